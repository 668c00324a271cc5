"""Best-of-N at each model step of a tool-using agent.

An agent step is one chat-model call that answers or calls tools. A bad step (a tool call
that does not parse, names a tool that does not exist, or passes arguments the tool rejects)
costs a whole round trip or derails the run; sampling N replies and keeping the best one
catches most of them for the price of N samples, which a provider usually bills as extra
output tokens only.

- :class:`BestOfNChatModel` wraps any LangChain chat model and is itself one: use it
  wherever the model goes (``bind_tools``, a hand-written loop, LangGraph, ``create_agent``).
  Per call it gets N candidate replies, with one request when the model has an ``n`` field
  (``ChatOpenAI``, ``ChatESamp``), else with N parallel calls.
- :class:`BestOfNMiddleware` (only when the optional ``langchain`` v1 package is installed)
  does the same inside ``langchain.agents.create_agent`` by calling the model handler N times.

Choosing, for both: first by tool-call validity, the fraction of the reply's tool calls that
parse, name a bound tool and pass that tool's argument schema (a reply without tool calls
counts as valid when it has text and ``tool_choice`` does not require a tool; an empty reply
as invalid); then, among the most valid replies only, by the optional ``reward`` (higher is
better; NaN and inf rank worst, as in BestOfN, whose reward-calling and ranking helpers this
shares); ties go to the earliest candidate. The chosen ``AIMessage`` carries
``response_metadata["best_of_n"]`` with every candidate's validity, problems and reward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.messages.ai import add_usage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import run_in_executor
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from esamp_agents.selection.best_of_n import BestOfNError, has_n_field, unwrap_binding
from esamp_agents.selection.fusion import fuse
from esamp_agents.selection.rewards import ScoredCandidate, ascore_candidates, score_candidates
from esamp_agents.validation import check_int

SAMPLING_MODES: tuple[str, ...] = ("auto", "n", "parallel")
REQUIRED_CHOICES = frozenset({"any", "required"})

ArgsCheck = Callable[[Any], list[str]]
"""Arguments -> problems (empty when the arguments are valid)."""


# --------------------------------------------------------------------------- argument checks


def _json_type_ok(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float))
    return True  # an unknown type keyword: do not reject


def check_json_schema(value: Any, schema: Any, path: str = "args", root: Any = None) -> list[str]:
    """Problems of ``value`` against the JSON-schema subset tool schemas use.

    Checked: ``type``, ``enum``, ``const``, ``required``, ``properties``,
    ``additionalProperties: false``, ``items``, ``anyOf``/``oneOf``/``allOf`` and local ``$ref``.
    Anything else is accepted (the check must never reject a call the tool would take).
    """
    if not isinstance(schema, dict):
        return []
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return check_json_schema(value, target, path, root)
    problems: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_json_type_ok(value, k) for k in kinds):
            return [f"{path}: {json.dumps(value, default=str)[:60]} is not of type {'/'.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{path}: {value!r} is not {schema['const']!r}")
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and all(check_json_schema(value, o, path, root) for o in options):
            problems.append(f"{path}: matches none of the allowed shapes")
    for sub in schema.get("allOf") or []:
        problems.extend(check_json_schema(value, sub, path, root))
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                problems.append(f"{path}: missing required argument {name!r}")
        for name, item in value.items():
            if name in properties:
                problems.extend(check_json_schema(item, properties[name], f"{path}.{name}", root))
            elif schema.get("additionalProperties") is False:
                problems.append(f"{path}: unexpected argument {name!r}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems.extend(check_json_schema(item, schema["items"], f"{path}[{i}]", root))
    return problems


def _pydantic_check(model: type[BaseModel]) -> ArgsCheck:
    def check(args: Any) -> list[str]:
        try:
            model.model_validate(args)
        except ValidationError as exc:
            return [
                f"args.{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors(include_url=False)
            ]
        return []

    return check


def _schema_check(schema: Any) -> ArgsCheck:
    return lambda args: check_json_schema(args, schema)


def tool_checks(tools: Sequence[Any]) -> dict[str, ArgsCheck]:
    """Tool name -> argument check, for the tools an agent bound (any form ``bind_tools`` takes).

    ``BaseTool``: its ``tool_call_schema`` (the arguments the model supplies; injected ones are
    left out), validated as the tool will validate them. Pydantic classes: ``model_validate``.
    Functions, TypedDicts and dicts: their JSON schema. Provider built-in tools (dicts without
    a function schema) cannot be called by name and are skipped.
    """
    checks: dict[str, ArgsCheck] = {}
    for tool in tools:
        if isinstance(tool, BaseTool):
            schema = tool.tool_call_schema
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                checks[tool.name] = _pydantic_check(schema)
            else:
                checks[tool.name] = _schema_check(schema)
            continue
        if isinstance(tool, type) and issubclass(tool, BaseModel):
            checks[convert_to_openai_tool(tool)["function"]["name"]] = _pydantic_check(tool)
            continue
        try:
            converted = convert_to_openai_tool(tool)
        except Exception as exc:
            raise ValueError(f"tool {tool!r} cannot be converted to a tool schema: {exc}") from exc
        function = converted.get("function") if isinstance(converted, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            checks[function["name"]] = _schema_check(function.get("parameters") or {})
    return checks


def _required_tool(tool_choice: Any) -> tuple[bool, str | None]:
    """(a tool call is required, the tool it must be) for LangChain's ``tool_choice`` forms."""
    if tool_choice is None or tool_choice is False:
        return False, None
    if tool_choice is True:
        return True, None
    if isinstance(tool_choice, str):
        if tool_choice in ("auto", "none"):
            return False, None
        return (True, None) if tool_choice in REQUIRED_CHOICES else (True, tool_choice)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        return True, name if isinstance(name, str) else None
    return False, None


