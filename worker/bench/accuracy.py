"""Sentiment accuracy of the engine per DTYPE, in process, on a fixed balanced sample."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from jobqueue.protocol import LABEL_SETS
from producer.evaluate import Row
from worker.engine.model_source import ModelSource


@dataclass
class AccuracyRow:
    dtype: str
    accuracy: float
    correct: int
    total: int
    mean_ms: float
    load_s: float


def measure_accuracy(source: ModelSource, dtype: str, examples: list[Row], threads: int,
                     engine: str = "torch") -> AccuracyRow:
    """The engine as the worker builds it by default, at the DTYPE given (llama.cpp: the GGUF's own)."""
    from worker.engine import load_engine

    started = time.perf_counter()
    loaded = load_engine(source, dtype, threads, engine=engine)
    load_s = time.perf_counter() - started
    name = f"llama.cpp, {loaded.dtype_name}" if engine == "llama.cpp" else dtype
    return _score(name, lambda text: loaded.classify_batch([(text, "zh")])[0].label, examples, load_s)


def measure_original_accuracy(source: ModelSource, examples: list[Row], threads: int) -> AccuracyRow:
    """The original pipeline's decision (float32, generate, substring search); no label counts as wrong."""
    from worker.bench.baseline import OriginalPipeline

    started = time.perf_counter()
    original = OriginalPipeline(source, threads)
    return _score("original pipeline (float32)", original.sentiment, examples, time.perf_counter() - started)


def _score(name: str, decide, examples: list[Row], load_s: float) -> AccuracyRow:
    words = LABEL_SETS["zh"]
    if any(example.gold >= len(words) for example in examples):
        raise ValueError("the accuracy bench is two-class: the data has neutral rows")
    correct = 0
    started = time.perf_counter()
    for example in tqdm(examples, desc=f"accuracy {name}", unit="review"):
        correct += decide(example.text) == words[example.gold]
    elapsed = time.perf_counter() - started
    return AccuracyRow(name, correct / len(examples), correct, len(examples), 1000 * elapsed / len(examples), load_s)


def format_accuracy(rows: list[AccuracyRow]) -> str:
    reference = next((row.accuracy for row in rows if row.dtype == "float32"), None)
    lines = ["| DTYPE | accuracy | vs float32 | correct | sentiment ms/review | load s |", "|---|---|---|---|---|---|"]
    for row in rows:
        delta = "" if reference is None else f"{100 * (row.accuracy - reference):+.1f} pt"
        lines.append(f"| {row.dtype} | {row.accuracy:.3f} | {delta} | {row.correct}/{row.total} | "
                     f"{row.mean_ms:.0f} | {row.load_s:.1f} |")
    return "\n".join(lines)
