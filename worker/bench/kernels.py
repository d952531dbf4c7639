"""``bench kernels``: the CPU matmul kernels a weight format can use, on the 0.5B model's shapes.

The candidates for int8/int4 weights, each timed at 1 and 8 rows (a decoding
step of one job, and of a batch of eight):

- float32: ``F.linear`` (MKL/oneDNN), the reference;
- fbgemm dynamic int8: ``quantized::linear_dynamic`` on per-channel weights,
  what the earlier DTYPE=int8 path ran on (its activation scale is per pass, so a
  row's result depends on its neighbours; its quantized tensors are deprecated);
- int8 weight-only: ``aten::_weight_int8pack_mm`` on bfloat16 activations,
  what torchao's int8 weight-only config calls on a CPU;
- int4 weight-only: ``aten::_weight_int4pack_mm_for_cpu``, groups of 128.
"""

from __future__ import annotations

import time
import warnings

import torch

#: (name, out features, in features): Qwen2.5-0.5B's fused q/k/v, o, gate/up, down and output layer.
SHAPES = [("qkv", 1152, 896), ("o", 896, 896), ("gate_up", 9728, 896), ("down", 896, 4864),
          ("output", 151936, 896)]


def _time_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return 1e6 * sorted(samples)[len(samples) // 2]


def _candidates(weight: torch.Tensor):
    out_features, in_features = weight.shape
    scale = weight.abs().amax(dim=1) / 127                                    # (out,)
    int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors: deprecated, measured here as the old baseline
        qweight = torch.quantize_per_channel(weight, scale, torch.zeros(out_features, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qweight, None)
    group = 128
    nibbles = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    int4 = torch._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    scales_zeros = torch.rand(in_features // group, out_features, 2).to(torch.bfloat16)
    scale_bf16 = scale.to(torch.bfloat16)
    return {
        "float32": lambda x: torch.nn.functional.linear(x, weight),
        "fbgemm dynamic int8": lambda x: torch.ops.quantized.linear_dynamic(x, packed, True),
        "int8 weight-only": lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), int8, scale_bf16),
        "int4 weight-only": lambda x: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), int4, group,
                                                                        scales_zeros),
    }


@torch.inference_mode()
def kernel_table(rows: tuple[int, ...] = (1, 8), repeats: int = 30) -> list[str]:
    names = list(_candidates(torch.randn(16, 128)))
    lines = ["| layer (out x in) | rows | " + " | ".join(f"{n} µs" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    totals = {(r, n): 0.0 for r in rows for n in names}
    for layer, out_features, in_features in SHAPES:
        torch.manual_seed(0)
        candidates = _candidates(torch.randn(out_features, in_features) * 0.02)
        for r in rows:
            x = torch.randn(r, in_features)
            times = {name: _time_us(lambda fn=fn, x=x: fn(x), repeats) for name, fn in candidates.items()}
            per_model = 1 if layer == "output" else 24
            for name, us in times.items():
                totals[(r, name)] += per_model * us
            lines.append(f"| {layer} ({out_features} x {in_features}) | {r} | "
                         + " | ".join(f"{times[n]:.0f}" for n in names) + " |")
    for r in rows:
        lines.append(f"| one decoding step (24 layers + output) | {r} | "
                     + " | ".join(f"**{totals[(r, n)] / 1000:.1f} ms**" for n in names) + " |")
    return lines
