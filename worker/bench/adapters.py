"""What a classifier adapter costs at serving time: memory, sentiment and reply speed, and the reply itself.

Each configuration (no adapter, then each adapter) loads in a process of its
own, so that its RSS is its own; the rows of one run are compared with each
other only.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from producer.evaluate import Row
from worker.bench import report

#: Greedy replies of this many tokens each, 8 at once.
REPLY_TOKENS = 32
REPLY_ROWS = 8


@dataclass
class AdapterCost:
    classifier: str
    load_s: float
    rss_bytes: int
    #: Mean ms of one job's sentiment pass alone, and per job in passes of 8.
    sentiment_ms_alone: float
    sentiment_ms_batched: float
    #: One decode of REPLY_ROWS greedy replies of REPLY_TOKENS tokens.
    reply_ms: float
    #: sha256 of the replies' token ids: equal means bit for bit the same replies.
    replies_sha256: str


def measure_one(model: str, adapter: str | None, dtype: str, threads: int, texts: list[str],
                rounds: int = 3, engine: str = "auto") -> AdapterCost:
    """In this process: load the engine (with ``adapter``), then time its sentiment and a batch of replies."""
    import psutil

    from worker.engine import ReplyRequest, load_engine
    from worker.engine.adapter import load_adapter
    from worker.engine.model_source import resolve_model_source

    started = time.perf_counter()
    engine = load_engine(resolve_model_source(model), dtype, threads, engine=engine,
                         adapter=load_adapter(adapter) if adapter else None,
                         kv_cache_tokens=REPLY_ROWS * 1024, max_rows=REPLY_ROWS)
    load_s = time.perf_counter() - started
    rss = psutil.Process().memory_info().rss
    engine.classify_batch([(texts[0], "zh")])  # warm-up
    alone, batched, replies = [], [], []
    for _ in range(rounds):
        alone += [_timed(lambda t=t: engine.classify_batch([(t, "zh")])) for t in texts]
        batched += [_timed(lambda i=i: engine.classify_batch([(t, "zh") for t in texts[i:i + 8]])) / 8
                    for i in range(0, len(texts) - 7, 8)]
    requests = [ReplyRequest(text=t, max_new_tokens=REPLY_TOKENS, min_new_tokens=REPLY_TOKENS, temperature=0.0)
                for t in texts[:REPLY_ROWS]]
    generated: dict[str, list[list[int]]] = {}

    def keep(rows: list[list[int]]) -> None:
        generated["rows"] = [list(row) for row in rows]

    for _ in range(rounds):
        replies.append(_timed(lambda: engine.reply_batch(requests, history_max_tokens=0, on_step=keep)))
    classifier = engine.classify_batch([(texts[0], "zh")])[0].classifier
    digest = hashlib.sha256(json.dumps(generated["rows"]).encode()).hexdigest()[:12]
    return AdapterCost(classifier, load_s, rss, statistics.median(alone), statistics.median(batched),
                       statistics.median(replies), digest)


def measure(model: str, adapters: list[str], dtype: str, threads: int, examples: list[Row],
            engine: str = "auto") -> list[AdapterCost]:
    """The plain engine, then each adapter, each in a fresh process."""
    texts = json.dumps([row.text for row in examples])
    results = []
    for adapter in [None, *adapters]:
        command = [sys.executable, "-m", "worker.bench", "adapter-one", "--model", model, "--dtype", dtype,
                   "--threads", str(threads), "--texts", texts, "--engine", engine]
        if adapter:
            command += ["--adapter", adapter]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(AdapterCost(**json.loads(done.stdout.strip().splitlines()[-1])))
    return results


def format_costs(costs: list[AdapterCost]) -> str:
    base = costs[0]
    lines = ["| classifier | RSS after load | RSS added | sentiment ms/job alone | vs prompt | "
             "sentiment ms/job in 8s | vs prompt | reply ms (8 x 32 tokens) | vs prompt | replies |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cost in costs:
        same = "the same" if cost.replies_sha256 == base.replies_sha256 else "DIFFERENT"
        lines.append(
            f"| {cost.classifier} | {report.mib(cost.rss_bytes)} | "
            f"{100 * (cost.rss_bytes / base.rss_bytes - 1):+.1f}% | {cost.sentiment_ms_alone:.1f} | "
            f"{cost.sentiment_ms_alone / base.sentiment_ms_alone:.3f} | {cost.sentiment_ms_batched:.1f} | "
            f"{cost.sentiment_ms_batched / base.sentiment_ms_batched:.3f} | {cost.reply_ms:.0f} | "
            f"{cost.reply_ms / base.reply_ms:.3f} | {same} |")
    return "\n".join(lines)


def cost_json(cost: AdapterCost) -> str:
    return json.dumps(asdict(cost))


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return 1000 * (time.perf_counter() - started)
