"""An offline tool-using agent: arithmetic word problems solved with a calculator tool.

Everything runs on the embedded SmolLM2-135M-Instruct with no API key. A 135M model cannot do
two-digit arithmetic in its head, but it can often copy two numbers and pick an operation, which
is what a tool call asks of it; the calculator does the arithmetic exactly.

- :func:`calculate` / :data:`calculator`: ``a op b`` for ``op`` in ``+ - * /``, by exact
  fractions (no ``eval``); division by zero is a clear error the agent sees as the tool result.
  Structured arguments (two numbers and an enum operator) suit a tiny model far better than a
  free-form expression string, and grammar-constrained decoding makes every call well-formed.
- :func:`~esamp_agents.recipes.word_problems.generate_word_problems` (module
  ``word_problems``, re-exported here): seeded two-digit word problems (add, take away, equal
  groups, share equally) with exact integer answers; a problem's split is a stable hash of its
  arithmetic fact, so held-out (``"test"``) facts never appear in the prompt's examples.
- :class:`ToolStepPolicy` / :class:`ToolStepMiddleware`: the small model almost never chooses
  a tool on its own (``tool_choice="auto"`` gets a text answer), so the policy forces a tool
  call on the first model step and text after a tool result came back, optionally constraining
  that final reply to ``"The answer is <number>."`` (without it the 135M model often writes
  something that is not an answer at all).
- :func:`calculator_agent`: the policy and the calculator in ``langchain.agents.create_agent``
  on ``ChatESamp`` (greedy); :func:`best_of_n_calculator_agent`: the same with
  :class:`~esamp_agents.recipes.tool_agent.BestOfNChatModel` over ``ChatESamp(n=N)`` (one
  batched ESamp decode per step) and :class:`CallVoteReward`, which prefers calls whose numbers
  appear in the question and that most candidates agree on (grammar-constrained calls are always
  valid, so validity alone cannot tell the candidates apart); :func:`direct_answers`: the
  no-tool baseline (same model, step-by-step answer, then ``Answer: <number>``).
- :func:`solve` runs an agent on one problem and returns an :class:`AgentAnswer` (the final
  number, the tool calls and results) so a benchmark can score it.

Measured (``benchmarks/calculator_agent.py``, BENCHMARKS.md section 10, 32 held-out problems):
direct 2/32, the greedy agent 15/32, Best-of-N (N=4, T=0.7, ESamp beta 0.25) 8/32. The agent's
calls always used the question's numbers and its final reply always stated the tool's result;
what it gets wrong is the operator (it never chose ``-`` or ``/``), which sampling and voting do
not fix, so the greedy agent is the one to use on this model.

Example:
    .. code-block:: python

        from esamp_agents.recipes.calculator_agent import calculator_agent, generate_word_problems, solve

        agent = calculator_agent()
        problem = generate_word_problems(1, seed=0)[0]
        result = solve(agent, problem)
        print(problem.question, "->", result.answer, result.tool_calls, result.correct)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import StructuredTool, ToolException

from esamp_agents.evaluation.tasks import (
    DEFAULT_SUFFIX,
    Problem,
    answers_match,
    extract_answer,
)
from esamp_agents.recipes.word_problems import (
    FAMILIES,
    TASK,
    generate_word_problems,
    problem_numbers,
    worked_example,
)
from esamp_agents.validation import check_int, check_range

OPS: tuple[str, ...] = ("+", "-", "*", "/")
TOOL_NAME = "calculator"
ANSWER_PATTERN = r"The answer is -?[0-9]{1,12}(\.[0-9]{1,6})?\."
"""The final reply's format when the policy constrains it (:class:`ToolStepPolicy`)."""

DEFAULT_MAX_TOKENS = 48
DEFAULT_DIRECT_MAX_TOKENS = 96
DEFAULT_N = 4
# Best-of-N's defaults: the measured better setting (BENCHMARKS.md section 10: T=0.3 with plain
# sampling matched the greedy agent, 15/32; T=0.7 with ESamp beta 0.25 lost 7 problems of them).
DEFAULT_TEMPERATURE = 0.3
DEFAULT_BETA = 0.0

# --------------------------------------------------------------------------- the calculator tool


class CalculatorError(ToolException, ValueError):
    """A calculation that cannot be done (division by zero, a non-finite or non-numeric operand,
    an unknown operator). A ``ToolException``, so in an agent it becomes the tool's result text
    (the model sees the error) instead of ending the run."""


