"""Tests of fxconet.data: built-in datasets, idx parsing, splits, loaders and their errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from fxconet.data import (
    DatasetInfo,
    TensorImageDataset,
    as_dataset,
    as_loader,
    available_datasets,
    dataset_info,
    load_dataset,
    make_loader,
    read_idx,
    train_val_split,
)
from fxconet.errors import DataError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def _stack(ds, n=None):
    n = len(ds) if n is None else n
    xs, ys = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def _write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def _write_fashion(root: Path, n_train: int = 6, n_test: int = 4, *, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            root / f"{prefix}-images-idx3-ubyte",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            gz=gz,
        )
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10, gz=gz)


# ----------------------------------------------------------------------------------- digits


def test_digits_split_sizes_shapes_and_labels():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1438, 359)
    x, y = train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 8, 8)
    assert isinstance(y, int)
    assert sorted(set(train.targets.tolist())) == list(range(10))
    assert sorted(set(test.targets.tolist())) == list(range(10))


def test_digits_is_deterministic_and_normalised():
    a, ya = _stack(load_dataset("digits"))
    b, yb = _stack(load_dataset("digits"))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    # The stored statistics are the training split's: mean 0 and std 1 after normalising.
    assert abs(float(a.mean())) < 1e-3
    assert abs(float(a.std()) - 1.0) < 1e-3


def test_digits_train_and_test_are_disjoint_images():
    train = load_dataset("digits").images.flatten(1)
    test = load_dataset("digits", split="test").images.flatten(1)
    shared = {bytes(r.numpy()) for r in train} & {bytes(r.numpy()) for r in test}
    # sklearn's digits contain a handful of exact duplicate bitmaps; a leak would be hundreds.
    assert len(shared) < 5


def test_digits_augment_crops_but_never_flips():
    plain = load_dataset("digits")
    aug = load_dataset("digits", augment=True)
    assert aug.flip is False and aug.pad == 1
    torch.manual_seed(0)
    xs = torch.stack([aug[0][0] for _ in range(50)])
    assert xs.shape == (50, 1, 8, 8)
    assert not all(torch.equal(x, plain[0][0]) for x in xs)
    assert any(torch.equal(x, plain[0][0]) for x in xs)  # offset (1, 1) is the identity crop


def test_dataset_info_without_loading():
    info = dataset_info("digits")
    assert info == DatasetInfo("digits", 10, 1, (8, 8), 1438, 359)
    assert dataset_info("cifar100", root="/nonexistent").num_classes == 100
    assert dataset_info("cifar10").image_size == (32, 32)
    fake = dataset_info("fake", num_classes=4, in_channels=1, image_size=(12, 16))
    assert (fake.num_classes, fake.in_channels, fake.image_size) == (4, 1, (12, 16))


def test_dataset_info_validates_fields():
    with pytest.raises(ValueError, match=r"DatasetInfo\.num_classes=0"):
        DatasetInfo("x", 0, 1, (8, 8))
    with pytest.raises(ValueError, match=r"DatasetInfo\.image_size=\(8,\)"):
        DatasetInfo("x", 2, 1, (8,))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- idx files


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write_idx(tmp_path / "x-idx3-ubyte", images, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    floats = np.array([[1.5, -2.0]], dtype=np.float32)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "f", floats, gz=gz)), floats)
    ints = np.array([1, -70000, 3], dtype=np.int32)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "i", ints, gz=gz)), ints)


def test_read_idx_errors_name_the_file(tmp_path):
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match=rf"{bad_magic}: not an idx file"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + b"\x00" * 10)
    with pytest.raises(DataError, match=rf"{truncated}: idx size mismatch.*needs 40 bytes"):
        read_idx(truncated)
    short_header = tmp_path / "short"
    short_header.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="header truncated"):
        read_idx(short_header)
    bad_gzip = tmp_path / "bad.gz"
    bad_gzip.write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(DataError, match=rf"{bad_gzip}: cannot read"):
        read_idx(bad_gzip)
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_tiny_idx_files(tmp_path, gz):
    _write_fashion(tmp_path, gz=gz)
    train = load_dataset("fashion-mnist", root=tmp_path)
    test = load_dataset("fashion-mnist", root=tmp_path, split="test")
    assert (len(train), len(test)) == (6, 4)
    expected = read_idx(next(tmp_path.glob("train-images-idx3-ubyte*")))
    x, y = train[2]
    assert tuple(x.shape) == (1, 28, 28) and y == 2
    torch.testing.assert_close(x[0], (torch.from_numpy(expected[2]) / 255 - 0.2860) / 0.3530)
    assert dataset_info("fashion-mnist", root=tmp_path).train_size == 6


def test_fashion_mnist_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope'}: fashion-mnist folder not found"):
        load_dataset("fashion-mnist", root=tmp_path / "nope")
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: file not found"):
        load_dataset("fashion-mnist", root=tmp_path, split="test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match=r"expected 4 labels"):
        load_dataset("fashion-mnist", root=tmp_path, split="test")


def test_fashion_mnist_from_the_debian_package():
    # Debian's dataset-fashion-mnist is a test dependency: fail loudly (no skip) when missing.
    assert FASHION_ROOT.is_dir(), f"{FASHION_ROOT} missing: apt-get install dataset-fashion-mnist"
    info = dataset_info("fashion-mnist")
    assert info == DatasetInfo("fashion-mnist", 10, 1, (28, 28), 60_000, 10_000)
    test = load_dataset("fashion-mnist", split="test")
    assert len(test) == 10_000
    x, y = test[0]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32
    assert y == 9  # the first test image is an ankle boot
    assert test.targets.bincount().tolist() == [1000] * 10
    train = load_dataset("fashion-mnist", augment=True)
    assert len(train) == 60_000 and train.flip and train.pad == 3
    assert train.targets[:3].tolist() == [9, 0, 0]


# ----------------------------------------------------------------------------------- CIFAR


def _write_cifar10(root: Path, n: int = 3, *, skip: str | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name == skip:
            continue
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(range(n)),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_cifar10_reads_the_python_batches(tmp_path):
    folder = _write_cifar10(tmp_path)
    train = load_dataset("cifar10", root=tmp_path)
    assert len(train) == 15 and train.targets.tolist() == [0, 1, 2] * 5
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][1]
    x, y = load_dataset("cifar10", root=folder, split="test")[1]  # the folder itself works too
    assert tuple(x.shape) == (3, 32, 32) and y == 1
    red = (torch.from_numpy(raw[:1024].reshape(32, 32)) / 255 - 0.4914) / 0.2470
    torch.testing.assert_close(x[0], red)


def test_cifar_errors_name_folder_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'cifar-10-batches-py'}: cifar10 folder"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path)
    _write_cifar10(tmp_path, skip="data_batch_3")
    with pytest.raises(DataError, match=r"cifar-10-batches-py: .*missing data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR batch file"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_cifar_batches_are_read_without_running_code(tmp_path):
    """A batch file is a pickle: one that names any global but numpy's arrays is refused."""
    folder = _write_cifar10(tmp_path)
    # the real files are Python 2 pickles of numpy arrays (protocol 2): they still load
    batch = pickle.loads((folder / "test_batch").read_bytes())
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert len(load_dataset("cifar10", root=tmp_path, split="test")) == 3
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match=r"refusing pathlib.*Path.touch"):
        load_dataset("cifar10", root=tmp_path, split="test")
    assert not marker.exists()


