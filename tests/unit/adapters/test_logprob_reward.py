"""The logit-only reward: offline tiktoken, reading every response shape, the fallback policy,
retries against a faulty loopback server, and agreement with local logits end to end."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import socket
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation, LLMResult

from esamp_agents.adapters import encodings
from esamp_agents.adapters.encodings import count_message_tokens, count_tokens, encoding_name_for, openai_encoding
from esamp_agents.adapters.logprob_reward import LogprobReward
from esamp_agents.adapters.sampling import (
    LogprobsUnsupportedError,
    SampleResult,
    SamplingError,
    asample_with_logprobs,
    sample_with_logprobs,
)
from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead, IncompatibleHeadError, save_head
from esamp_agents.hidden_reward.logprob_features import LogprobsMissingError
from tests.fakes import TOP_K, make_logprob_head

LOOPBACK = pytest.mark.allow_hosts(["127.0.0.1"])


def token_entry(token: str, logprob: float, alternatives: int = TOP_K) -> dict[str, Any]:
    top = [{"token": token, "bytes": list(token.encode()), "logprob": logprob}]
    top += [{"token": f"alt{j}", "bytes": None, "logprob": logprob - 1.0 - j} for j in range(alternatives - 1)]
    return {"token": token, "bytes": list(token.encode()), "logprob": logprob, "top_logprobs": top[:alternatives]}


def chat_logprobs(tokens: list[tuple[str, float]], alternatives: int = TOP_K) -> dict[str, Any]:
    return {"content": [token_entry(t, lp, alternatives) for t, lp in tokens], "refusal": None}


def completion_body(k: int, text: str = "ab") -> dict[str, Any]:
    """An OpenAI chat completion with k choices and full top-20 logprobs."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": chat_logprobs([("a", -0.1 - 0.1 * i), ("b", -0.5)]),
            "finish_reason": "stop",
        }
        for i in range(k)
    ]
    usage = {"prompt_tokens": 5, "completion_tokens": 2 * k, "total_tokens": 5 + 2 * k}
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "gpt-4o", "choices": choices,
            "usage": usage}  # fmt: skip


def test_tiktoken_encodings_load_offline_and_count():
    assert socket.socket.__name__ == "GuardedSocket"  # pytest-socket: no network in this test
    o200k, cl100k = openai_encoding("gpt-4o"), openai_encoding("gpt-4")
    assert (o200k.name, cl100k.name) == ("o200k_base", "cl100k_base")
    assert o200k.encode("hello world") == [24912, 2375]
    assert cl100k.encode("hello world") == [15339, 1917]
    text = "Hello, world! 12345 naïve café — 你好\n\n\ttabs"
    assert cl100k.decode(cl100k.encode(text)) == text
    assert count_tokens("hello world", "gpt-4o-mini") == 2
    # OpenAI's recipe: 3 to prime the reply + 3 per message + role and content tokens
    assert count_message_tokens([{"role": "user", "content": "hello world"}], "gpt-4o") == 9
    assert count_message_tokens([HumanMessage("hello world")], "gpt-4o") == 9


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("ft:gpt-4o-mini:org::id", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("embedded", "cl100k_base"),
    ],
)
def test_encoding_choice(model, encoding):
    assert encoding_name_for(model) == encoding


def test_corrupt_rank_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "cl100k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(b"YQ== 0\n"))
    monkeypatch.setattr(encodings, "rank_file", lambda name: bad)
    with pytest.raises(ValueError, match="SHA-256"):
        encodings._load_ranks("cl100k_base")
    with pytest.raises(ValueError, match="allowed: cl100k_base, o200k_base"):
        encodings.get_encoding("p50k_base")


