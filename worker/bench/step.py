"""``bench step``: where a decoding step of the llama.cpp engine goes, beside llama.cpp's own figures.

A reply batch of ``--rows`` rows runs in process, its ``llama_decode`` calls
timed one by one. The report gives, per configuration (reply prompt and
key/value cache type, alternating rounds):

- the median time of one decoding step of all rows (``llama_decode`` only);
- what the engine spends outside ``llama_decode`` per step (Python: batch
  building, logits, sampling, the repetition penalty), and the Python
  functions that take most of it.

``llama-batched-bench`` gives llama.cpp's own step for the same rows and
prompt length beside it (BENCHMARKS.md pastes both).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

TEXT = "送餐太慢了，等了两个小时，菜都凉了，打电话也没人接。"


def measure(gguf: str, reply_prompt: str, kv_type: str, rows: int, tokens: int, rounds: int,
            threads: int) -> dict:
    import worker.engine.llama_model as llama_model
    from worker.engine import ReplyRequest, load_engine
    from worker.engine.model_source import resolve_model_source

    # The cache type is a constant of the engine; a measurement of the other one sets it here.
    llama_model.KV_CACHE_TYPE = llama_model.KV_CACHE_TYPES[kv_type]
    engine = load_engine(resolve_model_source(gguf), threads=threads, engine="llama.cpp", max_rows=rows,
                         kv_cache_tokens=rows * 1024, reply_variant=reply_prompt)
    steps: list[float] = []
    inside = [0.0]
    decode = engine.model.decode

    def timed(sequences, group):
        started = time.perf_counter()
        result = decode(sequences, group)
        elapsed = time.perf_counter() - started
        inside[0] += elapsed
        if sum(len(tokens) for _, tokens, _ in group) == rows:  # a decoding step, not a prompt's pass
            steps.append(elapsed)
        return result

    engine.model.decode = timed

    def reply_batch() -> float:
        requests = [ReplyRequest(TEXT, max_new_tokens=tokens, min_new_tokens=tokens, deadline=time.time() + 600,
                                 temperature=0.7)] * rows
        started = time.perf_counter()
        engine.reply_batch(requests, history_max_tokens=0)
        return time.perf_counter() - started

    reply_batch()  # warm-up
    steps.clear()
    inside[0], total = 0.0, 0.0
    profile = cProfile.Profile()
    for _ in range(rounds):
        profile.enable()
        total += reply_batch()
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(8)
    return {"step_ms": 1000 * statistics.median(steps), "outside_ms_per_step": 1000 * (total - inside[0]) / (rounds * tokens),
            "outside_share": (total - inside[0]) / total, "profile": text.getvalue()}


def add_parser(sub, machine_line, default_threads: int) -> None:
    def run(args: argparse.Namespace) -> int:
        print(f"\none decoding step of the llama.cpp engine, {args.rows} rows x {args.tokens} tokens, "
              f"{args.rounds} rounds per configuration; {machine_line()}, {args.threads} threads\n")
        print("| reply prompt | KV cache | step of all rows, median ms | outside llama_decode, ms per step | share |")
        print("|---|---|---|---|---|")
        profiles = []
        for config in args.configs.split(","):
            reply_prompt, kv_type = config.split(":")
            result = measure(args.model, reply_prompt, kv_type, args.rows, args.tokens, args.rounds, args.threads)
            print(f"| {reply_prompt} | {kv_type} | {result['step_ms']:.1f} | {result['outside_ms_per_step']:.2f} | "
                  f"{result['outside_share']:.1%} |", flush=True)
            profiles.append((config, result["profile"]))
        for config, profile in profiles[:1]:
            lines = [line for line in profile.splitlines() if line.strip()]
            print(f"\nPython profile of {config} (by own time):\n" + "\n".join(lines[-10:]))
        return 0

    p = sub.add_parser("step", help="a llama.cpp decoding step: llama_decode against our own per-step work")
    p.add_argument("--model", required=True, help="the .gguf file")
    p.add_argument("--configs", default="original:q8_0,mood-examples:q8_0,original:f16,mood-examples:f16",
                   help="comma-separated REPLY_PROMPT:KV_CACHE_TYPE (f16 or q8_0)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=45)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=default_threads)
    p.set_defaults(func=run)