# ----------------------------------------------------------------------------------- imagefolder


def _write_imagefolder(root: Path) -> None:
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split in ("train", "val"):
        for cls, colour in colours.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20 + i, 10), colour).save(root / split / cls / f"{i}.png")


def test_imagefolder_resizes_and_uses_train_val(tmp_path):
    _write_imagefolder(tmp_path)
    train = load_dataset("imagefolder", root=tmp_path, image_size=16)
    val = load_dataset("imagefolder", root=tmp_path, split="test", image_size=(8, 12))
    assert len(train) == 4 and len(val) == 4
    x, y = train[3]
    assert tuple(x.shape) == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert float(x[2].mean()) > float(x[0].mean())  # "dog" images are blue
    assert tuple(val[0][0].shape) == (3, 8, 12)
    aug = load_dataset("imagefolder", root=tmp_path, augment=True, image_size=16)
    assert tuple(aug[0][0].shape) == (3, 16, 16)
    info = dataset_info("imagefolder", root=tmp_path)
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 3, (64, 64))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=r"needs its folder: root= \(--data-dir"):
        load_dataset("imagefolder")
    with pytest.raises(DataError, match=rf"{tmp_path}: no class sub-folders"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(DataError, match=r"image_size=0"):
        load_dataset("imagefolder", root=tmp_path, image_size=0)


# ----------------------------------------------------------------------------------- fake


def test_fake_is_deterministic_and_configurable():
    a, b = load_dataset("fake"), load_dataset("fake")
    assert len(a) == 512 and len(load_dataset("fake", split="test")) == 128
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert a.targets.bincount().tolist() == [52] * 2 + [51] * 8
    assert not torch.equal(a.images, load_dataset("fake", seed=1).images)
    small = load_dataset("fake", num_classes=3, in_channels=1, image_size=8, train_size=7)
    x, y = small[0]
    assert len(small) == 7 and tuple(x.shape) == (1, 8, 8) and 0 <= y < 3
    test = load_dataset("fake", split="test")
    assert not torch.equal(test.images[:8], a.images[:8])


# ----------------------------------------------------------------------------------- names


def test_unknown_name_split_and_option_errors():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'; valid names: cifar10, cifar100"):
        load_dataset("mnist")
    assert isinstance(DataError("x"), ValueError)
    with pytest.raises(DataError, match=r"unknown split 'val'"):
        load_dataset("digits", split="val")
    with pytest.raises(DataError, match=r"unknown option\(s\) colour; accepts none"):
        load_dataset("digits", colour=True)
    with pytest.raises(DataError, match=r"fake: num_classes=0 must be an int >= 1"):
        load_dataset("fake", num_classes=0)
    assert available_datasets() == [
        "cifar10",
        "cifar100",
        "digits",
        "fake",
        "fashion-mnist",
        "imagefolder",
    ]


# ----------------------------------------------------------------------------------- splits


def test_train_val_split_is_disjoint_complete_and_seeded():
    ds = load_dataset("digits")
    train, val = train_val_split(ds, 0.25, seed=3)
    assert (len(train), len(val)) == (1078, 360)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(len(ds)))
    again, _ = train_val_split(ds, 0.25, seed=3)
    other, _ = train_val_split(ds, 0.25, seed=4)
    assert again.indices == train.indices and other.indices != train.indices
    # Same seed and length: an augmented copy splits the same way.
    aug_train, _ = train_val_split(load_dataset("digits", augment=True), 0.25, seed=3)
    assert aug_train.indices == train.indices


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_train_val_split_rejects_bad_fractions(fraction):
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split(load_dataset("digits"), fraction, seed=0)


