"""What the reply's instructions and repetition control cost and give, per configuration, in one run.

    python -m worker.bench replies --model FILE.gguf|DIR --configs original:1.0,mood-examples
    python -m worker.bench replies --model FILE.gguf|DIR --configs ... --score [--temperature 0]

Without ``--score``: reply time. With it: the shipped prompt set through the engine (no queue), scored as
``qwen-allinone eval-replies`` scores it: the quick way to compare variants before measuring the chosen
one through the queue.

A configuration is ``REPLY_PROMPT[:REPETITION_PENALTY[:NO_REPEAT_NGRAM[:NO_COPY_NGRAM[:TOP_K[:TOP_P]]]]]``:
an empty or missing field keeps the default; ``1.0``, ``0`` and ``1.0`` turn the penalty, top-k and top-p
off. One engine is loaded; each configuration's prompts are built over it in turn, and the rounds alternate between configurations so that drift on a shared machine hits them alike.
Every reply has a fixed length (stop tokens ignored), so the figures compare the cost of a token.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from producer.reply_eval import SHIPPED_PROMPTS
from producer.reply_scores import read_prompts

ROWS = 8
TOKENS = 45


def _engine_for(base, config: str, default_sampler):
    """A QwenEngine over ``base``'s model with ``config``'s prompts and sampler (``default_sampler``, the
    loaded engine's, with the config's penalty); ``base``'s prefixes are handed back first (llama.cpp has
    a fixed number of sequence ids)."""
    from worker.engine.qwen import QwenEngine

    variant, penalty, ngram, copy_ngram, top_k, top_p = (config.split(":") + [""] * 5)[:6]
    for prefix in [*base.reply_prefixes.built(), *base.classifier_prefixes.built()]:
        prefix.sequences.release()
    given = {  # the fields the configuration sets, with the settings' meaning of "off"
        "repetition_penalty": penalty and (None if float(penalty) == 1.0 else float(penalty)),
        "no_repeat_ngram": ngram and int(ngram), "no_copy_ngram": copy_ngram and int(copy_ngram),
        "top_k": top_k and (int(top_k) or None), "top_p": top_p and (float(top_p) if float(top_p) < 1.0 else None),
    }
    sampler = dataclasses.replace(default_sampler, **{name: value for name, value in given.items() if value != ""})
    return QwenEngine(base.model, base.chat, base.model_id, base.dtype_name, sampler,
                      prompt_variant=base.prompt_variant, reply_variant=variant or "original")


def measure(model: str, engine_name: str, configs: list[str], dtype: str, threads: int, rounds: int,
            temperature: float = 0.0) -> dict[str, list[float]]:
    """Config -> reply ms of each round (ROWS replies of TOKENS tokens together)."""
    from worker.engine import ReplyRequest, load_engine
    from worker.engine.model_source import resolve_model_source
    from worker.engine.prompts import reply_mood

    engine = load_engine(resolve_model_source(model), dtype, threads, engine=engine_name,
                         kv_cache_tokens=ROWS * 1024, max_rows=ROWS)
    texts = [item["text"] for item in read_prompts(SHIPPED_PROMPTS) if item["kind"] == "review"][:ROWS]
    moods = [reply_mood("zh", s.label, s.confidence) for s in engine.classify_batch([(t, "zh") for t in texts])]
    times: dict[str, list[float]] = {config: [] for config in configs}
    default_sampler = engine.sampler
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for config in configs:
            engine = _engine_for(engine, config, default_sampler)
            requests = [ReplyRequest(t, max_new_tokens=TOKENS, min_new_tokens=TOKENS, mood=m, temperature=temperature)
                        for t, m in zip(texts, moods)]
            started = time.perf_counter()
            engine.reply_batch(requests, history_max_tokens=0)
            times[config].append(1000 * (time.perf_counter() - started))
    return {config: ms[1:] for config, ms in times.items()}


def score(model: str, engine_name: str, configs: list[str], dtype: str, threads: int, temperature: float
          ) -> dict[str, str]:
    """Config -> the eval-replies tables of the shipped prompt set, replies of up to 128 tokens."""
    from producer.reply_scores import format_tables, per_kind, score_reply, summarize
    from worker.engine import ReplyRequest, load_engine
    from worker.engine.model_source import resolve_model_source
    from worker.engine.prompts import reply_mood

    engine = load_engine(resolve_model_source(model), dtype, threads, engine=engine_name,
                         kv_cache_tokens=ROWS * 1024, max_rows=ROWS)
    items = read_prompts(SHIPPED_PROMPTS)
    labels = engine.classify_batch([(item["text"], item["lang"]) for item in items])
    tables = {}
    default_sampler = engine.sampler
    for config in configs:
        engine = _engine_for(engine, config, default_sampler)
        requests = [ReplyRequest(item["text"], max_new_tokens=128, temperature=temperature,
                                 mood=reply_mood(item["lang"], label.label, label.confidence))
                    for item, label in zip(items, labels)]
        results = engine.reply_batch(requests, history_max_tokens=0)
        scores = [score_reply(item, r.text, r.stop_reason.value) for item, r in zip(items, results)]
        runs = sum(key.split(" ")[0] == config for key in tables)  # a configuration may be given twice
        tables[config + (f" (run {runs + 1})" if runs else "")] = format_tables(summarize(scores), per_kind(scores))
    return tables


def format_times(times: dict[str, list[float]]) -> str:
    first = statistics.median(next(iter(times.values())))
    lines = [f"| configuration | reply ms ({ROWS} x {TOKENS} tokens), median | vs first |", "|---|---|---|"]
    for config, ms in times.items():
        lines.append(f"| {config} | {statistics.median(ms):.0f} | {statistics.median(ms) / first:.3f} |")
    return "\n".join(lines)


def add_parser(sub, machine_line, default_threads: int) -> None:
    def run(args: argparse.Namespace) -> int:
        configs = args.configs.split(",")
        if args.score:
            print(f"\nreplies to the shipped prompt set per configuration, ENGINE={args.engine}, temperature "
                  f"{args.temperature:g}; {machine_line()}, {args.threads} threads")
            for config, table in score(args.model, args.engine, configs, args.dtype, args.threads,
                                       args.temperature).items():
                print(f"\n{config}\n{table}")
            return 0
        times = measure(args.model, args.engine, configs, args.dtype, args.threads, args.rounds, args.temperature)
        print(f"\nreply time per configuration, ENGINE={args.engine}, temperature {args.temperature:g}, "
              f"{args.rounds} rounds alternating; "
              f"{machine_line()}, {args.threads} threads\n")
        print(format_times(times))
        return 0

    p = sub.add_parser("replies", help="reply time per REPLY_PROMPT and repetition control, side by side")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--engine", choices=("auto", "torch", "llama.cpp"), default="auto")
    p.add_argument("--configs", default="original:1.0,mood-examples",
                   help="comma-separated REPLY_PROMPT[:REPETITION_PENALTY[:NO_REPEAT_NGRAM[:NO_COPY_NGRAM[:TOP_K[:TOP_P]]]]]")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--score", action="store_true", help="score replies to the shipped prompt set instead of timing")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--threads", type=int, default=default_threads)
    p.set_defaults(func=run)
