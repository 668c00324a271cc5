"""``HiddenStateReward``: the ELHSR head as a reward that Best-of-N and users call.

Two ways to score, giving the same numbers (up to float noise):

- while decoding: :meth:`HiddenStateReward.make_observer` returns a decode observer that the
  ESamp engine feeds, so the reward costs no extra forward pass: the hidden states come free
  with generation. ``ChatESamp`` / ``ESampLLM`` take the reward itself per call,
  ``generate(..., rewards=[reward])``, and put each candidate's score in its metadata
  (``response_metadata["rewards"]["elhsr"]``);
- post hoc: :meth:`score` / :meth:`score_texts` run one batched forward of the policy model
  over (prompt, response) pairs, e.g. for candidates written by another system.

A head only makes sense on the model whose hidden states it was trained on; loading checks
the checkpoint's base model, hidden size and layer count against the model in use.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, load_model
from esamp_agents.hidden_reward.features import RewardObserver, posthoc_rewards
from esamp_agents.hidden_reward.head import GatedLinearHead, check_compatible, load_head
from esamp_agents.messages import to_chat_messages

SHIPPED_HEAD_FILE = "smollm2-135m-instruct-elhsr.safetensors"
"""The head shipped for the embedded model (package data, trained by ``benchmarks/reward_bon.py``)."""


def shipped_head_path() -> Path:
    """Path of the reward head that ships with the package for the embedded model."""
    path = Path(str(importlib.resources.files("esamp_agents") / "heads" / SHIPPED_HEAD_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"the shipped reward head is missing from the installation: {path}")
    return path


def _prompt_messages(value: Any) -> list[dict[str, str]]:
    """A Best-of-N input -> chat messages (:func:`esamp_agents.messages.to_chat_messages`); a
    dict holding the prompt under 'messages', 'input' or 'question' (not a message) is unwrapped."""
    if isinstance(value, dict) and "role" not in value:
        for key in ("messages", "input", "question"):
            if key in value:
                return _prompt_messages(value[key])
        raise ValueError(
            f"cannot find the prompt in a dict input with keys {sorted(value)}; use 'messages', 'input' or 'role'"
        )
    return to_chat_messages(value)


def _candidate_text(candidate: Any) -> tuple[str, bool]:
    """(text, ended with end-of-turn) of a Best-of-N candidate view, a str, or a LangChain message."""
    if isinstance(candidate, str):
        return candidate, True
    info = getattr(candidate, "generation_info", None) or {}
    text = getattr(candidate, "text", None)
    if text is None:
        output = getattr(candidate, "output", candidate)
        text = output if isinstance(output, str) else getattr(output, "text", None) or str(output.content)
        info = info or getattr(output, "response_metadata", {}) or {}
    ended = info.get("finish_reason", "stop") == "stop" and "stop_sequence" not in info
    return str(text), ended


class HiddenStateReward:
    """A gated linear reward over the policy model's own hidden states (ELHSR).

    >>> reward = HiddenStateReward.shipped()  # doctest: +SKIP
    >>> reward.score_texts("What is 2 + 3?", ["2 + 3 = 5. Answer: 5", "Answer: 6"])  # doctest: +SKIP
    """

    name = "elhsr"

    def __init__(self, head: GatedLinearHead | str | Path, model: LoadedModel | str = EMBEDDED) -> None:
        self.head = head if isinstance(head, GatedLinearHead) else load_head(head)
        if self.head.spec.kind != "hidden":
            raise ValueError(
                f"HiddenStateReward needs a head of feature kind 'hidden', got {self.head.spec.kind!r} "
                "(logprob heads go to esamp_agents.adapters.logprob_reward.LogprobReward)"
            )
        self._model = model
        if isinstance(model, LoadedModel):
            self._check(model)

    @classmethod
    def shipped(cls, model: LoadedModel | str = EMBEDDED) -> HiddenStateReward:
        """The head trained for the embedded SmolLM2-135M-Instruct (shipped with the package)."""
        return cls(shipped_head_path(), model)

    def _check(self, loaded: LoadedModel) -> None:
        check_compatible(
            self.head.spec, base_model=loaded.name, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers
        )

    @property
    def loaded(self) -> LoadedModel:
        """The policy model (loaded lazily through the shared registry when given by name)."""
        if not isinstance(self._model, LoadedModel):
            self._model = load_model(self._model)
            self._check(self._model)
        return self._model

    def make_observer(self, loaded: LoadedModel | None = None) -> RewardObserver:
        """A decode observer that scores candidates while the engine writes them."""
        if loaded is not None:
            self._check(loaded)
        return RewardObserver(self.head)

    def score_tokens(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[float]:
        """Rewards of (prompt, response) token-id pairs; a response includes its end-of-turn token."""
        return posthoc_rewards(self.head, self.loaded, prompt_ids, response_ids)

    def score_texts(self, prompt: Any, responses: Sequence[str], *, ended: Sequence[bool] | None = None) -> list[float]:
        """Rewards of text responses to one prompt (chat-templated as the head was trained).

        Each response gets the end-of-turn token appended unless ``ended[i]`` is False
        (a candidate cut by the length limit or a stop string).
        """
        loaded = self.loaded
        prompt_ids = loaded.chat_token_ids(_prompt_messages(prompt))
        eot = loaded.eos_token_ids[:1]
        ended = [True] * len(responses) if ended is None else list(ended)
        if len(ended) != len(responses):
            raise ValueError(f"ended has {len(ended)} entries for {len(responses)} responses")
        response_ids = []
        for text, end in zip(responses, ended, strict=True):
            ids = list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
            response_ids.append(ids + (eot if end else []))
        return self.score_tokens([prompt_ids] * len(responses), response_ids)

    def score(self, input: Any, candidates: Sequence[Any]) -> list[float]:
        """Best-of-N reward protocol: post-hoc rewards of ``candidates`` for ``input``."""
        texts, ended = zip(*(_candidate_text(c) for c in candidates), strict=True) if candidates else ((), ())
        return self.score_texts(input, list(texts), ended=list(ended))


__all__ = ["SHIPPED_HEAD_FILE", "HiddenStateReward", "shipped_head_path"]
