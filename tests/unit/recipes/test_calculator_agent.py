"""Calculator-agent recipe without the model: the calculator, the word-problem generator, the
tool-step policy (on real ModelRequests and inside create_agent with a fake chat model), the
Best-of-N reward, answer reading and input checks."""

from __future__ import annotations

import asyncio
import re
from fractions import Fraction
from typing import Any

import pytest
from langchain.agents.middleware import AgentMiddleware, ModelRequest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from esamp_agents.constrained import Grammar
from esamp_agents.evaluation.tasks import key_split
from esamp_agents.recipes import calculator_agent as ca
from esamp_agents.recipes.calculator_agent import (
    ANSWER_PATTERN,
    FAMILIES,
    AgentAnswer,
    CalculatorError,
    CallVoteReward,
    ToolStepMiddleware,
    ToolStepPolicy,
    best_of_n_calculator_agent,
    calculate,
    calculator,
    calculator_agent,
    direct_answers,
    example_messages,
    generate_word_problems,
    problem_numbers,
    solve,
)
from esamp_agents.selection.rewards import ScoredCandidate

# --------------------------------------------------------------------------- the calculator


@pytest.mark.parametrize(
    ("a", "op", "b", "want"),
    [(17, "+", 25, 42), (43, "-", 18, 25), (12, "*", 7, 84), (96, "/", 8, 12), (7, "/", 2, 3.5), (5, "-", 9, -4)],
)
def test_calculate_each_operator(a, op, b, want):
    got = calculate(a, op, b)
    assert got == want and type(got) is type(want)  # whole results are ints: the model copies "12", not "12.0"


def test_calculate_is_exact_and_reports_whole_floats_as_ints():
    assert calculate(0.1, "+", 0.2) == 0.3  # exact fractions, not 0.30000000000000004
    assert calculate(17.0, "+", 25.0) == 42 and isinstance(calculate(17.0, "+", 25.0), int)
    assert calculate(1, "/", 3) == pytest.approx(1 / 3)


def test_calculate_division_by_zero_is_a_clear_error():
    with pytest.raises(CalculatorError, match=r"b=0: division by zero; allowed: b != 0 when op='/'"):
        calculate(5, "/", 0)
    with pytest.raises(ValueError):  # a CalculatorError is a ValueError too
        calculate(5, "/", 0.0)


@pytest.mark.parametrize(
    ("a", "op", "b", "match"),
    [
        (1, "%", 2, r"op='%' is unknown; allowed: '\+', '-', '\*', '/'"),
        (float("nan"), "+", 1, r"a=nan is not finite"),
        (1, "+", float("inf"), r"b=inf is not finite"),
        ("3", "+", 1, r"a='3' is not a number"),
        (True, "+", 1, r"a=True is not a number"),
    ],
)
def test_calculate_rejects_bad_inputs_naming_them(a, op, b, match):
    with pytest.raises(CalculatorError, match=match):
        calculate(a, op, b)


def test_calculator_tool_schema_is_closed_with_an_operator_enum():
    schema = convert_to_openai_tool(calculator)["function"]["parameters"]  # what ChatESamp's grammar is built from
    assert schema["additionalProperties"] is False  # else the grammar lets the model invent arguments
    assert schema["properties"]["op"]["enum"] == list(ca.OPS)
    assert set(schema["required"]) == {"a", "op", "b"}


def test_calculator_tool_call_gives_a_tool_message_and_errors_come_back_as_text():
    out = calculator.invoke(
        {"name": "calculator", "args": {"a": 6, "op": "*", "b": 7}, "id": "c1", "type": "tool_call"}
    )
    assert isinstance(out, ToolMessage) and out.content == "42" and out.tool_call_id == "c1"
    err = calculator.invoke(
        {"name": "calculator", "args": {"a": 6, "op": "/", "b": 0}, "id": "c2", "type": "tool_call"}
    )
    assert isinstance(err, ToolMessage) and "division by zero" in err.content and err.status == "error"
    assert calculator.invoke({"a": 6, "op": "^", "b": 2}) == "op='^' is unknown; allowed: '+', '-', '*', '/'"


# --------------------------------------------------------------------------- word problems


