"""The ASGI server (FastAPI on uvicorn, on loopback) over a fake engine: routes, errors in
OpenAI's shape, streaming any n, usage chunks, metrics, the OpenAPI schema, backpressure,
disconnects, shutdown, and a bounded schemathesis fuzz run (no 5xx)."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.serving.fake import FakeServer

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
USER = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer(port=0, max_body_bytes=64 * 1024, max_queue=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Any:
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=30)


def root(server: FakeServer) -> str:
    return server.url.removesuffix("/v1")


def call(url: str, body: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def openai_error(raw: bytes, param: str | None = None) -> dict[str, Any]:
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# --------------------------------------------------------------------------- routes and errors


def test_health_models_and_unknown_paths(server):
    status, _, raw = call(root(server) + "/health")
    assert status == 200 and json.loads(raw) == {"status": "ok"}
    status, _, raw = call(server.url + "/models")
    assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == ["fake-model"]
    status, _, raw = call(server.url + "/models/other")
    assert status == 404 and openai_error(raw, "model")["code"] == "model_not_found"
    status, _, raw = call(server.url + "/nothing")
    assert status == 404 and openai_error(raw)["code"] == "unknown_url"
    status, _, raw = call(server.url + "/chat/completions")  # GET
    assert status == 405 and "POST" in openai_error(raw)["message"]


def test_validation_errors_are_400_in_openai_shape_never_422(server):
    cases = [
        ({"n": 0}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"messages": "hi"}, "messages"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ]
    for change, param in cases:
        status, _, raw = call(server.url + "/chat/completions", {"model": "fake-model", "messages": USER, **change})
        assert status == 400, raw
        assert openai_error(raw, param)["type"] == "invalid_request_error"
    status, _, raw = call(server.url + "/chat/completions", raw=b"{not json")
    assert status == 400 and openai_error(raw)["code"] == "invalid_json"
    status, _, raw = call(server.url + "/completions", raw=b"[" * 100000 + b"]" * 100000)
    assert status in (400, 413) and openai_error(raw)


def test_body_limit_413_with_content_length_and_chunked(server):
    big = {"model": "fake-model", "messages": USER, "pad": "x" * 70000}
    status, _, raw = call(server.url + "/chat/completions", big)
    error = openai_error(raw)
    assert status == 413 and error["code"] == "request_too_large" and str(64 * 1024) in error["message"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=iter([b"x" * 40000, b"y" * 40000]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)  # fmt: skip
    response = conn.getresponse()
    assert response.status == 413 and openai_error(response.read())["code"] == "request_too_large"
    conn.close()


def test_api_key_guards_all_but_health_and_schema():
    with FakeServer(port=0, api_key="secret") as srv:
        for path in ("/v1/models", "/metrics", "/v1/chat/completions"):
            status, _, raw = call(root(srv) + path, {} if "chat" in path else None)
            assert status == 401 and openai_error(raw)["code"] == "invalid_api_key", path
        assert call(root(srv) + "/health")[0] == 200
        assert call(root(srv) + "/openapi.json")[0] == 200
        good = openai.OpenAI(base_url=srv.url, api_key="secret", max_retries=0)
        assert good.chat.completions.create(model="fake-model", messages=USER, max_tokens=2).choices


# --------------------------------------------------------------------------- completions and streams


def test_stream_any_n_matches_the_whole_response(client):
    common = {"model": "fake-model", "messages": USER, "n": 2, "max_tokens": 5, "seed": 3}
    whole = client.chat.completions.create(**common)
    chunks = list(client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    texts, finishes, roles = {0: "", 1: ""}, {}, set()
    for c in chunks[:-1]:
        assert len(c.choices) == 1 and c.usage is None
        choice = c.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.delta.role:
            roles.add(choice.index)
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1} and finishes == {0: "length", 1: "length"}
    assert texts == {c.index: c.message.content for c in whole.choices} and texts[0] != texts[1]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_without_usage_and_completions_streams(client):
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model="fake-model", prompt=["a", "b"], n=2, max_tokens=3, stream=True,
                                              logprobs=2))  # fmt: skip
    finals = {c.choices[0].index: c.choices[0] for c in streamed if c.choices[0].finish_reason}
    assert sorted(finals) == [0, 1, 2, 3]


def test_streamed_logprobs_come_chunk_by_chunk_and_add_up_to_the_whole(client):
    """Each text chunk carries its own tokens' logprobs, the closing chunk the rest: per choice, the
    chunks together are exactly the non-streamed response's logprobs (chat and completions)."""
    chat = {"model": "fake-model", "messages": USER, "n": 2, "max_tokens": 4, "seed": 1, "logprobs": True}
    whole = client.chat.completions.create(**chat, top_logprobs=2)
    parts: dict[int, list[Any]] = {0: [], 1: []}
    carried = 0
    for c in client.chat.completions.create(**chat, top_logprobs=2, stream=True):
        for choice in c.choices:
            if choice.logprobs is not None:
                parts[choice.index] += choice.logprobs.content
                carried += bool(choice.delta.content and choice.logprobs.content)
    assert carried >= 4  # text chunks carried logprobs, not only the closing ones
    assert {i: [e.model_dump() for e in p] for i, p in parts.items()} == {
        c.index: [e.model_dump() for e in c.logprobs.content] for c in whole.choices
    }

    text = {"model": "fake-model", "prompt": "a", "max_tokens": 4, "seed": 2, "logprobs": 2}
    whole_text = client.completions.create(**text).choices[0].logprobs
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in client.completions.create(**text, stream=True):
        if c.choices[0].logprobs is not None:
            for key in merged:
                merged[key] += getattr(c.choices[0].logprobs, key)
    assert merged == {key: getattr(whole_text, key) for key in merged}


