"""Fakes shared by the tests: scripted chat models (with and without an ``n`` field), a slow
model that records concurrency, an LLM judge keyed by candidate, callback recorders."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr


class NChat(BaseChatModel):
    """Like ChatOpenAI: an ``n`` field, N replies per call. Call ``k`` returns ``rounds[k]``."""

    rounds: list[list[str]]
    n: int = 1
    calls: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "n-chat"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        n = kw.get("n", self.n)
        replies = self.rounds[min(len(self.calls), len(self.rounds) - 1)]
        self.calls.append(dict(kw))
        gens = [
            ChatGeneration(message=AIMessage(replies[i % len(replies)]), generation_info={"finish_reason": "stop"})
            for i in range(n)
        ]
        return ChatResult(generations=gens)


class SlowChat(BaseChatModel):
    """One reply per call, slowly; records the peak number of calls in flight (sync and async)."""

    delay: float = 0.05
    fail: bool = False
    active: int = 0
    peak: int = 0
    count: int = 0

    @property
    def _llm_type(self) -> str:
        return "slow-chat"

    def _enter(self) -> int:
        with _LOCK:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.count += 1
            return self.count

    def _leave(self) -> None:
        with _LOCK:
            self.active -= 1

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        k = self._enter()
        try:
            time.sleep(self.delay)
            if self.fail:
                raise ConnectionError("the server is down")
            return ChatResult(generations=[ChatGeneration(message=AIMessage(f"reply {k}"))])
        finally:
            self._leave()

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        k = self._enter()
        try:
            await asyncio.sleep(self.delay)
            return ChatResult(generations=[ChatGeneration(message=AIMessage(f"reply {k}"))])
        finally:
            self._leave()


_LOCK = threading.Lock()


class Recorder(BaseCallbackHandler):
    """Records chat-model / LLM / chain starts with their parents and tags."""

    def __init__(self) -> None:
        self.model_starts: list[dict[str, Any]] = []
        self.chains: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
        self.model_starts.append(kw)

    def on_llm_start(self, serialized: Any, prompts: Any, **kw: Any) -> None:
        self.model_starts.append(kw)

    def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
        self.chains.append(kw)


class ScriptedChat(BaseChatModel):
    """Replies from a script: at step s (= number of AI messages in the input) the k-th sample is
    ``script[s][k % len]``. ``bind_tools`` works like a real provider's (it binds OpenAI schemas)."""

    script: list[list[AIMessage]]
    calls: list[dict[str, Any]] = Field(default_factory=list)
    fail_every: int = 0
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _counter: Counter = PrivateAttr(default_factory=Counter)

    @property
    def _llm_type(self) -> str:
        return "scripted-chat"

    def bind_tools(self, tools: Any, *, tool_choice: Any = None, **kwargs: Any) -> Any:
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _replies(self, messages: list[BaseMessage], count: int) -> list[AIMessage]:
        step = sum(isinstance(m, AIMessage) for m in messages)
        options = self.script[min(step, len(self.script) - 1)]
        with self._lock:
            k = self._counter[step]
            self._counter[step] += count
        return [options[(k + j) % len(options)] for j in range(count)]

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        with self._lock:
            self.calls.append(dict(kwargs))
            number = len(self.calls)
        if self.fail_every and number % self.fail_every == 0:
            raise RuntimeError(f"provider error on call {number}")
        count = kwargs.get("n") or 1
        return ChatResult(generations=[ChatGeneration(message=m) for m in self._replies(messages, count)])


class ScriptedNChat(ScriptedChat):
    """Like ChatOpenAI: an ``n`` field, N replies in one request."""

    n: int | None = None


class ReplyByCandidate(BaseChatModel):
    """A judge whose reply depends only on the candidate in the prompt (so order is concurrency-proof)."""

    replies: dict[str, str]

    @property
    def _llm_type(self) -> str:
        return "reply-by-candidate"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        candidate = re.search(r"RESPONSE:\n(.*)", str(messages[-1].content), re.S).group(1)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(self.replies[candidate]))])


class TokenRecorder(BaseCallbackHandler):
    """Records every streamed token LangChain reports."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)
