"""A small digits network the project trains itself: features for a Fréchet distance,
and a classifier.

Introduced where the book first measures the clean utility of a (backdoored) model.

The paper measures clean utility with FID, the Fréchet distance between 2048-d
Inception-v3 features of generated and real images (BadDiffusion (Chou et al. 2023,
arXiv:2212.05400), Sec. 4). Inception weights must be downloaded, and they were trained
on photographs, not 8x8 digits. The book works offline on scikit-learn's bundled digits
(``sklearn.datasets.load_digits``: 1797 grey 8x8 images of the digits 0..9), so it uses
this small convolutional network instead, trained here on those digits and shipped with
the package:

* :meth:`DigitsNet.features` gives a 64-d feature vector per image, for a Fréchet
  distance ("FD with digits features"; its values are *not* comparable with published
  FIDs);
* :meth:`DigitsNet.forward` gives 10 logits, to ask "are the generated samples
  digit-like, and which digits are they?".

The weights live in ``baddiff_core/assets/digits_net.safetensors`` (safetensors, never
pickle) and the recipe with the held-out accuracy in
``baddiff_core/assets/digits_net.json``. Regenerate both with::

    python -m baddiff_core.features

Training is deterministic for a given seed (same machine, same torch version) and takes
a few seconds on a CPU.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_float, check_image_batch, check_int, check_positive_int
from .files import atomic_file, write_text_atomically

__all__ = [
    "INPUT_SIZE",
    "NUM_FEATURES",
    "ASSETS_DIR",
    "WEIGHTS_PATH",
    "RECIPE_PATH",
    "DigitsNet",
    "DigitsFeatureExtractor",
    "digits_images",
    "digits_split",
    "train_digits_net",
    "evaluate_accuracy",
    "load_digits_net",
    "load_digits_recipe",
    "regenerate",
]

#: Side, in pixels, that every input is resized to inside :class:`DigitsNet`.
INPUT_SIZE = 16
#: Dimension of :meth:`DigitsNet.features`.
NUM_FEATURES = 64
#: Smallest accepted input side (the digits themselves are 8x8).
MIN_SIZE = 8

#: The folder ``baddiff_core/assets`` of the installed package, which holds the
#: shipped weights and their recipe.
#:
#: :meta hide-value:
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
#: The shipped weights of :class:`DigitsNet`, ``assets/digits_net.safetensors``
#: (safetensors, never pickle), read by :func:`load_digits_net`.
#:
#: :meta hide-value:
WEIGHTS_PATH = ASSETS_DIR / "digits_net.safetensors"
#: The training recipe and held-out accuracy of the shipped weights,
#: ``assets/digits_net.json``, read by :func:`load_digits_recipe`.
#:
#: :meta hide-value:
RECIPE_PATH = ASSETS_DIR / "digits_net.json"

# ITU-R 601-2 luma weights (the ones PIL's "L" mode uses) for RGB -> grey.
_LUMA = (0.299, 0.587, 0.114)

# The training recipe of the shipped weights (train_digits_net's defaults).
_DEFAULT_EPOCHS = 40
_DEFAULT_LR = 1e-2
_DEFAULT_BATCH_SIZE = 64
_DEFAULT_WEIGHT_DECAY = 1e-4
_TEST_FRACTION = 0.2


def _check_images(images: object, name: str = "images") -> Tensor:
    """Validate a ``B,C,H,W`` float tensor with C in {1, 3} and H, W >= 8."""
    return check_image_batch(
        name, images, min_size=MIN_SIZE, value_range="[0, 1]", require_finite=False
    )


class DigitsNet(nn.Module):
    """A small CNN for grey digits: 64-d features and 10 logits.

    Architecture (28 330 parameters)::

        grey 16x16 -> conv3x3(16) GN ReLU -> conv3x3/2(32) GN ReLU -> conv3x3/2(64) GN ReLU  (4x4)
                   -> global average pool (64) -> linear(64) ReLU = features -> linear(10) = logits

    GroupNorm instead of BatchNorm, and no dropout, so the network computes the same
    function in ``train()`` and ``eval()`` mode and for any batch size.

    Input: ``B,C,H,W`` float images with values in [0, 1] (0 = black background, 1 =
    white stroke, as scikit-learn's digits scaled by 1/16), C in {1, 3}, H, W >= 8. RGB
    is converted to grey with the ITU-R 601-2 luma weights; images are resized to 16x16
    with ``F.interpolate(..., mode="bilinear", antialias=True)`` (skipped when already
    16x16).
    """

    num_features: int = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),  # 16x16 -> 8x8
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # 8x8 -> 4x4
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_layer = nn.Linear(64, NUM_FEATURES)
        self.head = nn.Linear(NUM_FEATURES, 10)

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """Images ``B,C,H,W`` in [0, 1] -> grey ``B,1,16,16`` (the network's own
        input)."""
        x = _check_images(x, "x")
        if x.shape[1] == 3:
            luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x, size=INPUT_SIZE, mode="bilinear", antialias=True, align_corners=False
            )
        return x

    def features(self, x: Tensor) -> Tensor:
        """64-d features ``(B, 64)`` of images ``B,C,H,W`` in [0, 1].

        Non-negative (after a ReLU, like Inception's pool features); a few are 0 for
        every digit (13 of 64 for the shipped weights), so feature covariances are
        singular, which the Fréchet distance handles.
        """
        x = self.prepare(x)
        x = x.to(self.head.weight.dtype)
        return F.relu(self.feature_layer(self.body(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, 10)`` over the digits 0..9 of images ``B,C,H,W`` in [0, 1]."""
        return self.head(self.features(x))


class DigitsFeatureExtractor(nn.Module):
    """Wraps a :class:`DigitsNet` so that ``forward`` returns its 64-d features.

    ``torchmetrics.image.fid.FrechetInceptionDistance(feature=module)`` calls
    ``module(images)`` and reads ``module.num_features``; a bare :class:`DigitsNet`
    would hand it the 10 logits instead.
    """

    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def digits_images(*, size: int = INPUT_SIZE) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 digits as float32 images in [0, 1] and their labels.

    Args:
        size: side in pixels; 8 gives the original images (values ``k/16``), other sizes are resized
            bilinearly exactly as :meth:`DigitsNet.prepare` does.

    Returns:
        ``(images, labels)``: ``(1797, 1, size, size)`` float32 in [0, 1] and ``(1797,)`` int64 in 0..9.
    """
    from baddiff_core.data import load_images

    size = check_int("size", size, minimum=4)
    # the diffusion models' data, in [-1, 1]
    images, labels = load_images("digits", size, with_labels=True)
    return ((images + 1) / 2).clamp(0.0, 1.0), labels


def digits_split(
    *, split_seed: int = 0, test_fraction: float = _TEST_FRACTION
) -> tuple[Tensor, Tensor]:
    """Indices of the train and held-out images of scikit-learn's digits.

    ``sklearn.model_selection.train_test_split`` of ``range(1797)``, stratified by
    label, with ``random_state=split_seed``: 1437 train and 360 held-out images for the
    default 20 %.

    Returns:
        ``(train_idx, test_idx)``, int64 tensors.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_float("test_fraction", test_fraction, above=0, below=1)
    labels = load_digits().target
    train_idx, test_idx = train_test_split(
        list(range(len(labels))),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=labels,
    )
    return torch.tensor(train_idx, dtype=torch.int64), torch.tensor(
        test_idx, dtype=torch.int64
    )


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts by -1, 0 or +1 px per axis (zero fill) and brightness scaling in
    [0.8, 1.2]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    shifted = padded[
        torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]
    ].unsqueeze(1)
    scale = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    return (shifted * scale).clamp(0.0, 1.0)


@torch.no_grad()
def evaluate_accuracy(
    net: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 512
) -> float:
    """Fraction of ``images`` (``B,C,H,W`` in [0, 1]) whose arg-max logit equals
    ``labels``."""
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = net(images[start : start + batch_size])
        correct += int(
            (logits.argmax(dim=1) == labels[start : start + batch_size]).sum()
        )
    return correct / len(images)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def train_digits_net(
    *,
    seed: int = 0,
    epochs: int = _DEFAULT_EPOCHS,
    lr: float = _DEFAULT_LR,
    batch_size: int = _DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> tuple[DigitsNet, dict[str, Any]]:
    """Train :class:`DigitsNet` on 80 % of scikit-learn's digits (CPU, a few seconds).

    Recipe: the 8x8 digits scaled to [0, 1] and upsampled to 16x16; a stratified 80/20
    split with ``split_seed = seed`` (:func:`digits_split`); AdamW (weight decay 1e-4)
    with a one-cycle learning rate peaking at ``lr``; cross-entropy; each batch
    augmented by random 1-px shifts and brightness scaling in [0.8, 1.2].
    Initialisation, shuffling and augmentation all draw from ``seed``
    (``torch.manual_seed`` and a ``torch.Generator``), and training runs on one CPU
    thread, so the weights are the same bits on every run with the same torch version
    and CPU instruction set.

    Returns:
        ``(net, recipe)``: the trained network in eval mode and a JSON-serialisable dict with the
        recipe, ``test_accuracy`` on the 360 held-out images and ``train_accuracy``.
    """
    seed = check_int("seed", seed, minimum=0)
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_float("lr", lr, above=0)

    # One CPU thread: multi-threaded kernels split their sums by thread count, so the
    # bits of the weights would otherwise depend on the machine's cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, recipe = _train(
            seed=seed, epochs=epochs, lr=lr, batch_size=batch_size, progress=progress
        )
    finally:
        torch.set_num_threads(threads)
    return net, recipe


def _train(
    *, seed: int, epochs: int, lr: float, batch_size: int, progress: bool
) -> tuple[DigitsNet, dict]:
    started = time.perf_counter()
    images, labels = digits_images(size=INPUT_SIZE)
    train_idx, test_idx = digits_split(split_seed=seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = DigitsNet()
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=lr, weight_decay=_DEFAULT_WEIGHT_DECAY
    )
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )

    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = _augment(x_train[batch], generator)
            loss = F.cross_entropy(net(x), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch)
        if progress and (epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            print(
                f"epoch {epoch + 1:3d}/{epochs}: train loss {total / len(x_train):.4f}"
            )

    net.eval().requires_grad_(False)
    test_accuracy = evaluate_accuracy(net, x_test, y_test)
    train_accuracy = evaluate_accuracy(net, x_train, y_train)
    seconds = time.perf_counter() - started
    if progress:
        print(
            f"held-out accuracy {test_accuracy:.4f} ({len(x_test)} images), {seconds:.1f} s"
        )

    import sklearn

    recipe: dict[str, Any] = {
        "model": "DigitsNet",
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "num_features": NUM_FEATURES,
        "input_size": INPUT_SIZE,
        "data": "sklearn.datasets.load_digits, values / 16, bilinear 8x8 -> 16x16",
        "seed": seed,
        "split_seed": seed,
        "split": "sklearn.model_selection.train_test_split(range(1797), stratify=labels)",
        "test_fraction": _TEST_FRACTION,
        "num_train": len(x_train),
        "num_test": len(x_test),
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": "AdamW",
        "lr": lr,
        "lr_schedule": "OneCycleLR",
        "weight_decay": _DEFAULT_WEIGHT_DECAY,
        "num_threads": 1,
        "augmentation": "random shift by -1/0/+1 px per axis (zero fill), brightness x U[0.8, 1.2]",
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "torch_version": torch.__version__,
        "sklearn_version": sklearn.__version__,
    }
    return net, recipe


# --------------------------------------------------------------------------- #
# Shipped weights
# --------------------------------------------------------------------------- #

_CACHE: dict[str, DigitsNet] = {}


def load_digits_recipe() -> dict[str, Any]:
    """The recipe and accuracy of the shipped weights (``assets/digits_net.json``)."""
    if not RECIPE_PATH.exists():
        raise FileNotFoundError(
            f"{RECIPE_PATH} is missing; regenerate it with `python -m baddiff_core.features`"
        )
    return json.loads(RECIPE_PATH.read_text())


def load_digits_net(device: str | torch.device | None = None) -> DigitsNet:
    """The shipped :class:`DigitsNet`, in eval mode with ``requires_grad_(False)``.

    Loaded with ``safetensors.torch.load_file`` (no pickle) from
    ``assets/digits_net.safetensors`` and cached per device, so repeated calls are
    cheap. The returned module is shared: do not modify it.

    Args:
        device: where to put the network; ``None`` means CPU.
    """
    from safetensors.torch import load_file

    device = torch.device("cpu" if device is None else device)
    key = str(device)
    if key not in _CACHE:
        if not WEIGHTS_PATH.exists():
            raise FileNotFoundError(
                f"{WEIGHTS_PATH} is missing; regenerate it with `python -m baddiff_core.features`"
            )
        net = DigitsNet()
        net.load_state_dict(load_file(str(WEIGHTS_PATH), device="cpu"))
        _CACHE[key] = net.to(device).eval().requires_grad_(False)
    return _CACHE[key]


def regenerate(*, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train the network and write ``assets/digits_net.safetensors`` and
    ``assets/digits_net.json``.

    Each file is written atomically (:mod:`baddiff_core.files`).
    Returns the recipe dict that was written.
    """
    from safetensors.torch import save_file

    net, recipe = train_digits_net(seed=seed, progress=progress)
    tensors = {
        name: t.detach().cpu().contiguous() for name, t in net.state_dict().items()
    }
    with atomic_file(WEIGHTS_PATH) as staging:
        save_file(
            tensors, str(staging), metadata={"format": "pt", "model": "DigitsNet"}
        )
    write_text_atomically(
        RECIPE_PATH, json.dumps(recipe, indent=2, sort_keys=True) + "\n"
    )
    _CACHE.clear()
    if progress:
        for p in (WEIGHTS_PATH, RECIPE_PATH):
            print(f"wrote {p} ({p.stat().st_size} bytes)")
    return recipe


if __name__ == "__main__":
    regenerate()