def check_tool_calls(
    message: AIMessage, checks: dict[str, ArgsCheck], tool_choice: Any = None
) -> tuple[float, list[str]]:
    """(validity in [0, 1], problems) of one reply: the fraction of its tool calls that are valid.

    A reply without tool calls scores 1 when it has text and ``tool_choice`` does not require
    a call, else 0; ``tool_choice="none"`` makes any tool call invalid.
    """
    problems: list[str] = []
    required, required_name = _required_tool(tool_choice)
    calls = list(message.tool_calls)
    broken = list(message.invalid_tool_calls)
    for bad in broken:
        problems.append(f"tool call {bad.get('name')!r} does not parse: {bad.get('error') or bad.get('args')!r}")
    if not calls and not broken:
        if required:
            return 0.0, [f"no tool call, but tool_choice={tool_choice!r} requires one"]
        if not str(message.text).strip():
            return 0.0, ["empty reply"]
        return 1.0, []
    if tool_choice == "none":
        return 0.0, [*problems, "tool calls, but tool_choice='none'"]
    good = 0
    for call in calls:
        name = call.get("name")
        if name not in checks:
            known = ", ".join(sorted(checks)) or "none"
            problems.append(f"tool {name!r} is not bound (bound: {known})")
            continue
        if required_name is not None and name != required_name:
            problems.append(f"tool {name!r} called, but tool_choice requires {required_name!r}")
            continue
        errors = checks[name](call.get("args"))
        if errors:
            problems.extend(f"{name}: {e}" for e in errors)
            continue
        good += 1
    return good / (len(calls) + len(broken)), problems


