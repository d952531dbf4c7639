"""``bench peers``: this service and llama.cpp's llama-server, on the same GGUF weights, in one run.

Both are driven as a user would drive them, by closed-loop clients measured
on the client side (submit to final answer):

- this service: ``Client.submit`` then ``Client.wait`` against real Celery
  workers, once with the llama.cpp engine on the GGUF file itself and once
  with the torch engine on the GGUF's Hugging Face folder;
- llama-server (``-np 8``): per job, a one-token completion of the classifier
  prompt with its token probabilities, then the chat reply with ``ignore_eos``
  and a fixed length, the two requests a user's script would make. The reply's
  messages are this service's own (system, example turns, in the mood the
  sentiment gave), so both do the same work.

Engine figures (decode ms/token at batch 1 and 8, prefill) come from the
engine in process for ours and from ``llama-batched-bench`` for llama.cpp.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from producer.evaluate import percentile
from worker.bench.service import PeakRss


@dataclass
class Loop:
    """Closed-loop results at one concurrency: client-side latency of every job."""

    concurrency: int
    latencies_ms: list[float]
    wall_s: float
    failures: int = 0

    @property
    def jobs_per_minute(self) -> float:
        return 60 * len(self.latencies_ms) / self.wall_s

    def row(self, name: str) -> str:
        return (f"| {name} | {self.concurrency} | {len(self.latencies_ms)} | {self.jobs_per_minute:.1f} | "
                f"{percentile(self.latencies_ms, 50):.0f} | {percentile(self.latencies_ms, 95):.0f} | "
                f"{self.failures} |")


@dataclass
class Subject:
    """One system under test: its closed loops and its process figures."""

    name: str
    start_s: float = 0.0
    rss_after_load: int = 0
    rss_peak: int = 0
    loops: list[Loop] = field(default_factory=list)
    decode_ms: dict[int, float] = field(default_factory=dict)  # rows -> ms per step
    prefill_ms: float | None = None


def closed_loop(job: Callable[[str], None], texts: list[str], concurrency: int, jobs: int) -> Loop:
    """``concurrency`` clients, each running one job at a time, ``jobs`` in all."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    counter = iter(range(jobs))

    def client() -> None:
        for i in counter:
            started = time.perf_counter()
            try:
                job(texts[i % len(texts)])
            except Exception:  # counted; a peer that fails jobs shows it in the table
                with lock:
                    failures[0] += 1
                continue
            with lock:
                latencies.append(1000 * (time.perf_counter() - started))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return Loop(concurrency, latencies, time.perf_counter() - started, failures[0])


# --- llama-server ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class LlamaServer:
    """A llama-server process with ``slots`` parallel slots on ``gguf``."""

    def __init__(self, bin_dir: Path, gguf: Path, threads: int, slots: int = 8, context_per_slot: int = 1024):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(bin_dir / "llama-server"), "-m", str(gguf), "-np", str(slots),
                   "-c", str(slots * context_per_slot), "-t", str(threads), "-tb", str(threads),
                   "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{self.port}.log", "w")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
        self._wait_healthy()
        self.start_s = time.perf_counter() - started

    def _wait_healthy(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"llama-server did not become healthy; see {self.log.name}")

    def job(self, classifier_prompt: str, reply_tokens: int) -> Callable[[str], None]:
        """One job as a user's script runs it: a one-token sentiment with probabilities, then the reply
        with the same prompt this service writes (its mood from that sentiment, its language from the text)."""
        from worker.engine.prompts import reply_language, reply_prefix_messages

        def run(text: str) -> None:
            prompt = (f"<|im_start|>system\n{classifier_prompt}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
                      "<|im_start|>assistant\n")
            answer = _post(f"{self.url}/completion", {"prompt": prompt, "n_predict": 1, "n_probs": 5,
                                                      "temperature": 0, "cache_prompt": True})
            if not answer.get("completion_probabilities"):
                raise RuntimeError("no token probabilities in the sentiment answer")
            messages = reply_prefix_messages(_mood_of(answer), reply_language(text))
            reply = _post(f"{self.url}/v1/chat/completions", {
                "messages": [*messages, {"role": "user", "content": text}],
                "max_tokens": reply_tokens, "ignore_eos": True, "temperature": 0.7})
            if reply["usage"]["completion_tokens"] != reply_tokens:
                raise RuntimeError(f"reply of {reply['usage']['completion_tokens']} tokens, not {reply_tokens}")

        return run

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _mood_of(answer: dict) -> str:
    """The reply's mood from llama-server's one-token sentiment answer, as this service decides it
    (``reply_mood``): the label word's first token with its probability."""
    import math

    from jobqueue.protocol import LABEL_SETS
    from worker.engine.prompts import MOOD_CONFIDENCE

    try:
        first = answer["completion_probabilities"][0]
        top = (first.get("top_logprobs") or first.get("top_probs"))[0]
        token = top["token"]
        probability = top["prob"] if "prob" in top else math.exp(top["logprob"])
    except (KeyError, IndexError, TypeError):
        return "neutral"
    for mood, word in zip(("positive", "negative"), LABEL_SETS["zh"]):
        if token and word.startswith(token) and probability >= MOOD_CONFIDENCE:
            return mood
    return "neutral"


