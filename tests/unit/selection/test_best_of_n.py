"""BestOfN: selection, strategies, failure policies, LangChain plumbing (fake models), and the
decode-time reward path on the real embedded model (one engine call for all N)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from esamp_agents.selection.best_of_n import (
    BestOfN,
    BestOfNError,
    BestOfNResult,
    default_answer_extractor,
)
from esamp_agents.selection.rewards import CallableReward, RewardError, ScoredCandidate
from tests.fakes import NChat, NormObserver, Recorder, SlowChat

LENGTH = CallableReward(lambda q, text: len(text), name="length")


def value_reward(name: str = "value") -> CallableReward:
    """The number in the text (an 'Answer: x' or a bare number)."""
    return CallableReward(lambda q, text: float(text.split()[-1]), name=name)


def metadata(output: AIMessage) -> dict[str, Any]:
    return output.response_metadata["best_of_n"]


def test_argmax_in_one_call_with_metadata():
    model = NChat(rounds=[["Answer: 1", "Answer: 22", "so Answer: 3"]])
    recorder = Recorder()
    out = BestOfN(model, n=3, rewards=[LENGTH]).invoke("q", {"callbacks": [recorder]})
    assert isinstance(out, AIMessage) and out.content == "so Answer: 3"
    assert len(model.calls) == 1 and model.calls[0]["n"] == 3
    assert len(recorder.model_starts) == 1
    meta = metadata(out)
    assert meta["chosen_index"] == 2 and meta["chosen_answer"] == "3" and meta["strategy"] == "argmax"
    assert [c["index"] for c in meta["candidates"]] == [2, 1, 0]
    assert [c["scores"]["length"] for c in meta["candidates"]] == [12.0, 10.0, 9.0]
    assert meta["fused"] == meta["candidates"][0]["fused"] and meta["warnings"] == []
    assert out.response_metadata["finish_reason"] == "stop"  # the candidate's own metadata is kept


def test_llm_output_is_a_string_and_include_candidates_gives_everything():
    llm = FakeListLLM(responses=["7", "Answer: 12", "x"])  # stateful: one call at a time keeps the order
    assert BestOfN(llm, n=3, rewards=LENGTH, max_concurrency=1).invoke("q") == "Answer: 12"
    result = BestOfN(llm, n=3, reward=LENGTH, include_candidates=True, max_concurrency=1).invoke("q")
    assert isinstance(result, BestOfNResult) and result.output == "Answer: 12"
    assert [c.index for c in result.candidates] == [1, 0, 2]
    assert [c.rank for c in result.candidates] == [0, 1, 2]
    assert result.chosen is result.candidates[0] and result.chosen.answer == "12"
    assert all(isinstance(c, ScoredCandidate) and isinstance(c.output, str) for c in result.candidates)
    assert result.metadata["chosen_index"] == 1


def test_ties_go_to_the_lowest_index():
    model = NChat(rounds=[["bb", "aa", "cc"]])
    out = BestOfN(model, n=3, rewards=[LENGTH]).invoke("q")
    assert out.content == "bb" and [c["index"] for c in metadata(out)["candidates"]] == [0, 1, 2]
    out = BestOfN(model, n=3, rewards=[LENGTH], fusion="worst_rank").invoke("q")
    assert out.content == "bb"


def test_fusion_of_two_rewards_with_weights():
    texts = ["Answer: 1", "Answer: 3", "long Answer: 2"]  # value [1, 3, 2], length [9, 9, 14]
    model = NChat(rounds=[texts])
    assert BestOfN(model, n=3, rewards=[value_reward(), LENGTH]).invoke("q").content == "long Answer: 2"
    assert BestOfN(model, n=3, rewards=[value_reward(), LENGTH], weights=[3, 1]).invoke("q").content == "Answer: 3"
    out = BestOfN(model, n=3, rewards=[value_reward(), LENGTH], fusion="minmax").invoke("q")
    assert metadata(out)["fused"] == pytest.approx((0.5 + 1) / 2)


def test_reward_weighted_vote_beats_a_low_scored_majority():
    texts = ["Answer: 7", "Answer: 7", "Answer: 7", "Answer: 9"]
    scores = {"Answer: 7": 0.0, "Answer: 9": 10.0}
    reward = CallableReward(lambda q, t: scores[t], name="judge")
    model = NChat(rounds=[texts])
    out = BestOfN(model, n=4, rewards=[reward], strategy="vote").invoke("q")
    meta = metadata(out)
    assert meta["chosen_answer"] == "9" and meta["chosen_index"] == 3
    weights = {answer: w for answer, w, _ in meta["votes"]}
    z = [-1 / math.sqrt(3)] * 3 + [math.sqrt(3)]  # z-scores of [0, 0, 0, 10]
    exps = [math.exp(v) for v in z]
    assert weights["9"] == pytest.approx(exps[3] / sum(exps))
    # a flat softmax is a plain majority
    flat = BestOfN(model, n=4, rewards=[reward], strategy="vote", vote_temperature=1000).invoke("q")
    assert metadata(flat)["chosen_answer"] == "7" and metadata(flat)["chosen_index"] == 0


def test_plain_majority_vote_without_rewards_and_no_answer_fallback():
    model = NChat(rounds=[["Answer: 4", "no idea", "Answer: 5", "it is 5"]])
    out = BestOfN(model, n=4, strategy="vote").invoke("q")
    assert metadata(out)["chosen_answer"] == "5" and metadata(out)["chosen_index"] == 2
    tie = BestOfN(NChat(rounds=[["Answer: 6", "Answer: 4"]]), n=2, strategy="vote").invoke("q")
    assert metadata(tie)["chosen_answer"] == "6"  # equal weight: the best-ranked (index 0) wins
    none = BestOfN(NChat(rounds=[["nothing", "at all!!"]]), n=2, rewards=[LENGTH], strategy="vote").invoke("q")
    assert none.content == "at all!!" and "fell back to argmax" in metadata(none)["warnings"][0]


def test_custom_answer_extractor():
    model = NChat(rounds=[["Paris.", "paris", "Lyon"]])
    out = BestOfN(model, n=3, strategy="vote", answer_extractor=lambda t: t.strip(".").lower()).invoke("q")
    assert metadata(out)["chosen_answer"] == "paris"


def test_default_extractor_is_the_tasks_one_and_answers_are_strings():
    from esamp_agents.evaluation.tasks import extract_answer

    assert default_answer_extractor() is extract_answer
    out = BestOfN(NChat(rounds=[["Answer: 12", "Answer: 12", "Answer: 3"]]), n=3, strategy="vote").invoke("q")
    assert metadata(out)["chosen_answer"] == "12"  # a str, as tasks.extract_answer returns


def test_answer_extractor_failure_is_a_best_of_n_error():
    def broken(text: str) -> str:
        raise KeyError(text)

    bon = BestOfN(NChat(rounds=[["a", "b"]]), n=2, strategy="vote", answer_extractor=broken)
    with pytest.raises(BestOfNError, match="answer_extractor failed on candidate 0: KeyError: 'a'") as info:
        bon.invoke("q")
    assert isinstance(info.value.__cause__, KeyError)


def test_threshold_stops_early():
    model = NChat(rounds=[["1", "2"], ["5", "9"], ["10", "11"]])
    out = BestOfN(model, n=2, rewards=[value_reward()], strategy="threshold", threshold=8, max_rounds=5).invoke("q")
    meta = metadata(out)
    assert out.content == "9" and len(model.calls) == 2
    assert meta["rounds"] == 2 and meta["threshold_reached"] is True and meta["chosen_index"] == 3
    assert sorted(c["index"] for c in meta["candidates"]) == [0, 1, 2, 3]


def test_threshold_never_reached_returns_the_best_seen():
    model = NChat(rounds=[["1", "2"], ["6", "3"], ["4", "5"]])
    bon = BestOfN(model, n=2, rewards=[value_reward()], strategy="threshold", threshold=100, max_rounds=3)
    out = bon.invoke("q")
    assert out.content == "6" and len(model.calls) == 3
    assert metadata(out)["threshold_reached"] is False and metadata(out)["rounds"] == 3
    assert bon.max_rounds == 3 and bon.n == 2  # no instance mutation


async def test_threshold_async_with_parallel_calls():
    model = SlowChat(delay=0.01)
    reward = CallableReward(lambda q, t: float(t.split()[-1]), name="k")
    bon = BestOfN(model, n=3, rewards=[reward], strategy="threshold", threshold=5, max_rounds=4)
    out = await bon.ainvoke("q")
    assert metadata(out)["rounds"] == 2 and model.count == 6 and out.content == "reply 6"


def test_async_parity_with_sync():
    texts = ["Answer: 1", "Answer: 22", "so Answer: 3", "4"]
    for strategy in ("argmax", "vote"):
        sync = BestOfN(NChat(rounds=[texts]), n=4, rewards=[LENGTH], strategy=strategy).invoke("q")
        asyn = asyncio.run(BestOfN(NChat(rounds=[texts]), n=4, rewards=[LENGTH], strategy=strategy).ainvoke("q"))
        assert sync.content == asyn.content and metadata(sync) == metadata(asyn)


@pytest.mark.parametrize("where", ["constructor", "config"])
def test_parallel_calls_respect_max_concurrency(where):
    model = SlowChat()
    bon = BestOfN(model, n=6, rewards=[LENGTH], max_concurrency=2 if where == "constructor" else None)
    config = {"max_concurrency": 2} if where == "config" else {}
    out = bon.invoke("q", config)
    assert model.count == 6 and model.peak == 2
    assert out.content.startswith("reply")


async def test_async_parallel_calls_respect_max_concurrency():
    model = SlowChat()
    await BestOfN(model, n=6, rewards=[LENGTH], max_concurrency=3).ainvoke("q")
    assert model.count == 6 and model.peak == 3


def test_stream_batch_and_chain():
    texts = ["Answer: 1", "Answer: 22"]
    bon = BestOfN(NChat(rounds=[texts]), n=2, rewards=[LENGTH])
    chunks = list(bon.stream("q"))
    assert len(chunks) == 1 and chunks[0].content == "Answer: 22"
    assert [o.content for o in bon.batch(["a", "b"])] == ["Answer: 22", "Answer: 22"]
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | bon | StrOutputParser()
    assert chain.invoke({"q": "What?"}) == "Answer: 22"
    assert list(chain.stream({"q": "What?"})) == ["Answer: 22"]


async def test_astream_and_abatch():
    bon = BestOfN(NChat(rounds=[["a", "bbb"]]), n=2, rewards=[LENGTH])
    assert [c.content async for c in bon.astream("q")] == ["bbb"]
    assert [o.content for o in await bon.abatch(["x", "y"])] == ["bbb", "bbb"]


def test_bound_model_is_still_one_call():
    model = NChat(rounds=[["a", "bbb"]])
    out = BestOfN(model.bind(temperature=0.3), n=2, rewards=[LENGTH]).invoke("q")
    assert out.content == "bbb" and model.calls == [{"temperature": 0.3, "n": 2}]


def test_callbacks_see_child_runs_and_tags_propagate():
    recorder = Recorder()
    model = SlowChat(delay=0)
    config = {"callbacks": [recorder], "tags": ["outer"], "metadata": {"user": "u1"}}
    BestOfN(model, n=3, rewards=[LENGTH]).invoke("q", config)
    root = next(c for c in recorder.chains if c.get("name") == "BestOfN")
    assert root["parent_run_id"] is None
    assert len(recorder.model_starts) == 3
    for start in recorder.model_starts:
        assert start["parent_run_id"] == root["run_id"]
        assert "outer" in start["tags"] and start["metadata"]["user"] == "u1"
    reward_run = next(c for c in recorder.chains if c.get("name") == "reward:length")
    assert reward_run["parent_run_id"] == root["run_id"] and "outer" in reward_run["tags"]


async def test_async_callbacks_see_child_runs():
    recorder = Recorder()
    model = NChat(rounds=[["a", "bb"]])
    await BestOfN(model, n=2, rewards=[LENGTH]).ainvoke("q", {"callbacks": [recorder], "tags": ["t"]})
    root = next(c for c in recorder.chains if c.get("name") == "BestOfN")
    assert len(recorder.model_starts) == 1
    assert recorder.model_starts[0]["parent_run_id"] == root["run_id"] and "t" in recorder.model_starts[0]["tags"]
    assert any(c.get("name") == "reward:length" for c in recorder.chains)


def test_nan_scores_rank_worst_with_a_warning():
    reward = CallableReward(lambda q, t: math.nan if t == "best?" else len(t), name="flaky")
    out = BestOfN(NChat(rounds=[["best?", "ok", "okay"]]), n=3, rewards=[reward]).invoke("q")
    meta = metadata(out)
    assert out.content == "okay" and meta["candidates"][-1]["index"] == 0
    assert any("non-finite" in w and "flaky" in w for w in meta["warnings"])


def test_every_score_non_finite_is_an_error():
    reward = CallableReward(lambda q, t: math.inf, name="broken")
    with pytest.raises(BestOfNError, match="non-finite"):
        BestOfN(NChat(rounds=[["a", "b"]]), n=2, rewards=[reward]).invoke("q")


def test_reward_errors_raise_or_skip():
    def boom(q: Any, t: str) -> float:
        raise KeyError("no such key")

    failing = CallableReward(boom, name="boom")
    model = NChat(rounds=[["a", "bb"]])
    with pytest.raises(RewardError, match="reward 'boom' failed: KeyError"):
        BestOfN(model, n=2, rewards=[LENGTH, failing]).invoke("q")
    out = BestOfN(model, n=2, rewards=[LENGTH, failing], on_reward_error="skip").invoke("q")
    assert out.content == "bb" and "reward 'boom' skipped" in metadata(out)["warnings"][0]
    assert "boom" not in metadata(out)["candidates"][0]["scores"]
    with pytest.raises(BestOfNError, match="every reward failed"):
        BestOfN(model, n=2, rewards=[failing], on_reward_error="skip").invoke("q")
    short = CallableReward(lambda q, t: 1.0, name="ok")
    short.score = lambda q, cs: [1.0]  # type: ignore[method-assign]
    with pytest.raises(RewardError, match="returned 1 scores for 2 candidates"):
        BestOfN(model, n=2, rewards=[short]).invoke("q")


async def test_async_reward_error_names_the_reward():
    failing = CallableReward(lambda q, t: 1 / 0, name="div")
    with pytest.raises(RewardError, match=r"'div'.*ZeroDivisionError"):
        await BestOfN(NChat(rounds=[["a"]]), n=1, rewards=[failing]).ainvoke("q")


def test_every_candidate_failing_names_the_cause():
    with pytest.raises(BestOfNError, match="all 3 candidates failed; first error: ConnectionError: the server is down"):
        BestOfN(SlowChat(delay=0, fail=True), n=3, rewards=[LENGTH]).invoke("q")


def test_some_candidates_failing_leaves_the_others():
    class Flaky(FakeListChatModel):
        def _call(self, *args: Any, **kwargs: Any) -> str:
            reply = super()._call(*args, **kwargs)
            if reply == "fail":
                raise TimeoutError("slow")
            return reply

    model = Flaky(responses=["fail", "ok", "longer"])
    out = BestOfN(model, n=3, rewards=[LENGTH], max_concurrency=1).invoke("q")
    meta = metadata(out)
    assert out.content == "longer" and len(meta["candidates"]) == 2
    assert meta["warnings"] == ["candidate 0 failed: TimeoutError: slow"]


class ObserverOnly:
    name = "hidden"

    def make_observer(self, loaded: Any) -> Any:
        return NormObserver()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, r"n=0 is out of range; allowed: an int n >= 1"),
        ({"weights": [1, 2]}, r"weights has 2 value\(s\) for 1 reward"),
        ({"fusion": "sum"}, r"fusion='sum' is unknown; allowed: 'zscore', 'minmax', 'worst_rank'"),
        ({"strategy": "best"}, r"strategy='best' is unknown"),
        ({"strategy": "threshold"}, r"threshold=None with strategy='threshold'"),
        ({"threshold": 1.0}, r"threshold only with strategy='threshold'"),
        ({"strategy": "threshold", "threshold": 1, "max_rounds": 0}, r"max_rounds=0 is out of range"),
        ({"max_concurrency": 0}, r"max_concurrency=0 is out of range"),
        ({"on_reward_error": "ignore"}, r"on_reward_error='ignore' is unknown"),
        ({"rewards": []}, r"no rewards with strategy='argmax'"),
        ({"rewards": [LENGTH, LENGTH]}, r"reward name 'length' appears twice"),
        ({"rewards": [ObserverOnly()]}, r"decode-time only .* works only with ESampLLM/ChatESamp"),
        ({"rewards": [object()]}, r"has no name"),
        ({"vote_temperature": 0}, r"vote_temperature=0"),
    ],
)
def test_bad_construction(kwargs, message):
    kwargs = {"rewards": [LENGTH], **kwargs}
    with pytest.raises(ValueError, match=message):
        BestOfN(NChat(rounds=[["a"]]), **kwargs)


def test_model_must_be_a_runnable():
    with pytest.raises(ValueError, match="not a LangChain model"):
        BestOfN("gpt-4", rewards=[LENGTH])
