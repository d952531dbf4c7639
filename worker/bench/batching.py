"""Batching off, static and continuous, side by side in one run: throughput, latency and memory.

Every mode runs the same workers, inputs and reply length; only the batching
settings differ (``MODES``). Closed loops (each client submits, waits, submits
again) measure throughput and latency per concurrency; open loops (Poisson
arrivals at a fraction of the measured capacity) measure what users arriving
on their own see. The original single-process pipeline and llama-server can be
timed in the same run, so every figure can be read as a ratio.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil
from tqdm import tqdm

from producer.evaluate import percentile
from worker.bench.peers import Loop
from worker.bench.report import mib
from worker.bench.service import LevelResult, RssSampler, run_level, start_workers

#: Worker settings of each mode, beside BATCH_MAX (``--batch-max``) where batching is on.
MODES = {
    "off": {"BATCH_MAX": "1"},
    "static": {"JOIN_WINDOW_S": "0"},  # a batch is the jobs that start together
    "continuous": {},                  # jobs join a running batch (the default)
}


@dataclass
class OpenLoop(Loop):
    """Poisson arrivals at ``rate_per_min`` (``fraction`` of the capacity): each job's latency, submit to end."""

    fraction: float = 0.0
    rate_per_min: float = 0.0


@dataclass
class Mode:
    name: str
    batch_max: int
    levels: list[LevelResult]
    start_s: float
    rss_loaded: int
    rss_peak: int
    open_loops: list[OpenLoop] = field(default_factory=list)


@dataclass(frozen=True)
class Load:
    """What every mode is put through: texts, closed-loop levels and open-loop fractions."""

    texts: list[str]
    levels: list[int]
    reply_tokens: int
    c1_jobs: int
    jobs_per_client: int
    open_fractions: tuple[float, ...] = ()
    open_jobs: int = 60


def run_modes(model: str, dtype: str, layout: tuple[int, int], redis_url: str, load: Load, batch_max: int,
              batch_wait_ms: float, names: list[str], capacity: list[float]) -> list[Mode]:
    """Each mode in the order given; ``capacity`` (jobs/min, one item) is set by the first batching
    mode's best closed loop when empty, so every mode's open loops arrive at the same rates. Batching
    off gets no open loops: arrivals at a batching worker's capacity would only grow its queue."""
    modes = []
    count, threads = layout
    for name in names:  # in the order given: rounds alternate it, so drift favours neither mode
        env = {"BATCH_MAX": str(batch_max), "BATCH_WAIT_MS": str(batch_wait_ms), **MODES[name]}
        workers = start_workers(model, dtype, count, threads, redis_url, env=env)
        try:  # never leave model-holding workers behind
            loaded = workers.rss_bytes()
            run_level(redis_url, load.texts, 1, 2, load.reply_tokens, f"{name}: warm-up")
            with RssSampler(workers) as sampler:
                results = [run_level(redis_url, load.texts, c, load.c1_jobs if c == 1 else load.jobs_per_client * c,
                                     load.reply_tokens, f"batching {name} c={c}") for c in load.levels]
                if name != "off" and not capacity:
                    capacity.append(max(level.jobs_per_minute for level in results))
                opens = [open_loop_service(redis_url, load, fraction * capacity[0] / 60, fraction,
                                           f"batching {name} open {fraction:.0%}")
                         for fraction in load.open_fractions] if capacity and name != "off" else []
        finally:
            workers.stop()
        modes.append(Mode(name, int(env["BATCH_MAX"]), results, workers.start_s, loaded, sampler.peak, opens))
    order = list(MODES)
    return sorted(modes, key=lambda mode: order.index(mode.name))


