"""Export scikit-learn's handwritten digits as a table of devices for `skipfleet prepare --from`.

    pip install scikit-learn          # for this script only: skipfleet does not need it
    python docs/examples/digits_to_csv.py out/digits.csv

The data: `sklearn.datasets.load_digits`, shipped inside the scikit-learn wheel (no download):
1,797 handwritten digits 0-9 as 8x8 images of ink counts 0..16 (the test set of UCI's "Optical
Recognition of Handwritten Digits", written by 13 people). Columns of the CSV: `scanner` (the
device), `p00` .. `p77` (the 64 pixels, row by row) and `digit` (the label).

The devices: 12 document scanners. The digits are dealt to them at random (seeded), about 150
each. Scanners 0-9 see the images as they are; two do not:
- scanner-10's ink ribbon is worn: every pixel count is halved (rounded);
- scanner-11's paper feed is one line late: every image is shifted one pixel down (the top row
  blank).
Pre-train on some good scanners and hold the others out, and the two bad ones are what a fleet
meets in the field: a drift the base model never saw, which each device can fine-tune away.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

SCANNERS = 12
FADED, SHIFTED = 10, 11
SEED = 0


def scanner_images(images: np.ndarray, scanner: int) -> np.ndarray:
    """What `scanner` sees of `images` (n, 8, 8)."""
    if scanner == FADED:
        return np.round(images / 2)
    if scanner == SHIFTED:  # one pixel down; the new top row is blank paper
        shifted = np.zeros_like(images)
        shifted[:, 1:, :] = images[:, :-1, :]
        return shifted
    return images


def main(out: Path) -> None:
    digits = load_digits()
    scanner_of = np.random.default_rng(SEED).permutation(len(digits.target)) % SCANNERS
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["scanner", *(f"p{r}{c}" for r in range(8) for c in range(8)), "digit"])
        for scanner in range(SCANNERS):
            rows = np.flatnonzero(scanner_of == scanner)  # in the data set's order
            images = scanner_images(digits.images[rows], scanner)
            for image, digit in zip(images, digits.target[rows], strict=True):
                table.writerow([f"scanner-{scanner}", *image.astype(int).ravel(), digit])
    print(f"wrote {out}: {len(digits.target)} digits from {SCANNERS} scanners")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/digits_to_csv.py OUT.csv")
    main(Path(sys.argv[1]))
