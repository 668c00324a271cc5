"""The engine runs the main decoder-only layouts, loaded from a local path.

Tiny randomly initialised models are built here from their configs (no hub), so
this checks our cache, mask and position handling against HF ``generate`` on
Llama, Qwen2, GPT-2, Gemma and Gemma-2 (logit soft-capping) layouts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.decoding.engine import ESampEngine

try:
    from transformers import Gemma2Config
except ImportError:  # pragma: no cover - older transformers
    Gemma2Config = None

VOCAB = 49152
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip

CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen2": lambda: Qwen2Config(**SMALL),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=256),
    "gemma": lambda: GemmaConfig(**SMALL, head_dim=8),
}
if Gemma2Config is not None:
    CONFIGS["gemma2"] = lambda: Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=30.0)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_engine(request, tmp_path_factory, embedded) -> ESampEngine:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param]())
    model.generation_config.eos_token_id = embedded.eos_token_ids
    path: Path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return ESampEngine(load_model(str(path), device="cpu", dtype="float32"))


def test_plain_sampling_matches_hf_generate(tiny_engine: ESampEngine) -> None:
    ids = tiny_engine.tokenize("Hello there, how are")
    sp = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, seed=7)
    ours = tiny_engine.generate([ids], sp, ESampParams(beta=0.0))[0].candidates[0]
    torch.manual_seed(7)
    hf = tiny_engine.loaded.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=True,
        temperature=1.0, top_k=0, max_new_tokens=8, pad_token_id=tiny_engine.loaded.pad_token_id,
    )  # fmt: skip
    assert ours.token_ids == hf[0, len(ids) :].tolist()[: len(ours.token_ids)]


def test_left_padding_does_not_change_greedy_output(tiny_engine: ESampEngine) -> None:
    short, long = "Hi", "A much longer prompt with many more tokens in it"
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    alone = tiny_engine.generate([short], greedy, ESampParams(beta=0.0))[0].candidates[0].token_ids
    batched = tiny_engine.generate([long, short], greedy, ESampParams(beta=0.0))[1].candidates[0].token_ids
    assert batched == alone


def test_esamp_runs_and_trains(tiny_engine: ESampEngine) -> None:
    sp = SamplingParams(n=3, max_new_tokens=10, seed=1, top_k=20)
    out = tiny_engine.generate(["Once", "Twice upon"], sp, ESampParams(beta=0.5, distiller_width=16))
    for pr in out:
        assert len(pr.candidates) == 3
        assert len(pr.distiller_loss) >= 1 and all(x == x for x in pr.distiller_loss)  # no NaN