def batched_bench(bin_dir: Path, gguf: Path, threads: int, prompt_tokens: int, new_tokens: int,
                  rows: list[int]) -> tuple[dict[int, float], float, str]:
    """llama-batched-bench: ({rows: decode ms per step}, prefill ms of ``prompt_tokens`` at one row, its table)."""
    command = [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-c", "4096", "-b", "2048", "-ub", "512",
               "-t", str(threads), "-npp", str(prompt_tokens), "-ntg", str(new_tokens),
               "-npl", ",".join(map(str, rows)), "--output-format", "jsonl"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False,
                            env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)})
    if result.returncode:
        raise RuntimeError(f"llama-batched-bench failed: {result.stderr[-2000:]}")
    decode, prefill = {}, None
    for line in (result.stdout + "\n" + result.stderr).splitlines():
        if line.startswith("{") and '"t_tg"' in line:
            entry = json.loads(line)
            # t_tg: seconds for n_tg steps of pl rows; t_pp: seconds for the prompts of pl rows.
            decode[entry["pl"]] = 1000 * entry["t_tg"] / entry["tg"]
            if entry["pl"] == 1:
                prefill = 1000 * entry["t_pp"]
    return decode, prefill, llama_build_line(bin_dir)


#: The vector extensions that decide which kernels llama.cpp (built with GGML_NATIVE) and torch use.
_VECTOR_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                 "amx_tile", "asimd", "sve")


def llama_build_line(bin_dir: Path) -> str:
    """llama-server's version and the CPU flags its native build compiled for (it prints none of its own)."""
    result = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True,
                            env={**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}, timeout=60, check=False)
    version = " ".join((result.stdout + result.stderr).split())
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                flags = [flag for flag in _VECTOR_FLAGS if flag in present]
                break
    except OSError:
        pass
    return f"{version}; GGML_NATIVE=ON for this CPU's flags: {' '.join(flags) or 'unknown'}"


# --- the run ---


@dataclass(frozen=True)
class PeersConfig:
    gguf: Path
    hf_folder: Path
    llama_bin: Path
    dtype: str
    threads: int
    redis_url: str
    levels: tuple[int, ...] = (1, 8)
    jobs_per_client: int = 6
    reply_tokens: int = 45


@dataclass(frozen=True)
class OurEngine:
    """One of our engines as ``bench peers`` runs it: its name in the tables, MODEL, ENGINE and DTYPE."""

    name: str
    model: Path
    engine: str
    dtype: str


def our_engines(config: PeersConfig) -> list[OurEngine]:
    return [OurEngine("this service, llama.cpp engine", config.gguf, "llama.cpp", config.dtype),
            OurEngine(f"this service, torch engine, DTYPE={config.dtype}", config.hf_folder, "torch", config.dtype)]


def measure_service(config: PeersConfig, engine: OurEngine, texts: list[str]) -> Subject:
    """This service through the queue: one worker (BATCH_MAX 8), closed-loop clients."""
    from producer import Client
    from jobqueue.protocol import JobStatus
    from jobqueue.settings import QueueSettings
    from worker.bench.service import start_workers

    subject = Subject(engine.name)
    workers = start_workers(str(engine.model), engine.dtype, 1, config.threads, config.redis_url,
                            env={"BATCH_MAX": "8", "ENGINE": engine.engine})
    subject.start_s = workers.start_s
    client = Client(settings=QueueSettings(redis_url=config.redis_url, job_timeout_s=300, queue_timeout_s=3600))

    def job(text: str) -> None:
        job_id = client.submit(text, max_new_tokens=config.reply_tokens, min_new_tokens=config.reply_tokens,
                               temperature=0.7)
        record = client.wait(job_id, timeout=1800)
        if record.status is not JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job_id} ended {record.status.value}")

    try:
        job(texts[0])  # warm-up
        with PeakRss(workers.pool_pids) as rss:
            subject.rss_after_load = rss.now()
            subject.loops = [closed_loop(job, texts, c, c * config.jobs_per_client) for c in config.levels]
        subject.rss_peak = rss.peak
    finally:
        client.close()
        workers.stop()
    return subject


