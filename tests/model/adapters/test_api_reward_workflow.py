"""The closed-API user's whole path, offline: ``esamp-agents serve`` stands in for the API;
collect candidates with logprobs through the real ``openai`` client, train a token logprob
head, and choose among ``ChatOpenAI`` candidates with it in ``BestOfN``."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from esamp_agents.adapters.api_collect import read_api_manifest, read_api_records
from esamp_agents.adapters.logprob_reward import LogprobReward
from esamp_agents.cli import main
from esamp_agents.hidden_reward.head import IncompatibleHeadError
from esamp_agents.selection.best_of_n import BestOfN

LOOPBACK = pytest.mark.allow_hosts(["127.0.0.1"])
TOP = 5


@pytest.fixture(scope="module")
def server(embedded) -> Iterator[Any]:
    from esamp_agents.serving import Server

    with Server(embedded, port=0) as srv:
        yield srv


@LOOPBACK
def test_collect_train_and_choose_through_an_openai_compatible_server(server, tmp_path):
    folder = tmp_path / "api"
    collect = [
        "collect", "--task", "single_digit:4:0:train", "--out", str(folder), "-n", "4", "--max-tokens", "24",
        "--api-base-url", server.url, "--api-model", "embedded", "--top-logprobs", str(TOP),
        "--extra-body", json.dumps({"top_k": 50, "beta": 0}), "--concurrency", "2",
    ]  # fmt: skip
    out = io.StringIO()
    assert main(collect, out=out) == 0, out.getvalue()
    records = read_api_records(folder)
    assert len(records) == 16 and {r["sample"] for r in records} == {0, 1, 2, 3}
    assert read_api_manifest(folder)["sampling"]["extra_body"] == {"top_k": 50, "beta": 0}
    for r in records:
        assert r["tokens"] and all(len(alts) == TOP for _tok, _lp, _raw, alts in r["tokens"])
        assert "".join(t[0] for t in r["tokens"]) == r["text"]  # the logprobs spell the text
        assert isinstance(r["correct"], bool)
    # a second run resumes: nothing new is asked or written
    assert main(collect, out=io.StringIO()) == 0
    assert len(read_api_records(folder)) == 16

    head_path = tmp_path / "head.safetensors"
    train = ["train-reward", str(folder), "--out", str(head_path), "--epochs", "3", "--val-fraction", "0.25"]
    out = io.StringIO()
    assert main(train, out=out) == 0, out.getvalue()
    reward = LogprobReward(head_path)
    spec = reward.head.spec
    assert (spec.kind, spec.base_model, spec.top_k, spec.token_index) == ("logprob_tokens", "embedded", TOP, "vocab")

    ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI
    llm = ChatOpenAI(
        model="embedded", base_url=server.url, api_key="x", logprobs=True, top_logprobs=TOP, n=3, max_tokens=16,
        seed=2, use_responses_api=False, max_retries=0,
    )  # fmt: skip
    result = BestOfN(llm, n=3, reward=reward, include_candidates=True).invoke("What is 2 + 3? Answer: <number>.")
    scores = [c.scores[reward.name] for c in result.candidates]
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    assert result.chosen.scores[reward.name] == max(scores)

    other = ChatOpenAI(
        model="embedded",
        base_url=server.url,
        api_key="x",
        logprobs=True,
        top_logprobs=TOP,
        n=1,
        max_tokens=4,
        use_responses_api=False,
        max_retries=0,
    ).generate([[HumanMessage("Hi")]])
    other.llm_output["model_name"] = "gpt-4o-mini"  # as if another API model had answered
    with pytest.raises(IncompatibleHeadError, match="'embedded' but the response comes from 'gpt-4o-mini'"):
        reward.score_response(other)
    assert len(LogprobReward(head_path, check_model=False).score_response(other)) == 1


@LOOPBACK
def test_the_shipped_logprob_head_scores_served_candidates_in_one_line(server):
    ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI
    llm = ChatOpenAI(
        model="embedded", base_url=server.url, api_key="x", logprobs=True, top_logprobs=20, n=3, max_tokens=24,
        seed=5, use_responses_api=False, max_retries=0, extra_body={"top_k": 50, "beta": 0},
    )  # fmt: skip
    result = BestOfN(llm, n=3, reward=LogprobReward.shipped(), strategy="vote", include_candidates=True).invoke(
        "What is 4 + 5? Think step by step, then write the final answer as 'Answer: <number>'."
    )
    scores = [c.scores["logprob_reward"] for c in result.candidates]
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
