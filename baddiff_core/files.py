"""Writing files and folders atomically: a reader sees the old one or the new one, never
half.

Models (:func:`baddiff_core.models.save_model`), cached tensors
(:func:`baddiff_core.cache.cached_tensors`), training checkpoints and benchmark results
take minutes to compute and seconds to write; a crash, a full disk or Ctrl-C during the
write must not leave something that looks finished. Each is therefore written under a
hidden name beside its final one and renamed into place (a rename within one file system
is atomic).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "atomic_file",
    "atomic_folder",
    "write_text_atomically",
    "check_output_folder",
    "folder_digests",
]


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an error, it becomes
    ``path``.

    The staging folder is a hidden sibling of ``path`` (same file system, so the final
    step is a rename). An existing ``path`` is first renamed aside, then the staging
    folder is renamed to ``path`` and the old one deleted, so ``path`` is never
    half-written. If the block raises, the staging folder is deleted and ``path`` is
    left as it was. The finished folder gets the usual permissions (temporary folders
    are created private).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        _make_readable(staging)
        if path.exists():
            retired = Path(
                tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent)
            )
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, the
    file written there replaces ``path``. If the block raises, it is deleted and
    ``path`` is left as it was. The finished file gets the usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o666 & ~_umask())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_file`; returns ``path``."""
    with atomic_file(path) as staging:
        staging.write_text(text)
    return Path(path)


def check_output_folder(
    path: str | os.PathLike, *, marker: str, overwrite: bool = False
) -> Path:
    """Check, before any long work, that a folder of results can be written at ``path``
    without destroying anything the user did not ask to replace.

    Writing replaces ``path`` whole (:func:`atomic_folder`), so it is refused when
    ``path``

    - is a file, or a non-empty folder without ``marker`` (the file this library writes
      into every folder of its kind, e.g. ``baddiff.json`` in a model): it was not
      written by us. With ``overwrite=True`` both are replaced;
    - is the current folder or a folder that holds it (never, whatever ``overwrite``
      says).

    Returns the absolute path.

    Raises:
        ValueError: one of the refusals above, naming the path and what to do.
        PermissionError: the folder that would receive ``path`` cannot be written.
    """
    # ".." and "a/../b" resolved, links kept
    target = Path(os.path.abspath(Path(path).expanduser()))
    here = Path.cwd().resolve()
    if target.resolve() == here or target.resolve() in here.parents:
        raise ValueError(
            f"output {str(path)!r} is the current folder or holds it; writing there would replace "
            "everything in it: name a new folder, e.g. runs/model"
        )
    if target.is_file() or target.is_symlink() and not target.is_dir():
        if not overwrite:
            raise ValueError(
                f"output {str(path)!r} is a file; refusing to replace it with a folder "
                "(pass --overwrite to replace it, or name a new folder)"
            )
    elif (
        target.is_dir()
        and any(target.iterdir())
        and not (target / marker).is_file()
        and not overwrite
    ):
        raise ValueError(
            f"output {str(path)!r} is a folder that holds other files and was not written by baddiff "
            f"(no {marker}); refusing to replace it (pass --overwrite to replace it, or name a new folder)"
        )
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"output {str(path)!r} cannot be created: {str(existing)!r} is a file, not a folder"
        )
    try:
        probe = Path(tempfile.mkdtemp(prefix=".baddiff-write-test-", dir=existing))
        probe.rmdir()
    except OSError as error:
        raise PermissionError(
            f"output {str(path)!r} cannot be written: {str(existing)!r} is not writable "
            f"({error.strerror})"
        ) from None
    return target


def folder_digests(
    folder: str | os.PathLike, *, exclude: tuple[str, ...] = ()
) -> dict[str, str]:
    """The SHA-256 (hex) of every file below ``folder``, by path relative to it
    ("unet/config.json"), except the top-level names in ``exclude``. Two folders with
    equal digests hold the same bytes."""
    folder = Path(folder)
    digests = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if name in exclude:
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[name] = digest.hexdigest()
    return digests


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _make_readable(folder: Path) -> None:
    umask = _umask()
    for item in [folder, *folder.rglob("*")]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
