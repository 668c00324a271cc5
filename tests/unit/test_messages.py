"""One chat-message converter: every input kind, the role table, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate

from esamp_agents.messages import ALLOWED_ROLES, ROLES, chat_role, to_chat_message, to_chat_messages

U = {"role": "user", "content": "hi"}


def test_role_table_maps_openai_and_langchain_names():
    assert {r: chat_role(r) for r in ALLOWED_ROLES} == {
        "ai": "assistant",
        "assistant": "assistant",
        "developer": "system",
        "function": "tool",
        "human": "user",
        "system": "system",
        "tool": "tool",
        "user": "user",
    }
    assert dict(ROLES) == {r: chat_role(r) for r in ALLOWED_ROLES}
    with pytest.raises(TypeError):
        ROLES["x"] = "y"  # type: ignore[index]
    with pytest.raises(ValueError, match=r"role 'critic' is not supported; allowed: ai, assistant, developer"):
        chat_role("critic")


def test_role_table_imports_without_langchain():
    code = (
        "import sys; from esamp_agents.messages import ROLES, to_chat_messages; "
        "assert to_chat_messages([{'role': 'developer', 'content': 'x'}]) == [{'role': 'system', 'content': 'x'}]; "
        "assert not any(m.startswith('langchain') for m in sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_strings_and_dicts():
    assert to_chat_messages("hi") == [U]
    assert to_chat_messages({"role": "human", "content": "hi"}) == [U]
    assert to_chat_messages(["hi", {"role": "developer", "content": "be brief"}]) == [
        U,
        {"role": "system", "content": "be brief"},
    ]
    # OpenAI shapes: content parts, a tool-calling assistant turn without content (its calls kept,
    # arguments parsed from JSON text), a tool result with its call id; other keys ignored
    parts = {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}
    call = {"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    calling = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
    tool = {"role": "tool", "content": "42", "tool_call_id": "1"}
    assert to_chat_messages([parts, calling, tool]) == [
        U,
        {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "name": "add", "arguments": {"a": 1}}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]


def test_bad_tool_calls_are_refused_with_the_reason():
    import pytest

    for calls, match in [
        ([{"id": "1"}], "no function name"),
        ([{"function": {"name": "f", "arguments": "{oops"}}], "not JSON"),
        ([{"function": {"name": "f", "arguments": "[1]"}}], "allowed: an object"),
        ("f", "must be a list"),
    ]:
        with pytest.raises(ValueError, match=match):
            to_chat_messages([{"role": "assistant", "content": "", "tool_calls": calls}])


def test_pairs_and_langchain_messages():
    assert to_chat_messages([("system", "s"), ("human", "hi"), ("ai", "a")]) == [
        {"role": "system", "content": "s"},
        U,
        {"role": "assistant", "content": "a"},
    ]
    messages = [
        SystemMessage("s"),
        HumanMessage("hi", name="someone"),
        AIMessage(content=[{"type": "reasoning", "reasoning": "hmm"}, {"type": "text", "text": "ok"}]),
        ToolMessage("42", tool_call_id="1"),
        FunctionMessage("7", name="f"),
        ChatMessage(role="developer", content="d"),
        AIMessageChunk(content="chunk"),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "s"},
        U,
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "tool", "content": "7", "name": "f"},
        {"role": "system", "content": "d"},
        {"role": "assistant", "content": "chunk"},
    ]
    assert to_chat_messages(HumanMessage("hi")) == [U]
    assert to_chat_message(HumanMessage("hi")) == U


def test_prompt_values():
    assert to_chat_messages(StringPromptValue(text="hi")) == [U]
    assert to_chat_messages(ChatPromptValue(messages=[SystemMessage("s"), HumanMessage("hi")])) == [
        {"role": "system", "content": "s"},
        U,
    ]
    template = ChatPromptTemplate.from_messages([("system", "s"), ("human", "{q}")])
    assert to_chat_messages(template.invoke({"q": "hi"}))[1] == U


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, r"message of type int is not supported; allowed: a str, a \{'role', 'content'\} dict"),
        ([3.5], r"message of type float is not supported"),
        ({"content": "x"}, r"message dict with keys \['content'\] has no 'role'"),
        ({"role": "critic", "content": "x"}, r"role 'critic' is not supported"),
        ([ChatMessage(role="critic", content="x")], r"role 'critic' is not supported"),
        ([], r"the conversation is empty; allowed: at least one message"),
        ([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])], r"'image_url' is not supported"),
        ({"role": "user", "content": 7}, r"content of type int is not supported"),
    ],
)
def test_bad_inputs_fail_clearly(value, message):
    with pytest.raises(ValueError, match=message):
        to_chat_messages(value)
