"""``python -m worker.bench`` engine, profile and kernels: one engine in process (load, memory,
decode steps) and the matmul kernels under it."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.bench.cli_common import DEFAULT_DATA, machine_line
from worker.settings import available_cores


def cmd_engine(args: argparse.Namespace) -> int:
    """Each DTYPE side by side, in process: load time, RSS growth, prefill, decode, sentiment."""
    import gc
    import time

    import psutil

    from producer.evaluate import balanced_sample, read_rows
    from worker.bench.micro import decode_ms_per_token, memory_bandwidth_gbps, prefill_ms
    from worker.engine.qwen import QwenEngine
    from worker.engine.model_source import resolve_model_source

    source = resolve_model_source(args.model)
    texts = [e.text for e in balanced_sample(read_rows(Path(args.data)), 40, seed=1)]
    bandwidth = memory_bandwidth_gbps()
    lines = [f"engine per DTYPE, in process; {machine_line()}, {args.threads} threads; "
             f"read bandwidth {bandwidth:.1f} GB/s", "",
             "| DTYPE | load s | RSS added | sentiment ms (p50, 40 reviews) | prefill 34 tok ms | "
             "decode ms/token | weight MB read/token | floor ms | decode / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dtype in args.dtypes.split(","):
        gc.collect()
        rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        engine = QwenEngine.load(source, dtype, args.threads)
        load_s = time.perf_counter() - started
        rss_added = psutil.Process().memory_info().rss - rss_before
        samples = []
        for text in texts:
            started = time.perf_counter()
            engine.classify(text)
            samples.append(1000 * (time.perf_counter() - started))
        decode = decode_ms_per_token(engine)
        nbytes = engine.info().weight_bytes
        floor = 1000 * nbytes / (bandwidth * 1e9)
        lines.append(f"| {dtype} | {load_s:.1f} | {rss_added / 2**20:.0f} MiB | {sorted(samples)[len(samples) // 2]:.0f} | "
                     f"{prefill_ms(engine):.0f} | {decode:.1f} | {nbytes / 1e6:.0f} | {floor:.1f} | {decode / floor:.2f} |")
        del engine
    print("\n".join(lines))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from worker.bench.micro import profile_decode
    from worker.engine.qwen import QwenEngine
    from worker.engine.model_source import resolve_model_source

    engine = QwenEngine.load(resolve_model_source(args.model), args.dtype, args.threads)
    print(f"decode profile, {args.tokens} tokens, DTYPE={args.dtype}; {machine_line()}, {args.threads} threads\n")
    print(profile_decode(engine, args.tokens, rows=args.rows))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    import time

    import torch

    from worker.bench.kernels import kernel_table

    torch.set_num_threads(args.threads)
    print(f"# matmul kernels on Qwen2.5-0.5B's shapes, {time.strftime('%Y-%m-%d %H:%M')}\n"
          f"machine: {machine_line()}, {args.threads} threads; median of {args.repeats}\n")
    print("\n".join(kernel_table(repeats=args.repeats)))
    return 0


def add_engine_commands(sub) -> None:
    """One engine in process: load, memory, decode steps, kernels."""
    p = sub.add_parser("engine", help="each DTYPE side by side, in process: load, memory, prefill, decode")
    p.add_argument("--model", required=True)
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--threads", type=int, default=available_cores())
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("profile", help="where decode time goes, by operator (torch.profiler)")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="int8")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--rows", type=int, default=1, help="rows decoding together")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("kernels", help="the CPU matmul kernels of each weight format, on the 0.5B shapes")
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--repeats", type=int, default=30)
    p.set_defaults(func=cmd_kernels)
