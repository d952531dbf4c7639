"""``qwen-allinone-tune --technique readout``: a readout trained across domains, with honest tables.

1. Sample: every file's eval dev sample is left out (as for the other techniques), then each domain
   gives a balanced held-out split (``--heldout`` rows) and ``--per-domain`` balanced training rows.
   ``--leave-out`` domains give nothing.
2. States: the sentiment pass's final hidden state of every sampled text, computed once by the engine
   the model's file runs on (a .gguf file on llama.cpp, a folder on torch), with a progress bar;
   saved to ``OUT.states.npz`` as it goes, so a killed run resumes where it stopped.
3. Fit (worker/readout.py): C is chosen by leave-one-domain-out accuracy over the training rows;
   the readout is then fitted on every training row and scored on each domain's held-out split,
   beside the prompt alone on the same rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from producer.evaluate import Row, balanced_sample
from jobqueue.protocol import LABEL_SETS
from worker.tune import DEV_SEED, data_manifest, report_saved

#: Texts per call of the engine, and how often (in texts) the states so far are saved.
CHUNK = 32
SAVE_EVERY = 512


def sample_domains(files: dict[Path, list[Row]], *, per_domain: int, heldout: int, dev_size: int,
                   leave_out: list[str], seed: int) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows), each balanced by class within every domain."""
    rows = []
    for file_rows in files.values():
        dev = {row.text for row in balanced_sample(file_rows, dev_size, DEV_SEED)} if dev_size else set()
        rows += [row for row in file_rows if row.text not in dev and row.domain not in leave_out]
    rng = random.Random(seed)
    train, kept = [], []
    for domain in sorted({row.domain for row in rows}):
        classes = sorted({row.gold for row in rows if row.domain == domain})
        for gold in classes:
            members = sorted({row.text: row for row in rows if row.domain == domain and row.gold == gold}.values(),
                             key=lambda row: row.text)
            rng.shuffle(members)
            take_kept = heldout // len(classes)
            kept += members[:take_kept]
            train += members[take_kept:take_kept + per_domain // len(classes)]
    return train, kept


def compute_states(engine, texts: list[str], labels: str, checkpoint: Path, key: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(texts, hidden) states and (texts, labels) label-word scores, resumed from ``checkpoint`` when it
    holds the first rows of this same run (``key``)."""
    states, scores = _resume(checkpoint, key)
    done = len(states)
    if done:
        print(f"resuming from {checkpoint}: {done} of {len(texts)} texts already read", flush=True)
    parts_s, parts_l = [states] if done else [], [scores] if done else []
    unsaved = 0
    with tqdm(total=len(texts), initial=done, desc="hidden states", unit="text") as bar:
        for start in range(done, len(texts), CHUNK):
            s, l = engine.classifier_states(texts[start:start + CHUNK], labels)
            parts_s.append(s)
            parts_l.append(l)
            bar.update(len(s))
            unsaved += len(s)
            if unsaved >= SAVE_EVERY:
                _save(checkpoint, key, np.concatenate(parts_s), np.concatenate(parts_l))
                unsaved = 0
    states, scores = np.concatenate(parts_s), np.concatenate(parts_l)
    _save(checkpoint, key, states, scores)
    return states, scores


def _resume(checkpoint: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    empty = (np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
    if not checkpoint.is_file():
        return empty
    with np.load(checkpoint, allow_pickle=False) as saved:
        if str(saved["key"]) != key:
            print(f"{checkpoint} is from another run (other data, model or prompt): starting over", flush=True)
            return empty
        return saved["states"], saved["scores"]


def _save(checkpoint: Path, key: str, states: np.ndarray, scores: np.ndarray) -> None:
    partial = checkpoint.with_name(checkpoint.name + ".partial.npz")
    np.savez(partial, key=np.array(key), states=states, scores=scores)
    partial.replace(checkpoint)  # a kill mid-write leaves the last whole checkpoint


def train_readout(args: argparse.Namespace, files: dict[Path, list[Row]], source) -> int:
    from worker.engine import load_engine
    from worker.engine.adapter import READOUT, save_adapter
    from worker.readout import accuracy, choose_c, fit
    from worker.settings import available_cores

    started = time.perf_counter()
    train, kept = sample_domains(files, per_domain=args.per_domain, heldout=args.heldout, dev_size=args.dev_size,
                                 leave_out=args.leave_out, seed=args.seed)
    if not train:
        print("qwen-allinone-tune: no training rows (every domain left out?)", file=sys.stderr)
        return 2
    engine = load_engine(source, args.dtype, args.threads or available_cores(), engine=args.engine,
                         prompt_variant=args.prompt,
                         kv_cache_tokens=16 * 1024, max_rows=CHUNK)
    rows = train + kept
    manifest = _manifest_base(engine, args)
    key = hashlib.sha256(json.dumps([[r.text for r in rows], manifest, engine.info().name,
                                     engine.dtype_name]).encode()).hexdigest()
    print(f"readout: {len(train)} training and {len(kept)} held-out rows from "
          f"{len({r.domain for r in rows})} domains; states on {engine.info().name} ({engine.dtype_name})", flush=True)
    states, label_scores = compute_states(engine, [r.text for r in rows], args.labels,
                                          args.out.with_name(args.out.name.split(".")[0] + ".states.npz"), key)
    golds = np.array([r.gold for r in rows])
    domains = np.array([r.domain for r in rows])
    is_train = np.arange(len(rows)) < len(train)
    labels = len(LABEL_SETS[args.labels])
    c, folds = choose_c(states[is_train], golds[is_train], domains[is_train], labels)
    readout = fit(states[is_train], golds[is_train], c, labels)
    prompt_says = np.array([LABEL_SETS[args.labels].index(engine.decide(s, args.labels, 0).label)
                            for s in label_scores])
    table = _domain_table(readout, states, golds, domains, is_train, prompt_says, folds[c], accuracy)
    train_s = time.perf_counter() - started
    print(_format_table(table, c, folds), flush=True)
    heldout_accuracy = accuracy(readout, states[~is_train], golds[~is_train])
    print(f"trained in {train_s / 60:.1f} min; held-out accuracy {heldout_accuracy:.3f} on {len(kept)} rows")
    manifest |= {
        "technique": READOUT, "name": args.name or args.out.name.split(".")[0],
        "data": data_manifest(args, len(train), len(kept)),
        "recipe": {"technique": READOUT, "per_domain": args.per_domain, "heldout_per_domain": args.heldout,
                   "seed": args.seed, "c": c, "states_engine": engine.info().name, "dtype": engine.dtype_name},
        "heldout_accuracy": heldout_accuracy, "domains": table, "train_seconds": round(train_s, 1),
    }
    tensors = {"readout.weight": readout.weight, "readout.bias": readout.bias}
    report_saved(args.out, save_adapter(args.out, tensors, manifest))
    return 0


def _manifest_base(engine, args: argparse.Namespace) -> dict:
    """What the engine checks at start (QwenEngine._check_adapter): the model, tokenizer, labels, prompt."""
    return {
        "model": engine.model.identity(),
        "tokenizer_fingerprint": engine.chat.tokenizer_fingerprint(),
        "labels": args.labels,
        "label_words": list(LABEL_SETS[args.labels]),
        "label_token_ids": engine.chat.label_token_ids[args.labels],
        "classifier_prompt": engine.chat.classifier_messages("x", args.labels, args.prompt)[0]["content"],
        "classifier_prompt_variant": args.prompt,
        "positive_threshold": 0.5,
    }


def _domain_table(readout, states, golds, domains, is_train, prompt_says, lodo, accuracy) -> dict[str, dict]:
    """Domain -> held-out rows, the prompt alone's and the readout's accuracy on them, and its
    leave-one-domain-out accuracy (the readout fitted without the domain, on its training rows)."""
    table = {}
    for domain in sorted(set(domains.tolist())):
        kept = (domains == domain) & ~is_train
        table[domain] = {"heldout_rows": int(kept.sum()),
                         "prompt": float((prompt_says[kept] == golds[kept]).mean()) if kept.any() else None,
                         "readout": accuracy(readout, states[kept], golds[kept]) if kept.any() else None,
                         "leave_one_out": lodo.get(domain)}
    return table


def _format_table(table: dict[str, dict], c: float, folds: dict[float, dict[str, float]]) -> str:
    def num(value):
        return "-" if value is None else f"{value:.3f}"

    lines = ["| domain | held-out rows | prompt alone | readout | leave-one-domain-out |", "|---|---|---|---|---|"]
    for domain, row in table.items():
        lines.append(f"| {domain} | {row['heldout_rows']} | {num(row['prompt'])} | {num(row['readout'])} | "
                     f"{num(row['leave_one_out'])} |")
    means = {name: np.mean([r[name] for r in table.values() if r[name] is not None]) for name in
             ("prompt", "readout", "leave_one_out")}
    lines.append(f"| mean | | {means['prompt']:.3f} | {means['readout']:.3f} | {means['leave_one_out']:.3f} |")
    lines.append("C (by mean leave-one-domain-out over the training rows): "
                 + ", ".join(f"{k:g}: {np.mean(list(v.values())):.3f}" for k, v in folds.items()) + f"; chose {c:g}")
    return "\n".join(lines)
