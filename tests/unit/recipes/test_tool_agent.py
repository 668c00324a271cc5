"""Tool-agent recipe: Best-of-N per agent step, with scripted fake chat models that emit tool calls."""

from __future__ import annotations

import asyncio
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from esamp_agents.recipes.tool_agent import (
    BestOfNChatModel,
    BestOfNStep,
    achoose_reply,
    check_json_schema,
    check_tool_calls,
    choose_reply,
    render_reply,
    tool_checks,
)
from esamp_agents.selection.best_of_n import BestOfNError
from esamp_agents.selection.rewards import CallableReward, RewardError
from tests.fakes import ScriptedChat, ScriptedNChat

# --------------------------------------------------------------------------- tools and fakes


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def call(name: str, args: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return {"name": name, "args": args, "id": f"call_{name}_{i}", "type": "tool_call"}


def reply(text: str = "", calls: list[dict[str, Any]] | None = None, broken: list[dict] | None = None) -> AIMessage:
    return AIMessage(content=text, tool_calls=calls or [], invalid_tool_calls=broken or [])


UNKNOWN = reply(calls=[call("divide", {"a": 6, "b": 7})])
BAD_ARGS = reply(calls=[call("multiply", {"a": "six", "b": 7})])
MISSING = reply(calls=[call("multiply", {"a": 6})])
UNPARSABLE = reply(broken=[{"name": "multiply", "args": '{"a": 6, "b": ', "id": "x", "error": "bad json"}])
GOOD = reply(calls=[call("multiply", {"a": 6, "b": 7})])


# --------------------------------------------------------------------------- validity checks


def test_check_tool_calls_scores_each_kind_of_mistake():
    checks = tool_checks([multiply, add])
    assert check_tool_calls(GOOD, checks) == (1.0, [])
    validity, problems = check_tool_calls(UNKNOWN, checks)
    assert validity == 0.0 and "tool 'divide' is not bound (bound: add, multiply)" in problems[0]
    validity, problems = check_tool_calls(BAD_ARGS, checks)
    assert validity == 0.0 and problems[0].startswith("multiply: args.a:")
    assert check_tool_calls(MISSING, checks)[0] == 0.0
    validity, problems = check_tool_calls(UNPARSABLE, checks)
    assert validity == 0.0 and "does not parse" in problems[0]
    half = reply(calls=[call("multiply", {"a": 1, "b": 2}), call("add", {"a": 1}, 1)])
    assert check_tool_calls(half, checks)[0] == 0.5
    assert check_tool_calls(reply("The answer is 42."), checks) == (1.0, [])
    assert check_tool_calls(reply(""), checks) == (0.0, ["empty reply"])


def test_check_tool_calls_honours_tool_choice():
    checks = tool_checks([multiply, add])
    assert check_tool_calls(reply("no tool"), checks, "any")[0] == 0.0
    assert check_tool_calls(reply("no tool"), checks, "required")[0] == 0.0
    assert check_tool_calls(GOOD, checks, "add")[0] == 0.0
    assert check_tool_calls(GOOD, checks, {"type": "function", "function": {"name": "multiply"}})[0] == 1.0
    assert check_tool_calls(GOOD, checks, "none")[0] == 0.0
    assert check_tool_calls(reply("fine"), checks, "auto")[0] == 1.0


def test_tool_checks_cover_every_tool_form():
    class Weather(BaseModel):
        """Get the weather."""

        city: str
        unit: str = "C"

    def lookup(key: str, limit: int = 3) -> str:
        """Look a key up."""
        return key

    raw = {
        "type": "function",
        "function": {
            "name": "paint",
            "description": "Paint a wall.",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
                "required": ["colour"],
                "additionalProperties": False,
            },
        },
    }
    checks = tool_checks([Weather, lookup, raw, {"type": "web_search_preview"}])
    assert sorted(checks) == ["Weather", "lookup", "paint"]
    assert checks["Weather"]({"city": "Oslo"}) == []
    assert checks["Weather"]({"unit": "F"})
    assert checks["lookup"]({"key": "k"}) == []
    assert checks["lookup"]({"key": 3})
    assert checks["paint"]({"colour": "red"}) == []
    assert checks["paint"]({"colour": "green"})
    assert checks["paint"]({"colour": "red", "extra": 1}) == ["args: unexpected argument 'extra'"]


