"""``esamp-agents serve`` on loopback with the real embedded model: OpenAI's protocol, errors in
OpenAI's shape, streaming, completions, concurrency, and the CLI hooks."""

from __future__ import annotations

import argparse
import asyncio
import io
import threading
import time

import pytest

from esamp_agents.cli.serve import add_serve_command, run_serve
from esamp_agents.serving import Server, serve_forever
from esamp_agents.serving.protocol import ParsedRequest, RequestError, ServeDefaults, parse_request
from tests.fakes import wait_for
from tests.model.serving.wire import USER, assert_openai_error, get, post

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])
openai = pytest.importorskip("openai")

# --------------------------------------------------------------------------- models and routing


def test_models_and_unknown_paths(server):
    status, body = get(server.url + "/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["embedded"]
    assert get(server.url + "/models/embedded")[0] == 200
    status, body = get(server.url + "/models/gpt-4o")
    assert status == 404 and assert_openai_error(body, "model")["code"] == "model_not_found"
    status, body = get(server.url + "/nothing")
    assert status == 404 and assert_openai_error(body)["code"] == "unknown_url"
    status, body = post(server.url + "/chat/completions", {"model": "gpt-4o", "messages": USER})
    assert status == 404 and assert_openai_error(body, "model")["code"] == "model_not_found"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"n": True}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs=true, as in OpenAI
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"beta": -0.5}, "beta"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),  # tool_choice needs tools
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format.json_schema.schema",
        ),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"model": None}, "model"),
    ],
)
def test_bad_requests_get_400_in_openai_shape(server, change, param):
    body = {"model": "embedded", "messages": USER, "max_tokens": 4, **change}
    status, reply = post(server.url + "/chat/completions", body)
    assert status == 400, reply
    assert assert_openai_error(reply, param)["type"] == "invalid_request_error"


def test_bad_json_too_large_and_too_long(server):
    status, reply = post(server.url + "/chat/completions", None, raw=b'{"model": "embedded", "messages": [')
    assert status == 400 and assert_openai_error(reply)["code"] == "invalid_json"
    status, reply = post(server.url + "/chat/completions", None, raw=b"[1, 2]")
    assert status == 400 and "JSON object" in assert_openai_error(reply)["message"]
    status, reply = post(server.url + "/chat/completions", {"model": "embedded", "messages": USER, "pad": "x" * 70000})
    assert status == 413 and assert_openai_error(reply)["code"] == "request_too_large"
    long_prompt = [{"role": "user", "content": "word " * 9000}]
    for stream in (False, True):
        body = {"model": "embedded", "messages": long_prompt, "max_tokens": 8, "stream": stream}
        status, reply = post(server.url + "/chat/completions", body)
        error = assert_openai_error(reply, "messages")
        assert status == 400 and error["code"] == "context_length_exceeded"
        assert "maximum context length is 8192 tokens" in error["message"]
    status, reply = post(server.url + "/completions", {"model": "embedded", "prompt": [[1, 2, 10**9]]})
    assert status == 400 and "outside the vocabulary" in assert_openai_error(reply, "prompt")["message"]
    status, reply = post(server.url + "/completions", {"model": "embedded", "prompt": "x", "echo": True})
    assert status == 400 and assert_openai_error(reply, "echo")


