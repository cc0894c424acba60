"""Built-in datasets for channel searches, and the loaders the training loop uses.

Every dataset yields ``(image, label)`` pairs: a normalised ``float32`` tensor ``[C, H, W]`` and an
``int``. Names accepted by :func:`load_dataset`:

=================  ===========================================================================
``digits``         8x8 grey handwritten digits shipped inside the package (1438 train / 359 test)
``fashion-mnist``  28x28 grey Zalando articles from the four idx files under ``root``
``cifar10``        32x32 colour images, torchvision's ``cifar-10-batches-py`` folder under ``root``
``cifar100``       32x32 colour images, torchvision's ``cifar-100-python`` folder under ``root``
``imagefolder``    any ``torchvision.datasets.ImageFolder`` tree, resized to ``image_size``
``fake``           seeded class textures plus noise: learnable, instant, no files
=================  ===========================================================================

Nothing is ever downloaded. Every failure (unknown name, missing folder or file, malformed file)
raises :class:`fxconet.errors.DataError` with a one-line message naming the path.

Data attribution: ``digits`` is the UCI Machine Learning Repository's *Optical Recognition of
Handwritten Digits* (E. Alpaydin, C. Kaynak, 1998, https://doi.org/10.24432/C50P49), licensed
CC BY 4.0, in the preprocessed form scikit-learn distributes; see ``fxconet/_data/README.md``.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from fxconet.errors import DataError

__all__ = [
    "DatasetInfo",
    "TensorImageDataset",
    "as_dataset",
    "as_loader",
    "available_datasets",
    "dataset_info",
    "load_dataset",
    "make_loader",
    "read_idx",
    "train_val_split",
]

PathLike = str | os.PathLike[str]
SPLITS = ("train", "test")

_DATA_DIR = Path(__file__).resolve().parent / "_data"
_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
# Relative on purpose: torchvision's examples keep CIFAR under ./data.
_CIFAR_ROOT = "data"

# Per-channel statistics of the training splits, in [0, 1] pixel units. Digits and
# Fashion-MNIST were measured on the files fxconet reads; CIFAR and ImageNet are the usual values.
_DIGITS_STATS = ((0.3049,), (0.3759,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset before seeing it.

    Attributes:
        name: the dataset's name as :func:`load_dataset` accepts it.
        num_classes: number of labels; labels are ``0 .. num_classes - 1``.
        in_channels: image channels (1 for grey, 3 for colour).
        image_size: ``(H, W)`` of the tensors the dataset yields.
        train_size: images in the ``"train"`` split, ``None`` when unknown without a scan.
        test_size: images in the ``"test"`` split, ``None`` when unknown without a scan.

    Example:
        >>> info = dataset_info("digits")
        >>> info.num_classes, info.in_channels, info.image_size, info.train_size
        (10, 1, (8, 8), 1438)
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    train_size: int | None = None
    test_size: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"DatasetInfo.num_classes={self.num_classes!r}: must be >= 1")
        if self.in_channels < 1:
            raise ValueError(f"DatasetInfo.in_channels={self.in_channels!r}: must be >= 1")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(
                f"DatasetInfo.image_size={self.image_size!r}: must be (H, W) with H, W >= 1"
            )
        for field_name in ("train_size", "test_size"):
            value = getattr(self, field_name)
            if value is not None and value < 0:
                raise ValueError(f"DatasetInfo.{field_name}={value!r}: must be >= 0 or None")


class TensorImageDataset(Dataset[tuple[Tensor, int]]):
    """Images held in memory as one tensor, normalised (and optionally augmented) per item.

    The in-memory datasets (digits, Fashion-MNIST, CIFAR, fake) are all this class, so they share
    one augmentation: a random crop of the zero-padded image (zero is black in pixel units, i.e.
    the background of digits and Fashion-MNIST) and an optional horizontal flip. Randomness comes
    from torch's global generator, which :func:`fxconet.train.train` seeds and DataLoader workers
    seed per worker, so augmented runs are reproducible.

    Args:
        images: ``(N, C, H, W)`` pixels, any dtype; multiplied by ``scale`` to reach [0, 1] units.
        targets: ``(N,)`` integer labels.
        mean: per-channel mean subtracted after scaling.
        std: per-channel standard deviation divided by after subtracting the mean.
        scale: factor from stored pixel values to [0, 1] units (``1 / 255`` for uint8 images).
        augment: apply the random crop and flip.
        pad: zero padding of the random crop, in pixels.
        flip: flip horizontally with probability 1/2 when ``augment``.

    Attributes:
        images: the stored pixels, as given.
        targets: the labels as an ``int64`` tensor.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4),
        ...                         mean=(0.5,), std=(0.5,), scale=1 / 255)
        >>> x, y = ds[3]
        >>> tuple(x.shape), float(x.mean()), y
        ((1, 8, 8), -1.0, 3)
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: float = 1.0,
        augment: bool = False,
        pad: int = 0,
        flip: bool = False,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise DataError(
                f"images {tuple(images.shape)} and targets {tuple(targets.shape)}: "
                "expected (N, C, H, W) images and N labels"
            )
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise DataError(
                f"mean={mean!r}, std={std!r}: need one value per channel ({images.shape[1]})"
            )
        self.images = images
        self.targets = targets.to(torch.int64)
        self.scale = float(scale)
        self.augment = augment
        self.pad = int(pad)
        self.flip = flip
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index].to(torch.float32) * self.scale  # (C, H, W) in [0, 1] units
        if self.augment:
            x = self._augment(x)
        return (x - self._mean) / self._std, int(self.targets[index])

    def _augment(self, x: Tensor) -> Tensor:
        if self.pad > 0:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, top : top + h, left : left + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


