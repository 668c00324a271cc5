"""A fake model and engine for the server's unit tests: the real ASGI app, backend and protocol
over an engine that writes ``" t0 t1 ..."`` at once (or slowly, to test queues and cancels)."""

from __future__ import annotations

import threading
import time
from typing import Any

from esamp_agents.decoding.results import Candidate, GenerationResult, GenerationStats, PromptResult
from esamp_agents.serving import Server
from esamp_agents.serving.backend import OpenAIBackend


class FakeTokenizer:
    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 900 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(f" t{i}" for i in ids)


class FakeLoaded:
    name = "fake-model"
    vocab_size = 1000
    context_window = 2048
    eos_token_ids = (0,)

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()

    def chat_token_ids(self, messages: list[dict[str, Any]], tools: Any = ()) -> list[int]:
        return [1 + ord(c) % 900 for m in messages for c in str(m.get("content") or "")] + [5]


class FakeEngine:
    """Writes token ``seed + s + k`` at step k of sample s; ``delay`` seconds per step; notes cancels."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.cancelled = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def generate(self, prompt_ids: Any, sampling: Any, esamp: Any, *, on_text: Any = None, cancel: Any = None,
                 add_special_tokens: bool = False, grammar: Any = None,
                 on_token: Any = None) -> GenerationResult:  # fmt: skip
        self.calls += 1
        self.started.set()
        results = []
        steps = min(sampling.max_new_tokens, 16)
        for p, ids in enumerate(prompt_ids):
            candidates = []
            for s in range(sampling.n):
                tokens, finish = [], "length"
                for k in range(steps):
                    if cancel is not None and cancel.is_set():
                        self.cancelled.set()
                        finish = "stop"
                        break
                    if self.delay:
                        time.sleep(self.delay)
                    token = 1 + ((sampling.seed or 0) + s + k) % 900
                    tokens.append(token)
                    if on_token is not None:
                        top = [(token, -0.5)] * sampling.top_logprobs if sampling.top_logprobs else None
                        on_token(p, s, token, -0.25, top)
                    if on_text is not None:
                        on_text(p, s, f" t{token}")
                top = [[(t, -0.5)] * sampling.top_logprobs for t in tokens] if sampling.top_logprobs else None
                extras = {} if grammar is None else {"constraint_satisfied": False}
                text = "".join(f" t{t}" for t in tokens)
                candidates.append(
                    Candidate(s, text, tokens, [-0.25] * len(tokens), finish, len(ids), top_logprobs=top, extras=extras)
                )
            results.append(PromptResult(prompt="", prompt_token_ids=list(ids), candidates=candidates))
        stats = GenerationStats(len(prompt_ids), sampling.n, steps, sum(len(c.token_ids) for r in results
                                for c in r.candidates), 0.0, 0.001, 0.0)  # fmt: skip
        return GenerationResult(results=results, stats=stats)


class FakeServer(Server):
    """The real server (uvicorn, the ASGI app, the backend) over :class:`FakeEngine`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("fake-model", **kwargs)
        self.engine = FakeEngine()

    def _build_backend(self) -> OpenAIBackend:
        return OpenAIBackend(
            FakeLoaded(),  # type: ignore[arg-type]
            served_name="fake-model",
            accept_any_model=self.accept_any_model,
            defaults=self.defaults,
            max_batch_tokens=self.max_batch_tokens,
            max_queue=self.max_queue,
            max_batch_rows=self.max_batch_rows,
            engine=self.engine,
        )