def test_check_json_schema_refs_unions_and_arrays():
    schema = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
            "mode": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
    }
    assert check_json_schema({"items": [{"n": 1}, {"n": 2.0}], "mode": None}, schema) == []
    assert check_json_schema({"items": [{"n": True}]}, schema) == ["args.items[0].n: true is not of type integer"]
    assert check_json_schema({"items": [{}]}, schema) == ["args.items[0]: missing required argument 'n'"]
    assert check_json_schema({"mode": "x"}, schema) == ["args.mode: matches none of the allowed shapes"]


def test_choose_reply_prefers_valid_then_reward_then_first():
    messages = [HumanMessage("What is 6 times 7?")]
    chosen, candidates = choose_reply(messages, [UNKNOWN, BAD_ARGS, GOOD, GOOD], tools=[multiply])
    assert chosen == 2 and [c.validity for c in candidates] == [0.0, 0.0, 1.0, 1.0]
    scored: list[int] = []

    def prefers_42(msgs: list[BaseMessage], message: AIMessage) -> float:
        scored.append(1)
        return 1.0 if "42" in str(message.content) else 0.0

    finals = [UNKNOWN, reply("It is 41."), reply("It is 42."), reply("")]
    chosen, candidates = choose_reply(messages, finals, tools=[multiply], reward=prefers_42)
    assert chosen == 2 and len(scored) == 2  # the reward only sees the most valid replies
    assert [c.reward for c in candidates] == [None, 0.0, 1.0, None]
    # a Reward object (BestOfN protocol) sees the rendered reply
    judge = CallableReward(lambda _, text: float("[tool call] multiply" in text), name="likes_tools")
    chosen, _ = choose_reply(messages, [reply("I think 42."), GOOD], tools=[multiply], reward=judge)
    assert chosen == 1
    assert render_reply(GOOD) == '[tool call] multiply({"a": 6, "b": 7})'


def test_choose_reply_ranks_rewards_like_best_of_n():
    finals = [reply("a"), reply("b"), reply("c")]
    scores = {"a": math.nan, "b": 2.0, "c": 2.0}
    chosen, candidates = choose_reply([], finals, reward=lambda m, r: scores[r.content])
    assert chosen == 1 and candidates[0].reward != candidates[0].reward  # NaN ranks worst; a tie goes to the first
    chosen, _ = choose_reply([], finals, reward=lambda m, r: math.nan)
    assert chosen == 0  # nothing to rank by: the earliest

    async def prefers_c(messages: Any, message: AIMessage) -> float:
        return float(message.content == "c")

    chosen, candidates = asyncio.run(achoose_reply([], finals, reward=prefers_c))
    assert chosen == 2 and [c.reward for c in candidates] == [0.0, 0.0, 1.0]
    short = CallableReward(lambda q, t: 1.0, name="one")
    short.score = lambda q, cands: [1.0]  # type: ignore[method-assign]
    with pytest.raises(RewardError, match="reward 'one' returned 1 scores for 3 candidates"):
        choose_reply([], finals, reward=short)


def test_choose_reply_failures_are_named():
    with pytest.raises(ValueError, match="replies is empty"):
        choose_reply([], [])
    with pytest.raises(RewardError, match="reward 'broken' failed: ZeroDivisionError"):
        choose_reply([], [GOOD, GOOD], tools=[multiply], reward=CallableReward(lambda q, t: 1 / 0, name="broken"))
    with pytest.raises(RewardError, match="returned"):
        choose_reply([], [GOOD, GOOD], tools=[multiply], reward=lambda m, r: "high")


# --------------------------------------------------------------------------- BestOfNChatModel


def test_parallel_sampling_keeps_the_valid_tool_call():
    fake = ScriptedChat(script=[[UNKNOWN, BAD_ARGS, UNPARSABLE, GOOD]])
    model = BestOfNChatModel(fake, n=4).bind_tools([multiply, add])
    out = model.invoke("What is 6 times 7?")
    assert out.tool_calls[0]["name"] == "multiply" and out.tool_calls[0]["args"] == {"a": 6, "b": 7}
    meta = out.response_metadata["best_of_n"]
    assert meta["sampling"] == "parallel" and meta["n"] == 4
    assert sorted(c["validity"] for c in meta["candidates"]) == [0.0, 0.0, 0.0, 1.0]
    assert len(fake.calls) == 4
    assert all([t["function"]["name"] for t in c["tools"]] == ["multiply", "add"] for c in fake.calls)


