"""Calculator agent on the real embedded model, offline: create_agent + ChatESamp + the tool-step policy."""

from __future__ import annotations

import re

from langchain_core.messages import AIMessage, ToolMessage

from esamp_agents.recipes.calculator_agent import (
    ANSWER_PATTERN,
    OPS,
    best_of_n_calculator_agent,
    calculate,
    generate_word_problems,
    problem_numbers,
    solve,
)


def _check_run(result, question: str) -> dict:
    """The structure every run must have: one valid calculator call on the question's numbers, its
    exact result in the conversation, then a final text reply stating that result."""
    calls = [c for m in result.messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert len(calls) == 1 and calls[0]["name"] == "calculator"
    args = calls[0]["args"]
    assert set(args) == {"a", "op", "b"} and args["op"] in OPS
    assert {args["a"], args["b"]} <= set(problem_numbers(question))  # copied from the problem, not invented
    tool_messages = [m for m in result.messages if isinstance(m, ToolMessage)]
    assert [m.content for m in tool_messages] == [str(calculate(args["a"], args["op"], args["b"]))]
    assert tool_messages[0].tool_call_id == calls[0]["id"]
    final = result.messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert re.fullmatch(ANSWER_PATTERN, final.content)
    stated, computed = result.answer, tool_messages[0].content
    # the final reply states the tool's result (a long decimal may be cut short: 0.909 for 0.9090909091)
    assert stated == computed or ("." in computed and stated is not None and computed.startswith(stated))
    return args


# The greedy agent end to end (one valid call on the question's numbers, its result in the
# conversation, the right final answer) is the README's example, run by tests/model/test_readme.py.


def test_best_of_n_calculator_agent_chooses_among_esamp_candidates():  # ESamp on: beta=0.25
    problem = generate_word_problems(1, seed=0, families=["add"])[0]
    result = solve(best_of_n_calculator_agent(2, temperature=0.7, beta=0.25, max_tokens=48, seed=0), problem)
    _check_run(result, problem.question)
    steps = [m for m in result.messages if isinstance(m, AIMessage)]
    for step in steps:
        meta = step.response_metadata["best_of_n"]
        assert meta["n"] == 2 and meta["reward"] == "call_vote" and len(meta["candidates"]) == 2
        assert all(c["validity"] == 1.0 for c in meta["candidates"])  # grammar-constrained: always valid
