"""Weight formats of the lean decoder: float32, bfloat16, and int8 weight-only (one scale per row).

Every layer takes and returns float32 activations, so the residual stream,
the norms and attention stay float32 whatever the weights are stored in.

int8 is weight-only: ATen's ``_weight_int8pack_mm`` (the kernel torchao's
int8 weight-only config calls on a CPU) multiplies bfloat16 activations by
int8 weights and applies one scale per output channel. Nothing is scaled by
the activations, so a row's result never depends on the other rows of its
pass; a test holds the engine to that (one answer per job, alone or in a
batch). BENCHMARKS.md has the kernel measurements behind the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: DTYPE setting -> how the linear weights and the embedding table are held.
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row): symmetric, the largest magnitude of a row maps to 127."""
    weight = weight.detach().float()                           # (rows, cols)
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (rows,)
    quantized = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (rows, cols)
    return quantized.contiguous(), scale


class FloatLinear(torch.nn.Module):
    """y = x W^T + b with W in float32 or bfloat16; float32 in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())  # (out, in)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, in) float32
        y = F.linear(x.to(self.weight.dtype), self.weight)  # (tokens, out)
        y = y.float()
        return y if self.bias is None else y + self.bias


class Int8Linear(torch.nn.Module):
    """Weight-only int8 with one float scale per output channel; bfloat16 activations into the kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        quantized, scale = quantize_rows(weight)
        self.register_buffer("weight", quantized)                     # (out, in) int8
        self.register_buffer("scale", scale.to(torch.bfloat16))       # (out,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (tokens, in) float32
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale).float()  # (tokens, out)
        return y if self.bias is None else y + self.bias


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> torch.nn.Module:
    if fmt == "int8":
        return Int8Linear(weight, bias)
    return FloatLinear(weight, bias, torch.bfloat16 if fmt == "bfloat16" else torch.float32)


class TokenTable(torch.nn.Module):
    """The embedding table, also the output layer when the model ties them (Qwen2.5 does).

    One copy serves both: a token's input row is read out of it, and the
    logits are the table times the last hidden state. Under int8 it is held
    as int8 with one scale per row (a quarter of float32's 544 MB for the 0.5B
    model), under bfloat16 as bfloat16.
    """

    def __init__(self, weight: torch.Tensor, fmt: str):
        super().__init__()
        self.fmt = fmt
        self.output = make_linear(weight, None, fmt)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (tokens,) -> (tokens, hidden) float32
        rows = self.output.weight[ids].float()           # (tokens, hidden)
        if self.fmt == "int8":
            rows = rows * self.output.scale[ids, None].float()
        return rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (rows, hidden) -> (rows, vocabulary)
        return self.output(hidden)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every buffer: what the weights occupy in memory."""
    return sum(buffer.numel() * buffer.element_size() for buffer in module.buffers())