def test_the_server_survives_bad_requests(server, client):
    """After all the errors above, a good request still works (nothing broke the worker)."""
    reply = client.chat.completions.create(model="embedded", messages=USER, max_tokens=3, seed=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1


def test_parse_request_defaults_and_esamp_fields():
    request = parse_request(
        {"model": "m", "messages": USER, "beta": 0.5, "warm_start_steps": 2, "top_k": 5, "stop": "\n"},
        "chat",
        ServeDefaults(),
        1000,
    )
    assert isinstance(request, ParsedRequest)
    assert request.esamp.beta == 0.5 and request.esamp.warm_start_steps == 2
    assert request.sampling.top_k == 5 and request.sampling.stop == ("\n",)
    assert request.sampling.temperature == 1.0 and request.sampling.top_p == 1.0  # OpenAI's defaults
    assert request.max_tokens is None
    off = parse_request({"model": "m", "messages": USER, "beta": 0}, "chat", ServeDefaults(), 1000)
    assert not off.esamp.enabled
    with pytest.raises(RequestError, match="beta=-1"):
        parse_request({"model": "m", "messages": USER, "beta": -1}, "chat", ServeDefaults(), 1000)


# --------------------------------------------------------------------------- generation


def test_chat_candidates_logprobs_and_usage(embedded, client):
    reply = client.chat.completions.create(
        model="embedded", messages=USER, n=3, max_tokens=6, logprobs=True, top_logprobs=5, seed=2,
        extra_body={"beta": 0.5},
    )  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.model == "embedded"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    prompt_tokens = len(embedded.chat_token_ids(USER))
    assert reply.usage.prompt_tokens == prompt_tokens
    for choice in reply.choices:
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert all(len(t.top_logprobs) == 5 for t in choice.logprobs.content)
        assert all(t.logprob <= 0 and t.bytes for t in choice.logprobs.content)
    # completion tokens count every generated token (the closing end-of-turn one included)
    assert reply.usage.completion_tokens >= sum(len(c.logprobs.content) for c in reply.choices)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_equals_the_same_seeded_request(client):
    common = {"model": "embedded", "messages": USER, "max_tokens": 6, "seed": 9, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**common)
    chunks = list(client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == whole.choices[0].logprobs.content  # chunk by chunk, adding up to the whole
    assert any(c.choices[0].delta.content and c.choices[0].logprobs for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_n2_equals_the_same_seeded_request(client):
    """Every choice streams (chunks carry choices[0].index); each one's text is the whole response's."""
    common = {"model": "embedded", "messages": USER, "n": 2, "max_tokens": 6, "seed": 5, "extra_body": {"beta": 0.5}}
    whole = client.chat.completions.create(**common)
    chunks = list(client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    for c in chunks[:-1]:
        choice = c.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_disconnect_mid_stream_then_health_metrics_and_a_request(server, client):
    import http.client
    import json
    import re

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": "embedded", "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    begun = time.monotonic()
    assert wait_for(lambda: server.backend.load()[0] == 0, timeout=15)  # its rows were cancelled, not decoded
    reply = client.chat.completions.create(model="embedded", messages=USER, max_tokens=2, seed=0)
    assert reply.choices and time.monotonic() - begun < 30
    root = server.url.removesuffix("/v1")
    assert get(root + "/health") == (200, {"status": "ok"})
    import urllib.request

    with urllib.request.urlopen(root + "/metrics", timeout=30) as metrics:
        text = metrics.read().decode()
    line = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? \S+$')
    assert all(line.match(x) for x in text.splitlines() if x and not x.startswith("#"))
    assert 'esamp_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_completions_endpoint(embedded, client):
    reply = client.completions.create(model="embedded", prompt=["1 + 1 =", "The sky is"], n=2, max_tokens=4,
                                      logprobs=3, seed=4)  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1, 2, 3] and reply.object == "text_completion"
    for c in reply.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    prompt_tokens = sum(len(embedded.tokenizer(p)["input_ids"]) for p in ["1 + 1 =", "The sky is"])
    assert reply.usage.prompt_tokens == prompt_tokens
    streamed = list(client.completions.create(model="embedded", prompt="The sky is", max_tokens=4, stream=True,
                                              seed=4))  # fmt: skip
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_requests_join_a_running_one_and_get_what_they_get_alone(server, client):
    """Continuous batching through the real clients: a short streamed request (async client) and a
    short whole one arrive while a long request decodes; both finish long before it does, with
    the text the same seeded request gets alone."""
    short = {"model": "embedded", "messages": USER, "max_tokens": 6, "seed": 3, "temperature": 0.7,
             "extra_body": {"beta": 0.0}}  # fmt: skip
    alone = client.chat.completions.create(**short).choices[0].message.content
    long_done = threading.Event()

    def long_request() -> None:
        client.chat.completions.create(model="embedded", messages=USER, max_tokens=56, extra_body={"ignore_eos": True})
        long_done.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    assert wait_for(lambda: server.backend.load()[0] > 0, timeout=30)
    joined_before = server.backend.engine.scheduler.stats.joined_running

    async def short_ones() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)
        stream = await aclient.chat.completions.create(**short, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        whole = await aclient.chat.completions.create(**short)
        return text, whole.choices[0].message.content or ""

    streamed, whole = asyncio.run(short_ones())
    assert not long_done.is_set()  # both came back while the long request was still decoding
    assert streamed == whole == alone
    assert server.backend.engine.scheduler.stats.joined_running - joined_before >= 2
    worker.join(120)
    assert long_done.is_set()


def test_any_model_name_and_api_key(embedded):
    with Server(embedded, port=0, accept_any_model=True, api_key="secret", served_name="smol") as srv:
        status, body = get(srv.url + "/models")
        assert status == 401 and assert_openai_error(body)["code"] == "invalid_api_key"
        status, body = post(srv.url + "/chat/completions", {"model": "gpt-4o", "messages": USER})
        assert status == 401
        client = openai.OpenAI(base_url=srv.url, api_key="secret", max_retries=0)
        assert [m.id for m in client.models.list()] == ["smol"]
        reply = client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2, seed=0)
        assert reply.model == "smol" and reply.choices
        assert srv.port != 0 and srv.url == f"http://127.0.0.1:{srv.port}/v1"  # the ephemeral port it got


# --------------------------------------------------------------------------- lifecycle and CLI


def test_constructor_checks_before_any_work():
    with pytest.raises(ValueError, match=r"port=70000 is out of range; allowed: 0 <= port <= 65535"):
        Server("embedded", port=70000)
    with pytest.raises(ValueError, match="max_queue=0"):
        Server("embedded", max_queue=0)


def test_cli_hooks_parse_and_serve(embedded):
    parser = argparse.ArgumentParser(prog="esamp-agents")
    sub = parser.add_subparsers(dest="command")
    add_serve_command(sub)
    args = parser.parse_args(["serve", "--port", "0", "--accept-any-model", "--beta", "0.5"])
    assert args.port == 0 and args.accept_any_model and args.beta == 0.5 and args.host == "127.0.0.1"
    with pytest.raises(ValueError, match="beta=-1"):
        run_serve(parser.parse_args(["serve", "--beta", "-1"]))

    out, stop = io.StringIO(), threading.Event()
    thread = threading.Thread(
        target=serve_forever, args=(embedded, "127.0.0.1", 0), kwargs={"out": out, "stop_event": stop}
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while "serving" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        url = out.getvalue().split(" at ", 1)[1].split()[0]
        assert get(url + "/models")[0] == 200
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
