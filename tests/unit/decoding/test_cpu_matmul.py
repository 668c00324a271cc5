"""Few-row matmuls in the operand order measured faster: the same products as torch's, where they apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from esamp_agents.decoding import cpu_matmul

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the rule is MKL's")


@pytest.fixture(autouse=True)
def _keep_the_rule():
    """Every test here may set the process-wide rule; put it back afterwards."""
    previous = cpu_matmul.fast_rows()
    yield
    cpu_matmul.set_fast_rows(previous)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_torchs_for_few_rows(rows: int, bias: bool) -> None:
    cpu_matmul.set_fast_rows(range(1, cpu_matmul.MAX_ROWS + 1))  # the transposed path wherever it may apply
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
def test_the_rule_covers_exactly_the_chosen_row_counts_of_float32_cpu_products() -> None:
    f32, bf16 = torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bfloat16)
    cpu_matmul.set_fast_rows({1, 3})
    assert cpu_matmul.applies(1, f32, f32) and cpu_matmul.applies(3, f32, f32)
    assert not cpu_matmul.applies(2, f32, f32) and not cpu_matmul.applies(cpu_matmul.MAX_ROWS + 1, f32, f32)
    assert not cpu_matmul.applies(1, bf16, bf16)  # bfloat16 was slower this way
    with cpu_matmul.torch_order():
        assert not cpu_matmul.applies(1, f32, f32)
    assert cpu_matmul.applies(1, f32, f32)
    assert cpu_matmul.set_fast_rows(()) == {1, 3}  # returns the rule it replaced
    assert not cpu_matmul.applies(1, f32, f32)


@pytest.mark.parametrize("rows", [[0], [cpu_matmul.MAX_ROWS + 1], [1.5]])
def test_set_fast_rows_rejects_row_counts_outside_1_to_max_rows(rows: list) -> None:
    with pytest.raises(ValueError, match=rf"rows=.*out of range; allowed: integers 1\.\.{cpu_matmul.MAX_ROWS}"):
        cpu_matmul.set_fast_rows(rows)


def test_the_transposed_order_is_chosen_only_where_it_won_by_the_margin() -> None:
    def rule(*speedups: float) -> frozenset[int]:
        n = len(speedups)
        transposed = tuple(30.0 / s for s in speedups)
        return cpu_matmul.Calibration(tuple(range(1, n + 1)), (30.0,) * n, transposed, 1.0, 2).fast_rows

    assert rule(2.0, 1.03, 0.97) == {1, 2}  # 2 is within a clear win's neighbourhood; 3 is slower itself
    assert rule(1.05, 1.03, 1.08) == frozenset()  # ties keep torch's order
    assert rule(0.5, 1.3, 0.5) == frozenset()  # one lucky timing between two losses
    assert rule(0.5, 0.5, 1.2, 1.3) == {4}  # 3 is held back by its neighbour (1.2 x 0.5 x 1.3 < 1.1^3)


def test_measure_times_both_orders_for_every_row_count() -> None:
    weights = [torch.randn(64, 32), torch.randn(48, 64)]
    result = cpu_matmul.measure(weights, rows=(1, 2), reps=2)
    assert result.rows == (1, 2) and len(result.torch_ms) == len(result.transposed_ms) == 2
    assert all(t > 0 for t in result.torch_ms + result.transposed_ms)
    assert result.megabytes == pytest.approx((64 * 32 + 48 * 64) * 4 / 1e6)
    with pytest.raises(ValueError, match=r"weights=\[\] is empty"):
        cpu_matmul.measure([])
    with pytest.raises(ValueError, match=r"reps=0 out of range; allowed: reps >= 1"):
        cpu_matmul.measure(weights, reps=0)


def test_calibration_weights_stay_within_the_budget_but_keep_every_shape() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 100))
    model[2].weight = model[1].weight  # tied: streamed once
    budget = (16 * 8 + 16 * 16) * 4  # room for the first two only
    chosen = cpu_matmul.calibration_weights(model, budget_bytes=budget)
    assert [tuple(w.shape) for w in chosen] == [(16, 8), (16, 16), (100, 16)]  # the head is a new shape


@pytest.mark.parametrize(
    ("value", "mode"), [(None, "auto"), ("", "auto"), ("torch", "torch"), (" Transposed ", "transposed")]
)
def test_the_environment_picks_the_mode(monkeypatch: pytest.MonkeyPatch, value: str | None, mode: str) -> None:
    if value is None:
        monkeypatch.delenv(cpu_matmul.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(cpu_matmul.ENV_VAR, value)
    assert cpu_matmul.mode_from_env() == mode


def test_a_bad_environment_value_names_itself_and_the_allowed_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_matmul.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"ESAMP_CPU_MATMUL='fastest' is not known; allowed: auto, torch, transposed"):
        cpu_matmul.mode_from_env()


@needs_mkl
def test_overrides_set_the_rule_without_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_matmul, "measure", lambda *a, **k: pytest.fail("an override must not measure"))
    model = nn.Sequential(nn.Linear(8, 8))
    monkeypatch.setenv(cpu_matmul.ENV_VAR, "transposed")
    assert cpu_matmul.calibrate(model) == frozenset(range(1, cpu_matmul.MAX_ROWS + 1))
    monkeypatch.setenv(cpu_matmul.ENV_VAR, "torch")
    assert cpu_matmul.calibrate(model) == frozenset()


@needs_mkl
def test_auto_measures_once_per_thread_count_and_sets_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_matmul.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_matmul, "_calibrated_threads", set())
    monkeypatch.setattr(cpu_matmul, "_last", None)
    calls: list[int] = []

    def fake_measure(weights, rows=range(1, cpu_matmul.MAX_ROWS + 1), reps=3):
        calls.append(len(weights))
        return cpu_matmul.Calibration((1, 2, 3), (20.0,) * 3, (10.0, 10.0, 40.0), 1.0, torch.get_num_threads())

    monkeypatch.setattr(cpu_matmul, "measure", fake_measure)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert cpu_matmul.install(model) == 2 and cpu_matmul.fast_rows() == {1, 2}
    assert cpu_matmul.last_calibration().fast_rows == {1, 2}
    assert cpu_matmul.calibrate(model) == {1, 2} and calls == [2]  # measured once
    cpu_matmul.calibrate(model, force=True)
    assert calls == [2, 2]


@pytest.mark.parametrize("rows", [1, cpu_matmul.MAX_ROWS + 1])
def test_linear_into_writes_torchs_result_into_the_buffer(rows: int) -> None:
    cpu_matmul.set_fast_rows({1})
    weight, bias, x = torch.randn(50, 8), torch.randn(50), torch.randn(rows, 8)
    out = torch.full((rows, 50), float("nan"))
    assert cpu_matmul.linear_into(x, weight, bias, out) is out
    torch.testing.assert_close(out, F.linear(x, weight, bias))


def test_more_rows_and_other_dtypes_take_torchs_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cpu_matmul, "few_row_mm", lambda x, w, out=None: calls.append(x.shape[0]))
    cpu_matmul.set_fast_rows(range(1, cpu_matmul.MAX_ROWS + 1))
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
    assert cpu_matmul.install(model, measure_order=False) == 1
    cpu_matmul.set_fast_rows({3})
    assert type(model[0]) is cpu_matmul.FewRowLinear and type(model[2]) is nn.Linear
    assert isinstance(model[0], nn.Linear)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    out = model[0](x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()  # autograd flows through the transposed product
    torch.testing.assert_close(model[0].weight.grad, torch.ones(16, 3) @ x)
    assert cpu_matmul.uninstall(model) == 1 and type(model[0]) is nn.Linear