def test_n_sampling_is_one_request():
    fake = ScriptedNChat(script=[[BAD_ARGS, GOOD, UNKNOWN]])
    model = BestOfNChatModel(fake, n=3).bind_tools([multiply], tool_choice="any")
    out = model.invoke("What is 6 times 7?")
    assert out.tool_calls == GOOD.tool_calls
    assert len(fake.calls) == 1
    assert fake.calls[0]["n"] == 3 and fake.calls[0]["stream"] is False and fake.calls[0]["tool_choice"] == "any"
    assert out.response_metadata["best_of_n"]["sampling"] == "n"
    forced = BestOfNChatModel(fake, n=2, sampling="parallel").bind_tools([multiply])
    forced.invoke("again")
    assert len(fake.calls) == 3 and "n" not in fake.calls[-1]


def test_one_model_run_per_step_with_the_total_usage():
    from langchain_core.callbacks import BaseCallbackHandler

    class Starts(BaseCallbackHandler):
        def __init__(self) -> None:
            self.starts = 0

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            self.starts += 1

    usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    counted = [GOOD.model_copy(update={"usage_metadata": usage}), BAD_ARGS.model_copy(update={"usage_metadata": usage})]
    handler = Starts()
    out = (
        BestOfNChatModel(ScriptedChat(script=[counted]), n=2)
        .bind_tools([multiply])
        .invoke("hi", {"callbacks": [handler]})
    )
    assert handler.starts == 1  # the candidate calls are not separate runs
    assert out.usage_metadata["total_tokens"] == 30  # two calls: their sum
    request_usage = {"input_tokens": 10, "output_tokens": 12, "total_tokens": 22}
    shared = [m.model_copy(update={"usage_metadata": request_usage}) for m in (GOOD, BAD_ARGS)]
    out = BestOfNChatModel(ScriptedNChat(script=[shared]), n=2).bind_tools([multiply]).invoke("hi")
    assert out.usage_metadata["total_tokens"] == 22  # one request: its usage, once


def test_failed_candidates_are_dropped_and_total_failure_is_named():
    flaky = ScriptedChat(script=[[GOOD]], fail_every=2)
    out = BestOfNChatModel(flaky, n=4, max_concurrency=1).bind_tools([multiply]).invoke("hi")
    warnings = out.response_metadata["best_of_n"]["warnings"]
    assert out.tool_calls == GOOD.tool_calls
    assert sum("failed: RuntimeError" in w for w in warnings) == 2 and "2 candidates for n=4" in warnings
    dead = ScriptedChat(script=[[GOOD]], fail_every=1)
    with pytest.raises(BestOfNError, match="all 3 candidates failed"):
        BestOfNChatModel(dead, n=3).invoke("hi")


def test_agent_loop_model_tool_model():
    """A hand-written agent loop: every model step is a Best-of-N step."""
    fake = ScriptedChat(
        script=[
            [UNKNOWN, BAD_ARGS, GOOD, MISSING],  # step 0: only one call is usable
            [reply("6 times 7 is 41."), UNPARSABLE, reply("6 times 7 is 42.")],  # step 1: the answer
        ]
    )

    def mentions_tool_result(messages: list[BaseMessage], message: AIMessage) -> float:
        results = [str(m.content) for m in messages if isinstance(m, ToolMessage)]
        return float(any(r in str(message.content) for r in results))

    agent_model = BestOfNChatModel(fake, n=3, reward=mentions_tool_result, max_concurrency=1).bind_tools([multiply])
    messages: list[BaseMessage] = [HumanMessage("What is 6 times 7?")]
    tools = {"multiply": multiply}
    for _ in range(4):
        ai = agent_model.invoke(messages)
        messages.append(ai)
        if not ai.tool_calls:
            break
        messages.extend(tools[c["name"]].invoke(c) for c in ai.tool_calls)
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert messages[2].content == "42"
    assert messages[-1].content == "6 times 7 is 42."
    step0 = messages[1].response_metadata["best_of_n"]
    assert step0["chosen_index"] == 2 and step0["candidates"][0]["problems"]
    assert messages[-1].response_metadata["best_of_n"]["reward"] == "mentions_tool_result"


def test_with_structured_output_goes_through_bind_tools():
    class Answer(BaseModel):
        """The final answer."""

        value: int

    good = reply(calls=[call("Answer", {"value": 42})])
    bad = reply(calls=[call("Answer", {"value": "forty-two"})])
    fake = ScriptedChat(script=[[bad, good]])
    structured = BestOfNChatModel(fake, n=2, max_concurrency=1).with_structured_output(Answer)
    assert structured.invoke("What is 6 times 7?") == Answer(value=42)
    assert fake.calls[0]["tool_choice"] == "any"