# --------------------------------------------------------------------------------------------
# idx files (MNIST / Fashion-MNIST)

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read one idx file (the MNIST format), gzipped or not, into a NumPy array.

    Layout: two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number of dims, one
    big-endian uint32 per dim, then the values in C order.

    Args:
        path: the file; gzip is detected from its first two bytes, not from its name.

    Returns:
        The array with the file's shape and a native-endian dtype.

    Raises:
        DataError: the file is missing, unreadable, truncated or not idx.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(p).tolist()
        [7, 8, 9]
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (header bytes {raw[:4].hex() or 'missing'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: idx header truncated ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: idx size mismatch: shape {shape} of {dtype} needs {expected} bytes, "
            f"file has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path:
    # Debian installs *.gz in root; torchvision keeps raw files under FashionMNIST/raw.
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{root / stem}: file not found (also tried {stem}.gz and FashionMNIST/raw/)")


def _idx_stems(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _load_fashion_mnist(root: Path, split: str, augment: bool, options: dict[str, Any]) -> Dataset:
    _require_dir(root, "fashion-mnist", "the four *-idx?-ubyte(.gz) files")
    image_stem, label_stem = _idx_stems(split)
    image_path, label_path = _find_idx(root, image_stem), _find_idx(root, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{image_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{label_path}: expected {len(images)} labels for {image_path.name}, got shape "
            f"{labels.shape}"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"{label_path}: label {int(labels.max())} out of range 0..9")
    h = images.shape[1]
    return TensorImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28)
        torch.from_numpy(labels.astype(np.int64)),
        mean=_FASHION_STATS[0],
        std=_FASHION_STATS[1],
        scale=1 / 255,
        augment=augment,
        pad=h // 8,
        # Garments and shoes are (near) mirror-symmetric classes: a flip keeps the label.
        flip=True,
    )


def _info_fashion_mnist(root: Path, options: dict[str, Any]) -> DatasetInfo:
    _require_dir(root, "fashion-mnist", "the four *-idx?-ubyte(.gz) files")
    sizes = []
    for split in SPLITS:
        path = _find_idx(root, _idx_stems(split)[1])
        # The label file's header holds the count; reading it avoids decoding 47 MB of pixels.
        sizes.append(len(read_idx(path)))
    return DatasetInfo("fashion-mnist", 10, 1, (28, 28), sizes[0], sizes[1])


# --------------------------------------------------------------------------------------------
# digits (embedded)


def _load_digits(root: Path | None, split: str, augment: bool, options: dict[str, Any]) -> Dataset:
    path = _DATA_DIR / "digits.npz"
    try:
        with np.load(path) as npz:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(
            f"{path}: cannot read the embedded digits ({e}); reinstall fxconet or run "
            "scripts/make_digits.py"
        ) from e
    return TensorImageDataset(
        torch.from_numpy(images).unsqueeze(1),  # (N, 1, 8, 8), values 0..16
        torch.from_numpy(labels.astype(np.int64)),
        mean=_DIGITS_STATS[0],
        std=_DIGITS_STATS[1],
        scale=1 / 16,
        augment=augment,
        pad=1,
        # Digits are not mirror-symmetric (a flipped 2, 3 or 7 is no digit): never flip.
        flip=False,
    )


def _info_digits(root: Path | None, options: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo("digits", 10, 1, (8, 8), 1438, 359)


# --------------------------------------------------------------------------------------------
# CIFAR (torchvision's python-pickle layout, parsed here so that errors can name what's missing)

_CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
        _CIFAR10_STATS,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100, _CIFAR100_STATS),
}


def _cifar_folder(name: str, root: Path) -> Path:
    folder_name = _CIFAR_LAYOUT[name][0]
    # Accept both torchvision's root (parent of the folder) and the folder itself.
    folder = root if root.name == folder_name else root / folder_name
    if not folder.is_dir():
        raise DataError(
            f"{folder}: {name} folder not found; put torchvision's {folder_name}/ (from the "
            f"CIFAR python archive) under {str(root)!r} (root= / --data-dir); fxconet never "
            "downloads"
        )
    return folder


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds (dicts, lists, bytes, numbers and numpy arrays) and
    refuses every other global, so a crafted batch file cannot run code."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR batch holds only arrays, lists and bytes"
            )
        return super().find_class(module, name)