def test_package_exports_every_public_name_and_sampling_needs_no_torch():
    import esamp_agents.adapters as adapters

    for name in adapters.__all__:
        assert getattr(adapters, name) is not None
    code = (
        "import sys\n"
        "from esamp_agents.adapters import count_tokens, sample_with_logprobs\n"
        "assert count_tokens('hello world') == 2\n"
        "assert 'torch' not in sys.modules, 'token counting and sampling must not import torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_shape_gives_the_same_scores():
    reward = LogprobReward(make_logprob_head())
    body = completion_body(3)
    from_dict = reward.score_response(body)
    assert len(from_dict) == 3 and all(math.isfinite(s) for s in from_dict)
    assert from_dict[0] != from_dict[1]

    from openai.types.chat import ChatCompletion

    assert reward.score_response(ChatCompletion.model_validate(body)) == pytest.approx(from_dict, abs=1e-6)

    gens = [
        ChatGeneration(message=AIMessage(content=c["message"]["content"]), generation_info={"logprobs": c["logprobs"]})
        for c in body["choices"]
    ]
    chat_result = ChatResult(generations=gens)
    assert reward.score_response(chat_result) == pytest.approx(from_dict, abs=1e-6)
    assert reward.score_response(LLMResult(generations=[gens])) == pytest.approx(from_dict, abs=1e-6)
    messages = [AIMessage(content="ab", response_metadata={"logprobs": c["logprobs"]}) for c in body["choices"]]
    assert reward.score_response(messages) == pytest.approx(from_dict, abs=1e-6)
    assert reward.score_response([c["logprobs"] for c in body["choices"]]) == pytest.approx(from_dict, abs=1e-6)

    # Best-of-N protocol: candidates with generation_info (merged response_metadata) and an AIMessage output
    from esamp_agents.selection.rewards import ScoredCandidate

    cands = [ScoredCandidate(i, m, "ab", dict(m.response_metadata)) for i, m in enumerate(messages)]
    assert reward.needs_logprobs is True and reward.name == "logprob_reward"
    assert reward.score("question", cands) == pytest.approx(from_dict, abs=1e-6)

    with pytest.raises(ValueError, match="2 prompts"):
        reward.score_response(LLMResult(generations=[gens, gens]))


def test_legacy_completions_logprobs_are_read():
    reward = LogprobReward(make_logprob_head())
    chat = chat_logprobs([("a", -0.2), ("b", -1.0)])
    legacy = {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.2, -1.0],
        "top_logprobs": [{a["token"]: a["logprob"] for a in item["top_logprobs"]} for item in chat["content"]],
        "text_offset": [0, 1],
    }
    via_generation = reward.score_response([Generation(text="ab", generation_info={"logprobs": legacy})])
    assert via_generation == pytest.approx(reward.score_response([chat]), abs=1e-6)


def test_missing_logprobs_raise_clearly_or_score_nan():
    body = completion_body(2)
    body["choices"][1]["logprobs"] = None
    with pytest.raises(LogprobsMissingError, match=r"candidate 1: .*logprobs=True"):
        LogprobReward(make_logprob_head()).score_response(body)
    scores = LogprobReward(make_logprob_head(), on_missing="nan").score_response(body)
    assert math.isfinite(scores[0]) and math.isnan(scores[1])

    # logprobs without any alternatives: the head cannot read them
    no_top = completion_body(1)
    no_top["choices"][0]["logprobs"] = chat_logprobs([("a", -0.1)], alternatives=0)
    with pytest.raises(LogprobsMissingError, match="top_logprobs=20"):
        LogprobReward(make_logprob_head()).score_response(no_top)