def _exact(name: str, value: Any) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CalculatorError(f"{name}={value!r} is not a number; allowed: a finite int or float")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"{name}={value!r} is not finite; allowed: a finite int or float")
    return Fraction(str(value)) if isinstance(value, float) else Fraction(value)


def format_number(value: Fraction | float | int) -> int | float:
    """An exact result as the tool reports it: an ``int`` when whole, else a float rounded to 10 places
    (``12.0`` -> ``12``, so the model copies "12", not "12.0")."""
    value = Fraction(value)
    return int(value) if value.denominator == 1 else round(float(value), 10)


def calculate(a: float, op: str, b: float) -> int | float:
    """``a op b`` computed exactly (fractions, so ``0.1 + 0.2`` is ``0.3``); no ``eval``.

    Raises :class:`CalculatorError` (naming the value and what is allowed) for an unknown ``op``,
    a non-finite operand or division by zero.
    """
    if op not in OPS:
        raise CalculatorError(f"op={op!r} is unknown; allowed: {', '.join(map(repr, OPS))}")
    x, y = _exact("a", a), _exact("b", b)
    if op == "+":
        return format_number(x + y)
    if op == "-":
        return format_number(x - y)
    if op == "*":
        return format_number(x * y)
    if y == 0:
        raise CalculatorError(f"b={b!r}: division by zero; allowed: b != 0 when op='/'")
    return format_number(x / y)


CALCULATOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "a": {"type": "number"},
        "op": {"type": "string", "enum": list(OPS)},
        "b": {"type": "number"},
    },
    "required": ["a", "op", "b"],
    "additionalProperties": False,
}
"""The calculator's arguments: two numbers and an operator enum (the grammar allows only those four).

A JSON schema rather than a pydantic model because LangChain's tool conversion drops a pydantic
model's ``additionalProperties: false``, and without it the grammar lets the small model invent
arguments (it wrote ``"type": "number"`` next to ``b``). :func:`calculate` checks the values itself."""


calculator = StructuredTool.from_function(
    func=calculate,
    name=TOOL_NAME,
    description="Compute a op b exactly for two numbers a and b and an operator op (+, -, *, /).",
    args_schema=CALCULATOR_SCHEMA,
    handle_tool_error=True,
)
"""The calculator as a LangChain tool (errors come back to the model as the result text)."""


# --------------------------------------------------------------------------- prompt

SYSTEM_PROMPT = (
    "You solve arithmetic word problems with the calculator tool. Call it once with the two numbers "
    "from the problem and the operation: '+' when things are added or combined, '-' when some are "
    "taken away, '*' for equal groups, '/' when something is shared or split equally. "
    "When the result comes back, reply with 'The answer is <result>.'"
)
"""Why the operation hints: the 135M model copies numbers well but picks the operator poorly."""


def example_messages() -> list[BaseMessage]:
    """Worked examples as conversation turns, one per operation (question, call, result, answer).

    Turns rather than text in the system prompt: on 16 train-split problems the greedy 135M model
    got 8 right with them, 5 with the same examples written into the system prompt. The facts come
    from the train split only, so held-out problems never share one.
    """
    out: list[BaseMessage] = []
    for i, family in enumerate(FAMILIES):
        question, op, a, b, answer = worked_example(family)
        call_id = f"call_example_{i}"
        out += [
            HumanMessage(question),
            AIMessage("", tool_calls=[{"name": TOOL_NAME, "args": {"a": a, "op": op, "b": b}, "id": call_id}]),
            ToolMessage(str(answer), tool_call_id=call_id, name=TOOL_NAME),
            AIMessage(f"The answer is {answer}."),
        ]
    return out


# --------------------------------------------------------------------------- the tool-step policy


def _after_tool_result(messages: Sequence[BaseMessage]) -> bool:
    """Whether a tool result came back since the last user message."""
    for message in reversed(list(messages)):
        if isinstance(message, ToolMessage):
            return True
        if isinstance(message, HumanMessage):
            return False
    return False


