"""The logit-only reward: offline tiktoken, reading every response shape, the fallback policy,
retries against a faulty loopback server, agreement with local logits end to end, and the
closed-API user's whole path offline (collect from a server, train, choose)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from langchain_core.messages import HumanMessage

from esamp_agents.adapters.api_collect import read_api_manifest, read_api_records
from esamp_agents.adapters.logprob_reward import LogprobReward, local_features, read_candidates
from esamp_agents.adapters.sampling import (
    sample_with_logprobs,
)
from esamp_agents.cli import main
from esamp_agents.hidden_reward.head import IncompatibleHeadError
from esamp_agents.selection.best_of_n import BestOfN
from tests.fakes import TOP_K, make_logprob_head

LOOPBACK = pytest.mark.allow_hosts(["127.0.0.1"])


def test_local_features_shape(embedded):
    prompt = embedded.chat_token_ids([{"role": "user", "content": "Hi"}])
    feats = local_features(embedded, prompt, [28, 29], TOP_K)
    assert feats.shape == (2, TOP_K + 8) and torch.isfinite(feats).all()
    assert local_features(embedded, prompt, [], TOP_K).shape == (0, TOP_K + 8)


def _ids_from_bytes(embedded: Any, logprobs: Any) -> list[int]:
    """Token ids of an OpenAI logprobs list, through its exact bytes (byte-level BPE)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char = bytes_to_unicode()
    tokenizer = embedded.tokenizer
    ids = []
    for item in logprobs["content"] if isinstance(logprobs, dict) else logprobs.content:
        raw = item["bytes"] if isinstance(item, dict) else item.bytes
        ids.append(int(tokenizer.convert_tokens_to_ids("".join(to_char[b] for b in raw))))
    return ids


@pytest.fixture(scope="module")
def server(embedded) -> Iterator[Any]:
    from esamp_agents.serving import Server

    with Server(embedded, port=0) as srv:
        yield srv


def _agreement(embedded: Any, reward: LogprobReward, prompt_ids: list[int], logprobs: list[Any],
               texts: list[str]) -> float:  # fmt: skip
    api_scores = reward.score_response(logprobs)
    local = []
    for lp, text in zip(logprobs, texts, strict=True):
        ids = _ids_from_bytes(embedded, lp)
        assert ids and embedded.tokenizer.decode(ids) == text  # the bytes name the very tokens sampled
        local.append(reward.score_features([local_features(embedded, prompt_ids, ids, TOP_K)])[0])
    assert all(math.isfinite(s) for s in api_scores)
    return max(abs(a - b) for a, b in zip(api_scores, local, strict=True))


QUESTION = "What is 7 + 5? Answer briefly."


@LOOPBACK
def test_raw_openai_client_scores_equal_local_logits(embedded, server):
    openai = pytest.importorskip("openai")

    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    response = client.chat.completions.create(
        model="embedded", messages=messages, n=4, max_tokens=12, logprobs=True, top_logprobs=20, seed=11
    )
    assert len(response.choices) == 4
    for choice in response.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 20 for t in choice.logprobs.content)
    reward = LogprobReward(make_logprob_head(embedded.name))
    prompt_ids = embedded.chat_token_ids(messages)
    assert response.usage.prompt_tokens == len(prompt_ids)
    diff = _agreement(
        embedded,
        reward,
        prompt_ids,
        [c.logprobs for c in response.choices],
        [c.message.content for c in response.choices],
    )
    print(f"raw client: max |api - local| = {diff:.2e}")
    assert diff <= 1e-4
    report = reward.score_with_report(response, prompt=messages)
    assert report.tokens == [len(c.logprobs.content) for c in response.choices]
    assert report.usage is not None and report.usage["prompt_tokens"] == len(prompt_ids)


@LOOPBACK
def test_chat_openai_gets_n_candidates_and_scores_equal_local_logits(embedded, server):
    ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI

    llm = ChatOpenAI(
        model="embedded", base_url=server.url, api_key="x", logprobs=True, top_logprobs=20, n=4, max_tokens=12,
        seed=3, use_responses_api=False, max_retries=0,
    )  # fmt: skip
    result = llm.generate([[HumanMessage(QUESTION)]])
    generations = result.generations[0]
    assert len(generations) == 4
    logprobs = [g.message.response_metadata["logprobs"] for g in generations]
    assert all(lp["content"] and len(lp["content"][0]["top_logprobs"]) == 20 for lp in logprobs)
    reward = LogprobReward(make_logprob_head(embedded.name))
    assert reward.score_response(result) == pytest.approx(reward.score_response(logprobs), abs=0)
    prompt_ids = embedded.chat_token_ids([{"role": "user", "content": QUESTION}])
    diff = _agreement(embedded, reward, prompt_ids, logprobs, [g.message.content for g in generations])
    print(f"ChatOpenAI: max |api - local| = {diff:.2e}")
    assert diff <= 1e-4


@LOOPBACK
def test_sample_with_logprobs_against_the_real_server(embedded, server):
    openai = pytest.importorskip("openai")

    client = openai.OpenAI(base_url=server.url, api_key="x")
    result = sample_with_logprobs(client, [{"role": "user", "content": "Hi"}], 2, "embedded", chunk=1, max_tokens=4,
                                  seed=1)  # fmt: skip
    assert result.complete and [a.outcome for a in result.attempts] == ["ok", "ok"]
    assert result.usage["completion_tokens"] >= sum(len(c.logprobs.content) for c in result.choices)
    scores = LogprobReward(make_logprob_head(embedded.name)).score_response(result)
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    assert len(read_candidates(result)) == 2


# --------------------------------------------------------------------------- the closed-API workflow
# esamp-agents serve stands in for the API: collect candidates with logprobs through the real openai
# client, train a token logprob head, and choose among ChatOpenAI candidates with it in BestOfN.
TOP = 5


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
