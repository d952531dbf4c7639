"""Measure the service's sentiment on a labelled CSV, through the real queue.

``python -m producer eval FILE.csv`` sends every row as a job (so it measures
the deployed service, prompts, DTYPE and all), then reports accuracy, per-class
precision/recall/F1, the confusion matrix, the share of valid labels,
latency, and calibration (accuracy per confidence decile).
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from producer.client import Client
from jobqueue.errors import ProducerError
from jobqueue.protocol import LABEL_SETS, JobStatus

# Values of the label column that mean positive / negative / neutral (or the label words themselves).
_GOLD_ALIASES = (
    {"1", "pos", "positive", "正面"},
    {"0", "neg", "negative", "负面"},
    {"2", "neutral", "中性"},
)


@dataclass(frozen=True)
class Row:
    text: str
    #: Index in the label set: 0 positive, 1 negative, 2 neutral.
    gold: int
    #: What kind of text it is (a product category, a service): the domain column, or the file's name.
    domain: str = ""


@dataclass
class Prediction:
    text: str
    gold: str
    predicted: str | None
    confidence: float | None
    #: The model's probability of the positive label (two-class sets), for threshold sweeps.
    p_positive: float | None
    status: str
    sentiment_ms: float | None
    total_ms: float | None
    job_id: str | None
    #: What decided, as the record names it (``prompt:fewshot``, ``adapter:name@1a2b3c4d``).
    classifier: str | None = None


def read_rows(path: Path, text_column: str = "review", label_column: str = "label",
              domain_column: str = "cat") -> list[Row]:
    """The labelled rows of a CSV; each row's domain is its ``domain_column`` where the file has one,
    else the file's name (``waimai_10k.csv`` -> ``waimai_10k``)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        has_domain = domain_column in (reader.fieldnames or [])
        missing = {text_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: no column {sorted(missing)}; columns are {reader.fieldnames}")
        for line, record in enumerate(reader, start=2):
            value = record[label_column].strip().lower()
            gold = next((i for i, names in enumerate(_GOLD_ALIASES) if value in names), None)
            if gold is None:
                raise ValueError(f"{path}:{line}: label {record[label_column]!r} is not 1/0/2 or a label word")
            if record[text_column].strip():
                domain = record[domain_column].strip() if has_domain else Path(path).stem
                rows.append(Row(record[text_column].strip(), gold, domain))
    return rows


def balanced_sample(rows: list[Row], n: int, seed: int = 0) -> list[Row]:
    """``n`` rows split evenly across the classes present, the same for the same rows, n and seed."""
    rng = random.Random(seed)
    classes = sorted({row.gold for row in rows})
    sample = []
    for position, gold in enumerate(classes):
        members = [row for row in rows if row.gold == gold]
        take = n // len(classes) + (1 if position < n % len(classes) else 0)
        if len(members) < take:
            raise ValueError(f"too few rows of class {gold} for a balanced sample of {n}")
        sample += rng.sample(members, take)
    rng.shuffle(sample)
    return sample


def in_threads(items: list, work, concurrency: int, desc: str, unit: str) -> list:
    """``work(item)`` for every item on ``concurrency`` threads, with a progress bar; results in order."""
    progress = tqdm(total=len(items), desc=desc, unit=unit)
    lock = threading.Lock()

    def one(item):
        result = work(item)
        with lock:
            progress.update()
        return result

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, items))
    progress.close()
    return results


def run_eval(client: Client, rows: list[Row], labels: str, concurrency: int = 1, reply_tokens: int = 1,
             timeout: float = 600) -> list[Prediction]:
    words = LABEL_SETS[labels]
    if max(row.gold for row in rows) >= len(words):
        raise ValueError(f"the data has neutral rows but labels={labels!r} has no neutral label")

    def one(row: Row) -> Prediction:
        job_id = None
        try:
            # Bulk: an evaluation run never holds up interactive users.
            job_id = client.submit(row.text, labels=labels, max_new_tokens=reply_tokens, temperature=0.0,
                                   priority="bulk")
            record = client.wait(job_id, timeout=timeout)
        except ProducerError as err:  # QueueFull, WaitTimeout, ...: this row fails, the eval goes on
            return Prediction(text=row.text, gold=words[row.gold], predicted=None, confidence=None,
                              p_positive=None, status=type(err).__name__, sentiment_ms=None,
                              total_ms=None, job_id=job_id)
        sentiment = record.sentiment
        p_positive = None
        if sentiment and len(words) == 2:
            p_positive = sentiment.confidence if sentiment.label == words[0] else 1 - sentiment.confidence
        return Prediction(
            text=row.text, gold=words[row.gold], predicted=sentiment.label if sentiment else None,
            confidence=sentiment.confidence if sentiment else None, p_positive=p_positive,
            status=record.status.value, sentiment_ms=record.timings.sentiment_ms,
            total_ms=record.timings.total_ms, job_id=job_id,
            classifier=sentiment.classifier if sentiment else None,
        )

    return in_threads(rows, one, concurrency, "eval", "row")