def test_refusals_and_empty_replies_follow_on_empty():
    body = completion_body(3)
    body["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    body["choices"][0]["logprobs"] = {"content": None, "refusal": [token_entry("I", -0.1)]}
    body["choices"][1]["message"]["content"] = ""
    body["choices"][1]["logprobs"] = {"content": [], "refusal": None}
    report = LogprobReward(make_logprob_head()).score_with_report(body)
    assert math.isnan(report.scores[0]) and math.isnan(report.scores[1]) and math.isfinite(report.scores[2])
    assert report.empty == [0, 1] and report.missing == []
    zero = LogprobReward(make_logprob_head(), on_empty="zero").score_response(body)
    assert zero[:2] == [0.0, 0.0]


def test_fewer_alternatives_warn_and_placeholders_never_crash():
    reward = LogprobReward(make_logprob_head())
    few = [chat_logprobs([("a", -0.1), ("b", -9999.0)], alternatives=5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = reward.score_response(few)
    assert math.isfinite(scores[0])
    assert any("top_logprobs=20" in str(w.message) for w in caught)


def test_report_counts_tokens_offline():
    reward = LogprobReward(make_logprob_head())
    body = completion_body(2, text="hello world")
    report = reward.score_with_report(body, prompt=[{"role": "user", "content": "hello world"}])
    assert report.encoding == "o200k_base"  # from the response's model, gpt-4o
    assert report.tokens == [2, 2] and report.text_tokens == [2, 2]
    assert report.prompt_tokens == 9
    assert report.usage == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_head_checks_and_checkpoints(tmp_path):
    hidden = GatedLinearHead(FeatureSpec(kind="hidden", dim=576, base_model="m", hidden_size=576, num_layers=30,
                                         layers=(30,)))  # fmt: skip
    with pytest.raises(
        IncompatibleHeadError,
        match="kind='hidden' features; LogprobReward needs a head of kind 'logprobs' or 'logprob_tokens'",
    ):
        LogprobReward(hidden)
    with pytest.raises(ValueError, match="on_missing='skip' is invalid; allowed: raise, nan"):
        LogprobReward(make_logprob_head(), on_missing="skip")  # type: ignore[arg-type]
    path = save_head(make_logprob_head(), tmp_path / "lp.safetensors")
    body = completion_body(2)
    assert LogprobReward(path).score_response(body) == pytest.approx(
        LogprobReward(make_logprob_head()).score_response(body)
    )


class FaultyAPI:
    """A loopback server that answers POSTs from a script: each request pops the next action."""

    def __init__(self, script: list[tuple[Any, ...]]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(body)
                action = api.script.pop(0) if api.script else ("status", 500)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out
                    api.answer(self, action, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None,
             length: int | None = None) -> None:  # fmt: skip
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data) if length is None else length))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()

    def answer(self, handler: BaseHTTPRequestHandler, action: tuple[Any, ...], body: dict[str, Any]) -> None:
        kind = action[0]
        if kind == "ok":  # ("ok", k): k choices, whatever n asked
            self.send(handler, 200, json.dumps(completion_body(action[1])).encode())
        elif kind == "status":  # ("status", code[, headers[, message]])
            message = action[3] if len(action) > 3 else f"scripted {action[1]}"
            error = {"error": {"message": message, "type": "x", "param": None, "code": None}}
            self.send(handler, action[1], json.dumps(error).encode(), action[2] if len(action) > 2 else None)
        elif kind == "malformed":
            self.send(handler, 200, b'{"id": "x", "choices": [{"index": 0, "mess')
        elif kind == "truncated":  # promises more bytes than it sends, then hangs up
            data = json.dumps(completion_body(2)).encode()
            self.send(handler, 200, data[: len(data) // 2], length=len(data))
            handler.close_connection = True
        elif kind == "not_completion":
            self.send(handler, 200, b'{"object": "list", "data": []}')
        elif kind == "slow":  # ("slow", seconds): answer too late
            time.sleep(action[1])
            self.send(handler, 200, json.dumps(completion_body(1)).encode())

    def __enter__(self) -> FaultyAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


MESSAGES = [{"role": "user", "content": "2+2?"}]


FAST = {"backoff": 0.001, "max_backoff": 0.05, "timeout": 2.0}


def _client(url: str) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url, api_key="x", max_retries=5)  # its own retries get switched off


@LOOPBACK
def test_retries_every_fault_kind_then_succeeds():
    script = [("status", 429, {"retry-after-ms": "30"}), ("status", 500), ("malformed",), ("truncated",),
              ("not_completion",), ("ok", 4)]  # fmt: skip
    with FaultyAPI(script) as api:
        t0 = time.monotonic()
        result = sample_with_logprobs(_client(api.url), MESSAGES, 4, "gpt-4o", max_retries=5, **FAST)
        elapsed = time.monotonic() - t0
    assert result.complete and len(result.choices) == 4 and result.error is None
    outcomes = [a.outcome for a in result.attempts]
    assert outcomes == ["rate_limited", "server_error", "malformed", "connection", "malformed", "ok"]
    assert result.attempts[0].status == 429 and result.attempts[1].status == 500
    assert len(api.requests) == 6  # exactly one HTTP request per attempt: the client's own retries are off
    assert all(r["logprobs"] is True and r["top_logprobs"] == 20 and r["n"] == 4 for r in api.requests)
    assert elapsed >= 0.03  # Retry-After honoured
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    scores = LogprobReward(make_logprob_head()).score_response(result)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)


@LOOPBACK
def test_slow_response_times_out_then_retries():
    with FaultyAPI([("slow", 1.5), ("ok", 2)]) as api:
        result = sample_with_logprobs(_client(api.url), MESSAGES, 2, "m", max_retries=1, backoff=0.0, timeout=0.3)
    assert [a.outcome for a in result.attempts] == ["timeout", "ok"]
    assert result.attempts[0].seconds < 1.4 and len(result.choices) == 2


@LOOPBACK
def test_budget_exhausted_keeps_every_received_candidate():
    # chunk 0 fine; chunk 1: 429, then only 1 of 2 candidates, then 500s past the budget
    script = [("ok", 2), ("status", 429), ("ok", 1), ("status", 500), ("status", 503), ("status", 500)]
    with FaultyAPI(script) as api, pytest.raises(SamplingError) as info:
        sample_with_logprobs(_client(api.url), MESSAGES, 6, "m", chunk=2, max_retries=2, seed=7, **FAST)
    partial = info.value.partial
    assert isinstance(partial, SampleResult) and not partial.complete
    assert len(partial.choices) == 3 and [c.index for c in partial.choices] == [0, 1, 2]
    message = str(info.value)
    assert "gave up after 3 failed attempts on chunk 1" in message and "kept 3 of 6" in message
    assert [a.outcome for a in partial.attempts] == ["ok", "rate_limited", "partial", "server_error"]
    # the remainder is asked for, and each request's seed is offset so chunks do not repeat
    assert [r["n"] for r in api.requests] == [2, 2, 2, 1]
    assert [r["seed"] for r in api.requests] == [7, 9, 9, 10]

    with FaultyAPI([("ok", 1), ("status", 500)]) as api:
        result = sample_with_logprobs(_client(api.url), MESSAGES, 2, "m", max_retries=0, raise_on_error=False, **FAST)
    assert result.error and len(result.choices) == 1


@LOOPBACK
def test_fatal_errors_are_not_retried():
    fatal = pytest.raises(SamplingError, match=r"not retried \(HTTP 401\).*kept 1 of 3")
    with FaultyAPI([("ok", 1), ("status", 401)]) as api, fatal as info:
        sample_with_logprobs(_client(api.url), MESSAGES, 3, "m", max_retries=3, **FAST)
    assert len(api.requests) == 2 and len(info.value.partial.choices) == 1

    refusal = ("status", 400, None, "logprobs is not supported with this model")
    unsupported = pytest.raises(LogprobsUnsupportedError, match=r"refused logprobs.*on_missing='nan'")
    with FaultyAPI([refusal]) as api, unsupported:
        sample_with_logprobs(_client(api.url), MESSAGES, 2, "o3-mini", **FAST)


@LOOPBACK
def test_deadline_bounds_the_whole_call():
    with FaultyAPI([("status", 500)] * 5) as api, pytest.raises(SamplingError, match="deadline"):
        sample_with_logprobs(_client(api.url), MESSAGES, 1, "m", max_retries=5, backoff=0.5, deadline=0.2)
    assert len(api.requests) == 1


@LOOPBACK
async def test_async_variant_retries():
    openai = pytest.importorskip("openai")

    with FaultyAPI([("status", 502), ("truncated",), ("ok", 2)]) as api:
        client = openai.AsyncOpenAI(base_url=api.url, api_key="x")
        result = await asample_with_logprobs(client, MESSAGES, 2, "m", max_retries=2, **FAST)
        await client.close()
    assert [a.outcome for a in result.attempts] == ["server_error", "connection", "ok"] and len(result.choices) == 2


def test_sampling_arguments_are_checked_before_any_request():
    for kwargs, match in [
        ({"n": 0}, "n=0 is out of range"),
        ({"top_logprobs": 21}, "top_logprobs=21 is out of range"),
        ({"max_retries": -1}, "max_retries=-1"),
        ({"timeout": 0}, "timeout=0"),
        ({"chunk": 0}, "chunk=0"),
        ({"messages": []}, "messages=.* is invalid"),
    ]:
        args = {"client": None, "messages": MESSAGES, "n": 2, "model": "m", **kwargs}
        with pytest.raises(ValueError, match=match):
            sample_with_logprobs(**args)
