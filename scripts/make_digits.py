"""Regenerate ``fxconet/_data/digits.npz`` from scikit-learn's copy of the UCI digits.

The package ships the result so that ``fxconet.data.load_dataset("digits")`` needs neither
scikit-learn nor a network at run time. The split is fixed here, once, and stored in the file:
runtime code never re-derives it, so it cannot drift with NumPy's random streams.

Data: UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak, 1998), CC BY 4.0,
https://doi.org/10.24432/C50P49.

Usage::

    python scripts/make_digits.py [--out fxconet/_data/digits.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

SEED = 0
TEST_FRACTION = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "fxconet" / "_data" / "digits.npz",
        help="where to write the npz file",
    )
    args = parser.parse_args()

    digits = load_digits()
    # Pixel values are counts of set bits in 4x4 blocks of a 32x32 bitmap: integers 0..16.
    images = digits.images.astype(np.uint8)  # (N, 8, 8)
    labels = digits.target.astype(np.uint8)  # (N,)
    assert images.max() <= 16 and np.array_equal(images, digits.images)

    order = np.random.default_rng(SEED).permutation(len(labels))
    n_test = round(TEST_FRACTION * len(labels))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        test_images=images[test_idx],
        test_labels=labels[test_idx],
    )
    print(f"wrote {args.out}: {len(train_idx)} train, {len(test_idx)} test images")


if __name__ == "__main__":
    main()
