"""Training a classifier adapter: the label words' scores under a learned prefix (or LoRA), with gradients.

The forward pass here computes exactly what the serving decoder computes for a
classifier job with the adapter loaded (decoder.py, the same layers and
helpers), laid out for training instead of serving:

    cache slots   [0, n)          the learned keys/values of every layer (deep prefix)
                  [n, n+P)        the classifier prompt's prefix, shared by the batch
                  [n+P, n+P+L)    each row's own tokens: its text and the assistant header

The prompt's P tokens run once per batch (batch size 1, broadcast to every
row), the rows run padded on the right, so causality alone keeps padding out
of every real token's view. Only the label words' rows of the output layer
are read: the loss is the cross-entropy over the label set, which is how the
service decides.

For LoRA, PEFT wraps the decoder's projections (tuning.py) and this forward
pass runs unchanged, with no prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.engine.decoder import Qwen2Decoder, _rms_norm, _rotate


class TrainableClassifier(torch.nn.Module):
    """The sentiment pass of ``decoder`` with trainable deep-prefix keys/values (and optional LoRA)."""

    def __init__(self, decoder: Qwen2Decoder, prompt_ids: list[int], label_rows: torch.Tensor,
                 prefix_init: tuple[torch.Tensor, torch.Tensor] | None):
        """``label_rows``: (labels, hidden) rows of the output layer. ``prefix_init``: (keys, values), each
        (layers, kv, n, d), or None for no prefix (LoRA alone)."""
        super().__init__()
        self.decoder = decoder
        self.prompt_ids = list(prompt_ids)
        self.register_buffer("label_rows", label_rows.detach().float().clone())  # (labels, hidden)
        if prefix_init is None:
            self.keys = self.values = None
        else:
            self.keys = torch.nn.Parameter(prefix_init[0].detach().float().clone())    # (layers, kv, n, d)
            self.values = torch.nn.Parameter(prefix_init[1].detach().float().clone())  # (layers, kv, n, d)

    @property
    def prefix_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def forward(self, rests: list[list[int]]) -> torch.Tensor:
        """Label-word scores (rows, labels) for each row's tokens after the classifier prompt."""
        d, s = self.decoder, self.decoder.shape
        n, p = self.prefix_tokens, len(self.prompt_ids)
        rows, width = len(rests), max(len(rest) for rest in rests)
        ids = torch.zeros(rows, width, dtype=torch.long)                       # (B, L)
        for row, rest in enumerate(rests):
            ids[row, : len(rest)] = torch.tensor(rest)
        last = torch.tensor([len(rest) - 1 for rest in rests])                 # (B,)
        x_prompt = d.embedding.embed(torch.tensor(self.prompt_ids))             # (P, hidden)
        x_rows = d.embedding.embed(ids.view(-1)).view(rows, width, s.hidden)    # (B, L, hidden)
        rope_prompt = d._rope(torch.arange(n, n + p))                           # each (P, 1, d)
        rope_rows = d._rope(torch.arange(n + p, n + p + width))                 # each (L, 1, d)
        mask_prompt = _visible(p, n)                                            # (P, n + P)
        mask_rows = _visible(width, n + p)                                      # (L, n + P + L)
        for index, layer in enumerate(d.layers):
            q, k, v = self._qkv(layer, x_prompt, *rope_prompt)                   # (P, h, d), (P, kv, d) x2
            keys, values = k.transpose(0, 1), v.transpose(0, 1)                  # each (kv, P, d)
            if n:
                keys = torch.cat([self.keys[index], keys], dim=1)                # (kv, n + P, d)
                values = torch.cat([self.values[index], values], dim=1)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                                 attn_mask=mask_prompt, enable_gqa=True)  # (1, h, P, d)
            x_prompt = self._after_attention(layer, x_prompt, out[0].transpose(0, 1).reshape(p, -1))
            q, k, v = self._qkv(layer, x_rows, *rope_rows)                       # (B, L, h, d), (B, L, kv, d) x2
            all_keys = torch.cat([keys.expand(rows, -1, -1, -1), k.transpose(1, 2)], dim=2)    # (B, kv, n+P+L, d)
            all_values = torch.cat([values.expand(rows, -1, -1, -1), v.transpose(1, 2)], dim=2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), all_keys, all_values,
                                                 attn_mask=mask_rows, enable_gqa=True)     # (B, h, L, d)
            x_rows = self._after_attention(layer, x_rows, out.transpose(1, 2).reshape(rows, width, -1))
        hidden = _rms_norm(x_rows[torch.arange(rows), last], d.final_norm, s.rms_eps)  # (B, hidden)
        return hidden @ self.label_rows.T                                              # (B, labels)

    def _qkv(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        s = self.decoder.shape
        qkv = layer.qkv(_rms_norm(x, layer.attn_norm, s.rms_eps))             # (..., (h + 2 kv) d)
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
        lead = x.shape[:-1]
        return (_rotate(q.reshape(*lead, s.heads, s.head_dim), cos, sin),     # (..., h, d)
                _rotate(k.reshape(*lead, s.kv_heads, s.head_dim), cos, sin),  # (..., kv, d)
                v.reshape(*lead, s.kv_heads, s.head_dim))                     # (..., kv, d)

    def _after_attention(self, layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        s = self.decoder.shape
        x = x + layer.o(attended)                                              # (..., hidden)
        gate, up = layer.gate_up(_rms_norm(x, layer.mlp_norm, s.rms_eps)).chunk(2, dim=-1)  # each (..., inter)
        return x + layer.down(F.silu(gate) * up)                               # (..., hidden)


def _visible(queries: int, before: int) -> torch.Tensor:
    """(queries, before + queries) bool: every earlier slot, and the new tokens up to each query itself."""
    causal = torch.arange(queries)[None, :] <= torch.arange(queries)[:, None]  # (q, q)
    return torch.cat([torch.ones(queries, before, dtype=torch.bool), causal], dim=1)


@torch.no_grad()
def real_token_prefix(decoder: Qwen2Decoder, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values the model itself computes for ``ids`` at positions 0..n-1: a prefix to start from.

    Starting from real tokens (the classifier prompt's first ones, whose first is
    the attention sink <|im_start|>) keeps the untrained adapter close to the prompt alone.
    """
    cache = decoder.new_cache(1, len(ids))
    decoder(cache, [(0, list(ids))])
    keys = torch.stack([k[0] for k in cache.keys])      # (layers, kv, n, d)
    values = torch.stack([v[0] for v in cache.values])  # (layers, kv, n, d)
    return keys, values