class ToolStepPolicy:
    """Which ``tool_choice`` each model step of the agent gets, free of ``langchain`` (testable alone).

    Before any tool result since the last user message: ``first`` (default ``"any"``: a tool call
    is forced, because the 135M model answers in text when it may choose). After a tool result:
    ``"none"`` (answer in text), and, when ``answer_pattern`` is set (default
    :data:`ANSWER_PATTERN`), the reply is constrained to that regex so it states a number.
    ``examples`` (messages, e.g. :func:`example_messages`) go before the conversation in every
    model request, not into the agent's state. ``wrap_model_call(request, handler)`` passes
    ``handler`` the request with those settings.
    """

    def __init__(
        self,
        first: str = "any",
        answer_pattern: str | None = ANSWER_PATTERN,
        examples: Sequence[BaseMessage] = (),
    ) -> None:
        if not isinstance(first, str) or not first or first == "none":
            raise ValueError(
                f"first={first!r} is not usable; allowed: 'any', 'required', 'auto' or a tool name ('none' never calls)"
            )
        if answer_pattern is not None and not isinstance(answer_pattern, str):
            raise ValueError(f"answer_pattern={answer_pattern!r} is not usable; allowed: a regex string or None")
        bad = [type(m).__name__ for m in examples if not isinstance(m, BaseMessage)]
        if bad:
            raise ValueError(f"examples has a {bad[0]}; allowed: LangChain messages only")
        self.first = first
        self.answer_pattern = answer_pattern
        self.examples = list(examples)
        self._grammar: Any = None
        if answer_pattern is not None:
            from esamp_agents.constrained import Grammar

            self._grammar = Grammar.regex(answer_pattern)  # a bad pattern fails here, not at the last step

    def tool_choice(self, messages: Sequence[BaseMessage]) -> str:
        """``"none"`` after a tool result, else ``first``."""
        return "none" if _after_tool_result(messages) else self.first

    def settings(self, request: Any) -> dict[str, Any]:
        """The request's overrides for this step: ``tool_choice``, ``messages`` (examples first)
        and, on the final step with an answer pattern, ``model_settings["grammar"]``."""
        choice = self.tool_choice(request.messages)
        update: dict[str, Any] = {"tool_choice": choice}
        if self.examples:
            update["messages"] = [*self.examples, *request.messages]
        if choice == "none" and self._grammar is not None:
            update["model_settings"] = {**(getattr(request, "model_settings", None) or {}), "grammar": self._grammar}
        return update

    def prepare(self, request: Any) -> Any:
        """``request`` with :meth:`settings` applied (``override`` for a ModelRequest, else a dataclass copy)."""
        update = self.settings(request)
        if hasattr(request, "override"):
            return request.override(**update)
        return dataclasses.replace(request, **update)

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        return handler(self.prepare(request))

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        return await handler(self.prepare(request))


try:  # langchain v1 agents (a dependency of this recipe's agent functions)
    from langchain.agents.middleware import AgentMiddleware as _AgentMiddleware
except ImportError:  # pragma: no cover - exercised by a test that hides langchain
    _AgentMiddleware = None

if _AgentMiddleware is not None:

    class ToolStepMiddleware(ToolStepPolicy, _AgentMiddleware):  # type: ignore[misc, valid-type]
        """:class:`ToolStepPolicy` as ``langchain.agents`` middleware (``create_agent(middleware=[...])``)."""

        def __init__(
            self,
            first: str = "any",
            answer_pattern: str | None = ANSWER_PATTERN,
            examples: Sequence[BaseMessage] = (),
        ) -> None:
            ToolStepPolicy.__init__(self, first, answer_pattern, examples)


def _need_langchain() -> None:
    if _AgentMiddleware is None:
        raise ImportError("the calculator agent needs the langchain package (v1): pip install langchain")


# --------------------------------------------------------------------------- Best-of-N reward


def _call_key(message: AIMessage) -> tuple[Any, ...] | None:
    calls = [c for c in message.tool_calls if c.get("name") == TOOL_NAME]
    if not calls:
        return None
    args = calls[0].get("args") or {}
    try:
        return (Fraction(str(args.get("a"))), args.get("op"), Fraction(str(args.get("b"))))
    except (ValueError, TypeError, ZeroDivisionError):
        return None


def _text_key(message: AIMessage) -> Any:
    answer = extract_answer(str(message.text))
    return None if answer is None else answer.rstrip(".")


class CallVoteReward:
    """Ranks a step's candidate replies: grounding plus agreement, in [0, 2].

    Grammar-constrained calls are always valid, so Best-of-N's validity check cannot tell them
    apart; this reward can. For a calculator call: the share of its two numbers that appear in
    the last user message (a call on numbers the problem does not mention is wrong), plus the
    share of candidates that made the same call (self-consistency over ``(a, op, b)``). For a text
    reply after a tool result: 1 if its answer equals the last tool result, plus the share of
    candidates with the same answer.
    """

    name = "call_vote"

    def score(self, input: Any, candidates: Sequence[Any]) -> list[float]:
        messages = list(input)
        last = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1)
        numbers_ = set(problem_numbers(str(messages[last].text))) if last >= 0 else set()
        results = [m for m in messages[last + 1 :] if isinstance(m, ToolMessage)]
        result = results[-1] if results else None
        replies = [c.output for c in candidates]
        keys = [_call_key(r) if r.tool_calls else _text_key(r) for r in replies]
        counts = Counter(k for k in keys if k is not None)
        scores = []
        for reply, key in zip(replies, keys, strict=True):
            if key is None:
                scores.append(0.0)
                continue
            agreement = counts[key] / len(replies)
            if reply.tool_calls:
                grounding = (int(key[0] in numbers_) + int(key[2] in numbers_)) / 2
            else:
                grounding = float(result is not None and answers_match(key, str(result.text)))
            scores.append(grounding + agreement)
        return scores