def _load_cifar(name: str, root: Path, split: str, augment: bool) -> Dataset:
    folder_name, train_files, test_files, label_key, num_classes, stats = _CIFAR_LAYOUT[name]
    folder = _cifar_folder(name, root)
    files = train_files if split == "train" else test_files
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder}: {name} {split} split incomplete, missing {', '.join(missing)}")
    images, labels = [], []
    for file_name in files:
        path = folder / file_name
        try:
            with open(path, "rb") as f:
                batch = _SafeUnpickler(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: not a CIFAR batch file ({type(e).__name__}: {e})") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels[-1]):
            raise DataError(
                f"{path}: expected data (N, 3072) and N labels, got {data.shape} and "
                f"{len(labels[-1])} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32))  # rows are stored channel-major: R, G, B
    targets = np.concatenate(labels)
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise DataError(f"{folder}: labels outside 0..{num_classes - 1}")
    return TensorImageDataset(
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(targets),
        mean=stats[0],
        std=stats[1],
        scale=1 / 255,
        augment=augment,
        pad=4,
        flip=True,
    )


def _info_cifar(name: str) -> DatasetInfo:
    num_classes = _CIFAR_LAYOUT[name][4]
    return DatasetInfo(name, num_classes, 3, (32, 32), 50_000, 10_000)


# --------------------------------------------------------------------------------------------
# ImageFolder


def _image_size(value: Any, option: str = "image_size") -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise DataError(f"{option}={value!r}: expected an int or (H, W) with H, W >= 1")
    return size  # type: ignore[return-value]


def _imagefolder_dir(root: Path, split: str) -> Path:
    _require_dir(root, "imagefolder", "one sub-folder per class (or train/ and val/)")
    names = ("train",) if split == "train" else ("val", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def _imagefolder_classes(folder: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders found (ImageFolder needs root/<class>/*)")
    return classes


def _load_imagefolder(root: Path, split: str, augment: bool, options: dict[str, Any]) -> Dataset:
    from torchvision import datasets
    from torchvision.transforms import v2

    size = _image_size(options.get("image_size", 64))
    folder = _imagefolder_dir(root, split)
    _imagefolder_classes(folder)
    steps: list[Callable[..., Any]] = [v2.ToImage(), v2.Resize(size, antialias=True)]
    if augment:
        steps += [v2.RandomCrop(size, padding=max(size) // 8), v2.RandomHorizontalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*_IMAGENET_STATS)]
    try:
        return datasets.ImageFolder(str(folder), transform=v2.Compose(steps))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{folder}: not a usable ImageFolder ({e})") from e


def _info_imagefolder(root: Path, options: dict[str, Any]) -> DatasetInfo:
    size = _image_size(options.get("image_size", 64))
    classes = _imagefolder_classes(_imagefolder_dir(root, "train"))
    return DatasetInfo("imagefolder", len(classes), 3, size)


# --------------------------------------------------------------------------------------------
# fake

_FAKE_DEFAULTS: dict[str, Any] = {
    "num_classes": 10,
    "in_channels": 3,
    "image_size": 32,
    "train_size": 512,
    "test_size": 128,
    "seed": 0,
    "noise": 1.0,
}


def _fake_options(options: dict[str, Any]) -> dict[str, Any]:
    opts = {**_FAKE_DEFAULTS, **options}
    for key, least in (("num_classes", 1), ("in_channels", 1), ("train_size", 0), ("test_size", 0)):
        if not isinstance(opts[key], int) or opts[key] < least:
            raise DataError(f"fake: {key}={opts[key]!r} must be an int >= {least}")
    opts["image_size"] = _image_size(opts["image_size"])
    if not opts["noise"] >= 0:
        raise DataError(f"fake: noise={opts['noise']!r} must be >= 0")
    return opts


def _load_fake(root: Path | None, split: str, augment: bool, options: dict[str, Any]) -> Dataset:
    o = _fake_options(options)
    k, c, (h, w) = o["num_classes"], o["in_channels"], o["image_size"]
    n = o["train_size"] if split == "train" else o["test_size"]
    # Each class is a striped texture (a sinusoidal grating with its own orientation, frequency
    # and channel mix) plus its own mean colour. The phase is random per image, so the classes
    # are translation-invariant textures that a conv net with global pooling learns in a few
    # epochs, and random crops keep the label. The class parameters depend only on the seed;
    # the splits draw labels, phases and noise from distinct seeds, so "test" is held out.
    g = torch.Generator().manual_seed(o["seed"] * 1_000_003)
    angle = (torch.arange(k) + torch.rand(k, generator=g)) * math.pi / k  # (K,)
    freq = 0.08 + 0.17 * torch.rand(k, generator=g)  # cycles per pixel, (K,)
    mix = F.normalize(torch.randn(k, c, generator=g), dim=1) * math.sqrt(c)  # (K, C)
    colour = 0.5 * torch.randn(k, c, generator=g)  # (K, C)
    g = torch.Generator().manual_seed(o["seed"] * 1_000_003 + 1 + SPLITS.index(split))
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (H, W)
    a, f = angle[labels].view(-1, 1, 1), freq[labels].view(-1, 1, 1)
    wave = torch.sin(2 * math.pi * f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)  # (N, H, W)
    images = colour[labels].view(n, c, 1, 1) + mix[labels].view(n, c, 1, 1) * wave.unsqueeze(1)
    images = images + o["noise"] * torch.randn(n, c, h, w, generator=g)  # (N, C, H, W)
    return TensorImageDataset(
        images,
        labels,
        mean=(0.0,) * c,
        std=(1.0,) * c,
        augment=augment,
        pad=max(h, w) // 8,
        # A flip mirrors a grating's orientation into another class's: never flip.
        flip=False,
    )


def _info_fake(root: Path | None, options: dict[str, Any]) -> DatasetInfo:
    o = _fake_options(options)
    return DatasetInfo(
        "fake", o["num_classes"], o["in_channels"], o["image_size"], o["train_size"], o["test_size"]
    )


# --------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class _Builtin:
    load: Callable[[Any, str, bool, dict[str, Any]], Dataset]
    info: Callable[[Any, dict[str, Any]], DatasetInfo]
    default_root: str | None
    needs_root: bool
    options: tuple[str, ...] = ()


_BUILTINS: dict[str, _Builtin] = {
    "digits": _Builtin(_load_digits, _info_digits, None, False),
    "fashion-mnist": _Builtin(_load_fashion_mnist, _info_fashion_mnist, _FASHION_MNIST_ROOT, True),
    "cifar10": _Builtin(
        lambda r, s, a, o: _load_cifar("cifar10", r, s, a),
        lambda r, o: _info_cifar("cifar10"),
        _CIFAR_ROOT,
        True,
    ),
    "cifar100": _Builtin(
        lambda r, s, a, o: _load_cifar("cifar100", r, s, a),
        lambda r, o: _info_cifar("cifar100"),
        _CIFAR_ROOT,
        True,
    ),
    "imagefolder": _Builtin(_load_imagefolder, _info_imagefolder, None, True, ("image_size",)),
    "fake": _Builtin(_load_fake, _info_fake, None, False, tuple(_FAKE_DEFAULTS)),
}


def available_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts.

    Example:
        >>> available_datasets()
        ['cifar10', 'cifar100', 'digits', 'fake', 'fashion-mnist', 'imagefolder']
    """
    return sorted(_BUILTINS)


def _require_dir(root: Path, name: str, what: str) -> None:
    if not root.is_dir():
        raise DataError(
            f"{root}: {name} folder not found (expected {what}); pass its folder with root= "
            "(--data-dir on the command line)"
        )


def _resolve(
    name: str, root: PathLike | None, options: Mapping[str, Any]
) -> tuple[_Builtin, Path | None]:
    if not isinstance(name, str) or name not in _BUILTINS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(available_datasets())}")
    spec = _BUILTINS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise DataError(
            f"dataset {name!r}: unknown option(s) {', '.join(unknown)}; accepts {allowed}"
        )
    if root is None:
        root = spec.default_root
    if root is None and spec.needs_root:
        raise DataError(
            f"dataset {name!r} needs its folder: root= (--data-dir on the command line)"
        )
    return spec, None if root is None else Path(root).expanduser()


def load_dataset(
    name: str,
    *,
    root: PathLike | None = None,
    split: str = "train",
    augment: bool = False,
    **options: Any,
) -> Dataset:
    """Load a built-in dataset by name.

    Augmentation (``augment=True``, meant for training splits) is a random crop of the image
    zero-padded by 1/8 of its size (1 pixel for digits, 3 for Fashion-MNIST, 4 for CIFAR), plus a
    horizontal flip for Fashion-MNIST, CIFAR and image folders. Digits are never flipped (mirror
    images of digits are not digits), nor are the fake templates.

    Args:
        name: one of :func:`available_datasets`.
        root: folder holding the files. Defaults: ``/usr/share/datasets/fashion-mnist`` (Debian's
            ``dataset-fashion-mnist``), ``./data`` for CIFAR (the folder that holds
            ``cifar-10-batches-py/`` or ``cifar-100-python/``); required for ``imagefolder``,
            whose ``train/`` and ``val/`` (or ``test/``) sub-folders are used when present;
            ignored for ``digits`` and ``fake``.
        split: ``"train"`` or ``"test"``.
        augment: apply training-time augmentation.
        **options: ``imagefolder``: ``image_size`` (int or ``(H, W)``, default 64). ``fake``:
            ``num_classes`` (10), ``in_channels`` (3), ``image_size`` (32), ``train_size``
            (512), ``test_size`` (128), ``seed`` (0), ``noise`` (1.0).

    Returns:
        A map-style dataset of ``(float32 [C, H, W], int)`` pairs.

    Raises:
        DataError: unknown name, split or option; missing or malformed folder or file.

    Example:
        >>> ds = load_dataset("digits", split="test")
        >>> len(ds), tuple(ds[0][0].shape)
        (359, (1, 8, 8))
    """
    spec, path = _resolve(name, root, options)
    if split not in SPLITS:
        raise DataError(f"dataset {name!r}: unknown split {split!r}; valid splits: train, test")
    return spec.load(path, split, augment, dict(options))


def dataset_info(name: str, *, root: PathLike | None = None, **options: Any) -> DatasetInfo:
    """Describe a built-in dataset without loading its images.

    Sizes come from file headers (Fashion-MNIST) or are known constants (digits, CIFAR);
    ``imagefolder`` lists its class folders and leaves the sizes ``None``.

    Args:
        name: one of :func:`available_datasets`.
        root: as for :func:`load_dataset`.
        **options: as for :func:`load_dataset`.

    Returns:
        The dataset's :class:`DatasetInfo`.

    Raises:
        DataError: as for :func:`load_dataset`.

    Example:
        >>> dataset_info("fake", num_classes=4, image_size=16).image_size
        (16, 16)
    """
    spec, path = _resolve(name, root, options)
    return spec.info(path, dict(options))


def train_val_split(dataset: Dataset, val_fraction: float, *, seed: int) -> tuple[Subset, Subset]:
    """Split a dataset into disjoint training and validation subsets, reproducibly.

    The permutation depends only on ``len(dataset)`` and ``seed``. To validate without
    augmentation, split an augmented and a plain copy of the same data with the same seed and
    take the training part of the first and the validation part of the second: the indices match.

    Args:
        dataset: any map-style dataset with ``len``.
        val_fraction: share of the items held out, in (0, 1); rounded, at least one item each.
        seed: seed of the permutation.

    Returns:
        ``(train, val)`` subsets.

    Raises:
        DataError: ``val_fraction`` outside (0, 1) or a dataset too small to split.

    Example:
        >>> train, val = train_val_split(load_dataset("digits"), 0.1, seed=0)
        >>> len(train), len(val)
        (1294, 144)
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r}: must be in (0, 1)")
    n = len(dataset)  # type: ignore[arg-type]
    if n < 2:
        raise DataError(f"cannot split a dataset of {n} item(s) into train and validation")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; carry that seed to NumPy and random
    # so that user transforms drawing from them are reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Wrap a dataset in a DataLoader whose order and worker seeds depend only on ``seed``.

    Args:
        dataset: a map-style dataset.
        batch_size: items per batch, >= 1.
        shuffle: reshuffle every epoch (the sequence of orders is fixed by ``seed``).
        seed: seed of the loader's own generator; the global RNG is not touched.
        num_workers: worker processes (0 loads in the main process).
        drop_last: drop the last incomplete batch.

    Returns:
        The DataLoader (pinned memory when CUDA is available).

    Raises:
        DataError: an empty dataset, ``batch_size < 1`` or ``num_workers < 0``.

    Example:
        >>> loader = make_loader(load_dataset("digits"), batch_size=64, shuffle=True, seed=0)
        >>> tuple(next(iter(loader))[0].shape)
        (64, 1, 8, 8)
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}: must be >= 1")
    if num_workers < 0:
        raise DataError(f"num_workers={num_workers!r}: must be >= 0")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise DataError(f"{type(dataset).__name__} is empty: nothing to load")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


def data_fingerprint(data: Any, samples: int = 16) -> str | None:
    """A short hash of a dataset (or a DataLoader's): its type, length and ``samples`` evenly
    spaced items, read under a fixed random seed (augmentation does not change it). A search's
    checkpoints record it, so resuming on other data is refused. None for data without a length.

    Example:
        >>> data_fingerprint(load_dataset("digits")) == data_fingerprint(load_dataset("digits"))
        True
    """
    import hashlib

    if data is None:
        return None
    extra = ""
    if isinstance(data, DataLoader):
        extra = f"batch {data.batch_size}"
        data = data.dataset
    try:
        n = len(data)
    except TypeError:
        return None
    h = hashlib.sha256(f"{type(data).__name__} {n} {extra}".encode())
    state = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        try:
            for i in sorted({int(k) for k in np.linspace(0, n - 1, min(samples, n))}):
                for part in _flat_items(data[i]):
                    h.update(part)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
    return h.hexdigest()[:16]


def _flat_items(item: Any) -> list[bytes]:
    if isinstance(item, Tensor):
        return [item.detach().cpu().contiguous().numpy().tobytes()]
    if isinstance(item, tuple | list):
        return [b for x in item for b in _flat_items(x)]
    return [repr(item).encode()]


def as_dataset(
    data: Dataset | DataLoader | str,
    *,
    split: str = "train",
    augment: bool = False,
    root: PathLike | None = None,
) -> Dataset:
    """Return the dataset behind a Dataset, a DataLoader or a built-in dataset name.

    Args:
        data: a map-style dataset (returned as is), a DataLoader (its ``.dataset``) or a name
            for :func:`load_dataset`.
        split: split to load when ``data`` is a name.
        augment: augmentation when ``data`` is a name.
        root: root folder when ``data`` is a name.

    Returns:
        The dataset.

    Raises:
        DataError: ``data`` is none of the three, or the name cannot be loaded.

    Example:
        >>> len(as_dataset("digits", split="test"))
        359
    """
    if isinstance(data, str):
        return load_dataset(data, root=root, split=split, augment=augment)
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    raise DataError(
        f"expected a Dataset, a DataLoader or a dataset name, got {type(data).__name__}"
    )


def as_loader(
    data: Dataset | DataLoader | str,
    *,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    split: str = "train",
    augment: bool = False,
    root: PathLike | None = None,
) -> DataLoader:
    """Return a DataLoader for a Dataset, a DataLoader or a built-in dataset name.

    A DataLoader is returned unchanged (its batch size, sampler and workers are the caller's
    choice); a dataset or name is wrapped with :func:`make_loader`.

    Args:
        data: what to load.
        batch_size: as for :func:`make_loader`.
        shuffle: as for :func:`make_loader`.
        seed: as for :func:`make_loader`.
        num_workers: as for :func:`make_loader`.
        drop_last: as for :func:`make_loader`.
        split: as for :func:`as_dataset`.
        augment: as for :func:`as_dataset`.
        root: as for :func:`as_dataset`.

    Returns:
        The DataLoader.

    Raises:
        DataError: as for :func:`as_dataset` and :func:`make_loader`.

    Example:
        >>> len(as_loader("digits", batch_size=100))
        15
    """
    if isinstance(data, DataLoader):
        return data
    return make_loader(
        as_dataset(data, split=split, augment=augment, root=root),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        drop_last=drop_last,
    )
