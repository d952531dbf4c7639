"""The llama.cpp engine's model: a GGUF file run in-process by llama.cpp, through llama-cpp-python.

It implements the same ``SequenceModel`` as the torch decoder, on the
binding's low-level API, so ``QwenEngine`` keeps everything that makes the
service ours (one-pass sentiment, prefix caches, batched decoding with a
deadline and limits per row, partial replies):

- one ``llama_context`` with one unified key/value cache of a fixed size: a
  sequence id per job row, plus one per fixed prompt prefix;
- a prefix is copied into a job's sequence with ``llama_memory_seq_cp``: the
  copy shares the prefix's cells, so it costs no compute and no memory;
- a pass is one ``llama_batch`` holding every row's new tokens, each tagged
  with its sequence; only each segment's last token asks for logits;
- the weights stay in the memory-mapped GGUF file in their own format (4 to
  8 bits), run by llama.cpp's kernels for the CPU's vector extensions.

Nothing here imports torch or transformers: a llama.cpp worker loads in seconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from worker.engine.adapter import ADAPTER_NEEDS_TORCH
from worker.engine.chat import ChatFormat
from worker.engine.generation import ReplyControls, Sampler
from worker.engine.interface import Segment, split_passes
from worker.engine.llama_vocab import LlamaVocab
from worker.engine.memory import release_freed_memory
from worker.engine.results import EngineInfo
from worker.engine.model_source import ModelLoadError, ModelSource
from worker.engine.prompts import DEFAULT_CLASSIFIER_PROMPT, DEFAULT_REPLY_PROMPT

log = logging.getLogger("qwen_allinone.worker")

#: Tokens per llama_decode call (llama.cpp splits it into micro-batches of N_UBATCH).
N_BATCH = 2048
N_UBATCH = 512
#: Sequence ids kept for the fixed prompt prefixes (one per label set, one per reply mood and language).
PREFIX_SEQUENCES = 12
#: Key/value cache entries in float16. q8_0 holds them in half the memory (48 MB less RSS for the
#: 0.5B model's 8,192 tokens), but flash attention dequantizes every cached value at every step: with
#: the reply's 330-token example prefixes a decoding step of 8 rows took 107 ms in q8_0 against 92 ms
#: in float16 (BENCHMARKS.md, "The llama.cpp engine's decoding step").
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
KV_CACHE_TYPE = KV_CACHE_TYPES["f16"]
KV_BYTES_PER_ELEMENT = 2


class LlamaOutput:
    """The last-token logits of each segment of a pass.

    Rows of the final llama_decode are views of llama.cpp's own output buffer,
    valid until the next pass; both accessors copy out of them at once.
    """

    def __init__(self, model: LlamaSequenceModel, rows: list[np.ndarray]):
        self.model = model
        self.rows = rows  # each (vocabulary,) float32

    def states(self) -> np.ndarray:
        return self.model.output_layer().states(np.stack(self.rows))  # (segments, hidden)

    def scores(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.stack([row[list(token_ids)] for row in self.rows])  # (segments, k): the label columns only

    def logits(self, segments: Sequence[int] | None = None) -> np.ndarray:
        rows = self.rows if segments is None else [self.rows[i] for i in segments]
        return np.stack(rows)  # (wanted, vocabulary)


class LlamaSequences:
    """Sequence ids of the context, one per row, with their lengths (the next token's position)."""

    def __init__(self, model: LlamaSequenceModel, seq_ids: list[int]):
        self.model = model
        self.seq_ids = seq_ids
        self.lengths = [0] * len(seq_ids)

    def copy_prefix(self, prefix: LlamaSequences, row: int) -> None:
        llama_cpp.llama_memory_seq_cp(self.model.memory, prefix.seq_ids[0], self.seq_ids[row], -1, -1)
        self.lengths[row] = prefix.lengths[0]

    def ensure_capacity(self, tokens: int) -> None:
        pass  # one fixed pool of cells: ReplySession keeps its replies within batch_token_limit

    def reset(self, row: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.model.memory, self.seq_ids[row], -1, -1)  # its cells are free
        self.lengths[row] = 0

    def extend(self, segments: Sequence[Segment]) -> LlamaOutput:
        rows: list[np.ndarray] = []
        for group in split_passes(segments, N_BATCH):
            rows = [row.copy() for row in rows]  # views of the previous pass: the next one overwrites them
            wanted = self.model.decode(self, group)  # batch positions of the segments' last tokens
            rows.extend(self.model.output_row(i) for i in wanted)
        return LlamaOutput(self.model, rows)

    def release(self) -> None:
        self.model.release(self)

    def attach(self, adapter) -> None:
        raise ModelLoadError(ADAPTER_NEEDS_TORCH)


class LlamaSequenceModel:
    def __init__(self, model, context, threads: int, max_rows: int, gguf_path: Path, prefix_cells: int = 0):
        self.model = model        # llama_model *
        #: Cells the context keeps for the fixed prompt prefixes.
        self.prefix_cells = prefix_cells
        self.context = context    # llama_context *
        self.gguf_path = gguf_path
        self._output_layer: OutputLayer | None = None
        self.memory = llama_cpp.llama_get_memory(context)
        self.threads = threads
        self.n_ctx = llama_cpp.llama_n_ctx(context)
        self.vocabulary = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._free_ids = list(range(_sequence_ids(max_rows)))
        self._live: dict[int, LlamaSequences] = {}
        #: Rows one batch of forked sequences may have (the prefixes keep ids of their own).
        self.batch_row_limit = max_rows

    @property
    def batch_token_limit(self) -> int:
        """Cache cells for batches: the context's size (rounded up to 256 by llama.cpp) less the cells kept
        for the fixed prefixes, or less what the live sequences hold, if that is more."""
        return self.n_ctx - max(self.prefix_cells, sum(sum(s.lengths) for s in self._live.values()))

    def new_sequences(self, rows: int, capacity: int) -> LlamaSequences:
        if rows > len(self._free_ids):
            raise RuntimeError(f"{rows} sequences asked for, {len(self._free_ids)} free in the llama.cpp context")
        ids, self._free_ids = self._free_ids[:rows], self._free_ids[rows:]
        sequences = LlamaSequences(self, ids)
        self._live[id(sequences)] = sequences
        return sequences

    def release(self, sequences: LlamaSequences) -> None:
        if self._live.pop(id(sequences), None) is None:
            return
        for seq_id in sequences.seq_ids:
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        self._free_ids.extend(sequences.seq_ids)

    def decode(self, sequences: LlamaSequences, group: list[tuple[int, list[int], bool]]) -> list[int]:
        """One llama_decode of ``group``'s tokens; returns the batch positions whose logits it kept."""
        batch = self._batch
        n, wanted = 0, []
        for row, tokens, last in group:
            seq_id, start = sequences.seq_ids[row], sequences.lengths[row]
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = 0
                n += 1
            sequences.lengths[row] = start + len(tokens)
            if last:
                batch.logits[n - 1] = 1
                wanted.append(n - 1)
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self.context, batch)
        if status != 0:
            reason = "its key/value cache is full (raise KV_TOKENS_PER_JOB)" if status == 1 else f"status {status}"
            raise RuntimeError(f"llama.cpp could not run a pass of {n} tokens: {reason}")
        return wanted

    def output_row(self, position: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.context, position)
        return np.ctypeslib.as_array(pointer, shape=(self.vocabulary,))  # a view of llama.cpp's buffer

    def output_layer(self) -> OutputLayer:
        """The GGUF file's output layer, read once and kept: for reading states pass after pass (the tuner)."""
        if self._output_layer is None:
            self._output_layer = OutputLayer(self.gguf_path)
        return self._output_layer

    def prepare_readout(self, weight: np.ndarray):
        """``SequenceModel.prepare_readout``: on the logits, which every pass hands out anyway. The output
        layer is read for this and let go (its pages mapped a second time cost 200 MB of RSS if kept)."""
        on_logits = OutputLayer(self.gguf_path).readout_on_logits(weight)         # (labels, vocabulary)
        release_freed_memory()  # the dequantized chunks (29 MB each) would stay in glibc's heap
        return lambda output: output.logits() @ on_logits.T                      # (segments, labels)

    def identity(self) -> dict:
        """The same identity the torch engine gives for the same model, whatever its weight format."""
        return gguf_identity(self.gguf_path)

    def info(self) -> EngineInfo:
        n_layer = llama_cpp.llama_model_n_layer(self.model)
        head_dim = _head_dim(self.model)
        kv_per_token = n_layer * 2 * llama_cpp.llama_model_n_head_kv(self.model) * head_dim * KV_BYTES_PER_ELEMENT
        return EngineInfo(name="llama.cpp", weights=weights_name(self.model),
                          weight_bytes=llama_cpp.llama_model_size(self.model), kv_bytes_per_token=kv_per_token,
                          threads=self.threads, batch_invariant=False)


