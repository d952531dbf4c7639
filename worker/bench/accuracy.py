"""Sentiment accuracy of the engine per DTYPE, in process, on a fixed balanced sample."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from producer.protocol import LABEL_SETS
from worker.bench.data import Example
from worker.model_source import ModelSource


@dataclass
class AccuracyRow:
    dtype: str
    accuracy: float
    correct: int
    total: int
    mean_ms: float
    load_s: float


def measure_accuracy(source: ModelSource, dtype: str, examples: list[Example], threads: int) -> AccuracyRow:
    from worker.engine import QwenEngine

    started = time.perf_counter()
    engine = QwenEngine.load(source, dtype, threads)
    load_s = time.perf_counter() - started
    positive = LABEL_SETS["zh"][0]
    correct = 0
    started = time.perf_counter()
    for example in tqdm(examples, desc=f"accuracy {dtype}", unit="review"):
        correct += (engine.classify(example.text, "zh").label == positive) == example.positive
    elapsed = time.perf_counter() - started
    return AccuracyRow(dtype, correct / len(examples), correct, len(examples), 1000 * elapsed / len(examples), load_s)


def format_accuracy(rows: list[AccuracyRow]) -> str:
    reference = next((row.accuracy for row in rows if row.dtype == "float32"), None)
    lines = ["| DTYPE | accuracy | vs float32 | correct | sentiment ms/review | load s |", "|---|---|---|---|---|---|"]
    for row in rows:
        delta = "" if reference is None else f"{100 * (row.accuracy - reference):+.1f} pt"
        lines.append(f"| {row.dtype} | {row.accuracy:.3f} | {delta} | {row.correct}/{row.total} | "
                     f"{row.mean_ms:.0f} | {row.load_s:.1f} |")
    return "\n".join(lines)
