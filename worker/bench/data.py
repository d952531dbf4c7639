"""Fixed, balanced samples of a labelled CSV (label,review; 1 = positive)."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    text: str
    positive: bool


def balanced_sample(path: Path, n: int, seed: int = 0, text_column: str = "review",
                    label_column: str = "label") -> list[Example]:
    """``n`` rows, half positive and half negative, the same for the same file, n and seed."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [Example(row[text_column].strip(), row[label_column].strip() == "1") for row in csv.DictReader(f)]
    rows = [row for row in rows if row.text]
    rng = random.Random(seed)
    positives = [row for row in rows if row.positive]
    negatives = [row for row in rows if not row.positive]
    if len(positives) < n // 2 or len(negatives) < n - n // 2:
        raise ValueError(f"{path} has too few rows of one class for a balanced sample of {n}")
    sample = rng.sample(positives, n // 2) + rng.sample(negatives, n - n // 2)
    rng.shuffle(sample)
    return sample
