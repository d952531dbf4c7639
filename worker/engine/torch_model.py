"""The torch engine's model: Hugging Face weights loaded once, run by the lean decoder.

Transformers reads the folder (or GGUF file) and the tokenizer; the weights
are then moved into ``Qwen2Decoder`` in the chosen format and the Hugging Face
model is dropped, so a worker holds each weight once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

# tqdm reads this when first imported; the GGUF conversion's progress bar
# would otherwise land in the worker log, one warning line per update.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from worker.engine.adapter import LORA, ClassifierAdapter
from worker.engine.decoder import KVCache, LoraDeltas, Qwen2Decoder
from worker.engine.interface import Segment, split_passes
from worker.engine.mapped import MappedEmbedding
from worker.engine.results import EngineInfo
from worker.engine.weights import WEIGHT_FORMATS, weight_bytes
from worker.engine.model_source import ModelLoadError, ModelSource

#: At most this many tokens in one pass: a longer batch of segments (or one long
#: prompt) is split, so that activations stay bounded (see docs/jobs.md, "Memory").
PASS_TOKENS = 2048


class TorchOutput:
    def __init__(self, model: TorchSequenceModel, hidden: torch.Tensor):
        self.model = model
        self.hidden = hidden  # (segments, hidden) float32

    @torch.inference_mode()
    def scores(self, token_ids: Sequence[int]):
        rows = torch.stack([self.model.label_rows[i] for i in token_ids])  # (k, hidden)
        # A reduction per (segment, token), not a matmul: a matmul's summation order
        # may depend on how many rows it has, and a job's label must not.
        return (self.hidden[:, None, :] * rows[None, :, :]).sum(dim=-1).numpy()   # (segments, k)

    def states(self):
        return self.hidden.float().numpy()  # (segments, hidden)

    @torch.inference_mode()
    def logits(self, segments: Sequence[int] | None = None):
        hidden = self.hidden if segments is None else self.hidden[list(segments)]  # (wanted, hidden)
        return self.model.decoder.logits(hidden).float().numpy()                   # (wanted, vocabulary)


class TorchSequences:
    def __init__(self, model: TorchSequenceModel, cache: KVCache):
        self.model = model
        self.cache = cache
        #: A LoRA classifier adapter's updates, for every pass of these sequences (None: the plain model).
        self.lora: LoraDeltas | None = None

    @property
    def lengths(self) -> list[int]:
        return self.cache.lengths

    def copy_prefix(self, prefix: TorchSequences, row: int) -> None:
        self.cache.copy_row(prefix.cache, 0, row)
        self.lora = prefix.lora  # forks of an adapted prefix run adapted

    def ensure_capacity(self, tokens: int) -> None:
        if tokens > self.cache.capacity:  # a reply joined that needs more than the rows so far
            self.cache.grow(tokens)

    def reset(self, row: int) -> None:
        self.cache.lengths[row] = 0  # what it held is overwritten before it is read again

    def release(self) -> None:
        self.cache = None  # the cache is this object's own: the allocator takes it back

    def attach(self, adapter: ClassifierAdapter) -> None:
        """This (prefix) sequence, and every fork of it, runs with ``adapter`` from here on."""
        if adapter.technique == LORA:
            self.lora = self.model.lora_deltas(adapter)
            return
        keys, values = adapter.tensors["prefix.keys"], adapter.tensors["prefix.values"]  # (layers, kv, n, d)
        n = keys.shape[2]
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.cache.keys[layer][0, :, :n] = torch.as_tensor(k)    # (kv, n, d)
            self.cache.values[layer][0, :, :n] = torch.as_tensor(v)  # (kv, n, d)
        self.cache.lengths[0] = n

    @torch.inference_mode()
    def extend(self, segments: Sequence[Segment]) -> TorchOutput:
        """One or more passes of at most PASS_TOKENS tokens; a long segment is prefilled in chunks."""
        hidden = []
        for group in split_passes(segments, PASS_TOKENS):
            out = self.model.decoder(self.cache, [(row, tokens) for row, tokens, _ in group],
                                     self.lora)  # (group, hidden)
            hidden.extend(out[i] for i, (_, _, last) in enumerate(group) if last)
        return TorchOutput(self.model, torch.stack(hidden))


class TorchSequenceModel:
    #: Each batch allocates a cache of its own (docs/jobs.md, "Memory"): no shared pool to fit.
    batch_row_limit = None
    batch_token_limit = None

    def __init__(self, decoder: Qwen2Decoder, label_rows: dict[int, torch.Tensor], threads: int):
        self.decoder = decoder
        #: token id -> float32 row of the output layer, for the label words only.
        self.label_rows = label_rows
        self.threads = threads

    def new_sequences(self, rows: int, capacity: int) -> TorchSequences:
        return TorchSequences(self, self.decoder.new_cache(rows, capacity))

    def identity(self) -> dict:
        return model_identity(self.decoder)

    def prepare_readout(self, weight: np.ndarray):
        """``SequenceModel.prepare_readout``: on the final hidden states a pass computes anyway."""
        return lambda output: output.states() @ weight.T                          # (segments, labels)

    def lora_deltas(self, adapter: ClassifierAdapter) -> LoraDeltas:
        """A LoRA adapter's (a, b) per layer and projection as float32 tensors, checked against the weights."""
        deltas: LoraDeltas = [{} for _ in self.decoder.layers]
        for (index, name), (a, b) in adapter.lora_pairs().items():
            out_features, in_features = getattr(self.decoder.layers[index], name).weight.shape
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise ModelLoadError(f"CLASSIFIER_ADAPTER={str(adapter.path)!r} does not fit: layer {index} {name} "
                                     f"is {out_features} x {in_features}, the adapter's update "
                                     f"{b.shape[0]} x {a.shape[1]}")
            # Shares the adapter's arrays: the updates are held once.
            deltas[index][name] = (torch.from_numpy(a), torch.from_numpy(b))  # (r, in), (out, r)
        return deltas

    def info(self) -> EngineInfo:
        return EngineInfo(name="torch", weights=self.decoder.fmt, weight_bytes=weight_bytes(self.decoder),
                          kv_bytes_per_token=self.decoder.shape.kv_bytes_per_token(), threads=self.threads,
                          # float32 matmuls may sum in another order for another number of rows.
                          batch_invariant=self.decoder.fmt == "int8")


