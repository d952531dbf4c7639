"""Engine-level timings for the benchmark: prefill, decode per token, memory bandwidth.

Measured through the engine boundary (``reply_batch``, ``SequenceModel``), so
the same functions time any engine; the ``hf_*`` ones time a plain Hugging
Face model with ``generate``, as the original pipeline runs it.
"""

from __future__ import annotations

import time

import torch

from worker.engine.results import ReplyRequest

_TEXT = "送餐太慢了"


def memory_bandwidth_gbps(megabytes: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: bytes of a large tensor over the time to sum it, best of ``repeats``.

    Decoding one token reads every weight once, so reading is what bounds it.
    """
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        source.sum()
        best = min(best, time.perf_counter() - started)
    return source.numel() * 4 / best / 1e9


def _median(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def decode_ms_per_token(engine, rows: int = 1, short: int = 8, long: int = 40, repeats: int = 3) -> float:
    """Per step of ``rows`` rows: median of (time for ``long`` tokens - time for ``short``) / (long - short)."""

    def generate(n: int) -> float:
        requests = [ReplyRequest(_TEXT, max_new_tokens=n, min_new_tokens=n, deadline=time.time() + 600)] * rows
        started = time.perf_counter()
        engine.reply_batch(requests, history_max_tokens=0)
        return time.perf_counter() - started

    generate(2)  # warm-up
    return 1000 * _median([(generate(long) - generate(short)) / (long - short) for _ in range(repeats)])


def prefill_ms(engine, tokens: int = 34, repeats: int = 5) -> float:
    """One pass over ``tokens`` prompt tokens from scratch (no prefix cache)."""
    ids = engine.encode_chat([{"role": "user", "content": "好" * 200}])[:tokens]

    def once() -> float:
        sequences = engine.model.new_sequences(1, tokens)
        started = time.perf_counter()
        sequences.extend([(0, ids)]).logits()
        elapsed = time.perf_counter() - started
        sequences.release()
        return elapsed

    once()  # warm-up
    return 1000 * _median([once() for _ in range(repeats)])


def profile_decode(engine, tokens: int = 20, rows: int = 1, table_rows: int = 15) -> str:
    """torch.profiler table of where the time of ``tokens`` decode steps goes, by operator."""
    from torch.profiler import ProfilerActivity, profile

    requests = [ReplyRequest(_TEXT, max_new_tokens=tokens, min_new_tokens=tokens, deadline=time.time() + 600)] * rows
    engine.reply_batch(requests[:1], history_max_tokens=0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.reply_batch(requests, history_max_tokens=0)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=table_rows)


# --- a plain Hugging Face model, as the original pipeline runs it ---


def hf_weight_bytes(model) -> int:
    """Bytes of the linear layers' weights: what ``generate`` reads for every token."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


@torch.inference_mode()
def hf_decode_ms_per_token(model, tokenizer, short: int = 8, long: int = 40, repeats: int = 3) -> float:
    text = tokenizer.apply_chat_template([{"role": "user", "content": _TEXT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(n: int) -> float:
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        return time.perf_counter() - started

    generate(2)
    return 1000 * _median([(generate(long) - generate(short)) / (long - short) for _ in range(repeats)])


@torch.inference_mode()
def hf_prefill_ms(model, tokenizer, tokens: int = 34, repeats: int = 5) -> float:
    ids = tokenizer("好" * 200, return_tensors="pt").input_ids[:, :tokens]
    model(ids, logits_to_keep=1)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(ids, logits_to_keep=1)
        samples.append(time.perf_counter() - started)
    return 1000 * _median(samples)