def _solve_key(key: str) -> int:
    family, nums = key.split(":")
    a, b = map(int, nums.split(","))
    return {"add": a + b, "sub": a - b, "mul": a * b, "div": Fraction(a, b)}[family]


def test_word_problems_are_deterministic_and_seeded():
    first = generate_word_problems(24, seed=3)
    assert first == generate_word_problems(24, seed=3)
    assert first != generate_word_problems(24, seed=4)
    assert len({p.id for p in first}) == 24  # no repeats


def test_word_problem_answers_are_exact_integers_stated_by_the_question():
    for problem in generate_word_problems(80, seed=0, split="all"):
        want = _solve_key(problem.key)
        assert Fraction(want).denominator == 1 and str(want) == problem.answer  # division problems divide evenly
        a, b = map(int, problem.key.split(":")[1].split(","))
        assert sorted(problem_numbers(problem.question)) == sorted([a, b])  # both operands are written out
        assert int(problem.answer) >= 0


def test_word_problems_take_turns_over_families_and_respect_the_split():
    problems = generate_word_problems(16, seed=1, split="test")
    assert [p.key.split(":")[0] for p in problems[:8]] == list(FAMILIES) * 2
    assert all(key_split(p.key) == "test" for p in problems)
    train = generate_word_problems(16, seed=1, split="train")
    assert all(key_split(p.key) == "train" for p in train)
    only_div = generate_word_problems(5, seed=1, families=["div"])
    assert all(p.key.startswith("div:") for p in only_div)


def test_examples_use_train_facts_only_so_held_out_problems_never_share_one():
    examples = example_messages()
    questions = [m for m in examples if isinstance(m, HumanMessage)]
    calls = [m.tool_calls[0]["args"] for m in examples if isinstance(m, AIMessage) and m.tool_calls]
    assert len(questions) == len(calls) == len(FAMILIES)
    assert [c["op"] for c in calls] == list(ca.OPS)
    keys = {f"{fam}:{c['a']},{c['b']}" for fam, c in zip(FAMILIES, calls, strict=True)}
    assert all(key_split(k) == "train" for k in keys)
    held_out = {p.key for p in generate_word_problems(200, seed=0)}
    assert not keys & held_out
    results = [m.content for m in examples if isinstance(m, ToolMessage)]
    assert results == [str(calculate(c["a"], c["op"], c["b"])) for c in calls]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, r"count=0 is out of range; allowed: 1 <= count"),
        ({"count": 10**6}, r"count=1000000 is out of range; allowed: 1 <= count <= \d+ \(split 'test'\)"),
        ({"count": 2, "split": "dev"}, r"split='dev' is unknown; allowed: all, train, test"),
        ({"count": 2, "families": ["pow"]}, r"families=\['pow'\] has unknown or no entries"),
        ({"count": 2, "families": []}, r"has unknown or no entries"),
        ({"count": 2, "seed": 1.5}, r"seed=1.5 must be an integer"),
        ({"count": True}, r"count=True must be an integer"),
    ],
)
def test_word_problem_bad_arguments_name_the_value_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_word_problems(**kwargs)


def test_problem_numbers_reads_the_written_numbers():
    assert problem_numbers("Tom has 17 apples and buys 25 more.") == [17, 25]
    assert problem_numbers("A shop had 54 shirts and sold 23. How many are left?") == [54, 23]
    assert problem_numbers("1,200 eggs in 2.5 days; x2 and a7 are not numbers") == [1200, Fraction(5, 2)]


# --------------------------------------------------------------------------- the tool-step policy


def _call_message(a: float = 6, op: str = "*", b: float = 7, call_id: str = "c1") -> AIMessage:
    return AIMessage("", tool_calls=[{"name": "calculator", "args": {"a": a, "op": op, "b": b}, "id": call_id}])


def _request(messages: list[BaseMessage], **kwargs: Any) -> ModelRequest:
    return ModelRequest(model=None, messages=messages, tools=[calculator], tool_choice="auto", **kwargs)  # type: ignore[arg-type]


QUESTION = HumanMessage("What is 6 times 7?")
AFTER_RESULT = [QUESTION, _call_message(), ToolMessage("42", tool_call_id="c1")]


