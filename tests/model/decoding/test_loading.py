"""Model loading: the embedded GGUF, errors that say what to do, the shared registry, chat templates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from esamp_agents.decoding import loading
from esamp_agents.decoding.loading import (
    EMBEDDED,
    EMBEDDED_FILE,
    LoadedModel,
    load_model,
)


def test_embedded_model_properties(embedded):
    assert isinstance(embedded, LoadedModel)
    assert embedded.name == f"{EMBEDDED}:{EMBEDDED_FILE}"
    assert embedded.num_layers == 30
    assert embedded.hidden_size == 576
    assert embedded.vocab_size == 49152
    assert embedded.context_window == 8192
    assert embedded.tokenizer.eos_token_id in embedded.eos_token_ids
    assert isinstance(embedded.pad_token_id, int)
    assert str(embedded.device) == "cpu"
    assert not embedded.model.training


def test_registry_shares_one_object(embedded):
    assert load_model(EMBEDDED, device="cpu") is embedded
    assert load_model(EMBEDDED, device="cpu") is load_model(EMBEDDED, device="cpu")
    assert load_model(embedded) is embedded
    assert (EMBEDDED, "cpu", "auto") in loading._REGISTRY


def test_model_object_with_tokenizer_is_wrapped(embedded):
    wrapped = load_model(embedded.model, tokenizer=embedded.tokenizer)
    assert wrapped.model is embedded.model
    assert wrapped.tokenizer is embedded.tokenizer
    assert wrapped.hidden_size == 576


def test_chat_template_ends_at_the_assistant_turn(embedded):
    text = embedded.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    with_system = embedded.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_models_without_a_chat_template_get_a_transcript(embedded):
    bare = LoadedModel(model=embedded.model, tokenizer=SimpleNamespace(chat_template=None), name="bare")
    text = bare.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "System: Be brief.\nUser: Hi\nAssistant:"


def test_loaded_float32_model_measures_the_few_row_order_and_agrees_with_torchs(embedded):
    """load_model gives every float32 linear layer the few-row path (MKL here) and settles, by
    timing both orders on the model's weights, which row counts take the transposed one; either
    way the model's outputs agree with torch's own order to float32 rounding."""
    import torch

    from esamp_agents.decoding import cpu_matmul

    if not torch.backends.mkl.is_available():
        pytest.skip("the rule is MKL's; without it load_model installs nothing (unit-tested)")
    linears = [m for m in embedded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is cpu_matmul.FewRowLinear for m in linears)
    if cpu_matmul.mode_from_env() == "auto":
        measured = cpu_matmul.last_calibration()
        assert measured is not None and measured.rows == tuple(range(1, cpu_matmul.MAX_ROWS + 1))
        # a 168 MB budget in module order, plus the 113 MB LM head kept as a shape of its own
        assert 150 < measured.megabytes < 400 and all(t > 0 for t in measured.torch_ms + measured.transposed_ms)
        assert cpu_matmul.fast_rows() == measured.fast_rows
    ids = torch.tensor([embedded.tokenizer("What is 2 + 3?").input_ids])
    with torch.no_grad(), cpu_matmul.fast_rows_set_to({1}):  # the transposed path, whatever was chosen
        fast = embedded.model(input_ids=ids[:, -1:]).logits  # one row: the few-row path
        with cpu_matmul.torch_order():
            stock = embedded.model(input_ids=ids[:, -1:]).logits
    torch.testing.assert_close(fast, stock, atol=1e-4, rtol=1e-4)  # the same to float32 rounding