def test_train_val_split_keeps_one_item_each():
    ds = TensorDataset(torch.arange(3))
    train, val = train_val_split(ds, 0.01, seed=0)
    assert (len(train), len(val)) == (2, 1)
    with pytest.raises(DataError, match="1 item"):
        train_val_split(TensorDataset(torch.arange(1)), 0.5, seed=0)


# ----------------------------------------------------------------------------------- loaders


def _order(loader: DataLoader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_make_loader_is_seeded():
    ds = TensorDataset(torch.arange(50))
    a = make_loader(ds, batch_size=8, shuffle=True, seed=1)
    b = make_loader(ds, batch_size=8, shuffle=True, seed=1)
    c = make_loader(ds, batch_size=8, shuffle=True, seed=2)
    first = _order(a)
    assert first == _order(b) and first != _order(c)
    assert sorted(first) == list(range(50))
    assert _order(a) != first  # a new order every epoch, itself fixed by the seed
    assert _order(make_loader(ds, batch_size=8, shuffle=False, seed=0)) == list(range(50))
    assert len(make_loader(ds, batch_size=8, shuffle=False, seed=0, drop_last=True)) == 6
    with pytest.raises(DataError, match="batch_size=0"):
        make_loader(ds, batch_size=0, shuffle=False, seed=0)


def test_make_loader_with_workers_is_seeded():
    ds = load_dataset("digits", augment=True)
    sub = torch.utils.data.Subset(ds, range(64))

    def batch(seed: int) -> torch.Tensor:
        loader = make_loader(sub, batch_size=64, shuffle=True, seed=seed, num_workers=1)
        return next(iter(loader))[0]

    assert torch.equal(batch(5), batch(5))
    assert not torch.equal(batch(5), batch(6))


def test_as_dataset_and_as_loader_accept_three_forms():
    ds = load_dataset("digits", split="test")
    loader = make_loader(ds, batch_size=10, shuffle=False, seed=0)
    assert as_dataset(ds) is ds and as_dataset(loader) is ds
    assert len(as_dataset("digits", split="test")) == 359
    assert as_loader(loader) is loader
    assert as_loader(ds, batch_size=100).dataset is ds
    named = as_loader("fake", batch_size=64, split="test")
    assert isinstance(named.dataset, TensorImageDataset) and len(named) == 2
    with pytest.raises(DataError, match="expected a Dataset, a DataLoader or a dataset name"):
        as_dataset([1, 2, 3])  # type: ignore[arg-type]
