"""DTYPE=int8: dynamic int8 linear layers, with float32 down-projections kept for the sentiment.

Measurements behind every choice here are in BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import warnings

import torch


class BFloat16Embedding(torch.nn.Module):
    """An embedding table kept in bfloat16 that returns float32 rows.

    One row is read per token, so its precision costs nothing in speed; halving
    it saves a quarter of the int8 worker's memory. The table is a buffer, not
    a parameter, so the model still reports (and computes in) float32.
    """

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.register_buffer("weight", embedding.weight.detach().to(torch.bfloat16))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(input_ids, self.weight).float()


class DualPrecisionLinear(torch.nn.Module):
    """One linear layer held twice: float32 for the sentiment pass, int8 for generating the reply.

    The MLP down-projections' inputs carry activation outliers that per-tensor
    dynamic quantization clips: quantized, they cost 7.7 points of sentiment
    accuracy on the dev sample, and in float32 they double the decode time
    (BENCHMARKS.md). So the one forward pass that decides the label reads the
    float32 copy, and the many decoding steps read the int8 one.
    """

    def __init__(self, linear: torch.nn.Linear, quantized: torch.nn.Module):
        super().__init__()
        self.exact = linear
        self.fast = quantized
        self.precise = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exact(x) if self.precise else self.fast(x)


def quantize_int8(model) -> None:
    """Linear layers to int8 weights with dynamic int8 activations, in place.

    The MLP down-projections become DualPrecisionLinear: float32 and int8 copies.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # from_pretrained maps the weights file into memory and every tensor is a view
    # of that one mapping: while any view lives (a bias kept by a quantized
    # layer, a norm), all ~2 GB of float32 pages stay resident. Own copies first.
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    gc.collect()
    with warnings.catch_warnings():
        # Deprecated in favour of torchao, whose CPU int8 kernels are slower here (BENCHMARKS.md).
        warnings.simplefilter("ignore")
        for layer in model.base_model.layers:
            down = layer.mlp.down_proj
            fast = quantize_dynamic(torch.nn.Sequential(copy.deepcopy(down)),
                                    {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)[0]
            layer.mlp.down_proj = DualPrecisionLinear(down, fast)
        # One weight scale per output channel rather than per layer: the sentiment then
        # matches float32's on 1,000 dev reviews, at the same decoding speed (EVAL.md).
        spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                if type(module) is torch.nn.Linear and not name.endswith("down_proj.exact")}
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    model.set_input_embeddings(BFloat16Embedding(model.get_input_embeddings()))
    gc.collect()
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the float32 copies freed by quantization back to the OS (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