def test_policy_forces_a_call_first_and_text_after_a_tool_result():
    policy = ToolStepPolicy()
    assert policy.tool_choice([QUESTION]) == "any"
    assert policy.tool_choice(AFTER_RESULT) == "none"
    assert policy.tool_choice([*AFTER_RESULT, AIMessage("The answer is 42."), HumanMessage("And 6 + 7?")]) == "any"
    assert policy.tool_choice([]) == "any"
    assert ToolStepPolicy(first="calculator").tool_choice([QUESTION]) == "calculator"


def test_policy_prepares_requests_examples_first_grammar_on_the_final_step_only():
    examples = [HumanMessage("example"), AIMessage("ok")]
    policy = ToolStepPolicy(examples=examples)
    first = policy.prepare(_request([QUESTION], model_settings={"temperature": 0.0}))
    assert first.tool_choice == "any" and first.messages == [*examples, QUESTION]
    assert first.model_settings == {"temperature": 0.0}  # no grammar while a call is forced
    final = policy.prepare(_request(list(AFTER_RESULT), model_settings={"temperature": 0.0}))
    assert final.tool_choice == "none" and final.messages == [*examples, *AFTER_RESULT]
    assert final.model_settings["temperature"] == 0.0 and isinstance(final.model_settings["grammar"], Grammar)
    free = ToolStepPolicy(answer_pattern=None).prepare(_request(list(AFTER_RESULT)))
    assert free.tool_choice == "none" and "grammar" not in free.model_settings and free.messages == AFTER_RESULT


def test_answer_pattern_accepts_what_the_answer_reader_reads():
    regex = re.compile(ANSWER_PATTERN)
    assert regex.fullmatch("The answer is 42.") and regex.fullmatch("The answer is -3.5.")
    assert not regex.fullmatch("The answer is forty-two.")
    assert ca.extract_answer("The answer is 42.") == "42"


def test_policy_wraps_sync_and_async_handlers_with_the_prepared_request():
    seen: list[Any] = []
    policy = ToolStepPolicy()

    def handler(request: Any) -> str:
        seen.append(request)
        return "response"

    assert policy.wrap_model_call(_request(list(AFTER_RESULT)), handler) == "response"
    assert seen[0].tool_choice == "none"

    async def ahandler(request: Any) -> str:
        seen.append(request)
        return "async response"

    assert asyncio.run(policy.awrap_model_call(_request([QUESTION]), ahandler)) == "async response"
    assert seen[1].tool_choice == "any"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"first": "none"}, ValueError, r"first='none' is not usable"),
        ({"first": 3}, ValueError, r"first=3 is not usable; allowed: 'any', 'required', 'auto' or a tool name"),
        ({"answer_pattern": 5}, ValueError, r"answer_pattern=5 is not usable; allowed: a regex string or None"),
        ({"examples": ["hi"]}, ValueError, r"examples has a str; allowed: LangChain messages only"),
        ({"answer_pattern": "(unclosed"}, ValueError, r"regex grammar '\(unclosed' cannot be enforced"),
    ],
)
def test_policy_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ToolStepPolicy(**kwargs)


class PolicyChat(BaseChatModel):
    """A chat model that answers as the policy asks: a calculator call when one is forced, else text."""

    calls: list[dict[str, Any]] = Field(default_factory=list)
    prompts: list[list[BaseMessage]] = Field(default_factory=list)
    args: dict[str, Any] = Field(default_factory=lambda: {"a": 6, "op": "*", "b": 7})

    @property
    def _llm_type(self) -> str:
        return "policy-chat"

    def bind_tools(self, tools: Any, *, tool_choice: Any = None, **kwargs: Any) -> Any:
        return self.bind(tools=[t.name for t in tools], tool_choice=tool_choice, **kwargs)

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any):
        self.calls.append(dict(kwargs))
        self.prompts.append(list(messages))
        if kwargs.get("tool_choice") == "none":
            result = next(m.content for m in reversed(messages) if isinstance(m, ToolMessage))
            message = AIMessage(f"The answer is {result}.")
        else:
            message = AIMessage("", tool_calls=[{"name": "calculator", "args": dict(self.args), "id": "call_1"}])
        return ChatResult(generations=[ChatGeneration(message=message)])


