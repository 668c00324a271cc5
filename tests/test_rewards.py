"""Traditional rewards: a callable, an LLM judge (fake chat model) and a REAL sequence-classification model."""

from __future__ import annotations

import math
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from esamp_agents.selection.rewards import (
    CallableReward,
    LLMJudgeReward,
    Reward,
    RewardError,
    ScoredCandidate,
    SequenceClassifierReward,
    as_prompt_value,
    ascore_candidates,
    check_scores,
    input_text,
    parse_judge_score,
    score_candidates,
)
from tests.fakes import ReplyByCandidate


def cands(*texts: str) -> list[ScoredCandidate]:
    return [ScoredCandidate(i, t, t) for i, t in enumerate(texts)]


# --------------------------------------------------------------------------- callable


def test_callable_reward_scores_each_candidate():
    reward = CallableReward(lambda q, text: len(text) + len(q))
    assert isinstance(reward, Reward)
    assert reward.name == "<lambda>"
    assert reward.score("ab", cands("x", "yyy")) == [3.0, 5.0]
    assert CallableReward(lambda q, t: t == "ok", name="exact").score("q", cands("ok", "no")) == [1.0, 0.0]


def test_callable_reward_rejects_bad_values():
    with pytest.raises(ValueError, match="not callable"):
        CallableReward(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'bad' returned 'high'"):
        CallableReward(lambda q, t: "high", name="bad").score("q", cands("a"))


def test_input_helpers():
    assert input_text("plain") == "plain"
    assert input_text([HumanMessage("hi")]) == "hi"
    assert input_text([SystemMessage("be brief"), HumanMessage("hi")]) == "System: be brief\nHuman: hi"
    assert as_prompt_value("plain").to_string() == "plain"
    assert as_prompt_value([("human", "hi")]).to_messages() == [HumanMessage("hi")]
    with pytest.raises(ValueError, match="input of type int is not a model input"):
        as_prompt_value(3)


# --------------------------------------------------------------------------- calling rewards


def test_check_scores_names_the_reward():
    assert check_scores("r", (1, 2.5, True), 3) == [1.0, 2.5, 1.0]
    with pytest.raises(RewardError, match="reward 'r' returned 2 scores for 3 candidates"):
        check_scores("r", [1, 2], 3)
    with pytest.raises(RewardError, match="reward 'r' returned str; allowed: a list of 1 floats"):
        check_scores("r", "1", 1)
    with pytest.raises(RewardError, match=r"reward 'r' returned 'x'; allowed: real numbers"):
        check_scores("r", ["x"], 1)


class ConfigReward:
    name = "cfg"

    def __init__(self) -> None:
        self.configs: list[Any] = []

    def score(self, input: Any, candidates: Any, config: Any = None) -> list[float]:
        self.configs.append(config)
        return [float(len(c.text)) for c in candidates]

    async def ascore(self, input: Any, candidates: Any) -> list[float]:
        return [-float(len(c.text)) for c in candidates]


class Raising:
    name = "boom"

    def score(self, input: Any, candidates: Any) -> list[float]:
        raise KeyError("gone")


def test_score_candidates_passes_config_and_wraps_failures():
    reward = ConfigReward()
    config = {"tags": ["t"]}
    assert score_candidates(reward, "q", cands("a", "bbb"), config) == [1.0, 3.0]
    assert reward.configs == [config]
    assert score_candidates(reward, "q", cands("a")) == [1.0] and reward.configs[-1] is None
    with pytest.raises(RewardError, match="reward 'boom' failed: KeyError: 'gone'") as info:
        score_candidates(Raising(), "q", cands("a"))
    assert isinstance(info.value.__cause__, KeyError)
    wrong = CallableReward(lambda q, t: 1.0, name="one")
    assert score_candidates(wrong, "q", cands("a", "b")) == [1.0, 1.0]


def test_ascore_candidates_prefers_ascore_and_falls_back_to_a_thread():
    import asyncio

    assert asyncio.run(ascore_candidates(ConfigReward(), "q", cands("ab"))) == [-2.0]
    with pytest.raises(RewardError, match="reward 'boom' failed: KeyError"):
        asyncio.run(ascore_candidates(Raising(), "q", cands("a")))


# --------------------------------------------------------------------------- judge


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Score: 7", 7.0),
        ("score = 8.5/10", 8.5),
        ("I'd give it 3 out of 10", 3.0),
        ("Rating: **9**", 9.0),
        ("no", None),
    ],
)
def test_parse_judge_score(reply, expected):
    value = parse_judge_score(reply)
    assert (math.isnan(value) and expected is None) or value == expected


REPLIES = {"good": "Score: 9", "meh": "I'd say 4 out of 10", "garbage": "no idea", "wild": "Score: 42"}


def test_llm_judge_parses_validates_and_clamps():
    judge = ReplyByCandidate(replies=REPLIES)
    texts = cands("good", "meh", "garbage", "wild")
    scores = LLMJudgeReward(judge).score("What is 2+2?", texts)
    assert scores[:2] == [9.0, 4.0] and math.isnan(scores[2]) and math.isnan(scores[3])
    clamped = LLMJudgeReward(judge, clamp=True, max_concurrency=2).score("q", texts)
    assert clamped[0] == 9.0 and clamped[3] == 10.0


async def test_llm_judge_async_matches_sync():
    judge = ReplyByCandidate(replies=REPLIES)
    reward = LLMJudgeReward(judge, score_range=(0, 10))
    texts = cands("good", "meh", "wild")
    sync = reward.score("q", texts)
    asynchronous = await reward.ascore("q", texts)
    assert asynchronous[:2] == sync[:2] == [9.0, 4.0]
    assert math.isnan(sync[2]) and math.isnan(asynchronous[2])


def test_llm_judge_prompt_and_range_validation():
    judge = ReplyByCandidate(replies={})
    with pytest.raises(ValueError, match=r"lacks the variable\(s\) \['candidate'\]"):
        LLMJudgeReward(judge, prompt="Rate {input}")
    with pytest.raises(ValueError, match="unknown variable"):
        LLMJudgeReward(judge, prompt="Rate {candidate} for {input} in {style}")
    with pytest.raises(ValueError, match="low < high"):
        LLMJudgeReward(judge, score_range=(5, 5))
    with pytest.raises(ValueError, match="not a LangChain"):
        LLMJudgeReward("gpt")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- sequence classifier (real model)


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


@pytest.mark.model
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


@pytest.mark.model
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


@pytest.mark.model
def test_sequence_classifier_bad_arguments(rm_path, tmp_path):
    with pytest.raises(ValueError, match=r"label_index=2 is out of range; allowed: -2 <= label_index < 2"):
        SequenceClassifierReward(rm_path, label_index=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        SequenceClassifierReward(rm_path, batch_size=0)
    with pytest.raises(ValueError, match="cannot load"):
        SequenceClassifierReward(tmp_path / "missing")
    with pytest.raises(ValueError, match="tokenizer=None"):
        SequenceClassifierReward(object())