def model_identity(decoder: Qwen2Decoder) -> dict:
    """The decoder's shape and a fingerprint of its weights: the norms, which survive every weight format."""
    digest = hashlib.sha256(decoder.final_norm.numpy().tobytes())
    for layer in decoder.layers:
        digest.update(layer.attn_norm.numpy().tobytes())
    shape = dataclasses.asdict(decoder.shape)
    del shape["rms_eps"]  # a GGUF file holds it as float32: not a way to tell models apart
    return {"architecture": "qwen2", **shape, "fingerprint": digest.hexdigest()[:16]}


def check_format(fmt: str) -> None:
    if fmt not in WEIGHT_FORMATS:
        raise ModelLoadError(f"DTYPE={fmt!r} is not one of {sorted(WEIGHT_FORMATS)}")


def load_model(source: ModelSource, fmt: str = "float32", threads: int | None = None):
    """(Hugging Face model in float32, tokenizer) of MODEL."""
    check_format(fmt)
    if threads:
        torch.set_num_threads(threads)
    # Progress bars would land in the worker log as warnings.
    transformers_logging.disable_progress_bar()
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"MODEL={source.model_id!r} could not be loaded: {reason}") from None
    if model.config.model_type not in ("qwen2",):
        raise ModelLoadError(f"MODEL={source.model_id!r} is a {model.config.model_type!r} model; "
                             "the torch engine runs Qwen2-architecture models (Qwen1.5, Qwen2, Qwen2.5)")
    return model.eval(), tokenizer


def build_sequence_model(hf_model, fmt: str, label_token_ids: list[int], threads: int,
                         weights_folder: Path | None = None) -> TorchSequenceModel:
    """Move the weights into the lean decoder (the caller drops ``hf_model``, then releases its memory)."""
    check_format(fmt)
    output = hf_model.get_output_embeddings().weight
    # Taken before quantization: the sentiment scores its label words in full precision.
    label_rows = {i: output[i].detach().float().clone() for i in label_token_ids}
    mapped = MappedEmbedding.open(weights_folder) if weights_folder is not None else None
    with torch.inference_mode():
        decoder = Qwen2Decoder(hf_model, fmt, embedding=mapped).eval()
    return TorchSequenceModel(decoder, label_rows, threads or torch.get_num_threads())
