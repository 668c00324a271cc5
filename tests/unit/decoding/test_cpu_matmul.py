"""Few-row matmuls in MKL's fast operand order: the same products as torch's, where they apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from esamp_agents.decoding import cpu_matmul

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the rule is MKL's")


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_torchs_for_few_rows(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 1, 40, generator=g)  # [batch, seq, features], as a decode step feeds it
    out = cpu_matmul.linear(x, weight, b)
    assert out.shape == (rows, 1, 96) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)


def test_few_row_mm_writes_into_the_given_buffer() -> None:
    weight, x = torch.randn(50, 8), torch.randn(1, 8)
    out = torch.full((1, 50), float("nan"))
    assert cpu_matmul.few_row_mm(x, weight, out=out) is out
    torch.testing.assert_close(out, x @ weight.t())


@needs_mkl
def test_the_rule_covers_float32_cpu_products_of_at_most_max_rows() -> None:
    f32, bf16 = torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bfloat16)
    assert cpu_matmul.applies(1, f32, f32) and cpu_matmul.applies(cpu_matmul.MAX_ROWS, f32, f32)
    assert not cpu_matmul.applies(cpu_matmul.MAX_ROWS + 1, f32, f32)  # prefill, large batches: torch's own
    assert not cpu_matmul.applies(1, bf16, bf16)  # bfloat16 was slower this way
    with cpu_matmul.torch_order():
        assert not cpu_matmul.applies(1, f32, f32)
    assert cpu_matmul.applies(1, f32, f32)


@pytest.mark.parametrize("rows", [1, cpu_matmul.MAX_ROWS + 1])
def test_linear_into_writes_torchs_result_into_the_buffer(rows: int) -> None:
    weight, bias, x = torch.randn(50, 8), torch.randn(50), torch.randn(rows, 8)
    out = torch.full((rows, 50), float("nan"))
    assert cpu_matmul.linear_into(x, weight, bias, out) is out
    torch.testing.assert_close(out, F.linear(x, weight, bias))


def test_more_rows_and_other_dtypes_take_torchs_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cpu_matmul, "few_row_mm", lambda x, w, out=None: calls.append(x.shape[0]))
    x = torch.randn(cpu_matmul.MAX_ROWS + 1, 8)
    torch.testing.assert_close(cpu_matmul.linear(x, torch.eye(8)), x)
    xb = torch.randn(2, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu_matmul.linear(xb, torch.eye(8, dtype=torch.bfloat16)), xb)
    assert calls == []


@needs_mkl
def test_install_swaps_only_float32_linears_and_keeps_parameters_and_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4).to(torch.bfloat16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    expected = model[0](x)
    assert cpu_matmul.install(model) == 1
    assert type(model[0]) is cpu_matmul.FewRowLinear and type(model[2]) is nn.Linear
    assert isinstance(model[0], nn.Linear)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    out = model[0](x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()  # autograd flows through the transposed product
    torch.testing.assert_close(model[0].weight.grad, torch.ones(16, 3) @ x)
    assert cpu_matmul.uninstall(model) == 1 and type(model[0]) is nn.Linear
