"""Classifier adapters: a small file, trained by ``python -m worker.tune``, that changes the sentiment pass only.

Three techniques (EVAL.md compares them):

- ``readout`` (the default): a linear read-out of the final hidden state of the
  classifier prompt's last token, which the sentiment pass computes anyway. It
  replaces the label words' rows of the output layer, so it costs one small
  product per job, and it runs on both engines (llama.cpp hands the state out
  as an embedding). It is trained in seconds on states computed once;
- ``lora``: a low-rank update of every projection of every layer, added to the
  frozen (and possibly int8) weights only while the classifier's sequences
  run: the classifier prompt's cached prefix, and every job's sentiment pass;
- ``deep-prefix``: a learned key/value prefix for every layer, placed in front
  of the classifier prompt's cached prefix (computed once at load, so a job
  pays nothing extra).

Either way the reply, whose sequences never carry the adapter, is what the
chat model writes without it.

The file is safetensors (no pickle): the adapter's tensors, float32, and a
JSON manifest in its metadata that records what it was trained for (the
model's shape and fingerprint, a hash of the tokenizer, the label set, the
classifier prompt) and how (recipe, data hash, held-out accuracy). The worker
refuses a file whose manifest does not fit the model it serves, naming the
mismatch.

Engine-neutral: NumPy only, so the worker's parent can read a manifest
before any pool process imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.model_source import ModelLoadError

#: The metadata key holding the manifest, and the manifest format this code reads and writes.
MANIFEST_KEY = "qwen_allinone_adapter"
FORMAT_VERSION = 1
LORA, DEEP_PREFIX, READOUT = "lora", "deep-prefix", "readout"
TECHNIQUES = (READOUT, LORA, DEEP_PREFIX)
#: The projections of a decoder layer a LoRA adapter may change (the lean decoder's fused names).
LORA_TARGETS = ("qkv", "o", "gate_up", "down")
SETTING = "CLASSIFIER_ADAPTER"
#: llama.cpp applies a LoRA to a whole context and loads no key/value prefix: it cannot keep
#: an adapter out of the reply.
ADAPTER_NEEDS_TORCH = (f"{SETTING} needs ENGINE=torch: llama.cpp cannot apply a lora or deep-prefix adapter to "
                       "the sentiment pass alone (serve the model folder with ENGINE=torch, or train a readout "
                       "adapter, which both engines serve)")


@dataclass(frozen=True)
class ClassifierAdapter:
    """A loaded adapter: its manifest and its float32 tensors.

    deep-prefix: ``prefix.keys`` and ``prefix.values``, each (layers, kv_heads, tokens, head_dim);
    lora: ``lora.<layer>.<target>.a`` (rank, in) and ``.b`` (out, rank), the scale folded into b.
    """

    path: Path
    sha256: str
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def technique(self) -> str:
        return self.manifest["technique"]

    @property
    def labels(self) -> str:
        return self.manifest["labels"]

    @property
    def classifier(self) -> str:
        """What records name as their classifier: ``adapter:<name>@<first 8 of sha256>``."""
        return f"adapter:{self.name}@{self.sha256[:8]}"

    @property
    def changes_the_pass(self) -> bool:
        """Whether it changes the model's computation (lora, deep-prefix: torch only); a readout only reads it."""
        return self.technique != READOUT

    def readout(self) -> tuple[np.ndarray, np.ndarray]:
        """A readout adapter's (weight (labels, hidden), bias (labels,))."""
        return self.tensors["readout.weight"], self.tensors["readout.bias"]

    @property
    def positive_threshold(self) -> float:
        return float(self.manifest.get("positive_threshold", 0.5))

    @property
    def prefix_tokens(self) -> int:
        """Learned cache slots in front of the classifier prompt (0 for LoRA)."""
        keys = self.tensors.get("prefix.keys")
        return 0 if keys is None else int(keys.shape[2])

    def lora_pairs(self) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
        """(layer, target) -> (a (rank, in), b (out, rank)) of a LoRA adapter."""
        pairs = {}
        for name, a in self.tensors.items():
            if name.startswith("lora.") and name.endswith(".a"):
                _, layer, target, _ = name.split(".")
                pairs[int(layer), target] = (a, self.tensors[name[:-2] + ".b"])
        return pairs


def lora_tensor_names(layer: int, target: str) -> tuple[str, str]:
    return f"lora.{layer}.{target}.a", f"lora.{layer}.{target}.b"


