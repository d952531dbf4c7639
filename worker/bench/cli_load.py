"""``python -m worker.bench`` run, brokers and peers: the service under load through the queue,
alone (beside the original pipeline), on either broker, and beside llama-server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.bench.cli_common import DEFAULT_DATA, machine_line, short_reviews
from worker.settings import available_cores


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from worker.bench.service import queue_is_empty

    if not queue_is_empty(args.redis_url):
        print(f"the queue at {args.redis_url} is not empty: use a Redis database of its own", file=sys.stderr)
        return 2
    model = _random_weights(args.shape) if args.shape else args.model
    texts = short_reviews(args.data)
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
    out += _run_tables(args, model, results, layouts, baseline, baseline_rpm)
    print("\n".join(out))
    return 0


def _random_weights(shape: str) -> str:
    """A model folder of random weights with the published shapes (no download)."""
    import tempfile

    from worker.bench.shapes import build_random_qwen

    return str(build_random_qwen(shape, Path(tempfile.mkdtemp(prefix=f"{shape}-"))))


def _run_tables(args: argparse.Namespace, model: str, results: dict, layouts: list[tuple[int, ...]],
                baseline, baseline_rpm: float | None) -> list[str]:
    """`run`'s tables: the stages and the memory of the first layout, its concurrency, the other layouts."""
    from worker.bench import report

    (count, threads) = layouts[0]
    _, rss_loaded, _, runs = results[layouts[0]]
    out = ["", f"## Latency per stage, concurrency 1, {count} worker x {threads} threads", "",
           report.stage_table(runs[0].succeeded, baseline)]
    out += _memory_table(args, model, results, layouts[0], rss_loaded)
    out += ["", f"## Concurrency, {count} worker x {threads} threads", "", report.level_table(runs, baseline_rpm)]
    for layout in layouts[1:]:
        out += ["", f"## Thread layout: {layout[0]} workers x {layout[1]} threads", "",
                report.level_table(results[layout][3], baseline_rpm)]
    return out


def _memory_table(args: argparse.Namespace, model: str, results: dict, first: tuple[int, ...],
                  rss_loaded: int) -> list[str]:
    """Each layout's RSS, and with --float32-rss a float32 worker's (started here) beside the first's."""
    from worker.bench import report
    from worker.bench.service import start_workers

    (count, threads) = first
    out = ["", "## Memory", "", "| worker | RSS after load | peak RSS under load | start s (until loaded and ready) |",
           "|---|---|---|---|"]
    for (count_, threads_), (start_, loaded_, peak_, _) in results.items():
        out.append(f"| {count_} x {threads_} threads, {args.dtype} | {report.mib(loaded_)} | {report.mib(peak_)} | "
                   f"{start_:.1f} |")
    if args.float32_rss and args.dtype != "float32":
        workers = start_workers(model, "float32", 1, threads, args.redis_url)
        rss32 = workers.rss_bytes()
        workers.stop()
        out.append(f"| 1 x {threads} threads, float32 | {report.mib(rss32)} | — | {workers.start_s:.1f} |")
        out.append(f"\n{args.dtype} worker RSS / float32 worker RSS: **{rss_loaded / count / rss32:.2f}**")
    return out


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


def cmd_brokers(args: argparse.Namespace) -> int:
    import time

    from worker.bench import brokers

    texts = short_reviews(args.data)
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


def cmd_peers(args: argparse.Namespace) -> int:
    """This service and llama-server on the same weights, one after the other, in one run."""
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
    texts = short_reviews(args.data)
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


def add_load_commands(sub) -> None:
    """The service under load through the queue, alone and beside llama-server."""
    _add_run_command(sub)
    _add_brokers_command(sub)
    _add_peers_command(sub)


def _add_run_command(sub) -> None:
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


def _add_brokers_command(sub) -> None:
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


def _add_peers_command(sub) -> None:
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
