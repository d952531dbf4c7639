"""python -m worker.bench: measure the service on this machine.

    python -m worker.bench accuracy --model DIR [--dtypes float32,bfloat16,int8] [--n 400]
    python -m worker.bench adapters --model DIR|FILE.gguf --adapters FILE[,FILE] [--engine auto]
    python -m worker.bench replies --model DIR|FILE.gguf [--configs original:1.0,mood-examples]
    python -m worker.bench step --model FILE.gguf [--configs original:q8_0,mood-examples:f16]
    python -m worker.bench prompts --model DIR [--layouts system:fewshot,example-turns]
    python -m worker.bench run --model DIR|FILE.gguf [--baseline] ...
    python -m worker.bench run --shape qwen2.5-0.5b [--baseline] ...
    python -m worker.bench batching --model DIR [--baseline] [--concurrency 1,2,4,8,16]
    python -m worker.bench engine --model DIR [--dtypes float32,bfloat16,int8]
    python -m worker.bench profile --model DIR [--dtype int8]
    python -m worker.bench kernels
    python -m worker.bench peers --gguf FILE --hf DIR --llama-bin DIR [--dtype int8]

See BENCHMARKS.md for the figures and the exact commands that produced them.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from worker.settings import available_cores

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "waimai_10k.csv"


def machine_line() -> str:
    from importlib.metadata import version

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # the vector extensions torch's CPU kernels use: figures compare only within one kind

    return (f"{available_cores()} cores ({cpu}), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"torch {version('torch')}, Python {platform.python_version()}")


def cmd_accuracy(args: argparse.Namespace) -> int:
    from producer.evaluate import balanced_sample, read_rows
    from worker.bench.accuracy import format_accuracy, measure_accuracy, measure_original_accuracy
    from worker.engine.model_source import resolve_model_source

    examples = balanced_sample(read_rows(Path(args.data)), args.n, args.seed)
    source = resolve_model_source(args.model)
    rows = [measure_accuracy(source, dtype, examples, args.threads) for dtype in args.dtypes.split(",")]
    if args.gguf:
        rows.append(measure_accuracy(resolve_model_source(args.gguf), "", examples, args.threads, engine="llama.cpp"))
    if args.original:
        rows.append(measure_original_accuracy(source, examples, args.threads))
    print(f"\nsentiment accuracy, {args.n} balanced reviews of {Path(args.data).name} (seed {args.seed}); "
          f"{machine_line()}, {args.threads} threads\n")
    print(format_accuracy(rows))
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from producer.evaluate import balanced_sample, read_rows
    from worker.bench.prompts import WORD_PAIRS, format_prompts, measure_prompts
    from worker.bench.wordscores import WordScorer
    from worker.engine.model_source import resolve_model_source

    examples = balanced_sample(read_rows(Path(args.data)), args.n, args.seed)
    names = args.layouts.split(",") if args.layouts else None
    words = [word for _, *pair in WORD_PAIRS for word in pair]
    scorer = WordScorer.load(resolve_model_source(args.model), words, args.dtype, args.threads)
    rows = measure_prompts(scorer, examples, names)
    print(f"\nclassifier prompt layouts, {args.n} balanced reviews of {Path(args.data).name} (seed {args.seed}), "
          f"DTYPE={args.dtype}; {machine_line()}, {args.threads} threads\n")
    print(format_prompts(rows))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from worker.bench import report
    from producer.evaluate import balanced_sample, read_rows
    from worker.bench.service import queue_is_empty, start_workers

    if not queue_is_empty(args.redis_url):
        print(f"the queue at {args.redis_url} is not empty: use a Redis database of its own", file=sys.stderr)
        return 2
    model = args.model
    if args.shape:
        from worker.bench.shapes import build_random_qwen

        model = str(build_random_qwen(args.shape, Path(tempfile.mkdtemp(prefix=f"{args.shape}-"))))
    examples = balanced_sample(read_rows(Path(args.data)), 400, seed=1)
    texts = [e.text for e in examples if len(e.text) <= 40][:100]  # short Chinese reviews
    levels = [int(c) for c in args.concurrency.split(",")]
    out = [f"# qwen-allinone benchmark, {time.strftime('%Y-%m-%d %H:%M')}",
           f"machine: {machine_line()}",
           f"model: {args.shape or args.model}; DTYPE={args.dtype}; reply fixed at {args.reply_tokens} tokens "
           f"(min_new_tokens = max_new_tokens); inputs: short reviews from {Path(args.data).name}"]

    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    results = _measure_layouts(args, model, texts, layouts, levels)

    baseline = baseline_rpm = None
    if args.baseline:
        baseline, baseline_rpm, engine_lines = run_in_process(args, model, texts)
        out += engine_lines

    (count, threads) = layouts[0]
    _, rss_loaded, _, runs = results[layouts[0]]
    out += ["", f"## Latency per stage, concurrency 1, {count} worker x {threads} threads", "",
            report.stage_table(runs[0].succeeded, baseline)]
    out += ["", "## Memory", "", "| worker | RSS after load | peak RSS under load | start s (until loaded and ready) |",
            "|---|---|---|---|"]
    for (count_, threads_), (start_, loaded_, peak_, _) in results.items():
        out.append(f"| {count_} x {threads_} threads, {args.dtype} | {report.mib(loaded_)} | {report.mib(peak_)} | "
                   f"{start_:.1f} |")
    if args.float32_rss and args.dtype != "float32":
        workers = start_workers(model, "float32", 1, layouts[0][1], args.redis_url)
        rss32 = workers.rss_bytes()
        workers.stop()
        out.append(f"| 1 x {layouts[0][1]} threads, float32 | {report.mib(rss32)} | — | {workers.start_s:.1f} |")
        out.append(f"\n{args.dtype} worker RSS / float32 worker RSS: **{rss_loaded / count / rss32:.2f}**")
    out += ["", f"## Concurrency, {count} worker x {threads} threads", "", report.level_table(runs, baseline_rpm)]
    for layout in layouts[1:]:
        out += ["", f"## Thread layout: {layout[0]} workers x {layout[1]} threads", "",
                report.level_table(results[layout][3], baseline_rpm)]
    print("\n".join(out))
    return 0


def _measure_layouts(args: argparse.Namespace, model: str, texts: list[str], layouts: list[tuple[int, ...]],
                     levels: list[int]) -> dict:
    """(workers, threads) -> (start s, RSS after load, peak RSS, runs): the first layout at every level
    of concurrency, the others at 1 and 8."""
    from worker.bench.service import RssSampler, run_level, start_workers

    results = {}
    for index, (count, threads) in enumerate(layouts):
        workers = start_workers(model, args.dtype, count, threads, args.redis_url)
        try:  # never leave model-holding workers behind
            rss_loaded = workers.rss_bytes()
            run_level(args.redis_url, texts, 1, 2, args.reply_tokens, "warm-up")
            with RssSampler(workers) as sampler:
                if index == 0:
                    c1 = run_level(args.redis_url, texts, 1, args.jobs, args.reply_tokens, f"{count}x{threads} c=1")
                    runs = [c1] + [run_level(args.redis_url, texts, c, max(args.min_jobs, 2 * c),
                                             args.reply_tokens, f"{count}x{threads} c={c}") for c in levels if c != 1]
                else:
                    runs = [run_level(args.redis_url, texts, c, max(args.min_jobs, 2 * c), args.reply_tokens,
                                      f"{count}x{threads} c={c}") for c in (1, 8)]
        finally:
            workers.stop()
        results[(count, threads)] = (workers.start_s, rss_loaded, sampler.peak, runs)
    return results


def run_in_process(args, model: str, texts: list[str]):
    """The original pipeline and engine micro-timings, in this process, one after the other."""
    import gc

    from tqdm import tqdm

    from worker.bench.baseline import OriginalPipeline
    from worker.bench.micro import (
        decode_ms_per_token,
        hf_decode_ms_per_token,
        hf_prefill_ms,
        hf_weight_bytes,
        memory_bandwidth_gbps,
        prefill_ms,
    )
    from worker.engine.qwen import QwenEngine
    from worker.engine.model_source import resolve_model_source

    source = resolve_model_source(model)
    threads = int(args.layouts.split(",")[0].split("x")[1])
    original = OriginalPipeline(source, threads)
    timings = [original.run(texts[i % len(texts)], args.reply_tokens)
               for i in tqdm(range(args.baseline_jobs), desc="original pipeline", unit="job")]
    baseline_rpm = 60_000 / (sum(t.total_ms for t in timings) / len(timings))
    rows = [("original (float32)", hf_prefill_ms(original.model, original.tokenizer),
             hf_decode_ms_per_token(original.model, original.tokenizer), hf_weight_bytes(original.model))]
    del original
    gc.collect()
    engine = QwenEngine.load(source, args.dtype, threads)
    rows.append((f"ours ({args.dtype})", prefill_ms(engine), decode_ms_per_token(engine),
                 engine.info().weight_bytes))
    bandwidth = memory_bandwidth_gbps()
    lines = ["", "## Engine, in process", "",
             f"read bandwidth {bandwidth:.1f} GB/s; floor = weight bytes read per token / bandwidth", "",
             "| weights | prefill 34 tok ms (no prefix cache) | decode ms/token | weight bytes | floor ms/token | "
             "decode / floor |",
             "|---|---|---|---|---|---|"]
    for name, prefill, decode, nbytes in rows:
        floor = 1000 * nbytes / (bandwidth * 1e9)
        lines.append(f"| {name} | {prefill:.0f} | {decode:.1f} | {nbytes / 1e6:.0f} MB | {floor:.1f} | "
                     f"{decode / floor:.2f} |")
    lines.append(f"\noriginal pipeline: {len(timings)} jobs, "
                 f"{sum(t.label is None for t in timings)} without a valid label; {baseline_rpm:.1f} jobs/min")
    return timings, baseline_rpm, lines


def cmd_batching(args: argparse.Namespace) -> int:
    """Longer than 60 lines: one report, assembled in the order it prints (modes, peer, open loops,
    targets, memory), from the parts batching.py measures."""
    import time

    from producer.evaluate import balanced_sample, read_rows
    from worker.bench import batching

    names = [name for name in batching.MODES if name in args.modes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    problem = _batching_arguments_problem(args, names, levels)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    examples = balanced_sample(read_rows(Path(args.data)), 400, seed=1)
    load = batching.Load(
        texts=[e.text for e in examples if len(e.text) <= 40][:100],  # short Chinese reviews, as in `run`
        levels=levels, reply_tokens=args.reply_tokens, c1_jobs=args.c1_jobs, jobs_per_client=args.jobs_per_client,
        open_fractions=tuple(float(f) for f in args.open_loop.split(",") if f), open_jobs=args.open_jobs)
    count, threads = (int(x) for x in args.layout.split("x"))
    out = [f"# batching off, static and continuous, {time.strftime('%Y-%m-%d %H:%M')}", f"machine: {machine_line()}",
           f"model: {args.model}; DTYPE={args.dtype}; {count} worker(s) x {threads} threads; BATCH_MAX "
           f"{args.batch_max} (static, continuous) or 1 (off), BATCH_WAIT_MS {args.batch_wait_ms:g}; reply fixed at "
           f"{args.reply_tokens} tokens, temperature 0.7; closed loop: each client submits, waits, submits again; "
           f"open loop: {args.open_jobs} Poisson arrivals at each fraction of the capacity", ""]
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
    if args.worst_case:
        out += ["", *batching.worst_case_memory(args.model, args.dtype, threads, args.batch_max,
                                                args.worst_case_chars, args.worst_case_tokens)]
    if args.stall:
        out += ["", *batching.join_stall(args.model, args.dtype, threads, args.batch_max - 1, args.worst_case_chars)]
    print("\n".join(out))
    return 0


def _batching_arguments_problem(args: argparse.Namespace, names: list[str], levels: list[int]) -> str | None:
    from worker.bench.service import queue_is_empty

    if not queue_is_empty(args.redis_url):
        return f"the queue at {args.redis_url} is not empty: use a Redis database of its own"
    if args.rounds > 1 and (len(names) < 2 or names[0] != "off" or not {1, 8} <= set(levels)):
        return "--rounds needs batching off and another mode, and concurrency levels 1 and 8"
    if args.llama_bin and not (args.gguf and (Path(args.llama_bin) / "llama-server").is_file()):
        return "--llama-bin needs llama-server in that folder and --gguf (the same weights as --model)"
    return None


def cmd_brokers(args: argparse.Namespace) -> int:
    import time

    from producer.evaluate import balanced_sample, read_rows
    from worker.bench import brokers

    examples = balanced_sample(read_rows(Path(args.data)), 400, seed=1)
    texts = [e.text for e in examples if len(e.text) <= 40][:100]  # short Chinese reviews, as in `run`
    count, threads = (int(x) for x in args.layout.split("x"))
    order = [("redis", None), ("rabbitmq", args.broker)]
    runs = [brokers.run_broker(name, url, model=args.model, dtype=args.dtype, layout=(count, threads),
                               redis_url=args.redis_url, texts=texts, reply_tokens=args.reply_tokens,
                               lone_jobs=args.lone_jobs, jobs_per_client=args.jobs_per_client)
            for number in range(args.rounds) for name, url in (order if number % 2 == 0 else order[::-1])]
    print("\n".join([f"# the queue in Redis and in RabbitMQ, {time.strftime('%Y-%m-%d %H:%M')}",
                     f"machine: {machine_line()}",
                     f"model: {args.model}; DTYPE={args.dtype}; {count} worker(s) x {threads} threads, default "
                     f"batching; reply fixed at {args.reply_tokens} tokens; records in {args.redis_url}; RabbitMQ: "
                     f"{_without_password(args.broker)}; {args.rounds} round(s), the order alternating", "",
                     *brokers.table(runs)]))
    return 0


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 5672}{parts.path}"


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


def cmd_peers(args: argparse.Namespace) -> int:
    """This service and llama-server on the same weights, one after the other, in one run."""
    from producer.evaluate import balanced_sample, read_rows
    from worker.bench import peers
    from worker.bench.service import queue_is_empty

    if not queue_is_empty(args.redis_url):
        print(f"the queue at {args.redis_url} is not empty: use a Redis database of its own", file=sys.stderr)
        return 2
    if not (Path(args.llama_bin) / "llama-server").is_file():
        print(f"--llama-bin {args.llama_bin}: no llama-server there (../shared/peers/build_llama_server.sh builds it)",
              file=sys.stderr)
        return 2
    config = peers.PeersConfig(
        gguf=Path(args.gguf), hf_folder=Path(args.hf), llama_bin=Path(args.llama_bin), dtype=args.dtype,
        threads=args.threads, redis_url=args.redis_url, levels=tuple(int(c) for c in args.concurrency.split(",")),
        jobs_per_client=args.jobs_per_client, reply_tokens=args.reply_tokens)
    examples = balanced_sample(read_rows(Path(args.data)), 400, seed=1)
    texts = [e.text for e in examples if len(e.text) <= 40][:100]  # short Chinese reviews, as in `batching`
    from worker.bench.micro import memory_bandwidth_gbps

    engines = [e for e in peers.our_engines(config) if e.engine in args.engines.split(",")]
    subjects, weight_bytes = [], {}
    for engine in engines:  # one system at a time: two cores
        subjects.append(peers.measure_service(config, engine, texts))
        weight_bytes[engine.name] = peers.measure_engine_in_process(config, engine, subjects[-1])
    llama, llama_info = peers.measure_llama_server(config, texts)
    lines = peers.report(config, [*subjects, llama], machine_line(), llama_info, weight_bytes, memory_bandwidth_gbps())
    print("\n".join(lines))
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


def cmd_adapters(args: argparse.Namespace) -> int:
    from producer.evaluate import balanced_sample, read_rows
    from worker.bench.adapters import format_costs, measure

    examples = balanced_sample(read_rows(Path(args.data)), args.n, args.seed)
    costs = measure(args.model, args.adapters.split(","), args.dtype, args.threads, examples, args.engine)
    print(f"\nclassifier adapters at serving time, ENGINE={args.engine}, DTYPE={args.dtype}, {args.n} reviews of {Path(args.data).name} "
          f"(seed {args.seed}); {machine_line()}, {args.threads} threads\n")
    print(format_costs(costs))
    return 0


def cmd_adapter_one(args: argparse.Namespace) -> int:
    import json

    from worker.bench.adapters import cost_json, measure_one

    print(cost_json(measure_one(args.model, args.adapter, args.dtype, args.threads, json.loads(args.texts),
                                engine=args.engine)))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from worker.bench.micro import profile_decode
    from worker.engine.qwen import QwenEngine
    from worker.engine.model_source import resolve_model_source

    engine = QwenEngine.load(resolve_model_source(args.model), args.dtype, args.threads)
    print(f"decode profile, {args.tokens} tokens, DTYPE={args.dtype}; {machine_line()}, {args.threads} threads\n")
    print(profile_decode(engine, args.tokens, rows=args.rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quality_commands(sub)
    _add_load_commands(sub)
    _add_batching_command(sub)
    _add_engine_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _add_quality_commands(sub) -> None:
    """What the answers are worth: accuracy, prompts, adapters, replies."""
    p = sub.add_parser("accuracy", help="sentiment accuracy per DTYPE on a fixed balanced sample")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--gguf", help="also this .gguf file on the llama.cpp engine (the same weights as --model)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CSV with label,review columns")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--original", action="store_true", help="also the original pipeline's generate-and-search decision")
    p.set_defaults(func=cmd_accuracy)

    from worker.bench import replies

    replies.add_parser(sub, machine_line, available_cores())
    from worker.bench import layers, step

    step.add_parser(sub, machine_line, available_cores())
    layers.add_parser(sub, machine_line, available_cores())

    p = sub.add_parser("adapters", help="what classifier adapters cost at serving time: RSS, sentiment, reply")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--engine", choices=("auto", "torch", "llama.cpp"), default="auto")
    p.add_argument("--adapters", required=True, help="comma-separated adapter files (worker.tune)")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CSV with label,review columns")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=available_cores())
    p.set_defaults(func=cmd_adapters)

    # One configuration of `adapters`, in a process of its own (prints one JSON line).
    p = sub.add_parser("adapter-one")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--engine", default="auto")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--texts", required=True, help="a JSON list of texts")
    p.set_defaults(func=cmd_adapter_one)

    p = sub.add_parser("prompts", help="classifier prompt layouts and label words, in process (EVAL.md)")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CSV with label,review columns")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--layouts", default="", help="comma-separated layout names (default: all)")
    p.set_defaults(func=cmd_prompts)


def _add_load_commands(sub) -> None:
    """The service under load through the queue, alone and beside llama-server."""
    p = sub.add_parser("run", help="the service under load, side by side with the original pipeline")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="model folder or .gguf file (real weights)")
    model.add_argument("--shape", choices=["qwen1.5-0.5b", "qwen2.5-0.5b"],
                       help="random weights with the published shapes (no download)")
    p.add_argument("--dtype", default="int8", help="DTYPE of the workers (default int8)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="a Redis database the bench may use")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--reply-tokens", type=int, default=45, help="fixed reply length (the original's mean: 45)")
    p.add_argument("--jobs", type=int, default=50, help="jobs for the per-stage table at concurrency 1")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--min-jobs", type=int, default=8, help="jobs per concurrency level: max(this, 2 x level)")
    p.add_argument("--layouts", default=f"1x{available_cores()},{available_cores()}x1",
                   help="workers x threads; the first is the main one, the others run c=1 and c=8")
    p.add_argument("--baseline", action="store_true", help="also time the original pipeline in process")
    p.add_argument("--baseline-jobs", type=int, default=5)
    p.add_argument("--float32-rss", action="store_true", help="also start a float32 worker to compare RSS")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("brokers", help="the service with its queue in Redis and in RabbitMQ, side by side")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--broker", required=True, help="the RabbitMQ to compare: amqp://user:pw@host:5672/vhost "
                   "(a vhost of the bench's own)")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="a Redis database the bench may use")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--layout", default=f"1x{available_cores()}", help="workers x threads")
    p.add_argument("--reply-tokens", type=int, default=45, help="fixed reply length (the original's mean: 45)")
    p.add_argument("--lone-jobs", type=int, default=8, help="jobs at concurrency 1 (delivery to an idle worker)")
    p.add_argument("--jobs-per-client", type=int, default=3, help="jobs per client at concurrency 8")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating which broker runs first")
    p.set_defaults(func=cmd_brokers)

    p = sub.add_parser("peers", help="this service beside llama-server on the same GGUF weights, one run")
    p.add_argument("--gguf", required=True, help="the .gguf file llama-server runs")
    p.add_argument("--hf", required=True, help="the same weights as a Hugging Face folder (get_real_qwen.py --hf)")
    p.add_argument("--llama-bin", required=True, help="folder of llama-server and llama-batched-bench")
    p.add_argument("--dtype", default="int8", help="the torch engine's DTYPE")
    p.add_argument("--engines", default="llama.cpp,torch", help="which of our engines to run, in this order")
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--concurrency", default="1,8,16")
    p.add_argument("--jobs-per-client", type=int, default=6)
    p.add_argument("--reply-tokens", type=int, default=45)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CSV with label,review columns (the job texts)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="a Redis database of its own")
    p.set_defaults(func=cmd_peers)


def _add_batching_command(sub) -> None:
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


def _add_engine_commands(sub) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