async def test_async_paths():
    fake = ScriptedChat(script=[[BAD_ARGS, GOOD]])
    out = await BestOfNChatModel(fake, n=2).bind_tools([multiply]).ainvoke("hi")
    assert out.tool_calls == GOOD.tool_calls
    nfake = ScriptedNChat(script=[[UNKNOWN, GOOD]])
    out = await BestOfNChatModel(nfake, n=2).bind_tools([multiply]).ainvoke("hi")
    assert out.tool_calls == GOOD.tool_calls and len(nfake.calls) == 1

    class AsyncJudge:
        name = "async_judge"

        def score(self, input: Any, candidates: Any) -> list[float]:
            raise AssertionError("the async path must use ascore")

        async def ascore(self, input: Any, candidates: Any) -> list[float]:
            await asyncio.sleep(0)
            return [float("42" in c.text) for c in candidates]

    finals = ScriptedChat(script=[[reply("41"), reply("42")]])
    out = await BestOfNChatModel(finals, n=2, reward=AsyncJudge(), max_concurrency=1).ainvoke("hi")
    assert out.content == "42"


def test_construction_errors_name_the_value():
    fake = ScriptedChat(script=[[GOOD]])
    with pytest.raises(ValueError, match=r"n=0 is out of range; allowed: 1 <= n"):
        BestOfNChatModel(fake, n=0)
    with pytest.raises(ValueError, match=r"sampling='n' but ScriptedChat has no n field"):
        BestOfNChatModel(fake, sampling="n")
    with pytest.raises(ValueError, match=r"sampling='many' is unknown"):
        BestOfNChatModel(fake, sampling="many")
    with pytest.raises(ValueError, match=r"reward=42 is not usable"):
        BestOfNChatModel(fake, reward=42)
    with pytest.raises(ValueError, match=r"max_concurrency=0 is out of range"):
        BestOfNChatModel(fake, max_concurrency=0)
    assert BestOfNChatModel(fake)._get_ls_params() == fake._get_ls_params()  # traces name the wrapped model


def test_docstring_example_runs_with_a_stand_in_for_chatopenai(monkeypatch):
    langchain_openai = pytest.importorskip("langchain_openai")

    class StandIn(ScriptedNChat):
        """Takes ChatOpenAI's arguments; answers from a script."""

        model: str = "gpt-4o-mini"
        temperature: float = 1.0

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(script=[[UNKNOWN, BAD_ARGS, GOOD, MISSING], [reply("6 times 7 is 42.")]], **kwargs)

    monkeypatch.setattr(langchain_openai, "ChatOpenAI", StandIn)
    doc = BestOfNChatModel.__doc__ or ""
    block = doc[doc.index(".. code-block:: python") :].split("\n", 1)[1]
    namespace: dict[str, Any] = {}
    exec(textwrap.dedent(block), namespace)  # trusted: our own docstring
    assert namespace["reply"].content == "6 times 7 is 42."
    candidates = namespace["messages"][1].response_metadata["best_of_n"]["candidates"]
    assert [c["validity"] for c in candidates] == [0.0, 0.0, 1.0, 0.0]


# --------------------------------------------------------------------------- middleware logic


@dataclass
class FakeRequest:
    """The fields of langchain's ModelRequest that the middleware reads."""

    messages: list[BaseMessage]
    tools: list[Any]
    tool_choice: Any = None
    system_prompt: str | None = None


@dataclass
class FakeResponse:
    """langchain's ModelResponse: result messages and an optional structured response."""

    result: list[BaseMessage]
    structured_response: Any = None


@dataclass
class Handler:
    replies: list[Any]
    seen: list[FakeRequest] = field(default_factory=list)

    def next(self, request: FakeRequest) -> Any:
        self.seen.append(request)
        out = self.replies[(len(self.seen) - 1) % len(self.replies)]
        if isinstance(out, BaseException):
            raise out
        return out

    def __call__(self, request: FakeRequest) -> Any:
        return self.next(request)


