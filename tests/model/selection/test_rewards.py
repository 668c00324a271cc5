"""Traditional rewards: a callable, an LLM judge (fake chat model) and a REAL sequence-classification model."""

from __future__ import annotations

import math

import pytest
from langchain_core.messages import HumanMessage

from esamp_agents.selection.rewards import (
    ScoredCandidate,
    SequenceClassifierReward,
)


def cands(*texts: str) -> list[ScoredCandidate]:
    return [ScoredCandidate(i, t, t) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def rm_path(embedded, tmp_path_factory):
    """A tiny randomly initialised Llama sequence classifier, saved with the embedded model's tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-rm")
    tokenizer = embedded.tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TEXTS = ["The answer is 12.", "12", "I think it is 7 + 5 = 12, so Answer: 12", "Thirteen?", "no"]


def test_sequence_classifier_batching_equals_one_by_one(rm_path):
    batched = SequenceClassifierReward(rm_path, batch_size=3)
    single = SequenceClassifierReward(rm_path, batch_size=1)
    assert batched.use_chat_template  # the SmolLM2 tokenizer has one
    scores = batched.score("What is 7 + 5?", cands(*TEXTS))
    assert len(scores) == len(TEXTS) and all(math.isfinite(s) for s in scores)
    assert len(set(scores)) == len(TEXTS)  # random weights still tell the texts apart
    assert scores == pytest.approx(single.score("What is 7 + 5?", cands(*TEXTS)), abs=1e-5)
    # order follows the candidates
    assert batched.score("What is 7 + 5?", cands(*reversed(TEXTS))) == pytest.approx(scores[::-1], abs=1e-5)


def test_sequence_classifier_reads_the_chosen_logit_of_the_chat_rendering(rm_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(rm_path, local_files_only=True)
    reward = SequenceClassifierReward(model, tokenizer, label_index=1)
    ids = reward.encode([HumanMessage("What is 7 + 5?")], "12")
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n12<|im_end|>\n") and "<|im_start|>user\nWhat is 7 + 5?" in text
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, 1].item()
    assert reward.score_texts("What is 7 + 5?", ["12"]) == pytest.approx([expected], abs=1e-5)
    plain = SequenceClassifierReward(model, tokenizer, use_chat_template=False)
    assert plain.encode("What is 7 + 5?", "12") == tokenizer("What is 7 + 5?", "12")["input_ids"]


def test_sequence_classifier_bad_arguments(rm_path, tmp_path):
    with pytest.raises(ValueError, match=r"label_index=2 is out of range; allowed: -2 <= label_index < 2"):
        SequenceClassifierReward(rm_path, label_index=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        SequenceClassifierReward(rm_path, batch_size=0)
    with pytest.raises(ValueError, match="cannot load"):
        SequenceClassifierReward(tmp_path / "missing")
    with pytest.raises(ValueError, match="tokenizer=None"):
        SequenceClassifierReward(object())