# --------------------------------------------------------------------------- agents


def _check_common(max_tokens: int, seed: int | None) -> None:
    check_int("max_tokens", max_tokens, 8, 4096)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an integer or None")


def _chat(**kwargs: Any) -> Any:
    from esamp_agents.langchain.chat_model import ChatESamp

    return ChatESamp(**kwargs)


def calculator_agent(
    model: Any = None,
    *,
    examples: bool = True,
    answer_pattern: str | None = ANSWER_PATTERN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int | None = 0,
    middleware: Sequence[Any] = (),
) -> Any:
    """A ``create_agent`` agent with the calculator and :class:`ToolStepMiddleware`.

    ``model``: any LangChain chat model with ``bind_tools``; default ``ChatESamp`` on the embedded
    model, greedy (temperature 0, ESamp off: one reply per step, so no reason to explore).
    ``examples``: show :func:`example_messages` (one worked call per operation) before each
    request. ``answer_pattern``: the
    final reply's regex (None: free text). ``middleware``: more middleware, run inside the policy
    (so it sees the policy's ``tool_choice``).
    """
    _need_langchain()
    from langchain.agents import create_agent

    _check_common(max_tokens, seed)
    if model is None:
        model = _chat(max_tokens=max_tokens, temperature=0.0, beta=0.0, seed=seed)
    return create_agent(
        model,
        tools=[calculator],
        system_prompt=SYSTEM_PROMPT,
        middleware=[
            ToolStepMiddleware(answer_pattern=answer_pattern, examples=example_messages() if examples else ()),
            *middleware,
        ],
    )


def best_of_n_calculator_agent(
    n: int = DEFAULT_N,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = DEFAULT_BETA,
    reward: Any = "default",
    examples: bool = True,
    answer_pattern: str | None = ANSWER_PATTERN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int | None = 0,
) -> Any:
    """:func:`calculator_agent` choosing each step among ``n`` candidates.

    The model is :class:`~esamp_agents.recipes.tool_agent.BestOfNChatModel` around
    ``ChatESamp(n=n, temperature, beta)``: one batched decode of ``n`` replies per step (ESamp
    on when ``beta > 0``, pushing the replies apart), chosen by tool-call validity, then by
    ``reward`` (default :class:`CallVoteReward`; None: the first valid reply). The defaults
    (T=0.3, plain sampling) are the better of the two measured settings; exploration (T=0.7,
    ESamp beta 0.25) spread the operator choice and lost (BENCHMARKS.md section 10).
    """
    from esamp_agents.recipes.tool_agent import BestOfNChatModel

    check_int("n", n, 1, 64)
    check_range("temperature", temperature, 0.0, 5.0, allowed="0 <= temperature <= 5")
    check_range("beta", beta, 0.0, 10.0, allowed="0 <= beta <= 10")
    _check_common(max_tokens, seed)
    if isinstance(reward, str):
        if reward != "default":
            raise ValueError(f"reward={reward!r} is unknown; allowed: 'default', None, or a reward")
        reward = CallVoteReward()
    base = _chat(n=n, max_tokens=max_tokens, temperature=temperature, beta=beta, seed=seed)
    model = BestOfNChatModel(base, n=n, reward=reward)
    return calculator_agent(model, examples=examples, answer_pattern=answer_pattern, max_tokens=max_tokens, seed=seed)


# --------------------------------------------------------------------------- running


@dataclass
class AgentAnswer:
    """What one run on one problem gave: the final answer and how it got there."""

    question: str
    answer: str | None
    """The number stated in the final reply (None when it states none)."""
    final_text: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Every tool call's arguments, in order."""
    tool_results: list[str] = field(default_factory=list)
    """Every tool result's text, in order (an error message when the tool refused)."""
    reference: str | None = None
    correct: bool | None = None
    """Whether ``answer`` matches ``reference`` (None without a reference)."""
    messages: list[BaseMessage] = field(default_factory=list, repr=False)

    @property
    def tool_result_correct(self) -> bool | None:
        """Whether the last tool result already was the right answer (None without a reference)."""
        if self.reference is None:
            return None
        return bool(self.tool_results) and answers_match(self.tool_results[-1], self.reference)


