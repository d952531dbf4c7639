"""``python -m worker.bench.sampler_time``: the sampler's time on one row of 151,936 logits (Qwen2.5's
vocabulary) with Qwen2.5's generation config, as a decoding step calls it. Run it in two checkouts
(a worktree) one after the other on one machine to compare commits.
"""

import time

import numpy as np

from worker.bench.cli_common import machine_line
from worker.engine.generation import DecodeRow, Sampler


def main() -> None:
    print(machine_line())
    sampler = Sampler((151645,), top_k=20, top_p=0.8, repetition_penalty=1.05)  # Qwen2.5's generation config
    logits = (np.random.default_rng(0).standard_normal(151_936) * 3).astype(np.float32)
    row = DecodeRow(max_new_tokens=64, min_new_tokens=0, temperature=0.7, deadline=float("inf"),
                    prompt_ids=list(range(300)))
    row.tokens.extend(range(50))
    for _ in range(50):
        sampler.choose([logits], [row])
    calls = 1000
    started = time.perf_counter()
    for _ in range(calls):
        sampler.choose([logits], [row])
    ms_per_call = (time.perf_counter() - started) * 1000 / calls
    print(f"Sampler.choose: {ms_per_call:.3f} ms a row per step (mean of {calls:,})")


if __name__ == "__main__":
    main()