def _sequence_ids(max_rows: int) -> int:
    """Sequence ids of a context: a session's rows, as many for the sentiment of jobs joining it
    (read beside its rows), and the prefixes'."""
    return 2 * max_rows + PREFIX_SEQUENCES


def _head_dim(model) -> int:
    return llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)


def weights_name(model) -> str:
    """The GGUF file's weight type as llama.cpp names it, e.g. "Q4_K - Medium"."""
    buffer = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(model, buffer, len(buffer))
    parts = buffer.value.decode("utf-8", "replace").split(" ", 2)  # "qwen2 494M Q4_K - Medium"
    return parts[2] if len(parts) == 3 else buffer.value.decode("utf-8", "replace")


# --- loading ---

_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


@llama_cpp.llama_log_callback
def _forward_log(level, text, _user_data):
    # llama.cpp reports every load step; the worker log gets its warnings and errors only.
    if level in _LOG_LEVELS and text:
        log.log(_LOG_LEVELS[level], "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def load_llama_engine(engine_class, source: ModelSource, threads: int | None, kv_cache_tokens: int,
                      max_rows: int, **options):
    """A QwenEngine over a llama.cpp model of MODEL's GGUF file, with ``kv_cache_tokens`` for batches."""
    if source.gguf_file is None:
        raise ModelLoadError(f"MODEL={source.model_id!r} is not a .gguf file: ENGINE=llama.cpp runs GGUF "
                             "models (use ENGINE=torch for a model folder)")
    llama_cpp.llama_log_set(_forward_log, ctypes.c_void_p())
    llama_cpp.llama_backend_init()
    threads = threads or 1
    model = _load_model(source)
    vocab = LlamaVocab(model)
    generation = _generation_config(source)
    chat = ChatFormat(vocab, source.model_id, generation.get("eos_token_id") or ())
    sampler = Sampler.from_generation_config(generation, chat.stop_token_ids, options.pop("controls", ReplyControls()))
    # The cache holds the fixed prefixes (computed once at load) and the batches' own tokens.
    classifier, replies = engine_class.prefix_systems(chat, options.get("prompt_variant", DEFAULT_CLASSIFIER_PROMPT),
                                                      options.get("reply_variant", DEFAULT_REPLY_PROMPT))
    prefix_tokens = (sum(len(chat.prefix_ids(system)) for system in classifier)
                     + sum(len(chat.prefix_ids(messages)) for messages in replies))
    context = _new_context(model, source, threads, prefix_tokens + kv_cache_tokens, max_rows)
    sequence_model = LlamaSequenceModel(model, context, threads, max_rows, source.folder / source.gguf_file,
                                        prefix_cells=prefix_tokens)
    return engine_class(sequence_model, chat, source.model_id, f"gguf:{weights_name(model)}", sampler, **options)


