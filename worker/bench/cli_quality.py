"""``python -m worker.bench`` accuracy, replies, step, layers, adapters, adapter-one and prompts:
what the answers are worth and what they cost, measured in process."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.bench import layers, replies, step
from worker.bench.cli_common import DEFAULT_DATA, machine_line
from worker.settings import available_cores


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


def add_quality_commands(sub) -> None:
    """What the answers are worth and cost: accuracy, replies, step, layers, adapters, adapter-one, prompts
    (in this order in --help)."""
    _add_accuracy_command(sub)
    replies.add_parser(sub, machine_line, available_cores())
    step.add_parser(sub, machine_line, available_cores())
    layers.add_parser(sub, machine_line, available_cores())
    _add_adapter_commands(sub)
    _add_prompts_command(sub)


def _add_accuracy_command(sub) -> None:
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


def _add_adapter_commands(sub) -> None:
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


def _add_prompts_command(sub) -> None:
    p = sub.add_parser("prompts", help="classifier prompt layouts and label words, in process (EVAL.md)")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CSV with label,review columns")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--layouts", default="", help="comma-separated layout names (default: all)")
    p.set_defaults(func=cmd_prompts)
