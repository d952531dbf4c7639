"""The weight formats: what each holds, how close int8 stays, and that no row depends on another."""

from __future__ import annotations

import pytest
import torch

from worker.engine.weights import FloatLinear, Int8Linear, TokenTable, make_linear, quantize_rows


def test_int8_rows_keep_their_largest_value_and_one_scale_each():
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    quantized, scale = quantize_rows(weight)
    assert quantized.dtype == torch.int8 and scale.shape == (64,)
    assert quantized.abs().amax(dim=1).eq(127).all()
    assert torch.allclose(quantized.float() * scale[:, None], weight, atol=float(scale.max()) / 2 + 1e-7)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_every_format_takes_and_gives_float32_close_to_the_reference(fmt):
    torch.manual_seed(1)
    weight, bias, x = torch.randn(48, 32) * 0.1, torch.randn(48), torch.randn(5, 32)
    layer = make_linear(weight, bias, fmt)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (5, 48)
    reference = x @ weight.T + bias
    assert (y - reference).norm() / reference.norm() < {"float32": 1e-6, "bfloat16": 2e-2, "int8": 2e-2}[fmt]
    assert isinstance(layer, Int8Linear if fmt == "int8" else FloatLinear)


def test_an_int8_row_is_the_same_alone_and_among_others():
    # The engine's "one answer per job" rests on this: weight-only int8 scales nothing by the activations.
    torch.manual_seed(2)
    layer = Int8Linear(torch.randn(96, 64), None)
    x = torch.randn(40, 64) * torch.logspace(-2, 2, 40)[:, None]  # rows of very different magnitudes
    together = layer(x)
    assert all(torch.equal(together[i:i + 1], layer(x[i:i + 1])) for i in range(40))
    assert torch.equal(together[3:11], layer(x[3:11]))


def test_the_token_table_embeds_and_scores_with_one_int8_copy():
    torch.manual_seed(3)
    weight = torch.randn(50, 16)
    table = TokenTable(weight, "int8")
    rows = table.embed(torch.tensor([0, 7, 49]))
    assert rows.dtype == torch.float32 and torch.allclose(rows, weight[[0, 7, 49]], atol=0.02)
    logits = table.logits(torch.randn(2, 16))
    assert logits.shape == (2, 50)
    assert [b.dtype for b in table.buffers()].count(torch.int8) == 1
