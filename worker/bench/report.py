"""Markdown tables of the benchmark, in the shape of the original write-up's three tables."""

from __future__ import annotations

import statistics

from producer.evaluate import percentile
from worker.bench.service import LevelResult


def stage_table(records, baseline=None) -> str:
    """Latency per stage at concurrency 1; with a baseline, our p50 as a ratio to the original's."""
    stages = [
        ("queue wait", [r.timings.queue_wait_ms for r in records], None),
        ("sentiment", [r.timings.sentiment_ms for r in records], [b.sentiment_ms for b in baseline or []]),
        ("history build", [r.timings.history_ms for r in records], None),
        ("reply", [r.timings.reply_ms for r in records], [b.reply_ms for b in baseline or []]),
        ("total", [r.timings.total_ms for r in records], [b.total_ms for b in baseline or []]),
    ]
    head = "| stage | p50 ms | p95 ms |"
    rule = "|---|---|---|"
    if baseline:
        head += " original p50 ms | ours / original (p50) |"
        rule += "---|---|"
    lines = [head, rule]
    for name, ours, theirs in stages:
        line = f"| {name} | {_ms(percentile(ours, 50))} | {_ms(percentile(ours, 95))} |"
        if baseline:
            if theirs:
                ratio = percentile(ours, 50) / percentile(theirs, 50)
                line += f" {percentile(theirs, 50):.0f} | **{ratio:.2f}** (1/{1 / ratio:.1f}) |"
            else:
                line += " — | — |"
        lines.append(line)
    tokens = statistics.mean(r.tokens.generated_tokens or 0 for r in records) if records else 0.0
    lines.append(f"\n{len(records)} jobs; mean generated tokens {tokens:.1f}")
    return "\n".join(lines)


def level_table(levels: list[LevelResult], baseline_jobs_per_minute: float | None = None) -> str:
    head = "| concurrency | succeeded/total | mean ms | p95 ms | errors | jobs/min |"
    rule = "|---|---|---|---|---|---|"
    if baseline_jobs_per_minute:
        head += " vs original |"
        rule += "---|"
    lines = [head, rule]
    for level in levels:
        latencies = [r.timings.total_ms for r in level.succeeded]
        errors = ", ".join(f"{k} {v}" for k, v in level.errors.items()) or "0"
        line = (f"| {level.concurrency} | {len(level.succeeded)}/{level.total} | "
                f"{_ms(statistics.mean(latencies) if latencies else None)} | "
                f"{_ms(percentile(latencies, 95))} | {errors} | {level.jobs_per_minute:.1f} |")
        if baseline_jobs_per_minute:
            line += f" {level.jobs_per_minute / baseline_jobs_per_minute:.1f}x |"
        lines.append(line)
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"
