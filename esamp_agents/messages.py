"""One conversion from any chat input to the ``{"role", "content"}`` dicts a chat template reads.

Every place that renders a conversation for the model (``ChatESamp``, the hidden-state
reward, the sequence-classifier reward) goes through :func:`to_chat_messages`, so they
cannot disagree on roles or content. The role table (:data:`ROLES`, :func:`chat_role`)
needs no LangChain: the server can share it. LangChain messages and prompt values are
recognised lazily, only when such an object is passed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

ROLES: Mapping[str, str] = MappingProxyType(
    {
        "system": "system",
        "developer": "system",  # OpenAI's newer name for the system role
        "user": "user",
        "human": "user",
        "assistant": "assistant",
        "ai": "assistant",
        "tool": "tool",
        "function": "tool",  # OpenAI's legacy tool-result role
    }
)
"""Accepted role names (OpenAI's and LangChain's) -> the role the chat template gets."""

ALLOWED_ROLES: tuple[str, ...] = tuple(sorted(ROLES))

# LangChain message ``.type`` -> role name in ROLES ("chat" messages carry their own role).
_LANGCHAIN_TYPES = {
    "human": "human",
    "ai": "ai",
    "system": "system",
    "tool": "tool",
    "function": "function",
    "HumanMessageChunk": "human",
    "AIMessageChunk": "ai",
    "SystemMessageChunk": "system",
    "ToolMessageChunk": "tool",
    "FunctionMessageChunk": "function",
}
_CHAT_TYPES = frozenset({"chat", "ChatMessageChunk"})
# Content blocks a text model cannot read but that carry no user-visible text: dropped.
_SKIPPED_BLOCKS = frozenset({"reasoning", "thinking", "tool_call", "tool_use", "tool_call_chunk"})
_ALLOWED_INPUT = (
    "a str, a {'role', 'content'} dict, a (role, content) pair, a LangChain message, a PromptValue, or a list of these"
)


def chat_role(role: Any) -> str:
    """The chat-template role for an OpenAI or LangChain role name (``developer`` -> ``system``)."""
    mapped = ROLES.get(role) if isinstance(role, str) else None
    if mapped is None:
        raise ValueError(f"role {role!r} is not supported; allowed: {', '.join(ALLOWED_ROLES)}")
    return mapped


def content_text(content: Any) -> str:
    """Message content (a str, None, or a list of content blocks) as the text a text model reads.

    Text blocks are joined; reasoning and tool-call blocks are dropped; any other block
    (images, audio...) is refused rather than silently ignored.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise ValueError(f"content of type {type(content).__name__} is not supported; allowed: a str or content blocks")
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind not in _SKIPPED_BLOCKS:
            raise ValueError(f"content block type {kind!r} is not supported by a text-only model; allowed: text")
    return "".join(parts)


def _openai_tool_calls(calls: Any) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` (arguments as JSON text) or LangChain's (``args`` dicts) -> ``{id, name, arguments}``."""
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise ValueError(f"tool_calls must be a list, got {type(calls).__name__}")
    out: list[dict[str, Any]] = []
    for call in calls:
        if not isinstance(call, Mapping):
            raise ValueError(f"a tool call must be a dict, got {type(call).__name__}")
        function = call.get("function", call)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise ValueError(f"tool call {dict(call)!r} has no function name")
        args: Any = function.get("args", function.get("arguments", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise ValueError(f"tool call {name!r} has arguments that are not JSON: {args[:80]!r}") from None
        if not isinstance(args, Mapping):
            raise ValueError(f"tool call {name!r} has arguments of type {type(args).__name__}; allowed: an object")
        out.append({"id": call.get("id"), "name": name, "arguments": dict(args)})
    return out


def _with_tool_fields(message: dict[str, Any], source: Any, get: Any) -> dict[str, Any]:
    """Copy the tool fields a chat needs (an assistant's calls, a tool result's call id and name)."""
    calls = get(source, "tool_calls")
    if calls:
        message["tool_calls"] = _openai_tool_calls(calls)
    for key in ("tool_call_id", "name"):
        value = get(source, key)
        if message["role"] == "tool" and isinstance(value, str) and value:
            message[key] = value
    return message


def _langchain_message(value: Any) -> dict[str, Any] | None:
    """A LangChain ``BaseMessage`` -> dict, or None when ``value`` is not one.

    Never imports LangChain: a LangChain object exists only if its module is already loaded.
    """
    base = sys.modules.get("langchain_core.messages.base")
    if base is None or not isinstance(value, base.BaseMessage):
        return None
    if value.type in _CHAT_TYPES:
        role = chat_role(getattr(value, "role", None))
    elif value.type in _LANGCHAIN_TYPES:
        role = chat_role(_LANGCHAIN_TYPES[value.type])
    else:
        raise ValueError(
            f"message type {value.type!r} is not supported; allowed: human, ai, system, tool, function, chat"
        )
    message: dict[str, Any] = {"role": role, "content": content_text(value.content)}
    return _with_tool_fields(message, value, lambda v, k: getattr(v, k, None))


def _langchain_prompt(value: Any) -> list[Any] | None:
    """A LangChain ``PromptValue`` -> its messages, or None when ``value`` is not one (no import)."""
    module = sys.modules.get("langchain_core.prompt_values")
    if module is None or not isinstance(value, module.PromptValue):
        return None
    return value.to_messages()


def to_chat_message(value: Any) -> dict[str, Any]:
    """One message (dict, ``(role, content)`` pair, str = a user turn, LangChain message) -> dict.

    Besides ``role`` and ``content``, an assistant turn keeps its ``tool_calls`` (as
    ``{"id", "name", "arguments": dict}``) and a tool turn its ``tool_call_id`` and ``name``.
    """
    if isinstance(value, str):
        return {"role": "user", "content": value}
    if isinstance(value, Mapping):
        if "role" not in value:
            keys = sorted(map(str, value))
            raise ValueError(f"message dict with keys {keys} has no 'role'; allowed: {{'role', 'content'}}")
        message: dict[str, Any] = {"role": chat_role(value["role"]), "content": content_text(value.get("content"))}
        return _with_tool_fields(message, value, lambda v, k: v.get(k))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return {"role": chat_role(value[0]), "content": content_text(value[1])}
    converted = _langchain_message(value)
    if converted is None:
        raise ValueError(f"message of type {type(value).__name__} is not supported; allowed: {_ALLOWED_INPUT}")
    return converted


def to_chat_messages(value: Any) -> list[dict[str, Any]]:
    """Any chat input -> ``[{"role", "content"}, ...]`` for a tokenizer's chat template.

    Accepted: a str (one user turn), a ``{"role", "content"}`` dict (OpenAI roles, with
    ``developer`` read as ``system``), a ``(role, content)`` pair inside a list, a LangChain
    message, a LangChain ``PromptValue``, or a list/tuple of messages. Anything else, an
    unknown role, a non-text content block or an empty conversation raises ``ValueError``.
    """
    if isinstance(value, (str, Mapping)):
        return [to_chat_message(value)]
    messages = list(value) if isinstance(value, (list, tuple)) else _langchain_prompt(value)
    if messages is None:  # one LangChain message, or an unsupported value (to_chat_message says so)
        messages = [value]
    if not messages:
        raise ValueError("the conversation is empty; allowed: at least one message")
    return [to_chat_message(m) for m in messages]


__all__ = ["ALLOWED_ROLES", "ROLES", "chat_role", "content_text", "to_chat_message", "to_chat_messages"]
