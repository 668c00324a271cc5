"""The lean Llama decode step computes what HF's forward computes, and steps aside where it cannot."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

from esamp_agents.decoding import fast_decode
from esamp_agents.decoding.fast_decode import LlamaDecodeStep, unsupported_reason

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip


def rope(kind: str) -> dict[str, object]:
    return {"rope_type": kind, "factor": 2.0, "rope_theta": 10000.0}


def tiny_llama(dtype: torch.dtype = torch.float32, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMALL, **overrides})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype).eval()


def prefilled(model: LlamaForCausalLM, capacity: int = 12) -> tuple[StaticCache, torch.Tensor, torch.Tensor]:
    """Three rows, the second and third left-padded by 1 and 3 columns, prefilled by HF: (cache, mask, positions)."""
    ids = torch.tensor([[5, 9, 3, 7, 2], [0, 4, 8, 1, 6], [0, 0, 0, 11, 12]])
    mask = torch.zeros(3, capacity, dtype=torch.long)
    mask[0, :5], mask[1, 1:5], mask[2, 3:5] = 1, 1, 1
    mask[:, 5:] = 1  # generated columns are always attended
    positions = (mask[:, :5].cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    with torch.no_grad():
        model.model(input_ids=ids, attention_mask=mask[:, :5], position_ids=positions, use_cache=True, cache=cache)
    return cache, mask, positions[:, -1] + 1


def run_steps(model: LlamaForCausalLM, lean: bool, steps: int = 4) -> tuple[list[list[torch.Tensor]], StaticCache]:
    cache, mask, positions = prefilled(model)
    step = LlamaDecodeStep(model)
    tokens = torch.tensor([[13], [14], [15]])
    states = []
    with torch.no_grad():
        for s in range(steps):
            width = 6 + s
            if lean:
                assert step.serves(tokens, mask[:, :width], cache)
                cache, hidden = step(tokens, mask[:, :width], positions.unsqueeze(-1), cache)
            else:
                out = model.model(
                    input_ids=tokens, attention_mask=mask[:, :width], position_ids=positions.unsqueeze(-1),
                    use_cache=True, output_hidden_states=True, cache=cache,
                )  # fmt: skip
                hidden = list(out.hidden_states)
            states.append([h.clone() for h in hidden])
            positions = positions + 1
            tokens = (tokens * 3 + 1) % 64
    return states, cache


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_bias": True, "mlp_bias": True}, {"rope_parameters": rope("linear")}],
    ids=["plain", "biases", "linear-rope"],
)
def test_lean_steps_equal_hf_forward_with_left_padding(overrides: dict) -> None:
    model = tiny_llama(**overrides)
    assert unsupported_reason(model) is None
    hf, hf_cache = run_steps(model, lean=False)
    lean, lean_cache = run_steps(model, lean=True)
    for hf_step, lean_step in zip(hf, lean, strict=True):
        assert len(lean_step) == len(hf_step) == SMALL["num_hidden_layers"] + 1
        for a, b in zip(hf_step, lean_step, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(hf_cache.layers, lean_cache.layers, strict=True):
        assert int(a.cumulative_length) == int(b.cumulative_length) == 9
        torch.testing.assert_close(b.keys, a.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)


def test_bfloat16_lean_steps_stay_within_bfloat16_rounding_of_hf() -> None:
    model = tiny_llama(torch.bfloat16)
    hf, _ = run_steps(model, lean=False, steps=2)
    lean, _ = run_steps(model, lean=True, steps=2)
    for a, b in zip(hf[-1], lean[-1], strict=True):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=0.02, atol=0.02)


def test_it_steps_aside_for_calls_it_does_not_compute() -> None:
    model = tiny_llama()
    step = LlamaDecodeStep(model)
    cache, mask, _ = prefilled(model)
    one = torch.tensor([[1], [2], [3]])
    assert not step.serves(one, mask[:, :6], cache)  # autograd on: a training call
    with torch.no_grad():
        assert step.serves(one, mask[:, :6], cache)
        assert not step.serves(torch.tensor([[1, 2]] * 3), mask[:, :7], cache)  # several tokens: a prefill
        assert not step.serves(one, mask[:, :7], cache)  # the mask's last column is not the cache's next one
        assert not step.serves(one[:2], mask[:2, :6], cache)  # rows differ from the cache's
        assert not step.serves(one, mask[:, :6], DynamicCache(config=model.config))
        assert not step.serves(one, mask[:, :6], None)
        with fast_decode.hf_forward():
            assert not step.serves(one, mask[:, :6], cache)
        assert step.serves(one, mask[:, :6], cache)
        model.train()
        assert not step.serves(one, mask[:, :6], cache)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)), "not a Llama architecture"),
        (lambda: tiny_llama(hidden_act="gelu"), "hidden_act='gelu'"),
        (lambda: tiny_llama(rope_parameters=rope("dynamic")), "'dynamic'"),
    ],
    ids=["qwen2", "gelu", "dynamic-rope"],
)
def test_unsupported_models_are_named_and_refused(make, reason: str) -> None:
    model = make()
    assert reason in (unsupported_reason(model) or "")
    assert fast_decode.for_model(model) is None
    with pytest.raises(ValueError, match="cannot serve"):
        LlamaDecodeStep(model)


def test_a_replaced_layer_module_is_refused() -> None:
    model = tiny_llama()

    class Custom(torch.nn.Module):
        pass

    model.model.layers[1].mlp = Custom()
    assert "Custom replaces LlamaMLP" in (unsupported_reason(model) or "")


def test_the_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    assert isinstance(fast_decode.for_model(model), LlamaDecodeStep)
    monkeypatch.setenv("ESAMP_FAST_DECODE", "0")
    assert fast_decode.for_model(model) is None
    monkeypatch.setenv("ESAMP_FAST_DECODE", "yes")
    with pytest.raises(ValueError, match=r"ESAMP_FAST_DECODE='yes'.*1 .*or 0"):
        fast_decode.for_model(model)


def test_a_bad_switch_fails_before_any_model_loads(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from esamp_agents.decoding import loading

    monkeypatch.setenv("ESAMP_FAST_DECODE", "2")
    with pytest.raises(ValueError, match=r"ESAMP_FAST_DECODE='2'"):
        loading._load_fresh(str(tmp_path / "no-model-here"), "cpu", "float32")
