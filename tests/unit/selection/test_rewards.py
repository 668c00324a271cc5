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