def _question(problem: Problem | str) -> tuple[str, str | None]:
    if isinstance(problem, Problem):
        return problem.question, problem.answer
    if isinstance(problem, str) and problem.strip():
        return problem, None
    raise ValueError(f"problem={problem!r} is not usable; allowed: a Problem or a non-empty question string")


def solve(agent: Any, problem: Problem | str, *, recursion_limit: int = 8) -> AgentAnswer:
    """Run ``agent`` (from :func:`calculator_agent`) on one problem; the answer is read from the final reply.

    ``recursion_limit`` bounds the graph steps (model -> tools -> model is 3; the policy ends the
    run after one tool result, so 8 leaves room and stops a runaway loop).
    """
    check_int("recursion_limit", recursion_limit, 3, 100)
    question, reference = _question(problem)
    state = agent.invoke({"messages": [HumanMessage(question)]}, {"recursion_limit": recursion_limit})
    messages = list(state["messages"])
    final = next((m for m in reversed(messages) if isinstance(m, AIMessage) and not m.tool_calls), None)
    text = str(final.text) if final is not None else ""
    answer = extract_answer(text) if text else None
    calls = [dict(c.get("args") or {}) for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    results = [str(m.text) for m in messages if isinstance(m, ToolMessage)]
    correct = None if reference is None else answers_match(answer, reference)
    return AgentAnswer(question, answer, text, calls, results, reference, correct, messages)


def direct_answers(
    problems: Sequence[Problem | str],
    *,
    model: Any = None,
    max_tokens: int = DEFAULT_DIRECT_MAX_TOKENS,
    batch_size: int = 8,
) -> list[AgentAnswer]:
    """The no-tool baseline: the same model answers each question step by step, then ``Answer: <number>``.

    ``model=None``: the embedded model, greedy, ``batch_size`` questions per batched decode of
    the ESamp engine (a chat model's ``batch`` would decode them one at a time on CPU). Else a
    LangChain chat model, called once per question. The answer is
    :func:`~esamp_agents.evaluation.tasks.extract_answer` of the reply.
    """
    check_int("max_tokens", max_tokens, 8, 4096)
    check_int("batch_size", batch_size, 1, 256)
    items = [_question(p) for p in problems]
    prompts = [f"{q} {DEFAULT_SUFFIX}" for q, _ in items]
    texts: list[str] = []
    if model is None:
        from esamp_agents.decoding.engine import ESampEngine
        from esamp_agents.decoding.loading import load_model
        from esamp_agents.decoding.params import ESampParams, SamplingParams

        loaded = load_model("embedded", device="cpu")
        engine = ESampEngine(loaded)
        sampling = SamplingParams(n=1, max_new_tokens=max_tokens, temperature=0.0, seed=0)
        for start in range(0, len(prompts), batch_size):
            ids = [loaded.chat_token_ids([{"role": "user", "content": p}]) for p in prompts[start : start + batch_size]]
            result = engine.generate(ids, sampling, ESampParams(beta=0.0))
            texts += [r.candidates[0].text for r in result]
    else:
        texts = [str(model.invoke([HumanMessage(p)]).text) for p in prompts]
    out = []
    for (question, reference), text in zip(items, texts, strict=True):
        answer = extract_answer(text)
        correct = None if reference is None else answers_match(answer, reference)
        out.append(AgentAnswer(question, answer, text, reference=reference, correct=correct))
    return out


def direct_answer(
    problem: Problem | str, *, model: Any = None, max_tokens: int = DEFAULT_DIRECT_MAX_TOKENS
) -> AgentAnswer:
    """:func:`direct_answers` for one problem."""
    return direct_answers([problem], model=model, max_tokens=max_tokens)[0]


__all__ = [
    "ANSWER_PATTERN",
    "CALCULATOR_SCHEMA",
    "FAMILIES",
    "OPS",
    "SYSTEM_PROMPT",
    "TASK",
    "AgentAnswer",
    "CalculatorError",
    "CallVoteReward",
    "ToolStepPolicy",
    "best_of_n_calculator_agent",
    "calculate",
    "calculator",
    "calculator_agent",
    "direct_answer",
    "direct_answers",
    "example_messages",
    "format_number",
    "generate_word_problems",
    "problem_numbers",
    "solve",
]
if _AgentMiddleware is not None:
    __all__ += ["ToolStepMiddleware"]