def test_metrics_parse_and_count_requests(server, client):
    client.chat.completions.create(model="fake-model", messages=USER, max_tokens=4)
    list(client.chat.completions.create(model="fake-model", messages=USER, max_tokens=2, stream=True))
    status, headers, raw = call(root(server) + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? (\S+)$')
    for line in raw.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        match = line_re.match(line)
        assert match, line
        values[match.group(1) + (match.group(2) or "")] = float(match.group(4))
    assert values['esamp_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 2
    assert values["esamp_generated_tokens_total"] >= 6 and values["esamp_generated_tokens_per_second"] > 0
    assert values["esamp_queue_depth"] == 0 and values["esamp_rows_in_flight"] == 0
    assert values["esamp_time_to_first_token_seconds_count"] >= 1
    assert values['esamp_time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1


def test_openapi_lists_the_endpoints_and_request_models(server):
    status, _, raw = call(root(server) + "/openapi.json")
    doc = json.loads(raw)
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "/health", "/metrics"):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ChatCompletion", "ErrorResponse"} <= set(schemas)
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["anyOf"][0]["maximum"] == 128
    assert "422" not in json.dumps(doc["paths"])


# --------------------------------------------------------------------------- backpressure, disconnects, shutdown


def test_full_queue_gets_503_with_retry_after():
    with FakeServer(port=0, max_queue=1, max_batch_rows=1) as srv:  # one request decoding at a time
        srv.engine.delay = 0.05  # 16 steps: ~0.8 s a request
        body = {"model": "fake-model", "messages": USER, "max_tokens": 16}
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(call(srv.url + "/chat/completions", body)[0]))
                   for _ in range(2)]  # fmt: skip
        threads[0].start()
        assert srv.engine.started.wait(10)  # one decoding...
        threads[1].start()
        deadline = time.monotonic() + 10
        while srv.backend.load()[1] < 1 and time.monotonic() < deadline:  # ...and one queued
            time.sleep(0.01)
        status, headers, raw = call(srv.url + "/chat/completions", body)
        assert status == 503 and headers["retry-after"] == "1"
        error = openai_error(raw)
        assert error["code"] == "server_overloaded" and "max_queue=1" in error["message"]
        for t in threads:
            t.join(30)
        assert results == [200, 200]


def test_disconnect_mid_stream_cancels_and_the_next_request_works():
    with FakeServer(port=0) as srv:
        srv.engine.delay = 0.2
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        body = {"model": "fake-model", "messages": USER, "max_tokens": 16, "stream": True}
        conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        conn.sock.shutdown(2)
        conn.close()
        assert srv.engine.cancelled.wait(5)  # the engine saw the cancel long before its 16 steps (3.2 s)
        srv.engine.delay = 0.0
        client = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
        assert client.chat.completions.create(model="fake-model", messages=USER, max_tokens=2).choices


def test_stop_cancels_in_flight_requests():
    srv = FakeServer(port=0).start()
    srv.engine.delay = 0.5
    body = {"model": "fake-model", "messages": USER, "max_tokens": 16}
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(call(srv.url + "/chat/completions", body)[0]))
    thread.start()
    assert srv.engine.started.wait(10)
    begun = time.monotonic()
    srv.stop()
    thread.join(10)
    assert srv.engine.cancelled.is_set() and time.monotonic() - begun < 8  # not the 8 s of decoding
    assert results and results[0] in (200, 503)
    with pytest.raises(OSError):
        call(srv.url + "/models")


# --------------------------------------------------------------------------- dependencies


def test_no_langchain_and_no_fastapi_at_import():
    code = ("import sys; import esamp_agents.serving, esamp_agents.serving.app, esamp_agents.cli.serve; "
            "assert not any(m.startswith('langchain') for m in sys.modules), sorted(sys.modules)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_fastapi_names_the_extra(monkeypatch, capsys):
    from esamp_agents.cli import main
    from esamp_agents.serving.server import require_serve_dependencies

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ImportError, match=r"pip install 'esamp-agents\[serve\]'"):
        require_serve_dependencies()
    assert main(["serve", "--port", "0"]) == 2
    assert "pip install 'esamp-agents[serve]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- fuzzing


def test_fuzz_no_server_errors(server):
    """Whatever schemathesis sends to each operation of /openapi.json (inside the schema and beside
    it), no 5xx and no crash; then a good request still works. Bounded: 40 examples an operation."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    api = schemathesis.openapi.from_url(root(server) + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 6
    begun = time.monotonic()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case: Any) -> None:
            case.call_and_validate(checks=[schemathesis.checks.not_a_server_error], timeout=30)

        fuzz()
    assert time.monotonic() - begun < 60
    assert openai.OpenAI(base_url=server.url, api_key="x").models.list().data
