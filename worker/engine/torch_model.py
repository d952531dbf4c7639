"""The torch engine's model: Hugging Face weights loaded once, run by the lean decoder.

Transformers reads the folder (or GGUF file) and the tokenizer; the weights
are then moved into ``Qwen2Decoder`` in the chosen format and the Hugging Face
model is dropped, so a worker holds each weight once.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Sequence
from pathlib import Path

# tqdm reads this when first imported; the GGUF conversion's progress bar
# would otherwise land in the worker log, one warning line per update.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from worker.engine.decoder import KVCache, Qwen2Decoder
from worker.engine.interface import Segment, split_passes
from worker.engine.mapped import MappedEmbedding
from worker.engine.results import EngineInfo
from worker.engine.weights import WEIGHT_FORMATS, weight_bytes
from worker.model_source import ModelLoadError, ModelSource

#: At most this many tokens in one pass: a longer batch of segments (or one long
#: prompt) is split, so that activations stay bounded (see README, "Memory").
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

    @torch.inference_mode()
    def logits(self):
        return self.model.decoder.logits(self.hidden).float().numpy()  # (segments, vocabulary)


class TorchSequences:
    def __init__(self, model: TorchSequenceModel, cache: KVCache):
        self.model = model
        self.cache = cache

    @property
    def lengths(self) -> list[int]:
        return self.cache.lengths

    def copy_prefix(self, prefix: TorchSequences, row: int) -> None:
        self.cache.copy_row(prefix.cache, 0, row)

    def release(self) -> None:
        self.cache = None  # the cache is this object's own: the allocator takes it back

    @torch.inference_mode()
    def extend(self, segments: Sequence[Segment]) -> TorchOutput:
        """One or more passes of at most PASS_TOKENS tokens; a long segment is prefilled in chunks."""
        hidden = []
        for group in split_passes(segments, PASS_TOKENS):
            out = self.model.decoder(self.cache, [(row, tokens) for row, tokens, _ in group])  # (group, hidden)
            hidden.extend(out[i] for i, (_, _, last) in enumerate(group) if last)
        return TorchOutput(self.model, torch.stack(hidden))


class TorchSequenceModel:
    #: Each batch allocates a cache of its own (README, "Memory"): no shared pool to fit.
    batch_row_limit = None
    batch_token_limit = None

    def __init__(self, decoder: Qwen2Decoder, label_rows: dict[int, torch.Tensor], threads: int):
        self.decoder = decoder
        #: token id -> float32 row of the output layer, for the label words only.
        self.label_rows = label_rows
        self.threads = threads

    def new_sequences(self, rows: int, capacity: int) -> TorchSequences:
        return TorchSequences(self, self.decoder.new_cache(rows, capacity))

    def info(self) -> EngineInfo:
        return EngineInfo(name="torch", weights=self.decoder.fmt, weight_bytes=weight_bytes(self.decoder),
                          kv_bytes_per_token=self.decoder.shape.kv_bytes_per_token(), threads=self.threads,
                          # float32 matmuls may sum in another order for another number of rows.
                          batch_invariant=self.decoder.fmt == "int8")


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


def release_freed_memory() -> None:
    """Hand the float32 weights freed after conversion back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