def test_middleware_is_langchain_middleware_and_drives_create_agent():
    assert issubclass(ToolStepMiddleware, AgentMiddleware)
    assert ToolStepMiddleware.wrap_model_call is not AgentMiddleware.wrap_model_call
    chat = PolicyChat()
    agent = calculator_agent(chat)
    problem = generate_word_problems(1, seed=0, families=["mul"])[0]
    a, b = map(int, problem.key.split(":")[1].split(","))
    chat.args = {"a": a, "op": "*", "b": b}
    result = solve(agent, problem)
    assert isinstance(result, AgentAnswer)
    assert [c["tool_choice"] for c in chat.calls] == ["any", "none"]
    assert isinstance(chat.calls[1]["grammar"], Grammar) and "grammar" not in chat.calls[0]
    assert isinstance(chat.prompts[0][0], SystemMessage) and "calculator" in chat.prompts[0][0].content
    assert chat.prompts[0][1 : 1 + len(example_messages())] == example_messages()
    assert result.tool_calls == [{"a": a, "op": "*", "b": b}] and result.tool_results == [problem.answer]
    assert result.answer == problem.answer and result.correct is True and result.tool_result_correct is True
    assert result.final_text == f"The answer is {problem.answer}."
    # the examples are request-only: they never enter the agent's state
    assert result.messages[0] == HumanMessage(problem.question, id=result.messages[0].id)
    assert len(result.messages) == 4


def test_agent_run_with_a_division_by_zero_call_still_ends_with_text():
    chat = PolicyChat(args={"a": 5, "op": "/", "b": 0})
    result = solve(calculator_agent(chat, examples=False), "What is 5 divided by 0?")
    assert "division by zero" in result.tool_results[0]
    assert result.reference is None and result.correct is None and result.tool_result_correct is None
    assert len(chat.prompts[0]) == 2  # system prompt and the question: no examples


# --------------------------------------------------------------------------- the Best-of-N reward


def _candidates(replies: list[AIMessage]) -> list[ScoredCandidate]:
    return [ScoredCandidate(i, m, "", {}) for i, m in enumerate(replies)]


def test_call_vote_reward_prefers_grounded_calls_that_most_candidates_agree_on():
    question = HumanMessage("Tom has 17 apples and buys 25 more. How many apples does he have now?")
    replies = [
        _call_message(17, "+", 25),
        _call_message(17, "+", 25.0),  # the same call written with a float
        _call_message(25, "+", 27),  # 27 is not in the question
        _call_message(17, "*", 25),
    ]
    scores = CallVoteReward().score([*example_messages(), question], _candidates(replies))
    assert scores == [1.5, 1.5, pytest.approx(0.75), 1.25]
    assert CallVoteReward().score([question], _candidates([AIMessage("")])) == [0.0]


def test_call_vote_reward_on_final_replies_checks_the_tool_result_of_this_question_only():
    question = HumanMessage("Tom has 17 apples and buys 25 more. How many apples does he have now?")
    history = [*example_messages(), question, _call_message(17, "+", 25), ToolMessage("42", tool_call_id="c1")]
    replies = [AIMessage("The answer is 42."), AIMessage("The answer is 52."), AIMessage("The answer is 42.")]
    scores = CallVoteReward().score(history, _candidates(replies))
    assert scores == [pytest.approx(1 + 2 / 3), pytest.approx(1 / 3), pytest.approx(1 + 2 / 3)]
    # before this question's tool result, the examples' results do not count as one
    early = CallVoteReward().score([*example_messages(), question], _candidates([AIMessage("The answer is 38.")]))
    assert early == [1.0]  # agreement only


# --------------------------------------------------------------------------- baseline, solve and checks


class ListChat(BaseChatModel):
    replies: list[str]
    seen: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "list-chat"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any):
        self.seen.append(str(messages[-1].content))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self.replies[len(self.seen) - 1]))])


