"""``bench layers``: would a readout on another layer, or pooled over the prompt, carry across domains?

The served readout reads the final layer's state of the classifier prompt's last
token. This measures the alternatives before anyone builds them: the tuner's
balanced sample of every domain goes through the model once (Hugging Face
transformers on the folder, float32, every layer's states kept), and a readout
is fitted and scored leave-one-domain-out for each layer and pooling:

- ``last``: the state of the prompt's last token (what the engines serve, at the final layer);
- ``mean``: the mean of the states over the whole prompt.

The states are saved (``--states``), so other layers or C values cost seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def compute_states(folder: str, data: list[Path], per_domain: int, seed: int, threads: int) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    from producer.evaluate import read_rows
    from worker.engine import load_engine
    from worker.engine.model_source import resolve_model_source
    from worker.tune_readout import sample_domains

    torch.set_num_threads(threads)
    files = {path: read_rows(path) for path in data}
    rows, _ = sample_domains(files, per_domain=per_domain, heldout=0, dev_size=400, leave_out=[], seed=seed)
    engine = load_engine(resolve_model_source(folder), "float32", threads, engine="torch")  # its prompt ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    last, mean = [], []
    started = time.perf_counter()
    for i, row in enumerate(rows):
        ids = engine.chat.encode_chat(engine.chat.classifier_messages(row.text, "zh", engine.prompt_variant))
        with torch.inference_mode():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states  # layers+1 x (1, T, H)
        stack = torch.stack([h[0] for h in hidden])                                     # (layers+1, T, H)
        last.append(stack[:, -1].numpy())                                               # (layers+1, H)
        mean.append(stack.mean(dim=1).numpy())                                          # (layers+1, H)
        if i % 200 == 0:
            print(f"{i}/{len(rows)} texts, {time.perf_counter() - started:.0f} s", flush=True)
    return {"last": np.stack(last), "mean": np.stack(mean),                             # (n, layers+1, H)
            "golds": np.array([r.gold for r in rows]), "domains": np.array([r.domain for r in rows])}


def add_parser(sub, machine_line, default_threads: int) -> None:
    def run(args: argparse.Namespace) -> int:
        from worker.readout import leave_one_domain_out

        states_file = Path(args.states)
        if states_file.is_file():
            states = dict(np.load(states_file, allow_pickle=False))
        else:
            states = compute_states(args.model, [Path(p) for p in args.data], args.per_domain, args.seed,
                                    args.threads)
            np.savez(states_file, **states)
        golds, domains = states["golds"], states["domains"]
        print(f"\nreadout leave-one-domain-out by layer and pooling, {len(golds)} texts "
              f"({args.per_domain} per domain, seed {args.seed}), C={args.c:g}; {machine_line()}\n")
        names = sorted(set(domains.tolist()))
        print("| pooling | layer | mean | lowest | " + " | ".join(names) + " |")
        print("|---|---|---|---|" + "---|" * len(names))
        for pooling in args.poolings.split(","):
            for layer in (int(x) for x in args.layers.split(",")):
                folds = leave_one_domain_out(states[pooling][:, layer], golds, domains, args.c)
                scores = np.array([folds[name] for name in names])
                print(f"| {pooling} | {layer} | {scores.mean():.3f} | {scores.min():.3f} | "
                      + " | ".join(f"{s:.2f}" for s in scores) + " |", flush=True)
        return 0

    p = sub.add_parser("layers", help="readout leave-one-domain-out accuracy per layer and pooling (a folder)")
    p.add_argument("--model", required=True, help="the model folder (Hugging Face transformers reads every layer)")
    p.add_argument("--data", action="append", required=True, help="a labelled CSV; give it again for more")
    p.add_argument("--per-domain", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--states", default="layers.states.npz", help="where the states are saved, and read if present")
    p.add_argument("--layers", default="24,20,16,12,8", help="0 is the embeddings; the last is after the final norm")
    p.add_argument("--poolings", default="last,mean")
    p.add_argument("--c", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=default_threads)
    p.set_defaults(func=run)
