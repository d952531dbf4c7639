"""Engine-level timings for the benchmark: prefill, decode per token, memory bandwidth."""

from __future__ import annotations

import time

import torch

from worker.engine.qwen import QwenEngine


def weight_bytes(model) -> int:
    """Bytes of weights read for every decoded token: all linear layers (embeddings: one row, ignored).

    Of a dual-precision layer, decoding reads only the int8 copy.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    total = 0
    for name, module in model.named_modules():
        if name.endswith(".exact"):
            continue
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, DynamicQuantizedLinear):  # int8 weights: one byte each
            total += module.weight().numel()
    return total


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


@torch.inference_mode()
def decode_ms_per_token(engine: QwenEngine, short: int = 8, long: int = 40, repeats: int = 3) -> float:
    """Median over repeats of (time for ``long`` tokens - time for ``short``) / (long - short)."""
    ids = torch.tensor([engine.encode_chat([{"role": "user", "content": "送餐太慢了"}])])

    def generate(n: int) -> float:
        started = time.perf_counter()
        engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, temperature=None, top_p=None, top_k=None,
                              pad_token_id=engine.pad_token_id)
        return time.perf_counter() - started

    with engine.precision(precise=False):  # the weights the reply is decoded with
        generate(2)  # warm-up
        samples = sorted((generate(long) - generate(short)) / (long - short) for _ in range(repeats))
    return 1000 * samples[len(samples) // 2]


@torch.inference_mode()
def prefill_ms(engine: QwenEngine, tokens: int = 34, repeats: int = 5) -> float:
    """One forward pass over ``tokens`` prompt tokens from scratch (no prefix cache), with the reply's weights."""
    with engine.precision(precise=False):
        return _median_forward_ms(engine, tokens, repeats)


def _median_forward_ms(engine: QwenEngine, tokens: int, repeats: int) -> float:
    ids = torch.tensor([engine.encode_chat([{"role": "user", "content": "好" * 200}])[:tokens]])
    engine.model(ids, logits_to_keep=1)  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.model(ids, logits_to_keep=1)
        samples.append(time.perf_counter() - started)
    return 1000 * sorted(samples)[len(samples) // 2]


@torch.inference_mode()
def profile_decode(engine: QwenEngine, tokens: int = 20, rows: int = 12) -> str:
    """torch.profiler table of where the time of ``tokens`` decode steps goes, by operator."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.tensor([engine.encode_chat([{"role": "user", "content": "送餐太慢了"}])])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=engine.pad_token_id)
    with engine.precision(precise=False):  # the weights the reply is decoded with
        engine.model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