def test_middleware_logic_picks_the_best_handler_response():
    request = FakeRequest([HumanMessage("6 times 7?")], tools=[multiply], system_prompt="Be brief.")
    handler = Handler([FakeResponse([BAD_ARGS]), RuntimeError("flaky"), FakeResponse([GOOD]), FakeResponse([UNKNOWN])])
    out = BestOfNStep(n=4).wrap_model_call(request, handler)
    assert isinstance(out, FakeResponse) and out.result[0].tool_calls == GOOD.tool_calls
    meta = out.result[0].response_metadata["best_of_n"]
    assert meta["sampling"] == "handler" and len(meta["candidates"]) == 3
    assert any("RuntimeError: flaky" in w for w in meta["warnings"])
    assert len(handler.seen) == 4 and all(r is request for r in handler.seen)


def test_middleware_logic_structured_response_counts_as_valid_and_interrupts_pass():
    request = FakeRequest([HumanMessage("hi")], tools=[])
    structured = FakeResponse([reply(calls=[call("Answer", {"value": 1})]), ToolMessage("ok", tool_call_id="x")], 1)
    out = BestOfNStep(n=2).wrap_model_call(request, Handler([FakeResponse([reply("")]), structured]))
    assert out.structured_response == 1 and len(out.result) == 2

    class GraphInterrupt(Exception):
        """Named like LangGraph's: control flow, not a failure."""

    with pytest.raises(GraphInterrupt):
        BestOfNStep(n=3).wrap_model_call(request, Handler([FakeResponse([GOOD]), GraphInterrupt()]))
    with pytest.raises(RuntimeError, match="down"):
        BestOfNStep(n=2).wrap_model_call(request, Handler([RuntimeError("down")]))
    with pytest.raises(ValueError, match="n=0 is out of range"):
        BestOfNStep(n=0)


async def test_middleware_logic_async_runs_candidates_concurrently():
    request = FakeRequest([HumanMessage("6 times 7?")], tools=[multiply])
    running = 0
    peak = 0

    async def handler(req: FakeRequest) -> FakeResponse:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return FakeResponse([GOOD if peak == 3 and running == 0 else BAD_ARGS])

    out = await BestOfNStep(n=3).awrap_model_call(request, handler)
    assert peak == 3 and out.result[0].tool_calls == GOOD.tool_calls


def test_langchain_middleware_when_installed():
    middleware = pytest.importorskip("langchain.agents.middleware")
    from esamp_agents.recipes.tool_agent import BestOfNMiddleware

    bon = BestOfNMiddleware(n=2)
    assert isinstance(bon, middleware.AgentMiddleware) and bon.tools == []
    assert type(bon).wrap_model_call is not middleware.AgentMiddleware.wrap_model_call
    request = FakeRequest([HumanMessage("6 times 7?")], tools=[multiply])
    response = middleware.ModelResponse(result=[BAD_ARGS])
    good = middleware.ModelResponse(result=[GOOD])
    out = bon.wrap_model_call(request, Handler([response, good]))
    assert out.result[0].tool_calls == GOOD.tool_calls


def test_middleware_absent_without_langchain(monkeypatch):
    """langchain is a test dependency, so its absence is simulated: every ``langchain.*`` module is
    hidden (None in ``sys.modules`` makes its import fail) and tool_agent is loaded afresh."""
    import importlib.util
    import sys

    import esamp_agents.recipes as recipes
    import esamp_agents.recipes.tool_agent as installed

    for name in [n for n in sys.modules if n == "langchain" or n.startswith("langchain.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "langchain", None)
    with pytest.raises(ImportError):
        import langchain.agents.middleware  # noqa: F401
    spec = importlib.util.spec_from_file_location(installed.__name__, installed.__file__)
    assert spec is not None and spec.loader is not None
    bare = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, installed.__name__, bare)  # what recipes' lazy lookup finds
    spec.loader.exec_module(bare)

    assert not hasattr(bare, "BestOfNMiddleware") and "BestOfNMiddleware" not in bare.__all__
    with pytest.raises(AttributeError, match="optional langchain package"):
        recipes.BestOfNMiddleware  # noqa: B018
    # the langchain-free parts still work: the middleware's logic picks the valid reply
    request = FakeRequest([HumanMessage("6 times 7?")], tools=[multiply])
    out = bare.BestOfNStep(n=2).wrap_model_call(request, Handler([FakeResponse([BAD_ARGS]), FakeResponse([GOOD])]))
    assert out.result[0].tool_calls == GOOD.tool_calls
    assert recipes.BestOfNChatModel is bare.BestOfNChatModel
