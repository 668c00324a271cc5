"""Reading OpenAI / LangChain objects and their plain-dict forms alike (shared by the reward and the sampler)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """``obj[name]`` for a mapping, else ``obj.name``: the SDK's objects and their JSON read the same."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def text_of(content: Any) -> str:
    """A message's content as text: a string, or the concatenated text of its content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(field_of(p, "text", "")) if not isinstance(p, str) else p for p in content)


__all__ = ["field_of", "text_of"]
