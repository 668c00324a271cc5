"""Fakes shared by the tests: scripted chat models (with and without an ``n`` field), a slow
model that records concurrency, an LLM judge keyed by candidate, callback recorders, a
decode-time reward (mean hidden-state norm) and a seeded logprob head."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from typing import Any

import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead


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


class NormObserver:
    """Test-only decode-time reward: the mean L2 norm of each candidate's final-layer states."""

    layers = (-1,)

    def on_start(self, num_prompts: int, samples_per_prompt: int, hidden_size: int) -> None:
        import torch

        self.n, self.p = samples_per_prompt, num_prompts
        self.sums = torch.zeros(num_prompts * samples_per_prompt, dtype=torch.float64)
        self.counts = torch.zeros_like(self.sums)
        self.steps = 0

    def on_step(self, step: int, hidden: dict[int, Any], token_ids: Any, live: Any) -> None:
        norms = hidden[-1].double().norm(dim=-1)
        self.sums += norms * live
        self.counts += live
        self.steps += 1

    def on_finish(self) -> None:
        pass

    def rewards(self) -> list[list[float]]:
        flat = (self.sums / self.counts.clamp(min=1)).tolist()
        return [flat[i * self.n : (i + 1) * self.n] for i in range(self.p)]


class NormReward:
    """Decode-time only; keeps its observers so the test can compare."""

    name = "norm"

    def __init__(self) -> None:
        self.observers: list[NormObserver] = []

    def make_observer(self, loaded: Any) -> NormObserver:
        assert loaded.hidden_size > 0
        obs = NormObserver()
        self.observers.append(obs)
        return obs


TOP_K = 20


def make_logprob_head(base_model: str = "embedded:SmolLM2-135M-Instruct.Q4_1.gguf", seed: int = 0) -> GatedLinearHead:
    """A logprobs head with seeded random weights and a realistic standardisation."""
    spec = FeatureSpec(
        kind="logprobs", dim=TOP_K + 8, base_model=base_model, hidden_size=576, num_layers=30, top_k=TOP_K
    )
    head = GatedLinearHead(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(2, spec.dim, generator=g) * 0.5)
        head.linear.bias.copy_(torch.randn(2, generator=g) * 0.1)
    head.set_standardisation(torch.full((spec.dim,), -5.0), torch.full((spec.dim,), 4.0))
    return head


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
