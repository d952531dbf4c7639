"""Train a classifier adapter on labelled reviews: ``qwen-allinone-tune --model M --data CSV [--data CSV] --out FILE``.

The adapter (worker/engine/adapter.py) decides the sentiment pass only; serve
it with ``CLASSIFIER_ADAPTER=FILE``. The default technique, ``readout``, is
trained across domains (worker/tune_readout.py: a domain is a file's ``cat``
column, or the file's name) and reports leave-one-domain-out accuracy. The
``lora`` and ``deep-prefix`` techniques split their rows the same way every time:

- the eval command's dev sample (``--dev-size`` balanced rows, seed 0, the rows
  ``qwen-allinone eval CSV --limit 400 --seed 0`` measures) is left out entirely,
  and so is every other row with the same text;
- a balanced held-out split (``--heldout`` rows, ``--seed``) is kept aside and
  scored at the end;
- training takes the rest (a balanced sample of ``--limit`` rows when given).

CPU only and deterministic for a seed. Also installed as ``qwen-allinone-tune``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from producer.evaluate import Row, balanced_sample, read_rows
from jobqueue.protocol import LABEL_SETS
from worker.engine.adapter import READOUT, TECHNIQUES
from worker.engine.prompts import CLASSIFIER_PROMPTS, DEFAULT_CLASSIFIER_PROMPT

#: The lora recipe's training rows: it trains in under 30 minutes on 2 cores with the 0.5B model (EVAL.md).
DEFAULT_LIMIT = 3000
DEV_SEED = 0
#: The readout recipe's training rows per domain (EVAL.md): its hidden states take most of its time.
DEFAULT_PER_DOMAIN = 400


@dataclass(frozen=True)
class Split:
    train: list[Row]
    heldout: list[Row]
    #: Rows left out because their text is in the dev sample.
    excluded: int


def split_rows(rows: list[Row], *, dev_size: int, heldout: int, limit: int | None, seed: int) -> Split:
    """Dev sample out (by text), then a balanced held-out split, then the training rows."""
    dev_texts = {row.text for row in balanced_sample(rows, dev_size, DEV_SEED)} if dev_size else set()
    remaining = [row for row in rows if row.text not in dev_texts]
    kept_aside = balanced_sample(remaining, heldout, seed) if heldout else []
    aside = {id(row) for row in kept_aside}
    train = [row for row in remaining if id(row) not in aside]
    if limit is not None and limit < len(train):
        try:
            train = balanced_sample(train, limit, seed)
        except ValueError:  # too few of one class for a balanced sample: a plain one
            train = random.Random(seed).sample(train, limit)
    return Split(train, kept_aside, len(rows) - len(remaining))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qwen-allinone-tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model the worker serves: a folder or a .gguf file")
    p.add_argument("--data", required=True, type=Path, action="append",
                   help="a CSV of labelled texts; give it again for more files (domains)")
    p.add_argument("--out", required=True, type=Path, help="the adapter file to write (.safetensors)")
    p.add_argument("--text-column", default="review")
    p.add_argument("--label-column", default="label", help="1/0 (or 2 for neutral), or the label words")
    p.add_argument("--domain-column", default="cat", help="each row's domain, where a file has it (else the file's name)")
    p.add_argument("--labels", choices=sorted(LABEL_SETS), default="zh", help="the label set it decides")
    p.add_argument("--technique", choices=TECHNIQUES, default=READOUT,
                   help="readout (the default: both engines), lora or deep-prefix (torch only); EVAL.md compares them")
    p.add_argument("--leave-out", action="append", default=[], metavar="DOMAIN",
                   help="a domain kept out of training entirely (to measure it later through the queue)")
    p.add_argument("--per-domain", type=int, default=DEFAULT_PER_DOMAIN,
                   help="readout: training rows per domain, balanced by class")
    p.add_argument("--engine", choices=("auto", "torch", "llama.cpp"), default="auto",
                   help="readout: the engine that computes the hidden states (auto: llama.cpp for a .gguf file)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="lora, deep-prefix: training rows (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "int8"),
                   help="weights: readout int8 (as served), lora and deep-prefix float32 (or bfloat16)")
    p.add_argument("--prefix-tokens", type=int, default=16, help="learned key/value slots per layer")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--heldout", type=int, default=None,
                   help="balanced rows kept aside and scored at the end: per domain for readout (default 100), "
                        "in all for lora and deep-prefix (default 400)")
    p.add_argument("--dev-size", type=int, default=400, help="each file's eval dev sample (seed 0), left out of everything")
    p.add_argument("--prompt", choices=sorted(CLASSIFIER_PROMPTS), default=DEFAULT_CLASSIFIER_PROMPT,
                   help="the classifier prompt it is trained under (the worker's CLASSIFIER_PROMPT must match)")
    p.add_argument("--name", help="the adapter's name in job records (default: the file's stem)")
    p.add_argument("--threads", type=int, default=0, help="compute threads (0: every core)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.prefix_tokens < 1 or args.lora_rank < 1 or args.per_domain < 2:
        p.error("--epochs, --batch-size, --prefix-tokens and --lora-rank must be at least 1, --per-domain at least 2")
    if args.technique != READOUT and args.dtype == "int8":
        p.error("--dtype int8 is for readout: lora and deep-prefix train in float32 or bfloat16")
    if args.heldout is None:
        args.heldout = 100 if args.technique == READOUT else 400
    args.dtype = args.dtype or ("int8" if args.technique == READOUT else "float32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from worker.engine.model_source import ModelLoadError, resolve_model_source

    words = LABEL_SETS[args.labels]
    try:
        files = {path: read_rows(path, args.text_column, args.label_column, args.domain_column) for path in args.data}
        for path, rows in files.items():
            if max(row.gold for row in rows) >= len(words):
                raise ValueError(f"{path} has neutral rows but --labels {args.labels} has no neutral label")
        source = resolve_model_source(args.model)
    except (ValueError, OSError, ModelLoadError) as err:
        print(f"qwen-allinone-tune: {err}", file=sys.stderr)
        return 2
    if args.technique == READOUT:
        from worker.tune_readout import train_readout

        return train_readout(args, files, source)
    return _train_in_torch(args, files, source)


def _train_in_torch(args: argparse.Namespace, files: dict[Path, list[Row]], source) -> int:
    """lora or deep-prefix: trained through the torch decoder on one balanced sample of every file's rows."""
    from worker.engine.adapter import save_adapter
    from worker.engine.tuning import Recipe, Tuner

    rows = [row for rows in files.values() for row in rows if row.domain not in args.leave_out]
    try:
        split = split_rows(rows, dev_size=args.dev_size, heldout=args.heldout, limit=args.limit or None,
                           seed=args.seed)
    except ValueError as err:
        print(f"qwen-allinone-tune: {err}", file=sys.stderr)
        return 2
    recipe = Recipe(technique=args.technique, prefix_tokens=args.prefix_tokens, lora_rank=args.lora_rank,
                    epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
                    learning_rate=args.learning_rate)
    started = time.perf_counter()
    tuner = Tuner(source, args.labels, args.prompt, recipe, args.threads)
    train = [tuner.example(row.text, row.gold) for row in split.train]
    heldout = [tuner.example(row.text, row.gold) for row in split.heldout]
    print(f"{args.technique}: {tuner.trainable_parameters:,} trainable parameters; {len(train)} training rows, "
          f"{len(heldout)} held out, {split.excluded} left out (the dev sample)", flush=True)
    with tqdm(total=recipe.epochs * -(-len(train) // recipe.batch_size), desc="tune", unit="step") as bar:
        def show(step):
            bar.set_postfix(loss=f"{step.loss:.3f}", acc=f"{step.running_accuracy:.3f}", refresh=False)
            bar.update()

        tuner.train(train, show)
    train_s = time.perf_counter() - started
    accuracy = tuner.accuracy(heldout) if heldout else None
    shown = "-" if accuracy is None else f"{accuracy:.3f}"
    print(f"trained in {train_s / 60:.1f} min; held-out accuracy {shown} on {len(heldout)} rows")
    manifest = tuner.manifest() | {
        "name": args.name or args.out.name.split(".")[0],
        "data": data_manifest(args, len(train), len(heldout)) | {"dev_rows_left_out": split.excluded},
        "heldout_accuracy": accuracy,
        "train_seconds": round(train_s, 1),
    }
    report_saved(args.out, save_adapter(args.out, tuner.tensors(), manifest))
    return 0


def data_manifest(args: argparse.Namespace, train_rows: int, heldout_rows: int) -> dict:
    """What an adapter's manifest records of its data: the files (by hash), columns and row counts."""
    from worker.engine.adapter import file_sha256

    return {"files": [{"file": path.name, "sha256": file_sha256(path)} for path in args.data],
            "text_column": args.text_column, "label_column": args.label_column,
            "domain_column": args.domain_column, "left_out": args.leave_out,
            "train_rows": train_rows, "heldout_rows": heldout_rows, "limit": args.limit}


def report_saved(out: Path, digest: str) -> None:
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, sha256 {digest[:8]}); "
          f"serve it with CLASSIFIER_ADAPTER={out}")


if __name__ == "__main__":
    sys.exit(main())
