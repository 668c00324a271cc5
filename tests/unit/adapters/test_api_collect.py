"""Collecting labelled candidates from an OpenAI-compatible API, against a fake client:
records, labels, resuming, manifest checks, failures, the compact token format."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from esamp_agents.adapters.api_collect import (
    chat_logprobs,
    collect_from_api,
    compact_tokens,
    read_api_manifest,
    read_api_records,
)
from esamp_agents.evaluation.tasks import Problem, generate_problems
from esamp_agents.hidden_reward.collect import CollectFormatError, call_seed
from esamp_agents.hidden_reward.logprob_features import token_rows_from_openai
from esamp_agents.hidden_reward.token_index import TokenIndex

MODEL = "fake-model"
TOP = 3


def problems() -> list[Problem]:
    return generate_problems("single_digit", 3, seed=0, split="train")


def logprobs_for(text: str) -> dict[str, Any]:
    content = []
    for ch in text:
        alts = [{"token": ch, "logprob": -0.25, "bytes": list(ch.encode())}]
        alts += [{"token": f"a{j}", "logprob": -2.0 - j, "bytes": list(f"a{j}".encode())} for j in range(TOP - 1)]
        content.append({"token": ch, "logprob": -0.25, "bytes": list(ch.encode()), "top_logprobs": alts})
    return {"content": content, "refusal": None}


class FakeCompletions:
    def __init__(self, owner: FakeClient) -> None:
        self.owner = owner

    def create(self, **kwargs: Any) -> dict[str, Any]:
        return self.owner.create(**kwargs)


class FakeChat:
    def __init__(self, owner: FakeClient) -> None:
        self.completions = FakeCompletions(owner)


class FakeClient:
    """An ``openai.OpenAI`` stand-in: even-numbered choices answer right, odd ones wrong."""

    base_url = "http://fake.invalid/v1"

    def __init__(self, answers: dict[str, str], fail_on: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.answers = answers  # question -> right answer
        self.fail_on = fail_on  # questions whose requests time out
        self.calls: list[dict[str, Any]] = []
        self.options: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.chat = FakeChat(self)

    def with_options(self, **options: Any) -> FakeClient:
        with self.lock:
            self.options.append(options)
        return self

    def _question(self, kwargs: dict[str, Any]) -> str:
        prompt = kwargs["messages"][-1]["content"]
        return next(q for q in self.answers if q in prompt)

    def create(self, **kwargs: Any) -> dict[str, Any]:
        with self.lock:
            self.calls.append(kwargs)
        question = self._question(kwargs)
        if question in self.fail_on:
            raise TimeoutError("the fake request timed out")
        choices = []
        for i in range(kwargs["n"]):
            text = f"Answer: {self.answers[question]}" if i % 2 == 0 else "Answer: 99999"
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs_for(text),
                "finish_reason": "stop",
            })  # fmt: skip
        n_tokens = sum(len(c["message"]["content"]) for c in choices)
        usage = {"prompt_tokens": 10, "completion_tokens": n_tokens, "total_tokens": 10 + n_tokens}
        return {"id": "c", "object": "chat.completion", "model": MODEL, "choices": choices, "usage": usage}


def client_for(ps: list[Problem], **kw: Any) -> FakeClient:
    return FakeClient({p.question: str(p.answer) for p in ps}, **kw)


def run(client: FakeClient, out: Path, ps: list[Problem], **kw: Any) -> Any:
    args = {"n": 4, "top_logprobs": TOP, "max_tokens": 16, "progress": False, "concurrency": 2, **kw}
    return collect_from_api(client, MODEL, ps, out, **args)


def test_collect_writes_labelled_records(tmp_path: Path):
    ps = problems()
    client = client_for(ps)
    summary = run(client, tmp_path, ps)
    assert (summary.problems_done, summary.problems_skipped, summary.failed) == (3, 0, [])
    assert summary.candidates == 12 and summary.positives == 6 and summary.positive_rate == 0.5
    assert len(client.calls) == 3
    assert all(o == {"max_retries": 0, "timeout": 120.0} for o in client.options)
    by_question = {c["messages"][-1]["content"]: c for c in client.calls}
    for p in ps:
        kwargs = next(c for q, c in by_question.items() if p.question in q)
        assert kwargs["model"] == MODEL and kwargs["n"] == 4
        assert kwargs["logprobs"] is True and kwargs["top_logprobs"] == TOP and kwargs["max_tokens"] == 16
        assert kwargs["seed"] == call_seed(0, [p.id]) % 2**31
    records = read_api_records(tmp_path)
    assert len(records) == 12
    assert summary.tokens == sum(len(r["tokens"]) for r in records)
    for p in ps:
        mine = sorted((r for r in records if r["problem_id"] == p.id), key=lambda r: r["sample"])
        assert [r["sample"] for r in mine] == [0, 1, 2, 3]
        assert [r["correct"] for r in mine] == [True, False, True, False]
        assert mine[0]["text"] == f"Answer: {p.answer}" and mine[1]["text"] == "Answer: 99999"
        assert {r["call_records"] for r in mine} == {4} and len({r["call"] for r in mine}) == 1
        assert all(r["question"] == p.question and r["answer"] == p.answer for r in mine)
        assert all(r["finish_reason"] == "stop" for r in mine)
        # the stored tokens are exactly what the API sent
        assert chat_logprobs(mine[0]) == {"content": logprobs_for(mine[0]["text"])["content"]}
    assert sorted({r["call"] for r in records}) == [0, 1, 2]
    manifest = read_api_manifest(tmp_path)
    assert manifest["model"] == MODEL and manifest["base_url"] == FakeClient.base_url
    assert manifest["sampling"]["n"] == 4 and manifest["sampling"]["top_logprobs"] == TOP
    assert manifest["sampling"]["extra_body"] == {}


def test_resume_skips_complete_problems(tmp_path: Path):
    ps = problems()
    run(client_for(ps), tmp_path, ps[:2])
    before = (tmp_path / "records.jsonl").read_bytes()
    again = client_for(ps)
    summary = run(again, tmp_path, ps[:2])
    assert again.calls == [] and summary.problems_done == 0 and summary.problems_skipped == 2
    assert (tmp_path / "records.jsonl").read_bytes() == before
    more = client_for(ps)
    summary = run(more, tmp_path, ps)
    assert len(more.calls) == 1 and ps[2].question in more.calls[0]["messages"][-1]["content"]
    assert summary.problems_done == 1 and summary.problems_skipped == 2
    records = read_api_records(tmp_path)
    assert len(records) == 12
    assert {r["call"] for r in records if r["problem_id"] == ps[2].id} == {2}  # calls keep counting


def test_resume_drops_a_torn_or_incomplete_call(tmp_path: Path):
    ps = problems()
    run(client_for(ps), tmp_path, ps[:1])
    path = tmp_path / "records.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]))  # half of the problem's candidates
    client = client_for(ps)
    summary = run(client, tmp_path, ps[:1])
    assert len(client.calls) == 1 and summary.problems_done == 1
    assert len(read_api_records(tmp_path)) == 4


@pytest.mark.parametrize(
    ("change", "name"),
    [({"n": 2}, "sampling"), ({"temperature": 0.3}, "sampling"), ({"suffix": "Say it."}, "suffix")],
)
def test_manifest_mismatch_raises(tmp_path: Path, change: dict[str, Any], name: str):
    ps = problems()
    run(client_for(ps), tmp_path, ps[:1])
    client = client_for(ps)
    with pytest.raises(CollectFormatError, match=f"different {name}"):
        run(client, tmp_path, ps, **change)
    assert client.calls == []


def test_model_mismatch_raises(tmp_path: Path):
    ps = problems()
    run(client_for(ps), tmp_path, ps[:1])
    client = client_for(ps)
    with pytest.raises(CollectFormatError, match=r"different model.*'fake-model'.*'other'"):
        collect_from_api(client, "other", ps, tmp_path, n=4, top_logprobs=TOP, max_tokens=16, progress=False)
    assert client.calls == []


def test_changed_question_for_a_stored_id_raises(tmp_path: Path):
    ps = problems()
    run(client_for(ps), tmp_path, ps[:1])
    changed = [Problem(**{**ps[0].__dict__, "question": "Calculate 1 plus 1."})]
    with pytest.raises(CollectFormatError, match="ids must name the same problem"):
        run(client_for(changed), tmp_path, changed)


def test_failed_request_is_reported_and_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from esamp_agents.adapters import sampling

    monkeypatch.setattr(sampling.time, "sleep", lambda s: None)  # no real backoff waits
    ps = problems()
    client = client_for(ps, fail_on={ps[1].question})
    summary = run(client, tmp_path, ps, max_retries=2)
    assert summary.failed == [ps[1].id]
    assert summary.problems_done == 2 and summary.candidates == 8
    failing = [c for c in client.calls if ps[1].question in c["messages"][-1]["content"]]
    assert len(failing) == 3  # the first try and two retries
    records = read_api_records(tmp_path)
    assert ps[1].id not in {r["problem_id"] for r in records} and len(records) == 8
    # a rerun asks again for the failed problem only
    retry = client_for(ps)
    summary = run(retry, tmp_path, ps, max_retries=2)
    assert len(retry.calls) == 1 and summary.failed == [] and summary.problems_done == 1
    assert len(read_api_records(tmp_path)) == 12


def test_argument_validation(tmp_path: Path):
    ps = problems()
    client = client_for(ps)
    with pytest.raises(ValueError, match="appears twice"):
        run(client, tmp_path, [ps[0], ps[0]])
    with pytest.raises(ValueError, match="top_logprobs"):
        run(client, tmp_path, ps, top_logprobs=21)
    with pytest.raises(ValueError, match="model"):
        collect_from_api(client, "", ps, tmp_path, progress=False)
    assert client.calls == []


def test_compact_tokens_round_trip_and_bytes():
    lp = {
        "content": [
            {"token": "é", "logprob": -0.5, "bytes": list("é".encode()),
             "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": list("é".encode())},
                              {"token": "\ufffd", "logprob": -1.5, "bytes": [0xE4, 0xBD]}]},
            {"token": "x", "logprob": -9999.0, "bytes": None, "top_logprobs": []},
            {"token": "", "logprob": -0.1, "bytes": [], "top_logprobs": None},
        ]
    }  # fmt: skip
    tokens = compact_tokens(lp)
    assert tokens[0] == ["é", -0.5, None, [["é", -0.5, None], ["\ufffd", -1.5, [0xE4, 0xBD]]]]
    assert tokens[1] == ["x", -9999.0, None, []]
    assert tokens[2] == ["", -0.1, None, []]
    json.dumps(tokens, allow_nan=False)  # storable as is
    back = chat_logprobs({"tokens": tokens})
    assert back["content"][0] == lp["content"][0]
    assert back["content"][1]["bytes"] == [ord("x")]  # null bytes are the token's UTF-8
    assert back["content"][2]["bytes"] == [] and back["content"][2]["top_logprobs"] == []
    assert compact_tokens(back) == tokens
    index = TokenIndex("vocab", tokens=["é".encode(), b"\xe4\xbd", b"x", b""])
    assert torch.equal(token_rows_from_openai(back, TOP, index), token_rows_from_openai(lp, TOP, index))
    assert compact_tokens(None) == [] and compact_tokens({"content": None}) == []


def test_read_api_records_rejects_other_folders(tmp_path: Path):
    with pytest.raises(CollectFormatError, match="not a collection folder"):
        read_api_records(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "esamp-agents/collect"}))
    with pytest.raises(CollectFormatError, match="not an API collection"):
        read_api_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "esamp-agents/collect-api", "format_version": 9}))
    with pytest.raises(CollectFormatError, match="format_version 9"):
        read_api_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CollectFormatError, match="not valid JSON"):
        read_api_manifest(tmp_path)