def poisson_arrivals(rate_per_s: float, jobs: int, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of ``jobs`` arrives (exponential gaps, a fixed seed)."""
    rng = random.Random(seed)
    at, arrivals = 0.0, []
    for _ in range(jobs):
        at += rng.expovariate(rate_per_s)
        arrivals.append(at)
    return arrivals


def open_loop(job, texts: list[str], rate_per_s: float, jobs: int, fraction: float, desc: str) -> OpenLoop:
    """Each job starts at its Poisson arrival time whatever the others do; ``job(text)`` runs it to the end."""
    arrivals = poisson_arrivals(rate_per_s, jobs)
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    progress = tqdm(total=jobs, desc=desc, unit="job", leave=False)
    started = time.perf_counter()

    def arrive(i: int) -> None:
        time.sleep(max(0.0, started + arrivals[i] - time.perf_counter()))
        submitted = time.perf_counter()
        try:
            job(texts[i % len(texts)])
        except Exception:  # counted: a system that fails jobs shows it in the table
            with lock:
                failures[0] += 1
            return
        with lock:
            latencies.append(1000 * (time.perf_counter() - submitted))
        progress.update()

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(arrive, range(jobs)))
    progress.close()
    return OpenLoop(0, latencies, time.perf_counter() - started, failures[0], fraction=fraction,
                    rate_per_min=60 * rate_per_s)


def open_loop_service(redis_url: str, load: Load, rate_per_s: float, fraction: float, desc: str) -> OpenLoop:
    from producer import Client
    from jobqueue.protocol import JobStatus
    from jobqueue.settings import QueueSettings

    settings = QueueSettings(redis_url=redis_url, job_timeout_s=300, queue_timeout_s=3600)
    local = threading.local()

    def job(text: str) -> None:
        if not hasattr(local, "client"):
            local.client = Client(settings=settings)
        client = local.client
        job_id = client.submit(text, max_new_tokens=load.reply_tokens, min_new_tokens=load.reply_tokens,
                               temperature=0.7)
        # Polled often: the client's own wait would add up to its poll interval to every latency.
        record = client.wait(job_id, timeout=1800, poll_interval=0.05)
        if record.status is not JobStatus.SUCCEEDED or record.truncated:
            raise RuntimeError(f"job {job_id} ended {record.status.value}")

    return open_loop(job, load.texts, rate_per_s, load.open_jobs, fraction, desc)


def rounds_summary(rounds: list[list[Mode]]) -> list[str]:
    """Each round's two latency targets, and their medians: tells a real gap from the machine's drift."""
    lines = ["| round | order | p50 c=1 batching / off | p95 c=8 batching / p50 c=1 batching |", "|---|---|---|---|"]
    gaps, spreads = [], []
    for number, modes in enumerate(rounds, start=1):
        off, on = modes[0], modes[-1]
        on_p50 = _latency_ms(on, 1, 50)
        gap = on_p50 / _latency_ms(off, 1, 50)
        spread = _latency_ms(on, 8, 95) / on_p50
        gaps.append(gap)
        spreads.append(spread)
        order = "off first" if number % 2 else "off last"
        lines.append(f"| {number} | {order} | {gap:.3f} | {spread:.2f} |")
    lines.append(f"| median | | **{statistics.median(gaps):.3f}** (target ≤ 1.03) | "
                 f"**{statistics.median(spreads):.2f}** (target ≤ 2) |")
    return lines


def baseline_jobs_per_minute(model: str, threads: int, texts: list[str], reply_tokens: int, jobs: int) -> float:
    """The original pipeline, sequentially in this process: its jobs per minute."""
    from worker.bench.baseline import OriginalPipeline
    from worker.engine.model_source import resolve_model_source

    original = OriginalPipeline(resolve_model_source(model), threads)
    original.run(texts[0], 4)  # warm-up
    timings = [original.run(texts[i % len(texts)], reply_tokens)
               for i in tqdm(range(jobs), desc="original pipeline", unit="job", leave=False)]
    return 60_000 / statistics.mean(t.total_ms for t in timings)


def level_table(modes: list[Mode], baseline_rpm: float | None) -> str:
    """One row per concurrency: each mode's throughput and latency, then ratios to batching off and the original."""
    names = [mode.name for mode in modes]
    last = names[-1]
    head = "| concurrency | " + " | ".join(
        f"jobs/min {n} | p50 ms {n} | p95 ms {n} | mean batch {n} | failures {n}" for n in names)
    if len(modes) > 1 and names[0] == "off":
        head += f" | {last} / off (jobs/min)"
    if baseline_rpm:
        head += f" | {last} / original (jobs/min)"
    head += " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for levels in zip(*(mode.levels for mode in modes)):
        cells = [str(levels[0].concurrency)]
        for level in levels:
            latencies = [r.timings.total_ms for r in level.succeeded]
            batch = statistics.mean(r.batch_size or 1 for r in level.succeeded) if level.succeeded else 0.0
            cells += [f"{level.jobs_per_minute:.1f}", f"{percentile(latencies, 50):.0f}",
                      f"{percentile(latencies, 95):.0f}", f"{batch:.1f}", str(sum(level.errors.values()))]
        if len(levels) > 1 and names[0] == "off":
            cells.append(f"**{levels[-1].jobs_per_minute / levels[0].jobs_per_minute:.2f}**")
        if baseline_rpm:
            cells.append(f"**{levels[-1].jobs_per_minute / baseline_rpm:.1f}x**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def open_table(modes: list[Mode], peer: list[OpenLoop] | None = None) -> str:
    """Open loops: each system's latency at the same arrival rates."""
    lines = ["| system | load | arrivals/min | jobs | served/min | p50 ms | p95 ms | failed |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(f"batching {mode.name}", loop) for mode in modes for loop in mode.open_loops]
    rows += [("llama-server -np 8", loop) for loop in peer or []]
    for name, loop in rows:
        lines.append(f"| {name} | {loop.fraction:.0%} | {loop.rate_per_min:.1f} | {len(loop.latencies_ms)} | "
                     f"{loop.jobs_per_minute:.1f} | {percentile(loop.latencies_ms, 50):.0f} | "
                     f"{percentile(loop.latencies_ms, 95):.0f} | {loop.failures} |")
    return "\n".join(lines)


def targets(modes: list[Mode], baseline_rpm: float | None, peer_levels: dict[int, float] | None = None) -> list[str]:
    """The continuous batching targets, from this run's figures (a line for each that it can tell)."""
    by_name = {mode.name: mode for mode in modes}
    best = by_name.get("continuous") or by_name.get("static")
    if best is None:
        return ["- (the targets compare batching modes: run static or continuous)"]
    lines = []
    p50, p95_8 = _latency_ms(best, 1, 50), _latency_ms(best, 8, 95)
    if p50 and p95_8:
        lines.append(f"- p95 at concurrency 8 / p50 of a lone job, {best.name}: **{p95_8 / p50:.2f}** (target ≤ 2)")
    rpm = {level.concurrency: level.jobs_per_minute for level in best.levels}
    if 8 in rpm and 16 in rpm:
        lines.append(f"- throughput at concurrency 16 / 8, {best.name}: **{rpm[16] / rpm[8]:.2f}** (target ≥ 1)")
    off_p50 = _latency_ms(by_name["off"], 1, 50) if "off" in by_name else None
    if p50 and off_p50:
        lines.append(f"- p50 of a lone job, {best.name} / batching off: **{p50 / off_p50:.3f}** (target ≤ 1.03)")
    if "static" in by_name and best.name == "continuous":
        for ours, theirs in zip(best.open_loops, by_name["static"].open_loops):
            ratio = percentile(ours.latencies_ms, 95) / percentile(theirs.latencies_ms, 95)
            target = " (target ≤ 0.6)" if abs(ours.fraction - 0.8) < 1e-9 else ""
            lines.append(f"- open loop at {ours.fraction:.0%} of capacity, p95 continuous / static: "
                         f"**{ratio:.2f}**{target}")
    for level, peer_rpm in sorted((peer_levels or {}).items()):
        if level in rpm and level > 1:
            lines.append(f"- throughput at concurrency {level}, {best.name} / llama-server -np 8: "
                         f"**{rpm[level] / peer_rpm:.2f}** (target ≥ 1)")
    if 8 in rpm and baseline_rpm:
        lines.append(f"- throughput at concurrency 8, {best.name} / original sequential: "
                     f"**{rpm[8] / baseline_rpm:.1f}x** (target ≥ 10x)")
    return lines


def _latency_ms(mode: Mode, concurrency: int, q: float) -> float | None:
    """The q-th percentile of the mode's job latency at ``concurrency`` (None: not run, or nothing succeeded)."""
    level = next((level for level in mode.levels if level.concurrency == concurrency), None)
    return percentile([r.timings.total_ms for r in level.succeeded], q) if level and level.succeeded else None


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
    from worker.engine.model_source import resolve_model_source

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


@dataclass
class Peer:
    """llama-server -np 8 on the same weights, put through the same load."""

    loops: list[Loop]  # one per closed-loop concurrency
    open_loops: list[OpenLoop]
    build: str

    def table(self) -> str:
        lines = ["| system | concurrency | jobs | jobs/min | p50 ms | p95 ms | failed |", "|---|---|---|---|---|---|---|"]
        return "\n".join(lines + [loop.row("llama-server -np 8") for loop in self.loops])


def run_llama_peer(bin_dir, gguf, threads: int, load: Load, capacity_rpm: float | None) -> Peer:
    """llama-server with 8 slots: a one-token sentiment request, then the reply, per job (peers.py)."""
    from worker.bench.peers import LlamaServer, closed_loop, llama_build_line
    from worker.engine.prompts import DEFAULT_CLASSIFIER_PROMPT, classifier_prompt

    server = LlamaServer(bin_dir, gguf, threads, slots=8)
    job = server.job(classifier_prompt("zh", DEFAULT_CLASSIFIER_PROMPT), load.reply_tokens)
    try:
        job(load.texts[0])  # warm-up
        loops = [closed_loop(job, load.texts, c, load.c1_jobs if c == 1 else load.jobs_per_client * c)
                 for c in tqdm(load.levels, desc="llama-server closed loops", leave=False)]
        opens = [open_loop(job, load.texts, fraction * capacity_rpm / 60, load.open_jobs, fraction,
                           f"llama-server open {fraction:.0%}") for fraction in load.open_fractions] if capacity_rpm else []
    finally:
        server.stop()
    return Peer(loops, opens, llama_build_line(bin_dir))


def join_stall(model: str, dtype: str, threads: int, rows: int, input_chars: int,
               chunks: tuple[int | None, ...] = (256, None)) -> list[str]:
    """What a long job joining costs the rows already decoding, in process: their step times while
    its prompt is read, in chunks and in one pass, and its sentiment's passes, likewise."""
    from worker.engine import ReplyRequest
    from worker.engine.qwen import QwenEngine
    from worker.engine.session import ReplySession
    from worker.engine.model_source import resolve_model_source

    engine = QwenEngine.load(resolve_model_source(model), dtype, threads)
    text = ("送餐太慢了，等了两个小时，菜都凉了。" * (input_chars // 18 + 1))[:input_chars]
    lines = [f"a {input_chars}-character job joins {rows} decoding rows, in process ({dtype}, {threads} threads):", "",
             "| prefill per step | prompt tokens | steps to read it | running rows' step ms before | "
             "longest step while it joins | time added to every running row |", "|---|---|---|---|---|---|"]
    for chunk in chunks:
        with ReplySession(engine, rows + 1, history_max_tokens=0, prefill_chunk=chunk or 10**9) as session:
            for i in range(rows):
                session.add(ReplyRequest(f"第{i}单 还行", max_new_tokens=400, min_new_tokens=400, temperature=0.7,
                                         deadline=time.time() + 3600))
            before = statistics.median(_timed_steps(session, 12)[2:])  # the first steps read the prompts
            key = session.add(ReplyRequest(text, max_new_tokens=4, deadline=time.time() + 3600))
            prompt = session.prompt_left(key)
            during = []
            while not session.tokens(key):
                during += _timed_steps(session, 1)
        added = sum(ms - before for ms in during) - before  # the joiner's first token costs a step anyway
        lines.append(f"| {chunk or 'all at once'} | {prompt} | {len(during)} | {before:.0f} | {max(during):.0f} | "
                     f"{added:.0f} ms |")
    lines += ["", "its sentiment, before it joins (the running rows get a decoding step between passes):", "",
              "| sentiment read per pass | passes | longest pass ms | all passes ms |", "|---|---|---|---|"]
    for chunk in chunks:
        passes = []
        with engine.classify_in_chunks([(text, "zh")], chunk or 10**9) as sentiment:
            done = False
            while not done:
                started = time.perf_counter()
                done = sentiment.advance()
                passes.append(1000 * (time.perf_counter() - started))
        lines.append(f"| {chunk or 'all at once'} | {len(passes)} | {max(passes):.0f} | {sum(passes):.0f} |")
    return lines


def _timed_steps(session, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        session.step()
        times.append(1000 * (time.perf_counter() - started))
    return times