def test_direct_answers_reads_the_stated_answer_of_each_reply():
    problems = generate_word_problems(2, seed=0)
    chat = ListChat(replies=[f"17 + 25 = 42\nAnswer: {problems[0].answer}", "I think it is 3. Answer: 3"])
    out = direct_answers(problems, model=chat)
    assert [r.answer for r in out] == [problems[0].answer, "3"]
    assert out[0].correct is True and out[1].correct is (problems[1].answer == "3")
    assert all("Answer: <number>" in s for s in chat.seen) and out[0].tool_calls == []


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: solve(object(), ""), r"problem='' is not usable; allowed: a Problem or a non-empty question"),
        (lambda: solve(object(), "q", recursion_limit=2), r"recursion_limit=2 is out of range; allowed: 3 <="),
        (lambda: direct_answers(["q"], model=ListChat(replies=["1"]), batch_size=0), r"batch_size=0 is out of range"),
        (lambda: direct_answers(["q"], max_tokens=4), r"max_tokens=4 is out of range; allowed: 8 <= max_tokens"),
        (lambda: calculator_agent(PolicyChat(), max_tokens=0), r"max_tokens=0 is out of range"),
        (lambda: calculator_agent(PolicyChat(), seed="x"), r"seed='x' must be an integer or None"),
        (lambda: best_of_n_calculator_agent(0), r"n=0 is out of range; allowed: 1 <= n <= 64"),
        (lambda: best_of_n_calculator_agent(2, temperature=-1.0), r"temperature=-1.0 is out of range"),
        (lambda: best_of_n_calculator_agent(2, beta=float("nan")), r"beta=nan is not a number"),
        (lambda: best_of_n_calculator_agent(2, reward="judge"), r"reward='judge' is unknown; allowed: 'default'"),
    ],
)
def test_bad_inputs_fail_before_any_model_work(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_best_of_n_agent_builds_n_candidates_and_chooses_by_the_call_vote_reward(monkeypatch):
    made: list[dict[str, Any]] = []

    def fake_chat(**kwargs: Any) -> PolicyChat:
        made.append(kwargs)
        return PolicyChat(args={"a": 17, "op": "+", "b": 25})

    monkeypatch.setattr(ca, "_chat", fake_chat)
    agent = best_of_n_calculator_agent(3, temperature=0.9, beta=0.3, max_tokens=40, seed=5)
    assert made == [{"n": 3, "max_tokens": 40, "temperature": 0.9, "beta": 0.3, "seed": 5}]
    result = solve(agent, "Tom has 17 apples and buys 25 more. How many apples does he have now?")
    assert result.answer == "42" and result.tool_calls == [{"a": 17, "op": "+", "b": 25}]
    steps = [m for m in result.messages if isinstance(m, AIMessage)]
    meta = [m.response_metadata["best_of_n"] for m in steps]
    assert [m["n"] for m in meta] == [3, 3] and {m["reward"] for m in meta} == {"call_vote"}
    assert [c["reward"] for c in meta[0]["candidates"]] == [2.0, 2.0, 2.0]  # grounded, unanimous


def test_without_langchain_the_agent_says_what_to_install(monkeypatch):
    """Simulated absence (langchain is a test dependency): the calculator and the policy still work."""
    import importlib.util
    import sys

    for name in [n for n in sys.modules if n == "langchain" or n.startswith("langchain.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "langchain", None)
    spec = importlib.util.spec_from_file_location(ca.__name__, ca.__file__)
    assert spec is not None and spec.loader is not None
    bare = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, ca.__name__, bare)
    spec.loader.exec_module(bare)
    assert not hasattr(bare, "ToolStepMiddleware") and "ToolStepMiddleware" not in bare.__all__
    with pytest.raises(ImportError, match=r"needs the langchain package \(v1\): pip install langchain"):
        bare.calculator_agent(PolicyChat())
    assert bare.calculate(6, "*", 7) == 42 and bare.ToolStepPolicy().tool_choice(AFTER_RESULT) == "none"


def test_module_docstring_example_runs_with_a_stand_in_for_the_model(monkeypatch, capsys):
    import textwrap

    monkeypatch.setattr(ca, "_chat", lambda **kwargs: PolicyChat(args={"a": 50, "op": "+", "b": 55}))
    doc = ca.__doc__ or ""
    block = textwrap.dedent(doc[doc.index(".. code-block:: python") :].split("\n", 1)[1])
    namespace: dict[str, Any] = {}
    exec(block, namespace)  # trusted: our own docstring
    assert namespace["problem"].answer == "105" and namespace["result"].correct is True
    assert "-> 105 [{'a': 50, 'op': '+', 'b': 55}] True" in capsys.readouterr().out