def measure_engine_in_process(config: PeersConfig, engine: OurEngine, subject: Subject) -> int:
    """Decode per step at 1 and 8 rows and prefill, in this process; returns the engine's weight bytes."""
    import gc

    from worker.bench.micro import decode_ms_per_token, prefill_ms
    from worker.engine import load_engine
    from worker.engine.model_source import resolve_model_source

    loaded = load_engine(resolve_model_source(str(engine.model)), engine.dtype, config.threads, engine=engine.engine,
                         max_rows=8)
    subject.decode_ms = {rows: decode_ms_per_token(loaded, rows=rows) for rows in (1, 8)}
    subject.prefill_ms = prefill_ms(loaded, tokens=34)
    weight_bytes = loaded.info().weight_bytes
    del loaded
    gc.collect()
    return weight_bytes


def measure_llama_server(config: PeersConfig, texts: list[str]) -> tuple[Subject, str]:
    from worker.engine.prompts import DEFAULT_CLASSIFIER_PROMPT, classifier_prompt

    subject = Subject("llama-server -np 8")
    server = LlamaServer(config.llama_bin, config.gguf, config.threads)
    subject.start_s = server.start_s
    job = server.job(classifier_prompt("zh", DEFAULT_CLASSIFIER_PROMPT), config.reply_tokens)
    try:
        job(texts[0])  # warm-up
        with PeakRss(lambda: [server.process.pid]) as rss:
            subject.rss_after_load = rss.now()
            subject.loops = [closed_loop(job, texts, c, c * config.jobs_per_client) for c in config.levels]
        subject.rss_peak = rss.peak
    finally:
        server.stop()
    subject.decode_ms, subject.prefill_ms, system_info = batched_bench(
        config.llama_bin, config.gguf, config.threads, 34, config.reply_tokens, [1, 8])
    return subject, system_info


def report(config: PeersConfig, subjects: list[Subject], machine: str, llama_info: str,
           weight_bytes: dict[str, int], bandwidth_gbps: float) -> list[str]:
    """The tables; ``subjects`` are ours, then llama-server last; ``weight_bytes`` by subject name."""
    *ours, peer = subjects
    lines = [f"# bench peers, {time.strftime('%Y-%m-%d %H:%M')}", f"machine: {machine}",
             f"llama.cpp build: {llama_info}",
             (f"weights: {config.gguf.name} (llama.cpp engine, llama-server) and its Hugging Face folder (torch engine); "
              f"{config.threads} threads each; replies fixed at {config.reply_tokens} tokens; "
              f"closed loop, {config.jobs_per_client} jobs per client; latency measured by the client"), "",
             "| system | concurrency | jobs | jobs/min | p50 ms | p95 ms | failed |", "|---|---|---|---|---|---|---|"]
    lines += [loop.row(s.name) for s in subjects for loop in s.loops]
    lines += ["", ("| system | start s | RSS after load | RSS peak | decode ms/step, 1 row | "
                   "decode ms/step, 8 rows | prefill 34 tokens ms |"), "|---|---|---|---|---|---|---|"]
    for s in subjects:
        lines.append(f"| {s.name} | {s.start_s:.1f} | {s.rss_after_load / 2**20:.0f} MiB | "
                     f"{s.rss_peak / 2**20:.0f} MiB | {s.decode_ms.get(1, 0):.1f} | {s.decode_ms.get(8, 0):.1f} | "
                     f"{s.prefill_ms or 0:.0f} |")
    lines += ["", f"read bandwidth {bandwidth_gbps:.1f} GB/s"]
    for s in ours:
        lines += ratios(config, s, peer, weight_bytes[s.name], bandwidth_gbps)
    return lines


def ratios(config: PeersConfig, ours: Subject, peer: Subject, weight_bytes: int, bandwidth_gbps: float) -> list[str]:
    floor_ms = 1000 * weight_bytes / (bandwidth_gbps * 1e9)
    lines = ["", f"{ours.name}: weights {weight_bytes / 1e6:.0f} MB -> bandwidth floor {floor_ms:.1f} ms/token; "
             "ratios to llama-server:"]
    by_level = {(s.name, loop.concurrency): loop for s in (ours, peer) for loop in s.loops}
    for level in config.levels:
        a, b = by_level[(ours.name, level)], by_level[(peer.name, level)]
        lines.append(f"- concurrency {level}: p50 {percentile(a.latencies_ms, 50) / percentile(b.latencies_ms, 50):.2f}, "
                     f"p95 {percentile(a.latencies_ms, 95) / percentile(b.latencies_ms, 95):.2f}, "
                     f"jobs/min {a.jobs_per_minute / b.jobs_per_minute:.2f}")
    lines.append(f"- decode at 1 row: {ours.decode_ms[1] / peer.decode_ms[1]:.2f} x llama.cpp, "
                 f"{ours.decode_ms[1] / floor_ms:.2f} x the floor; at 8 rows: "
                 f"{ours.decode_ms[8] / peer.decode_ms[8]:.2f} x llama.cpp")
    lines.append(f"- RSS after load: {ours.rss_after_load / peer.rss_after_load:.2f}; "
                 f"start: {ours.start_s / peer.start_s:.2f}")
    return lines