def render_reply(message: AIMessage) -> str:
    """A reply as text for text-based rewards (an LLM judge): its text, then one line per tool call."""
    lines = [str(message.text)] if str(message.text).strip() else []
    for call in message.tool_calls:
        lines.append(f"[tool call] {call.get('name')}({json.dumps(call.get('args'), default=str)})")
    for bad in message.invalid_tool_calls:
        lines.append(f"[unparsable tool call] {bad.get('name')}: {bad.get('args')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- choosing


@dataclass
class StepCandidate:
    """One candidate reply of an agent step and what the chooser made of it."""

    index: int
    message: AIMessage
    validity: float
    problems: list[str] = field(default_factory=list)
    reward: float | None = None
    """None when the reward was not computed (no reward, or not among the most valid)."""


def _check_reward(reward: Any) -> None:
    if reward is None:
        return
    if callable(getattr(reward, "score", None)):
        if not isinstance(getattr(reward, "name", None), str):
            raise ValueError(f"reward={reward!r} has no str .name; allowed: a Reward with a name")
        return
    if not callable(reward):
        raise ValueError(
            f"reward={reward!r} is not usable; allowed: a function (messages, reply) -> float, a Reward, or None"
        )


def _reward_name(reward: Any) -> str | None:
    if reward is None:
        return None
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


class _ReplyReward:
    """A function ``(messages, reply) -> float`` (sync or async) as a Reward over the candidates'
    AIMessages, so it is called, checked and named by the shared ``selection`` helpers."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = _reward_name(fn)

    def score(self, input: Any, candidates: Sequence[ScoredCandidate]) -> list[Any]:
        return [self.fn(input, c.output) for c in candidates]

    async def ascore(self, input: Any, candidates: Sequence[ScoredCandidate]) -> list[Any]:
        if not asyncio.iscoroutinefunction(self.fn):
            return await run_in_executor(None, self.score, input, candidates)
        return [await self.fn(input, c.output) for c in candidates]


def _as_reward(reward: Any) -> Any:
    return reward if callable(getattr(reward, "score", None)) else _ReplyReward(reward)


def _candidates_for(replies: list[AIMessage]) -> list[ScoredCandidate]:
    return [ScoredCandidate(i, m, render_reply(m), dict(m.response_metadata)) for i, m in enumerate(replies)]


def _assess(
    replies: list[AIMessage], tools: Sequence[Any] | None, tool_choice: Any, check_tools: bool, valid: list[bool]
) -> tuple[list[StepCandidate], list[int]]:
    """Validity of every reply, and the indices of the most valid ones (the reward's contenders)."""
    checks = tool_checks(tools or []) if check_tools else {}
    out = []
    for i, (reply, forced) in enumerate(zip(replies, valid, strict=True)):
        if forced or not check_tools:
            out.append(StepCandidate(i, reply, 1.0))
        else:
            validity, problems = check_tool_calls(reply, checks, tool_choice)
            out.append(StepCandidate(i, reply, validity, problems))
    top = max(c.validity for c in out)
    return out, [c.index for c in out if c.validity == top]


def _pick(candidates: list[StepCandidate], contenders: list[int]) -> int:
    """The best-rewarded contender, ranked as BestOfN ranks (``selection.fusion``: NaN/inf
    worst, ties to the earliest); without reward scores, the earliest contender."""
    scores = [candidates[i].reward for i in contenders]
    if len(contenders) == 1 or any(s is None for s in scores):
        return contenders[0]
    try:
        order = fuse({"reward": [float(s) for s in scores if s is not None]}).order
    except ValueError:  # every score is non-finite: nothing to rank by
        return contenders[0]
    return contenders[order[0]]


def _annotate(
    candidates: list[StepCandidate], chosen: int, mode: str, warnings: list[str], reward: Any, n: int
) -> AIMessage:
    message = candidates[chosen].message
    metadata = {
        "chosen_index": chosen,
        "n": n,
        "sampling": mode,
        "reward": _reward_name(reward),
        "candidates": [
            {
                "index": c.index,
                "validity": c.validity,
                "problems": list(c.problems),
                "reward": c.reward,
                "tool_calls": [call.get("name") for call in c.message.tool_calls],
                "text": str(c.message.text)[:200],
            }
            for c in candidates
        ],
        "warnings": warnings,
    }
    return message.model_copy(update={"response_metadata": {**message.response_metadata, "best_of_n": metadata}})


def choose_reply(
    messages: Sequence[BaseMessage],
    replies: Sequence[AIMessage],
    *,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    reward: Any = None,
    check_tools: bool = True,
    valid: Sequence[bool] | None = None,
) -> tuple[int, list[StepCandidate]]:
    """The index of the best reply and every candidate's assessment (see the module docstring).

    ``valid[i] = True`` marks a reply as valid whatever its tool calls (e.g. a parsed structured response).
    """
    _check_reward(reward)
    replies = list(replies)
    if not replies:
        raise ValueError("replies is empty; allowed: at least one AIMessage")
    flags = [False] * len(replies) if valid is None else list(valid)
    candidates, contenders = _assess(replies, tools, tool_choice, check_tools, flags)
    if reward is not None and len(contenders) > 1:
        scores = score_candidates(_as_reward(reward), list(messages), _candidates_for([replies[i] for i in contenders]))
        for i, s in zip(contenders, scores, strict=True):
            candidates[i].reward = s
    return _pick(candidates, contenders), candidates


async def achoose_reply(
    messages: Sequence[BaseMessage],
    replies: Sequence[AIMessage],
    *,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    reward: Any = None,
    check_tools: bool = True,
    valid: Sequence[bool] | None = None,
) -> tuple[int, list[StepCandidate]]:
    """Async :func:`choose_reply` (uses the reward's ``ascore`` when it has one)."""
    _check_reward(reward)
    replies = list(replies)
    if not replies:
        raise ValueError("replies is empty; allowed: at least one AIMessage")
    flags = [False] * len(replies) if valid is None else list(valid)
    candidates, contenders = _assess(replies, tools, tool_choice, check_tools, flags)
    if reward is not None and len(contenders) > 1:
        scores = await ascore_candidates(
            _as_reward(reward), list(messages), _candidates_for([replies[i] for i in contenders])
        )
        for i, s in zip(contenders, scores, strict=True):
            candidates[i].reward = s
    return _pick(candidates, contenders), candidates


# --------------------------------------------------------------------------- the chat model


class BestOfNChatModel(BaseChatModel):
    """A chat model that samples N replies from ``model`` per call and returns the best one.

    ``bind_tools`` binds the tools on the wrapped model (so it sends them to the provider)
    and keeps them to check the candidates' tool calls. Sampling (``sampling``): ``"n"``
    asks the model for N replies in one request (models with an ``n`` field: ``ChatOpenAI``,
    ``ChatESamp``); ``"parallel"`` makes N calls (at most ``max_concurrency`` at once);
    ``"auto"`` (default) picks ``"n"`` when the model has an ``n`` field. Use a sampling
    temperature above 0, or the N replies are the same. A failed parallel call drops that
    candidate (noted in the metadata); if every call fails, :class:`BestOfNError` says why.

    ``reward`` ranks the most valid replies: a function ``(messages, reply) -> float``, or a
    Reward object (``score(messages, candidates)``, e.g. an ``LLMJudgeReward``: each
    candidate's ``.text`` lists its tool calls, ``.output`` is the AIMessage). It is only
    called when more than one reply ties on validity. ``check_tools=False`` skips the
    validity check (the reward alone decides).

    Callbacks and traces see one model run per step (the candidate calls run without the
    caller's callbacks, so a streaming UI does not show N interleaved drafts); the returned
    message's ``usage_metadata`` is the whole step's usage, over all candidates. Streaming
    yields the chosen reply once, when it is known.

    Example (needs an OpenAI key; the tests run it against a scripted stand-in):
        .. code-block:: python

            from langchain_core.messages import HumanMessage
            from langchain_core.tools import tool
            from langchain_openai import ChatOpenAI

            from esamp_agents.recipes.tool_agent import BestOfNChatModel


            @tool
            def multiply(a: int, b: int) -> int:
                \"\"\"Multiply two integers.\"\"\"
                return a * b


            model = BestOfNChatModel(ChatOpenAI(model="gpt-4o-mini", temperature=1.0), n=4)
            agent_model = model.bind_tools([multiply])
            messages = [HumanMessage("What is 6 times 7? Use the multiply tool.")]
            while True:  # the agent loop: model -> tools -> model ...
                reply = agent_model.invoke(messages)
                messages.append(reply)
                if not reply.tool_calls:
                    break
                messages.extend(multiply.invoke(call) for call in reply.tool_calls)  # ToolMessages
            print(reply.content)
            print(messages[1].response_metadata["best_of_n"]["candidates"])
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: BaseChatModel
    """The chat model to sample from."""
    n: int = 4
    """Candidate replies per call."""
    reward: Any = None
    """Optional ranking among the most valid replies (see the class docstring)."""
    check_tools: bool = True
    sampling: str = "auto"
    max_concurrency: int | None = None
    tools: list[Any] | None = Field(default=None, exclude=True)
    """The tools given to ``bind_tools`` (set by it)."""
    tool_choice: Any = Field(default=None, exclude=True)
    bound_model: Any = Field(default=None, exclude=True, repr=False)
    """``model.bind_tools(tools, ...)`` (set by ``bind_tools``)."""

    def __init__(self, model: Any = None, /, **kwargs: Any) -> None:
        if model is not None:
            if "model" in kwargs:
                raise ValueError("model given twice (positionally and as model=); allowed: one of them")
            kwargs["model"] = model
        super().__init__(**kwargs)

    @model_validator(mode="after")
    def _validate(self) -> BestOfNChatModel:
        """Bad values fail at construction, naming the value and the allowed range."""
        check_int("n", self.n, 1)
        check_int("max_concurrency", self.max_concurrency, 1, allow_none=True)
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling={self.sampling!r} is unknown; allowed: {', '.join(map(repr, SAMPLING_MODES))}")
        if self.sampling == "n" and not has_n_field(self.model):
            raise ValueError(
                f"sampling='n' but {type(self.model).__name__} has no n field; allowed: 'parallel' or 'auto'"
            )
        _check_reward(self.reward)
        return self

    @property
    def _llm_type(self) -> str:
        return "best-of-n-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        inner = getattr(self.model, "_identifying_params", {})
        return {"n": self.n, "sampling": self.sampling, "reward": _reward_name(self.reward), "model": inner}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        """Traces name the wrapped model (provider, model name), not the wrapper."""
        try:
            return self.model._get_ls_params(stop=stop, **kwargs)
        except Exception:
            return super()._get_ls_params(stop=stop, **kwargs)

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Bind ``tools`` on the wrapped model; the returned wrapper checks calls against them."""
        tool_checks(tools)  # unusable tool definitions fail now, not at the first step
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.model.bind_tools(tools, **kwargs)
        return self.model_copy(update={"tools": list(tools), "tool_choice": tool_choice, "bound_model": bound})

    def _mode(self) -> str:
        if self.sampling != "auto":
            return self.sampling
        return "n" if has_n_field(self.model) else "parallel"

    def _inner(self) -> Any:
        return self.bound_model if self.bound_model is not None else self.model

    def _native_call(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        base, bound = unwrap_binding(self._inner())
        # stream=False: N replies cannot be streamed, even when a streaming callback is attached.
        return base, {**bound, **kwargs, "n": self.n, "stream": False, "stop": stop}

    def _config(self) -> RunnableConfig:
        # No callbacks for the candidate calls: the step is one model run, whose usage is the total.
        config: RunnableConfig = {"callbacks": []}
        if self.max_concurrency is not None:
            config["max_concurrency"] = self.max_concurrency
        return config

    @staticmethod
    def _collect(outputs: Sequence[Any]) -> tuple[list[AIMessage], list[str]]:
        replies, warnings, errors = [], [], []
        for i, out in enumerate(outputs):
            if isinstance(out, BaseException):
                errors.append(out)
                warnings.append(f"candidate {i} failed: {type(out).__name__}: {out}")
            elif isinstance(out, AIMessage):
                replies.append(out)
            else:
                warnings.append(f"candidate {i} is a {type(out).__name__}, not an AIMessage; dropped")
        if not replies:
            first = errors[0] if errors else None
            raise BestOfNError(f"all {len(outputs)} candidates failed: {'; '.join(warnings)}") from first
        return replies, warnings

    @staticmethod
    def _replies(generations: Sequence[Any]) -> list[AIMessage]:
        replies = [g.message for g in generations if isinstance(getattr(g, "message", None), AIMessage)]
        if not replies:
            raise BestOfNError("the model returned no candidate replies")
        return replies

    def _result(
        self, replies: list[AIMessage], chosen: int, candidates: list[StepCandidate], mode: str, warnings: list[str]
    ) -> ChatResult:
        if len(replies) != self.n:
            warnings = [*warnings, f"{len(replies)} candidates for n={self.n}"]
        message = _annotate(candidates, chosen, mode, warnings, self.reward, self.n)
        usages = [r.usage_metadata for r in replies if r.usage_metadata]
        if usages:
            # n-mode: every reply carries the whole request's usage; parallel: one call each, so sum.
            total = usages[0] if mode == "n" else functools.reduce(add_usage, usages)
            message = message.model_copy(update={"usage_metadata": total})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        kwargs.pop("n", None)  # the number of candidates is this wrapper's n, not a per-call option
        mode, warnings = self._mode(), []
        if mode == "n":
            base, call = self._native_call(stop, kwargs)
            try:
                result = base.generate([messages], callbacks=[], **call)
            except Exception as exc:
                raise BestOfNError(f"sampling {self.n} replies failed: {type(exc).__name__}: {exc}") from exc
            replies = self._replies(result.generations[0])
        else:
            outputs = self._inner().batch(
                [messages] * self.n, self._config(), return_exceptions=True, stop=stop, **kwargs
            )
            replies, warnings = self._collect(outputs)
        chosen, candidates = choose_reply(
            messages,
            replies,
            tools=self.tools,
            tool_choice=self.tool_choice,
            reward=self.reward,
            check_tools=self.check_tools,
        )
        return self._result(replies, chosen, candidates, mode, warnings)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        kwargs.pop("n", None)  # the number of candidates is this wrapper's n, not a per-call option
        mode, warnings = self._mode(), []
        if mode == "n":
            base, call = self._native_call(stop, kwargs)
            try:
                result = await base.agenerate([messages], callbacks=[], **call)
            except Exception as exc:
                raise BestOfNError(f"sampling {self.n} replies failed: {type(exc).__name__}: {exc}") from exc
            replies = self._replies(result.generations[0])
        else:
            outputs = await self._inner().abatch(
                [messages] * self.n, self._config(), return_exceptions=True, stop=stop, **kwargs
            )
            replies, warnings = self._collect(outputs)
        chosen, candidates = await achoose_reply(
            messages,
            replies,
            tools=self.tools,
            tool_choice=self.tool_choice,
            reward=self.reward,
            check_tools=self.check_tools,
        )
        return self._result(replies, chosen, candidates, mode, warnings)


# --------------------------------------------------------------------------- agent middleware


def _is_control_flow(exc: BaseException) -> bool:
    """LangGraph interrupts and commands travel as exceptions: they must pass through, not count as failures."""
    return any(cls.__name__ in ("GraphBubbleUp", "GraphInterrupt", "ParentCommand") for cls in type(exc).__mro__)


class BestOfNStep:
    """The middleware's logic, free of ``langchain`` so it works (and is tested) without it.

    ``wrap_model_call(request, handler)`` calls ``handler(request)`` ``n`` times (one after
    another; ``awrap_model_call`` runs them concurrently) and returns the best response, as
    :class:`BestOfNChatModel` chooses, checking tool calls against ``request.tools`` and
    ``request.tool_choice``. A response with a parsed ``structured_response`` counts as valid.
    """

    def __init__(self, n: int = 4, *, reward: Any = None, check_tools: bool = True) -> None:
        check_int("n", n, 1)
        _check_reward(reward)
        self.n = n
        self.reward = reward
        self.check_tools = check_tools
        self.tools: list[Any] = []  # middleware-provided tools: none

    @staticmethod
    def _reply_of(response: Any) -> AIMessage | None:
        if isinstance(response, AIMessage):
            return response
        for message in getattr(response, "result", None) or []:
            if isinstance(message, AIMessage):
                return message
        return None

    @staticmethod
    def _messages(request: Any) -> list[BaseMessage]:
        system = getattr(request, "system_prompt", None)
        head: list[BaseMessage] = [SystemMessage(system)] if system else []
        return head + list(request.messages)

    def _gathered(self, outputs: list[Any]) -> tuple[list[Any], list[AIMessage], list[bool], list[str]]:
        responses, replies, valid, warnings, errors = [], [], [], [], []
        for i, out in enumerate(outputs):
            if isinstance(out, BaseException):
                if _is_control_flow(out):
                    raise out
                errors.append(out)
                warnings.append(f"candidate {i} failed: {type(out).__name__}: {out}")
                continue
            reply = self._reply_of(out)
            if reply is None:
                warnings.append(f"candidate {i} has no AIMessage; dropped")
                continue
            responses.append(out)
            replies.append(reply)
            valid.append(getattr(out, "structured_response", None) is not None)
        if not replies:
            if errors and len(errors) == len(outputs):
                raise errors[0]
            raise BestOfNError(f"all {len(outputs)} candidates failed: {'; '.join(warnings)}")
        return responses, replies, valid, warnings

    def _finish(
        self,
        responses: list[Any],
        replies: list[AIMessage],
        chosen: int,
        candidates: list[StepCandidate],
        warnings: list[str],
    ) -> Any:
        response, old = responses[chosen], replies[chosen]
        new = _annotate(candidates, chosen, "handler", warnings, self.reward, self.n)
        if isinstance(response, AIMessage):
            return new
        result = [new if m is old else m for m in response.result]
        return dataclasses.replace(response, result=result)

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        outputs: list[Any] = []
        for _ in range(self.n):
            try:
                outputs.append(handler(request))
            except Exception as exc:
                if _is_control_flow(exc):
                    raise
                outputs.append(exc)
        responses, replies, valid, warnings = self._gathered(outputs)
        chosen, candidates = choose_reply(
            self._messages(request),
            replies,
            tools=getattr(request, "tools", None),
            tool_choice=getattr(request, "tool_choice", None),
            reward=self.reward,
            check_tools=self.check_tools,
            valid=valid,
        )
        return self._finish(responses, replies, chosen, candidates, warnings)

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        outputs = list(await asyncio.gather(*(handler(request) for _ in range(self.n)), return_exceptions=True))
        responses, replies, valid, warnings = self._gathered(outputs)
        chosen, candidates = await achoose_reply(
            self._messages(request),
            replies,
            tools=getattr(request, "tools", None),
            tool_choice=getattr(request, "tool_choice", None),
            reward=self.reward,
            check_tools=self.check_tools,
            valid=valid,
        )
        return self._finish(responses, replies, chosen, candidates, warnings)


try:  # optional: langchain v1 agents (pip install langchain)
    from langchain.agents.middleware import AgentMiddleware as _AgentMiddleware
except ImportError:  # langchain is an optional extra
    _AgentMiddleware = None

if _AgentMiddleware is not None:

    class BestOfNMiddleware(BestOfNStep, _AgentMiddleware):  # type: ignore[misc, valid-type]
        """Best-of-N at every model call of ``langchain.agents.create_agent`` (see :class:`BestOfNStep`).

        Example:
            .. code-block:: python

                from langchain.agents import create_agent
                from langchain_openai import ChatOpenAI

                from esamp_agents.recipes.tool_agent import BestOfNMiddleware

                agent = create_agent(
                    ChatOpenAI(model="gpt-4o-mini", temperature=1.0),
                    tools=[multiply],
                    middleware=[BestOfNMiddleware(n=4)],
                )
                agent.invoke({"messages": [("user", "What is 6 times 7?")]})
        """

        def __init__(self, n: int = 4, *, reward: Any = None, check_tools: bool = True) -> None:
            BestOfNStep.__init__(self, n, reward=reward, check_tools=check_tools)


__all__ = [
    "SAMPLING_MODES",
    "BestOfNChatModel",
    "BestOfNStep",
    "StepCandidate",
    "achoose_reply",
    "check_json_schema",
    "check_tool_calls",
    "choose_reply",
    "render_reply",
    "tool_checks",
]
if _AgentMiddleware is not None:
    __all__ += ["BestOfNMiddleware"]