def _load_model(source: ModelSource):
    params = llama_cpp.llama_model_default_params()
    params.use_mmap = True  # the weights stay in the file's pages: shared, and read only when used
    model = llama_cpp.llama_model_load_from_file(str(source.folder / source.gguf_file).encode(), params)
    if not model:
        raise ModelLoadError(f"MODEL={source.model_id!r} could not be loaded by llama.cpp (see the log above)")
    return model


def _new_context(model, source: ModelSource, threads: int, n_ctx: int, max_rows: int):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = N_BATCH
    params.n_ubatch = N_UBATCH
    # One pool of cells for every sequence: a prefix copy shares cells instead of duplicating them.
    params.kv_unified = True
    params.type_k = params.type_v = KV_CACHE_TYPE
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.n_seq_max = _sequence_ids(max_rows)
    params.n_threads = params.n_threads_batch = threads
    context = llama_cpp.llama_init_from_model(model, params)
    if not context:
        raise ModelLoadError(f"MODEL={source.model_id!r}: llama.cpp could not create a context of "
                             f"{n_ctx} tokens (BATCH_MAX x KV_TOKENS_PER_JOB)")
    return context


def _generation_config(source: ModelSource) -> dict:
    """The sampling defaults a generation_config.json beside the GGUF file gives, if there is one."""
    path = source.folder / "generation_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def gguf_identity(path: Path) -> dict:
    """Architecture, sizes and the norms' fingerprint of a GGUF file, as ``torch_model.model_identity``
    gives them for the same model (norms stay float32 in every weight format, so the fingerprint is
    the same for a Q4_K_M file and the folder converted from it)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    arch = _field(reader, "general.architecture")
    layers = int(_field(reader, f"{arch}.block_count"))
    hidden, vocabulary = (int(n) for n in tensors["token_embd.weight"].shape[:2])  # GGUF lists ne0 first
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    digest = hashlib.sha256(np.asarray(tensors["output_norm.weight"].data, dtype=np.float32).tobytes())
    for layer in range(layers):
        digest.update(np.asarray(tensors[f"blk.{layer}.attn_norm.weight"].data, dtype=np.float32).tobytes())
    return {"architecture": arch, "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
            "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
            "intermediate": int(_field(reader, f"{arch}.feed_forward_length")), "vocabulary": vocabulary,
            "fingerprint": digest.hexdigest()[:16]}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelLoadError(f"the GGUF file has no {key!r}")
        return default
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types and field.types[0].name == "STRING" else value[0]


class OutputLayer:
    """The final hidden states of a pass, read back from its logits through the output layer.

    llama.cpp hands out final hidden states only in its embeddings mode, which makes every token of a
    pass an output and so computes the whole vocabulary's logits for every prompt token: many times the
    cost of a sentiment pass. But logits = W h, with W (vocabulary, hidden) of full column rank, so
    h = (W^T W)^-1 W^T logits, exactly up to float rounding (W is the file's own weights, dequantized).
    A readout w.h is then V.logits with V = w (W^T W)^-1 W^T: one product over the vocabulary per job.
    """

    def __init__(self, gguf_path: Path, rows_per_chunk: int = 8192):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        tensors = {tensor.name: tensor for tensor in GGUFReader(str(gguf_path)).tensors}
        tensor = tensors.get("output.weight") or tensors["token_embd.weight"]  # tied: the embedding table
        self._chunks = [(tensor.data[i:i + rows_per_chunk], tensor.tensor_type)
                        for i in range(0, tensor.data.shape[0], rows_per_chunk)]
        self._dequantize = dequantize
        #: Every chunk dequantized (vocabulary x hidden float32: 545 MB for the 0.5B model), kept only
        #: where states are read pass after pass (the tuner); serving dequantizes once, at load.
        self._kept: list[np.ndarray] | None = None
        # float32 products per chunk, summed in float64: 12x faster than float64 throughout, and within
        # 1e-7 of it (the 0.5B model's W^T W has a condition number of about 4,000).
        gram = sum((w.T @ w).astype(np.float64) for w in self._rows())              # (hidden, hidden)
        self.gram_inverse = np.linalg.inv(gram)                                     # (hidden, hidden)

    def _rows(self):
        if self._kept is not None:
            yield from self._kept
            return
        for raw, kind in self._chunks:
            yield self._dequantize(raw, kind)                                       # (chunk, hidden) float32

    def readout_on_logits(self, weight: np.ndarray) -> np.ndarray:
        a = (weight.astype(np.float64) @ self.gram_inverse).astype(np.float32)      # (labels, hidden)
        return np.concatenate([a @ w.T for w in self._rows()], axis=1)             # (labels, vocabulary)

    def states(self, logits: np.ndarray) -> np.ndarray:
        if self._kept is None:
            self._kept = list(self._rows())
        projected = sum(logits[:, start:start + len(w)] @ w                         # (n, hidden)
                        for start, w in zip(self._starts(), self._rows()))
        return (projected.astype(np.float64) @ self.gram_inverse).astype(np.float32)  # (n, hidden)

    def _starts(self):
        start = 0
        for raw, _ in self._chunks:
            yield start
            start += raw.shape[0]
