"""Running the book in Google Colab: keeping models, data and downloads in Google Drive.

Every chapter's first code cell installs the library when it runs in Colab and offers
``DRIVE = True``: a Colab runtime forgets its disk when it disconnects or is reset, and
every chapter opens in a runtime of its own, so without Drive chapter 4 trains again
what chapter 3 trained, and a fine-tune cut off by a disconnection starts from step 0.
With Drive, the model cache (``BADDIFF_CACHE``: models, and the checkpoints a training
resumes from), the data sets (``BADDIFF_DATA``: CIFAR-10) and the Hugging Face downloads
(``HF_HUB_CACHE``: ``google/ddpm-cifar10-32``) live in one folder of the reader's Drive.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["DRIVE_FOLDER", "keep_in_drive"]

#: Where in the reader's Drive the book keeps what it computes and downloads.
DRIVE_FOLDER = "MyDrive/baddiff"


def keep_in_drive(
    folder: str = DRIVE_FOLDER, *, mount_point: str = "/content/drive"
) -> Path:
    """Mount Google Drive (Colab asks the reader to allow it) and keep the book's files
    in ``folder``.

    Sets ``BADDIFF_CACHE``, ``BADDIFF_DATA`` and ``HF_HUB_CACHE`` to ``cache/``,
    ``data/`` and ``huggingface/`` inside ``mount_point/folder``, and returns that
    folder. Call it before the chapter's imports (the Colab cell does): the Hugging Face
    hub reads ``HF_HUB_CACHE`` when it is first imported.

    Raises:
        RuntimeError: not running in Google Colab (``google.colab`` cannot be imported).
    """
    try:
        from google.colab import drive
    except ImportError:
        raise RuntimeError(
            "keep_in_drive() runs in Google Colab only; elsewhere set BADDIFF_CACHE and "
            "BADDIFF_DATA to folders of your choice"
        ) from None
    drive.mount(mount_point)
    root = Path(mount_point) / folder
    places = {
        "BADDIFF_CACHE": root / "cache",
        "BADDIFF_DATA": root / "data",
        "HF_HUB_CACHE": root / "huggingface",
    }
    for variable, path in places.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)
    if "huggingface_hub" in sys.modules:
        print(
            "huggingface_hub was imported before keep_in_drive(): this runtime keeps its downloads on its "
            "own disk (restart the runtime to keep them in Drive)"
        )
    print(f"models, checkpoints, data and downloads are kept in {root}")
    return root
