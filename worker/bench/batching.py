"""Batching on and off, side by side in one run: throughput, latency and memory per concurrency.

Both modes run the same workers, inputs and reply length; only BATCH_MAX
differs. The original single-process pipeline is timed in the same run, so
every figure can be read as a ratio.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import psutil
from tqdm import tqdm

from producer.evaluate import percentile
from worker.bench.report import mib
from worker.bench.service import LevelResult, RssSampler, run_level, start_workers


@dataclass
class Mode:
    name: str
    batch_max: int
    levels: list[LevelResult]
    start_s: float
    rss_loaded: int
    rss_peak: int


def run_modes(model: str, dtype: str, layout: tuple[int, int], redis_url: str, texts: list[str],
              levels: list[int], reply_tokens: int, batch_max: int, batch_wait_ms: float,
              c1_jobs: int, jobs_per_client: int, names: list[str]) -> list[Mode]:
    modes = []
    count, threads = layout
    sizes = {"off": 1, "on": batch_max}
    for name in names:  # in the order given: rounds alternate it, so drift favours neither mode
        size = sizes[name]
        env = {"BATCH_MAX": str(size), "BATCH_WAIT_MS": str(batch_wait_ms)}
        workers = start_workers(model, dtype, count, threads, redis_url, env=env)
        try:  # never leave model-holding workers behind
            loaded = workers.rss_bytes()
            run_level(redis_url, texts, 1, 2, reply_tokens, f"{name}: warm-up")
            with RssSampler(workers) as sampler:
                results = [run_level(redis_url, texts, c, c1_jobs if c == 1 else jobs_per_client * c, reply_tokens,
                                     f"batching {name} c={c}") for c in levels]
        finally:
            workers.stop()
        modes.append(Mode(name, size, results, workers.start_s, loaded, sampler.peak))
    return sorted(modes, key=lambda mode: mode.batch_max)


def rounds_summary(rounds: list[list[Mode]]) -> list[str]:
    """Each round's two latency targets, and their medians: tells a real gap from the machine's drift."""
    lines = ["| round | order | p50 c=1 on / off | p95 c=8 on / p50 c=1 on |", "|---|---|---|---|"]
    gaps, spreads = [], []
    for number, (off, on) in enumerate(rounds, start=1):
        p50 = {mode.name: percentile([r.timings.total_ms for r in _level(mode, 1).succeeded], 50)
               for mode in (off, on)}
        gap = p50["on"] / p50["off"]
        spread = percentile([r.timings.total_ms for r in _level(on, 8).succeeded], 95) / p50["on"]
        gaps.append(gap)
        spreads.append(spread)
        order = "off, on" if number % 2 else "on, off"
        lines.append(f"| {number} | {order} | {gap:.3f} | {spread:.2f} |")
    lines.append(f"| median | | **{statistics.median(gaps):.3f}** (target ≤ 1.05) | "
                 f"**{statistics.median(spreads):.2f}** (target ≤ 2) |")
    return lines


def _level(mode: Mode, concurrency: int):
    return next(level for level in mode.levels if level.concurrency == concurrency)


def baseline_jobs_per_minute(model: str, threads: int, texts: list[str], reply_tokens: int, jobs: int) -> float:
    """The original pipeline, sequentially in this process: its jobs per minute."""
    from worker.bench.baseline import OriginalPipeline
    from worker.model_source import resolve_model_source

    original = OriginalPipeline(resolve_model_source(model), threads)
    original.run(texts[0], 4)  # warm-up
    timings = [original.run(texts[i % len(texts)], reply_tokens)
               for i in tqdm(range(jobs), desc="original pipeline", unit="job", leave=False)]
    return 60_000 / statistics.mean(t.total_ms for t in timings)


def level_table(modes: list[Mode], baseline_rpm: float | None) -> str:
    """One row per concurrency: each mode's throughput and latency, then on/off and on/original ratios."""
    names = [mode.name for mode in modes]
    head = "| concurrency | " + " | ".join(
        f"jobs/min {n} | p50 ms {n} | p95 ms {n} | mean batch {n} | failures {n}" for n in names)
    if len(modes) == 2:
        head += " | on / off (jobs/min)"
    if baseline_rpm:
        head += f" | {names[-1]} / original (jobs/min)"
    head += " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for levels in zip(*(mode.levels for mode in modes)):
        cells = [str(levels[0].concurrency)]
        for level in levels:
            latencies = [r.timings.total_ms for r in level.succeeded]
            batch = statistics.mean(r.batch_size or 1 for r in level.succeeded) if level.succeeded else 0.0
            cells += [f"{level.jobs_per_minute:.1f}", f"{percentile(latencies, 50):.0f}",
                      f"{percentile(latencies, 95):.0f}", f"{batch:.1f}", str(sum(level.errors.values()))]
        if len(levels) == 2:
            cells.append(f"**{levels[1].jobs_per_minute / levels[0].jobs_per_minute:.2f}**")
        if baseline_rpm:
            cells.append(f"**{levels[-1].jobs_per_minute / baseline_rpm:.1f}x**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(modes: list[Mode], baseline_rpm: float | None) -> list[str]:
    if len(modes) != 2:
        return ["- (the targets compare batching off and on: run both modes)"]
    off, on = modes
    by_c = {level.concurrency: level for level in on.levels}
    off_c = {level.concurrency: level for level in off.levels}
    lines = []
    if 8 in by_c and baseline_rpm:
        ratio = by_c[8].jobs_per_minute / baseline_rpm
        lines.append(f"- throughput at concurrency 8, batching on / original sequential: **{ratio:.1f}x** "
                     f"(target ≥ 10x), failures {sum(by_c[8].errors.values())}")
    if 8 in by_c and 1 in by_c:
        p95_8 = percentile([r.timings.total_ms for r in by_c[8].succeeded], 95)
        p50_1 = percentile([r.timings.total_ms for r in by_c[1].succeeded], 50)
        lines.append(f"- p95 at concurrency 8 / p50 at concurrency 1, batching on: **{p95_8 / p50_1:.2f}** "
                     f"(target ≤ 2)")
    if 1 in by_c and 1 in off_c:
        on_p50 = percentile([r.timings.total_ms for r in by_c[1].succeeded], 50)
        off_p50 = percentile([r.timings.total_ms for r in off_c[1].succeeded], 50)
        lines.append(f"- p50 at concurrency 1, batching on / off: **{on_p50 / off_p50:.3f}** (target ≤ 1.05)")
    return lines


def memory_table(modes: list[Mode]) -> str:
    lines = ["| batching | RSS after load | peak RSS under load | start s |", "|---|---|---|---|"]
    for mode in modes:
        lines.append(f"| {mode.name} (BATCH_MAX={mode.batch_max}) | {mib(mode.rss_loaded)} | {mib(mode.rss_peak)} | "
                     f"{mode.start_s:.1f} |")
    return "\n".join(lines)


def worst_case_memory(model: str, dtype: str, threads: int, rows: int, input_chars: int,
                      new_tokens: int) -> list[str]:
    """One batch of ``rows`` longest-possible jobs, in this process: peak RSS against the KV-cache formula."""
    from worker.engine import ReplyRequest
    from worker.engine.qwen import QwenEngine
    from worker.model_source import resolve_model_source

    engine = QwenEngine.load(resolve_model_source(model), dtype, threads)
    text = ("送餐太慢了，等了两个小时，菜都凉了。" * (input_chars // 18 + 1))[:input_chars]
    engine.reply_batch([ReplyRequest("好", max_new_tokens=2, deadline=time.time() + 60)], history_max_tokens=0)
    process = psutil.Process()
    before = peak = process.memory_info().rss
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    requests = [ReplyRequest(text, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.7,
                             deadline=time.time() + 3600) for _ in range(rows)]
    sentiments = engine.classify_batch([(text, "zh")] * rows)
    results = engine.reply_batch(requests, history_max_tokens=0)
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    tokens = max(r.prompt_tokens for r in results) + new_tokens
    per_token = engine.info().kv_bytes_per_token
    if any(isinstance(s, Exception) for s in sentiments):
        raise RuntimeError(f"the worst-case sentiment pass failed: {sentiments}")
    title = (f"one batch of {rows} jobs, each {input_chars} characters ({results[0].prompt_tokens} prompt tokens) "
             f"+ {new_tokens} generated tokens, in process ({elapsed:.0f} s):")
    row = (f"| {mib(before)} | {mib(peak)} | {mib(peak - before)} | {mib(rows * tokens * per_token)} "
           f"({rows} x {tokens} x {per_token // 1024} KiB) |")
    return [title, "", "| RSS before | peak RSS | added | KV cache by formula (rows x tokens x bytes/token) |",
            "|---|---|---|---|", row]
