"""The service with its queue in Redis and in RabbitMQ, side by side in one run.

``python -m worker.bench brokers --model DIR --broker amqp://guest:guest@127.0.0.1:5672/bench``
starts the same worker layout on each broker in turn (records in the same Redis)
and measures what the broker costs a job: the submit as a producer sees it, the
wait of a lone job from submission to its start (delivery to an idle worker),
and throughput with p50/p95 at concurrency 8. ``--rounds 2`` alternates the
order, so the machine's drift favours neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from producer.evaluate import percentile
from worker.bench.service import LevelResult, queue_is_empty, run_level, start_workers

#: The load the issue asks the comparison at.
CONCURRENCY = 8


@dataclass
class BrokerRun:
    name: str
    lone: LevelResult
    loaded: LevelResult
    start_s: float


def run_broker(name: str, broker_url: str | None, *, model: str, dtype: str, layout: tuple[int, int],
               redis_url: str, texts: list[str], reply_tokens: int, lone_jobs: int,
               jobs_per_client: int) -> BrokerRun:
    """One broker: workers up, a warm-up, ``lone_jobs`` at concurrency 1, then the load at 8."""
    if not queue_is_empty(redis_url, broker_url):
        raise RuntimeError(f"the {name} queue is not empty: give the bench a Redis database and vhost of its own")
    count, threads = layout
    workers = start_workers(model, dtype, count, threads, redis_url, broker_url=broker_url)
    try:  # never leave model-holding workers behind
        run_level(redis_url, texts, 1, 2, reply_tokens, f"{name}: warm-up", broker_url)
        lone = run_level(redis_url, texts, 1, lone_jobs, reply_tokens, f"{name} c=1", broker_url)
        loaded = run_level(redis_url, texts, CONCURRENCY, jobs_per_client * CONCURRENCY, reply_tokens,
                           f"{name} c={CONCURRENCY}", broker_url)
    finally:
        workers.stop()
    return BrokerRun(name, lone, loaded, workers.start_s)


def table(runs: list[BrokerRun]) -> list[str]:
    """One row per run, then each measure of RabbitMQ as a ratio of Redis's (mean over rounds)."""
    lines = [f"| broker | jobs/min c={CONCURRENCY} | p50 ms c={CONCURRENCY} | p95 ms c={CONCURRENCY} | "
             "lone job: submission to start, p50 ms | submit p50 ms | submit p95 ms | failures |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        figures = measures(run)
        failures = sum(level.total - len(level.succeeded) for level in (run.lone, run.loaded))
        lines.append(f"| {run.name} | {figures['jobs/min']:.1f} | {figures['p50']:.0f} | {figures['p95']:.0f} | "
                     f"{figures['start wait']:.0f} | {figures['submit p50']:.1f} | {figures['submit p95']:.1f} | "
                     f"{failures} |")
    by_name: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(measures(run))
    if {"redis", "rabbitmq"} <= set(by_name):
        lines += ["", "RabbitMQ / Redis (mean of the rounds):"]
        for key in ("jobs/min", "p50", "p95", "start wait", "submit p50"):
            ours = sum(m[key] for m in by_name["rabbitmq"]) / len(by_name["rabbitmq"])
            theirs = sum(m[key] for m in by_name["redis"]) / len(by_name["redis"])
            lines.append(f"- {key}: {ours / theirs:.2f}" if theirs else f"- {key}: n/a")
    return lines


def measures(run: BrokerRun) -> dict[str, float]:
    loaded = [r.timings.total_ms for r in run.loaded.succeeded]
    submits = run.lone.submit_ms + run.loaded.submit_ms
    return {"jobs/min": run.loaded.jobs_per_minute, "p50": _pct(loaded, 50), "p95": _pct(loaded, 95),
            "start wait": _pct([r.timings.queue_wait_ms for r in run.lone.succeeded], 50),
            "submit p50": _pct(submits, 50), "submit p95": _pct(submits, 95)}


def _pct(values: list[float], q: float) -> float:
    found = percentile(values, q)
    return float("nan") if found is None else found