def summarize(predictions: list[Prediction], labels: str) -> dict:
    words = LABEL_SETS[labels]
    total = len(predictions)
    correct = sum(p.predicted == p.gold for p in predictions)
    per_class = {}
    for word in words:
        tp = sum(p.predicted == word and p.gold == word for p in predictions)
        predicted = sum(p.predicted == word for p in predictions)
        actual = sum(p.gold == word for p in predictions)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[word] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    confusion = Counter((p.gold, p.predicted) for p in predictions)
    deciles = {}
    for p in predictions:
        if p.confidence is not None:
            deciles.setdefault(min(int(p.confidence * 10), 9), []).append(p.predicted == p.gold)
    latencies = [p.total_ms for p in predictions if p.total_ms is not None]
    sentiment_ms = [p.sentiment_ms for p in predictions if p.sentiment_ms is not None]
    return {
        "labels": labels,
        "rows": total,
        "accuracy": correct / total if total else 0.0,
        "valid_label_share": sum(p.predicted in words for p in predictions) / total if total else 0.0,
        "classifiers": dict(Counter(p.classifier for p in predictions if p.classifier)),
        "failed_jobs": sum(p.status != JobStatus.SUCCEEDED.value for p in predictions),
        "per_class": per_class,
        "confusion": {gold: {pred: confusion[(gold, pred)] for pred in words} for gold in words},
        "calibration": {f"{d / 10:.1f}-{(d + 1) / 10:.1f}": {"rows": len(v), "accuracy": sum(v) / len(v)}
                        for d, v in sorted(deciles.items())},
        "latency_ms": {
            "job_mean": statistics.mean(latencies) if latencies else None,
            "job_p95": percentile(latencies, 95),
            "sentiment_mean": statistics.mean(sentiment_ms) if sentiment_ms else None,
        },
        "threshold_sweep": threshold_sweep(predictions, words) if len(words) == 2 else None,
    }


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between ranks; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def threshold_sweep(predictions: list[Prediction], words: tuple[str, ...]) -> dict[str, float]:
    """Accuracy if "positive" were decided by p(positive) >= t, for t in 0.05 .. 0.95."""
    scored = [p for p in predictions if p.p_positive is not None]
    sweep = {}
    for step in range(1, 20):
        t = step / 20
        hits = sum((words[0] if p.p_positive >= t else words[1]) == p.gold for p in scored)
        sweep[f"{t:.2f}"] = hits / len(scored) if scored else 0.0
    return sweep


def format_summary(summary: dict) -> str:
    words = list(summary["per_class"])
    lat = {key: "n/a" if value is None else f"{value:.0f}" for key, value in summary["latency_ms"].items()}
    lines = [
        f"accuracy {summary['accuracy']:.3f} on {summary['rows']} rows (labels={summary['labels']}); "
        f"valid labels {100 * summary['valid_label_share']:.1f}%; failed jobs {summary['failed_jobs']}",
        f"latency per job: mean {lat['job_mean']} ms, p95 {lat['job_p95']} ms; "
        f"sentiment step mean {lat['sentiment_mean']} ms",
        "classifier: " + (", ".join(f"{name} ({rows} rows)" for name, rows in summary.get("classifiers", {}).items())
                          or "not reported"),
        "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
    ]
    for word, m in summary["per_class"].items():
        lines.append(f"| {word} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    lines += ["", "| gold \\ predicted | " + " | ".join(words) + " |", "|---" * (len(words) + 1) + "|"]
    for gold in words:
        lines.append(f"| {gold} | " + " | ".join(str(summary["confusion"][gold][p]) for p in words) + " |")
    lines += ["", "| confidence | rows | accuracy |", "|---|---|---|"]
    for band, c in summary["calibration"].items():
        lines.append(f"| {band} | {c['rows']} | {c['accuracy']:.3f} |")
    if summary["threshold_sweep"]:
        best = max(summary["threshold_sweep"].items(), key=lambda kv: kv[1])
        lines += ["", f"best POSITIVE_THRESHOLD on this data: {best[0]} (accuracy {best[1]:.3f}; "
                      f"at 0.50: {summary['threshold_sweep']['0.50']:.3f})"]
    return "\n".join(lines)


def write_report(path: Path, summary: dict, predictions: list[Prediction]) -> None:
    path.write_text(json.dumps({"summary": summary, "rows": [asdict(p) for p in predictions]},
                               ensure_ascii=False, indent=1))
