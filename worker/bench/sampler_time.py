"""``python -m worker.bench.sampler_time [--gguf FILE.gguf]``: the sampler's time per row and step.

Without ``--gguf``: one row of 151,936 random logits (Qwen2.5's vocabulary) with Qwen2.5's generation
config, as a decoding step calls it; run it in two checkouts (a worktree) one after the other on one
machine to compare commits. Random scores put far more words near the best than a model does.

With ``--gguf``: the logits of a real 45-token reply at temperature 0.7 on the llama.cpp engine, kept
and then sampled again, in one run, by the engine's sampler and by the same sampler with top-k and
top-p off (a draw from the whole vocabulary).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from worker.bench.cli_common import machine_line
from worker.engine.generation import DecodeRow, Sampler

CALLS = 1000
TEXT = "送餐太慢了，等了两个小时，菜都凉了，打电话也没人接。"


def _ms_per_call(sampler: Sampler, steps: list[tuple[np.ndarray, DecodeRow]], calls: int) -> float:
    for logits, row in steps[:50]:  # warm-up
        sampler.choose([logits], [row])
    started = time.perf_counter()
    for i in range(calls):
        logits, row = steps[i % len(steps)]
        sampler.choose([logits], [row])
    return (time.perf_counter() - started) * 1000 / calls


def _random_step() -> tuple[Sampler, list[tuple[np.ndarray, DecodeRow]]]:
    sampler = Sampler((151645,), top_k=20, top_p=0.8, repetition_penalty=1.05)  # Qwen2.5's generation config
    logits = (np.random.default_rng(0).standard_normal(151_936) * 3).astype(np.float32)
    row = DecodeRow(max_new_tokens=64, min_new_tokens=0, temperature=0.7, deadline=float("inf"),
                    prompt_ids=list(range(300)))
    row.tokens.extend(range(50))
    return sampler, [(logits, row)]


def _reply_steps(gguf: str) -> tuple[Sampler, list[tuple[np.ndarray, DecodeRow]]]:
    """The engine's sampler, and every step of one real reply: its logits and its row as they were."""
    from worker.engine import ReplyRequest, load_engine
    from worker.engine.model_source import resolve_model_source

    engine = load_engine(resolve_model_source(gguf), threads=None, engine="llama.cpp", kv_cache_tokens=2048,
                         max_rows=1)
    sampler, steps = engine.sampler, []

    class Keeping:  # the engine's sampler, keeping what each step hands it
        def __getattr__(self, name):
            return getattr(sampler, name)

        def choose(self, logits, rows):
            steps.append((np.array(logits[0], dtype=np.float32),                     # (vocabulary,)
                          dataclasses.replace(rows[0], tokens=list(rows[0].tokens))))
            return sampler.choose(logits, rows)

    engine.sampler = Keeping()
    engine.reply_batch([ReplyRequest(TEXT, max_new_tokens=45, min_new_tokens=45, temperature=0.7)],
                       history_max_tokens=0)
    return sampler, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="time on a real reply's logits from this GGUF file")
    args = parser.parse_args()
    print(machine_line())
    if not args.gguf:
        sampler, steps = _random_step()
        print(f"Sampler.choose: {_ms_per_call(sampler, steps, CALLS):.3f} ms a row per step (mean of {CALLS:,})")
        return
    sampler, steps = _reply_steps(args.gguf)
    whole = dataclasses.replace(sampler, top_k=None, top_p=None)
    print(f"\n{len(steps)} steps of a real reply at 0.7, each sampled again; mean of {CALLS:,} calls\n")
    print("| sampler | ms a row per step |\n|---|---|")
    for name, chosen in [(f"the engine's (top-k {sampler.top_k}, top-p {sampler.top_p}, penalty, copy rule)",
                          sampler), ("the same, top-k and top-p off (the whole vocabulary)", whole)]:
        print(f"| {name} | {_ms_per_call(chosen, steps, CALLS):.3f} |")


if __name__ == "__main__":
    main()