def save_adapter(path: Path, tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> str:
    """Write the adapter file; returns its sha256."""
    from safetensors.numpy import save_file

    if manifest.get("technique") not in TECHNIQUES:
        raise ValueError(f"technique {manifest.get('technique')!r} is not one of {TECHNIQUES}")
    manifest = {"format": FORMAT_VERSION, **manifest}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: np.ascontiguousarray(t, dtype=np.float32) for name, t in tensors.items()},
              str(path), metadata={MANIFEST_KEY: json.dumps(manifest, ensure_ascii=False, sort_keys=True)})
    return file_sha256(path)


def load_adapter(path: str | Path) -> ClassifierAdapter:
    """Read an adapter file; a missing, unreadable or foreign file is a ModelLoadError naming the setting."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{SETTING}={str(path)!r}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            manifest = json.loads((f.metadata() or {})[MANIFEST_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # not safetensors, no manifest: not an adapter
        raise ModelLoadError(f"{SETTING}={str(path)!r} is not a classifier adapter file "
                             f"({type(err).__name__}: {err})"[:300]) from None
    if manifest.get("format") != FORMAT_VERSION or manifest.get("technique") not in TECHNIQUES:
        raise ModelLoadError(f"{SETTING}={str(path)!r}: format {manifest.get('format')!r}, technique "
                             f"{manifest.get('technique')!r}; this worker reads format {FORMAT_VERSION}, {TECHNIQUES}")
    adapter = ClassifierAdapter(path, file_sha256(path), manifest, tensors)
    _check_tensors(adapter)
    return adapter


def _check_tensors(adapter: ClassifierAdapter) -> None:
    if adapter.technique == DEEP_PREFIX:
        keys, values = adapter.tensors.get("prefix.keys"), adapter.tensors.get("prefix.values")
        ok = keys is not None and values is not None and keys.ndim == 4 and keys.shape == values.shape
    elif adapter.technique == READOUT:
        weight, bias = adapter.tensors.get("readout.weight"), adapter.tensors.get("readout.bias")
        ok = (weight is not None and bias is not None and weight.ndim == 2 and bias.shape == weight.shape[:1]
              and bool(np.isfinite(weight).all() and np.isfinite(bias).all()))
    else:
        pairs = adapter.lora_pairs()
        ok = bool(pairs) and all(target in LORA_TARGETS and a.ndim == b.ndim == 2 and a.shape[0] == b.shape[1]
                                 for (_, target), (a, b) in pairs.items())
    if not ok:
        raise ModelLoadError(f"{SETTING}={str(adapter.path)!r}: its tensors are not a {adapter.technique} adapter")


def check_fits(adapter: ClassifierAdapter, expected: dict[str, Any]) -> None:
    """Raise ModelLoadError naming the first field where the adapter was trained for something else.

    ``expected`` holds what the serving model has, under the manifest's keys
    (``model``, ``tokenizer_sha256``, ``labels``' words and token ids, ``classifier_prompt``).
    """
    for field, want in expected.items():
        have = adapter.manifest.get(field)
        if isinstance(want, dict) and isinstance(have, dict):
            for key, value in want.items():
                if have.get(key) != value:
                    raise ModelLoadError(f"{SETTING}={str(adapter.path)!r} does not fit: {field}.{key} is "
                                         f"{have.get(key)!r} in the adapter and {value!r} here")
        elif have != want:
            raise ModelLoadError(f"{SETTING}={str(adapter.path)!r} does not fit: {field} is {_short(have)} "
                                 f"in the adapter and {_short(want)} here")
    _check_shapes(adapter, expected.get("model", {}))


def _check_shapes(adapter: ClassifierAdapter, model: dict[str, Any]) -> None:
    """The tensors fit the model's layers (a manifest could be edited, the tensors are what runs)."""
    if adapter.technique == DEEP_PREFIX:
        layers, kv_heads, _, head_dim = adapter.tensors["prefix.keys"].shape
        fits = (layers, kv_heads, head_dim) == (model.get("layers"), model.get("kv_heads"), model.get("head_dim"))
    elif adapter.technique == READOUT:
        fits = adapter.tensors["readout.weight"].shape[1] == model.get("hidden")
    else:
        fits = all(0 <= layer < model.get("layers", 0) for layer, _ in adapter.lora_pairs())
    if not fits:
        raise ModelLoadError(f"{SETTING}={str(adapter.path)!r} does not fit: its tensors do not match the "
                             f"model's {model.get('layers')} layers")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
