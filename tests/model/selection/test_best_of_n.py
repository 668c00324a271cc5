"""BestOfN: selection, strategies, failure policies, LangChain plumbing (fake models), and the
decode-time reward path on the real embedded model (one engine call for all N)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from esamp_agents.selection.best_of_n import (
    BestOfN,
)
from esamp_agents.selection.rewards import CallableReward, RewardError
from tests.fakes import NormObserver, NormReward, Recorder

LENGTH = CallableReward(lambda q, text: len(text), name="length")


def metadata(output: AIMessage) -> dict[str, Any]:
    return output.response_metadata["best_of_n"]


def test_esamp_decode_time_reward_in_one_engine_call(embedded, monkeypatch):
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.langchain.chat_model import ChatESamp

    engine_calls: list[int] = []
    original = ESampEngine.generate

    def counting(self: Any, prompts: Any, sampling: Any = None, *args: Any, **kwargs: Any) -> Any:
        engine_calls.append(sampling.n)
        return original(self, prompts, sampling, *args, **kwargs)

    monkeypatch.setattr(ESampEngine, "generate", counting)
    chat = ChatESamp(loaded_model=embedded, max_tokens=12, seed=0, temperature=0.9)
    reward = NormReward()
    recorder = Recorder()
    bon = BestOfN(chat, n=4, rewards=[reward, LENGTH], include_candidates=True)
    result = bon.invoke("What is 7 + 5?", {"callbacks": [recorder]})
    assert engine_calls == [4] and len(recorder.model_starts) == 1
    params = recorder.model_starts[0]["invocation_params"]
    assert not {"observers", "rewards", "on_reward_error"} & set(params)
    (obs,) = reward.observers
    assert obs.steps >= 1
    observed = obs.rewards()[0]
    assert len(result.candidates) == 4
    for c in result.candidates:
        assert c.scores["norm"] == pytest.approx(observed[c.index])
        assert c.generation_info["rewards"] == {"norm": c.scores["norm"]}  # the model's public metadata
        assert isinstance(c.output, AIMessage) and c.generation_info["candidate_index"] == c.index
    assert isinstance(result.output, AIMessage)
    assert result.output.response_metadata["best_of_n"]["chosen_index"] == result.chosen.index
    assert not any(c.get("name") == "reward:norm" for c in recorder.chains)  # scored during decoding


class BrokenDecodeReward:
    name = "broken"

    def make_observer(self, loaded: Any) -> Any:
        raise RuntimeError("no head for this model")


def test_esamp_decode_time_reward_failure_follows_on_reward_error(embedded):
    from esamp_agents.langchain.chat_model import ChatESamp

    chat = ChatESamp(loaded_model=embedded, max_tokens=4, seed=0)
    with pytest.raises(RewardError, match="reward 'broken' failed: RuntimeError: no head for this model"):
        BestOfN(chat, n=2, rewards=[BrokenDecodeReward(), LENGTH]).invoke("hi")
    out = BestOfN(chat, n=2, rewards=[BrokenDecodeReward(), LENGTH], on_reward_error="skip").invoke("hi")
    assert metadata(out)["warnings"] == ["reward 'broken' skipped: RuntimeError: no head for this model"]
    assert set(metadata(out)["candidates"][0]["scores"]) == {"length"}


def test_esamp_observers_keyword_is_validated(embedded):
    from langchain_core.caches import InMemoryCache
    from langchain_core.messages import HumanMessage

    from esamp_agents.langchain.chat_model import ChatESamp
    from esamp_agents.langchain.llm import ESampLLM

    chat = ChatESamp(loaded_model=embedded, max_tokens=4, seed=0)
    with pytest.raises(ValueError, match=r"observers=.*is not a sequence"):
        chat.invoke("hi", observers=NormObserver())
    with pytest.raises(ValueError, match=r"observers\[0\] \(object\) has layers=None"):
        chat.generate([[HumanMessage("hi")]], observers=[object()])
    cached = ChatESamp(loaded_model=embedded, max_tokens=4, seed=0, cache=InMemoryCache())
    with pytest.raises(ValueError, match="allowed: cache=False when passing observers"):
        cached.invoke("hi", observers=[NormObserver()])
    obs = NormObserver()
    llm = ESampLLM(loaded_model=embedded, max_tokens=4, seed=0)
    result = llm.generate(["The capital of France is"], n=2, observers=[obs])
    assert len(obs.rewards()[0]) == 2 and len(result.generations[0]) == 2


def test_real_chain_with_the_shipped_head_answers_arithmetic(embedded):
    """The issue's chain: prompt | BestOfN(ChatESamp, reward=<shipped head>) | StrOutputParser."""
    from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, answers_match, extract_answer
    from esamp_agents.hidden_reward.reward import HiddenStateReward
    from esamp_agents.langchain.chat_model import ChatESamp

    prompt = ChatPromptTemplate.from_messages([("human", "{question} " + DEFAULT_SUFFIX)])
    chat = ChatESamp(loaded_model=embedded, temperature=0.7, max_tokens=48, seed=0)
    best = BestOfN(chat, n=6, reward=HiddenStateReward.shipped(embedded), strategy="vote")
    chain = prompt | best | StrOutputParser()
    answers = {q: extract_answer(chain.invoke({"question": q})) for q in ("What is 2 + 2?", "What is 3 + 5?")}
    assert all(a is not None for a in answers.values())
    assert answers_match(answers["What is 2 + 2?"], "4")
    reply = (prompt | best).invoke({"question": "What is 3 + 5?"})
    meta = reply.response_metadata["best_of_n"]
    assert len(meta["candidates"]) == 6
    assert all(math.isfinite(c["scores"]["elhsr"]) for c in meta["candidates"])
    assert meta["chosen_answer"] == extract_answer(reply.content)
