"""The lean Qwen2 decoder: the serving path's own forward pass over a preallocated key/value cache.

Transformers loads the weights; this module runs them. Written for a CPU
serving short jobs, where a decoding step is bound by reading the weights and
everything else is overhead:

- q/k/v and gate/up are fused into one matrix each at load: two matmuls fewer
  per layer, and each reads its input once;
- the key/value cache is allocated once per batch (rows x the batch's token
  budget) and written in place, never concatenated;
- a pass takes *segments*: (cache row, new tokens) pairs of any lengths. The
  tokens of all segments are packed into one matrix for every linear layer
  (no padding), and attention runs per segment over exactly that row's
  tokens. A prefill is one long segment, a decoding step one token per row,
  a chunked prefill a segment of a chunk; finished rows are simply left out.

Because linear layers treat every token row alike (the weight formats in
weights.py are row-invariant) and attention sees only its own row, a row's
numbers never depend on what else is in its pass: one answer per job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine.weights import TokenTable, make_linear


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocabulary: int
    rms_eps: float

    @classmethod
    def of(cls, config) -> DecoderShape:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size, vocabulary=config.vocab_size, rms_eps=config.rms_norm_eps,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Key/value cache bytes one token of one row holds, across every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


class KVCache:
    """Keys and values of ``rows`` sequences, each up to ``capacity`` tokens, and each row's length."""

    def __init__(self, shape: DecoderShape, rows: int, capacity: int, dtype: torch.dtype = torch.float32):
        size = (rows, shape.kv_heads, capacity, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype) for _ in range(shape.layers)]    # each (rows, kv, T, d)
        self.values = [torch.zeros(size, dtype=dtype) for _ in range(shape.layers)]  # each (rows, kv, T, d)
        self.lengths = [0] * rows
        self.capacity = capacity

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` tokens per row, keeping what every row holds."""
        for tensors in (self.keys, self.values):
            for layer, old in enumerate(tensors):
                rows, kv, length, d = old.shape
                tensors[layer] = torch.zeros((rows, kv, capacity, d), dtype=old.dtype)  # (rows, kv, T', d)
                tensors[layer][:, :, :length] = old
        self.capacity = capacity

    def copy_row(self, source: KVCache, source_row: int, row: int) -> None:
        """Row ``row`` starts as a copy of ``source``'s row (a prompt prefix, computed once)."""
        n = source.lengths[source_row]
        for mine, theirs in zip(self.keys + self.values, source.keys + source.values):
            mine[row, :, :n] = theirs[source_row, :, :n]
        self.lengths[row] = n


class _Layer(torch.nn.Module):
    def __init__(self, hf_layer, fmt: str):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # (q+k+v, hidden)
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        qkv_bias = torch.cat(biases) if all(b is not None for b in biases) else None
        self.qkv = make_linear(qkv_weight, qkv_bias, fmt)
        self.o = make_linear(attn.o_proj.weight, attn.o_proj.bias, fmt)
        self.gate_up = make_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None, fmt)
        self.down = make_linear(mlp.down_proj.weight, None, fmt)
        self.register_buffer("attn_norm", hf_layer.input_layernorm.weight.detach().float().clone())
        self.register_buffer("mlp_norm", hf_layer.post_attention_layernorm.weight.detach().float().clone())


class Qwen2Decoder(torch.nn.Module):
    """Qwen2 (and Qwen1.5/2.5, which share it) inference over segments; float32 activations throughout."""

    def __init__(self, hf_model, fmt: str, embedding=None):
        """``embedding``: anything with ``embed(ids)``, used instead of holding the input table."""
        super().__init__()
        config = hf_model.config
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the lean decoder")
        self.shape = DecoderShape.of(config)
        self.fmt = fmt
        base = hf_model.model
        self.layers = torch.nn.ModuleList(_Layer(layer, fmt) for layer in base.layers)
        self.register_buffer("final_norm", base.norm.weight.detach().float().clone())
        tied = hf_model.lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr()
        if tied:  # one table serves both: the output layer reads all of it anyway
            self.embedding = self.output = TokenTable(base.embed_tokens.weight, fmt)
        else:
            self.embedding = embedding or TokenTable(base.embed_tokens.weight, fmt)
            self.output = TokenTable(hf_model.lm_head.weight, fmt)
        rotary = base.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone())  # (d/2,)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache(self.shape, rows, capacity)

    def forward(self, cache: KVCache, segments: list[tuple[int, list[int]]],
                lora: LoraDeltas | None = None) -> torch.Tensor:
        """Append each segment's tokens to its cache row; the final hidden state of each segment's last token.

        ``lora``: per layer, projection name -> (a, b), added to that projection
        for this pass only (a classifier adapter; the weights are never changed).
        Returns (segments, hidden) float32, normalized: ready for the output layer.
        """
        starts = [cache.lengths[row] for row, _ in segments]
        for (row, tokens), start in zip(segments, starts):
            if start + len(tokens) > cache.capacity:
                raise ValueError(f"row {row} would hold {start + len(tokens)} tokens; its cache holds {cache.capacity}")
        ids = torch.tensor([t for _, tokens in segments for t in tokens])  # (n,)
        positions = torch.tensor([start + i for (_, tokens), start in zip(segments, starts)
                                  for i in range(len(tokens))])            # (n,)
        cos, sin = self._rope(positions)                                  # each (n, 1, d)
        x = self.embedding.embed(ids)                                     # (n, hidden)
        for index, layer in enumerate(self.layers):
            deltas = None if lora is None else lora[index]
            x = x + self._attention(layer, _rms_norm(x, layer.attn_norm, self.shape.rms_eps), cos, sin,
                                    cache, index, segments, starts, deltas)
            h = project(layer, "gate_up", _rms_norm(x, layer.mlp_norm, self.shape.rms_eps), deltas)  # (n, 2 inter)
            gate, up = h.chunk(2, dim=-1)                                        # each (n, intermediate)
            x = x + project(layer, "down", F.silu(gate) * up, deltas)           # (n, hidden)
        for (row, tokens), start in zip(segments, starts):
            cache.lengths[row] = start + len(tokens)
        last = torch.tensor(_cumulative(len(tokens) for _, tokens in segments)) - 1  # (segments,)
        return _rms_norm(x[last], self.final_norm, self.shape.rms_eps)              # (segments, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (rows, hidden) -> (rows, vocabulary)
        return self.output.logits(hidden)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # (n, d/2)
        angles = torch.cat([freqs, freqs], dim=-1)                   # (n, d)
        return ((angles.cos() * self.rope_scaling)[:, None, :],      # (n, 1, d)
                (angles.sin() * self.rope_scaling)[:, None, :])

    def _attention(self, layer: _Layer, h, cos, sin, cache: KVCache, index: int, segments, starts,
                   deltas) -> torch.Tensor:
        s = self.shape
        qkv = project(layer, "qkv", h, deltas)                                   # (n, (heads + 2 kv) d)
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        q = _rotate(q.view(-1, s.heads, s.head_dim), cos, sin)                   # (n, heads, d)
        k = _rotate(k.view(-1, s.kv_heads, s.head_dim), cos, sin)                # (n, kv, d)
        v = v.view(-1, s.kv_heads, s.head_dim)                                   # (n, kv, d)
        keys, values = cache.keys[index], cache.values[index]                   # each (rows, kv, T, d)
        outputs, offset = [], 0
        for (row, tokens), start in zip(segments, starts):
            n, end = len(tokens), start + len(tokens)
            keys[row, :, start:end] = k[offset:offset + n].transpose(0, 1)       # (kv, n, d)
            values[row, :, start:end] = v[offset:offset + n].transpose(0, 1)
            query = q[offset:offset + n].transpose(0, 1)[None]                   # (1, heads, n, d)
            # A token sees the row's cached tokens and the new ones up to itself.
            mask = None if n == 1 else _causal_mask(n, start)                   # (n, end) bool
            out = F.scaled_dot_product_attention(query, keys[row:row + 1, :, :end], values[row:row + 1, :, :end],
                                                 attn_mask=mask, enable_gqa=True)  # (1, heads, n, d)
            outputs.append(out[0].transpose(0, 1).reshape(n, s.heads * s.head_dim))  # (n, heads d)
            offset += n
        return project(layer, "o", torch.cat(outputs) if len(outputs) > 1 else outputs[0], deltas)  # (n, hidden)


#: Per layer: projection name ("qkv", "o", "gate_up", "down") -> (a (rank, in), b (out, rank)) float32.
LoraDeltas = list[dict[str, tuple[torch.Tensor, torch.Tensor]]]


def project(layer: torch.nn.Module, name: str, x: torch.Tensor, deltas) -> torch.Tensor:
    """``layer.<name>(x)``, plus its low-rank update when the pass carries one.

    The update is computed row by row (a batch of one-row matmuls), because a
    matmul over all rows may sum in another order for another number of rows,
    and a job's sentiment must not depend on its batch.
    """
    y = getattr(layer, name)(x)                                            # (n, out)
    pair = None if deltas is None else deltas.get(name)
    if pair is not None:
        a, b = pair                                                        # (rank, in), (out, rank)
        rows = x.shape[0]
        low = torch.bmm(x[:, None, :], a.T.expand(rows, -1, -1))           # (n, 1, rank)
        y = y + torch.bmm(low, b.T.expand(rows, -1, -1))[:, 0]             # (n, out)
    return y


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight  # (n, hidden)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (n, heads, d)
    return x * cos + rotated * sin


def _causal_mask(n: int, start: int) -> torch.Tensor:
    return torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]  # (n, start + n)


def _cumulative(lengths) -> list[int]:
    total, out = 0, []
    for length in lengths:
        total += length
        out.append(total)
    return out
