"""``python -m worker.bench batching``: batching off, static and continuous side by side under load
(and llama-server beside them); the parts it measures are batching.py's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.bench.cli_common import DEFAULT_DATA, machine_line, short_reviews
from worker.settings import available_cores


def cmd_batching(args: argparse.Namespace) -> int:
    """One report, in the order it prints: modes (round by round), peer, open loops, targets, memory."""
    from worker.bench import batching

    names = [name for name in batching.MODES if name in args.modes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    problem = _batching_arguments_problem(args, names, levels)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    load = batching.Load(
        texts=short_reviews(args.data),
        levels=levels, reply_tokens=args.reply_tokens, c1_jobs=args.c1_jobs, jobs_per_client=args.jobs_per_client,
        open_fractions=tuple(float(f) for f in args.open_loop.split(",") if f), open_jobs=args.open_jobs)
    count, threads = (int(x) for x in args.layout.split("x"))
    out = _batching_header(args, count, threads)
    capacity: list[float] = [args.capacity] if args.capacity else []
    # Alternate which mode runs first, so the machine's drift favours none (--modes none: no rounds).
    rounds = [batching.run_modes(args.model, args.dtype, (count, threads), args.redis_url, load, args.batch_max,
                                 args.batch_wait_ms, names if number % 2 == 0 else names[::-1], capacity)
              for number in range(args.rounds)] if names else []
    if capacity:
        out.append(f"capacity for the open loops: {capacity[0]:.1f} jobs/min "
                   f"({'given' if args.capacity else 'the first batching mode’s best closed loop'})\n")
    peer = None
    if args.llama_bin:
        peer = batching.run_llama_peer(Path(args.llama_bin), Path(args.gguf), count * threads, load,
                                       capacity[0] if capacity else None)
        out.append(f"llama.cpp build: {peer.build}; llama-server -np 8 on {args.gguf}, {count * threads} threads, "
                   "latency measured by the client\n")
    baseline = None
    if args.baseline:
        baseline = batching.baseline_jobs_per_minute(args.model, count * threads, load.texts, args.reply_tokens,
                                                     args.baseline_jobs)
        out.append(f"original pipeline, sequential, in process, {count * threads} threads: "
                   f"{baseline:.1f} jobs/min ({args.baseline_jobs} jobs)\n")
    out += _round_tables(rounds, peer, baseline)
    if args.worst_case:
        out += ["", *batching.worst_case_memory(args.model, args.dtype, threads, args.batch_max,
                                                args.worst_case_chars, args.worst_case_tokens)]
    if args.stall:
        out += ["", *batching.join_stall(args.model, args.dtype, threads, args.batch_max - 1, args.worst_case_chars)]
    print("\n".join(out))
    return 0


def _batching_header(args: argparse.Namespace, count: int, threads: int) -> list[str]:
    import time

    return [f"# batching off, static and continuous, {time.strftime('%Y-%m-%d %H:%M')}", f"machine: {machine_line()}",
            f"model: {args.model}; DTYPE={args.dtype}; {count} worker(s) x {threads} threads; BATCH_MAX "
            f"{args.batch_max} (static, continuous) or 1 (off), BATCH_WAIT_MS {args.batch_wait_ms:g}; reply fixed at "
            f"{args.reply_tokens} tokens, temperature 0.7; closed loop: each client submits, waits, submits again; "
            f"open loop: {args.open_jobs} Poisson arrivals at each fraction of the capacity", ""]


def _round_tables(rounds: list, peer, baseline: float | None) -> list[str]:
    """Each round's tables; llama-server's beside the first round's only (it ran once)."""
    from worker.bench import batching

    out = []
    peer_rpm = {loop.concurrency: loop.jobs_per_minute for loop in peer.loops} if peer else None
    for number, modes in enumerate(rounds, start=1):
        if len(rounds) > 1:
            out += [f"### round {number}", ""]
        out += [batching.level_table(modes, baseline), ""]
        if peer is not None and number == 1:
            out += [peer.table(), ""]
        if any(mode.open_loops for mode in modes):
            out += [batching.open_table(modes, peer.open_loops if peer and number == 1 else None), ""]
        out += [*batching.targets(modes, baseline, peer_rpm), "", batching.memory_table(modes), ""]
    if len(rounds) > 1:
        out += ["### the latency targets, round by round", "", *batching.rounds_summary(rounds)]
    return out


def _batching_arguments_problem(args: argparse.Namespace, names: list[str], levels: list[int]) -> str | None:
    from worker.bench.service import queue_is_empty

    if not queue_is_empty(args.redis_url):
        return f"the queue at {args.redis_url} is not empty: use a Redis database of its own"
    if args.rounds > 1 and (len(names) < 2 or names[0] != "off" or not {1, 8} <= set(levels)):
        return "--rounds needs batching off and another mode, and concurrency levels 1 and 8"
    if args.llama_bin and not (args.gguf and (Path(args.llama_bin) / "llama-server").is_file()):
        return "--llama-bin needs llama-server in that folder and --gguf (the same weights as --model)"
    return None


def add_batching_command(sub) -> None:
    """Batching off, static and continuous under load (and llama-server beside them)."""
    p = sub.add_parser("batching", help="batching off, static and continuous side by side under load")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="a Redis database the bench may use")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--layout", default=f"1x{available_cores()}", help="workers x threads")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--batch-max", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=50.0)
    p.add_argument("--modes", default="off,static,continuous",
                   help="comma-separated: off (BATCH_MAX=1), static (JOIN_WINDOW_S=0), continuous; or none")
    p.add_argument("--open-loop", default="0.5,0.8",
                   help="open loops at these fractions of the capacity (empty: none)")
    p.add_argument("--open-jobs", type=int, default=60, help="jobs per open loop")
    p.add_argument("--capacity", type=float, help="jobs/min the open-loop fractions refer to (default: measured "
                                                  "as the first batching mode's best closed loop)")
    p.add_argument("--llama-bin", help="also llama-server -np 8 under the same load (folder of llama-server)")
    p.add_argument("--gguf", help="the .gguf file llama-server runs: the same weights as --model")
    p.add_argument("--reply-tokens", type=int, default=45, help="fixed reply length (the original's mean: 45)")
    p.add_argument("--c1-jobs", type=int, default=20, help="jobs at concurrency 1")
    p.add_argument("--jobs-per-client", type=int, default=3, help="jobs per client above concurrency 1")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the modes this many times, alternating which runs first (needs off, c=1 and c=8)")
    p.add_argument("--baseline", action="store_true", help="also time the original pipeline in process")
    p.add_argument("--baseline-jobs", type=int, default=5)
    p.add_argument("--worst-case", action="store_true", help="also one batch of the longest jobs, in process")
    p.add_argument("--stall", action="store_true",
                   help="also what a --worst-case-chars job joining costs the decoding rows, in process")
    p.add_argument("--worst-case-chars", type=int, default=2000, help="input length (MAX_INPUT_CHARS)")
    p.add_argument("--worst-case-tokens", type=int, default=128, help="generated tokens (MAX_NEW_TOKENS)")
    p.set_defaults(func=cmd_batching)
