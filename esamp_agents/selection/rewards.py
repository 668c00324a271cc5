"""Rewards that score a group of candidate answers, for :class:`~esamp_agents.selection.best_of_n.BestOfN`.

A reward is any object with a ``name`` and ``score(input, candidates) -> list[float]`` (one
score per candidate, higher is better; an optional ``ascore`` is used by async callers).
``input`` is what the wrapped model received (a string, a list of messages or a
``PromptValue``); each candidate has ``.text`` and ``.output``. Three traditional rewards ship:

- :class:`CallableReward`: any Python function ``(input, candidate_text) -> float``;
- :class:`LLMJudgeReward`: an LLM-as-judge over any LangChain chat model, with a parsed score;
- :class:`SequenceClassifierReward`: a Hugging Face ``AutoModelForSequenceClassification``
  reward model (chat-template aware, batched, loaded offline).

A *decode-time* reward instead has ``make_observer(loaded_model)`` returning a
:class:`~esamp_agents.decoding.observers.DecodeObserver` with ``rewards() -> [prompt][sample]``;
``ESampLLM``/``ChatESamp`` take such rewards per call (``generate(..., rewards=[...])``) and
return each candidate's score in its metadata, which is how BestOfN scores the candidates
while they are generated.

:func:`score_candidates` / :func:`ascore_candidates` call a reward the one way BestOfN and
the tool-agent recipe share: ``config`` passed when the reward takes it, the result checked
by :func:`check_scores`, any failure a :class:`RewardError` that names the reward.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from langchain_core.language_models import BaseLanguageModel
from langchain_core.messages import BaseMessage, convert_to_messages, get_buffer_string
from langchain_core.prompt_values import ChatPromptValue, PromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import run_in_executor

from esamp_agents.messages import to_chat_messages


@dataclass
class ScoredCandidate:
    """One sampled candidate and everything BestOfN learned about it.

    ``output`` is what the wrapped model returns (``str`` for LLMs, ``AIMessage`` for chat
    models); ``rank`` is 0 for the chosen candidate's position in the fused ranking.
    """

    index: int
    output: Any
    text: str
    generation_info: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    fused: float = math.nan
    answer: Any = None
    rank: int = -1


@runtime_checkable
class Reward(Protocol):
    """Scores a group of candidates for one input; higher is better."""

    name: str

    def score(self, input: Any, candidates: Sequence[ScoredCandidate]) -> list[float]:
        """One float per candidate, in order (NaN marks a failure on that candidate)."""
        ...


class RewardError(RuntimeError):
    """A reward raised or returned an unusable result (the message names the reward)."""


# --------------------------------------------------------------------------- calling rewards


def check_scores(name: str, values: Any, expected: int) -> list[float]:
    """A reward's result as ``expected`` floats, or :class:`RewardError` naming the reward."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}; allowed: a list of {expected} floats")
    if len(values) != expected:
        raise RewardError(f"reward {name!r} returned {len(values)} scores for {expected} candidates")
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {name!r} returned {v!r}; allowed: real numbers") from exc
    return out


def reward_failure(name: str, exc: BaseException) -> RewardError:
    """``exc`` raised by reward ``name`` as a :class:`RewardError` that names it (chained by the caller)."""
    if isinstance(exc, RewardError):
        return exc
    return RewardError(f"reward {name!r} failed: {type(exc).__name__}: {exc}")


def _accepts_config(fn: Callable[..., Any]) -> bool:
    try:
        return "config" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def score_candidates(
    reward: Any, input: Any, candidates: Sequence[ScoredCandidate], config: RunnableConfig | None = None
) -> list[float]:
    """``reward.score(input, candidates)`` (passing ``config`` when it takes one), checked: one float
    per candidate. Any failure is a :class:`RewardError` naming the reward, chained to the cause."""
    name = str(getattr(reward, "name", type(reward).__name__))
    try:
        if config is not None and _accepts_config(reward.score):
            values = reward.score(input, candidates, config=config)
        else:
            values = reward.score(input, candidates)
    except Exception as exc:
        raise reward_failure(name, exc) from exc
    return check_scores(name, values, len(candidates))


async def ascore_candidates(
    reward: Any, input: Any, candidates: Sequence[ScoredCandidate], config: RunnableConfig | None = None
) -> list[float]:
    """Async :func:`score_candidates`: the reward's ``ascore`` when it has one, else ``score`` in a thread."""
    ascore = getattr(reward, "ascore", None)
    if not callable(ascore):
        return await run_in_executor(config, score_candidates, reward, input, candidates, config)
    name = str(getattr(reward, "name", type(reward).__name__))
    try:
        if config is not None and _accepts_config(ascore):
            values = await ascore(input, candidates, config=config)
        else:
            values = await ascore(input, candidates)
    except Exception as exc:
        raise reward_failure(name, exc) from exc
    return check_scores(name, values, len(candidates))


# --------------------------------------------------------------------------- input helpers


def as_prompt_value(input: Any) -> PromptValue:
    """A model input (str, messages, PromptValue) as the ``PromptValue`` ``generate_prompt`` takes."""
    if isinstance(input, PromptValue):
        return input
    if isinstance(input, str):
        return StringPromptValue(text=input)
    if isinstance(input, Sequence):
        return ChatPromptValue(messages=convert_to_messages(input))
    raise ValueError(
        f"input of type {type(input).__name__} is not a model input; allowed: str, a list of messages, a PromptValue"
    )


def input_messages(input: Any) -> list[BaseMessage]:
    """The model input as LangChain messages (a string is one human message)."""
    if isinstance(input, PromptValue):
        return input.to_messages()
    if isinstance(input, str):
        return convert_to_messages([("human", input)])
    if isinstance(input, Sequence):
        return convert_to_messages(input)
    raise ValueError(
        f"input of type {type(input).__name__} is not a model input; allowed: str, a list of messages, a PromptValue"
    )


def input_text(input: Any) -> str:
    """The model input as plain text: a lone human message is its content, else a transcript."""
    if isinstance(input, str):
        return input
    if isinstance(input, PromptValue) and not hasattr(input, "messages"):
        return input.to_string()
    messages = input_messages(input)
    if len(messages) == 1 and messages[0].type == "human":
        return str(messages[0].text)
    return get_buffer_string(messages)


def _as_score(value: Any, reward: str) -> float:
    """A reward's value as a float (bools, numpy and 0-d tensors included); anything else is a bug."""
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            inner = item()
        except (TypeError, ValueError, RuntimeError):
            inner = None
        if isinstance(inner, numbers.Real):
            return float(inner)
    raise TypeError(f"reward {reward!r} returned {value!r} ({type(value).__name__}); allowed: a real number")


# --------------------------------------------------------------------------- callable


class CallableReward:
    """A Python function ``fn(input, candidate_text) -> float`` as a reward."""

    def __init__(self, fn: Callable[[Any, str], float], name: str | None = None) -> None:
        if not callable(fn):
            raise ValueError(f"fn={fn!r} is not callable; allowed: a function (input, candidate_text) -> float")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={name!r} is empty; allowed: a non-empty string")

    def score(self, input: Any, candidates: Sequence[ScoredCandidate]) -> list[float]:
        return [_as_score(self.fn(input, c.text), self.name) for c in candidates]

    def __repr__(self) -> str:
        return f"CallableReward({self.name!r})"


# --------------------------------------------------------------------------- LLM judge

DEFAULT_JUDGE_PROMPT = ChatPromptTemplate.from_messages(
    [
        (
            "system",
            "You are a strict grader. Rate how correct and helpful the RESPONSE is as an answer to the "
            "QUESTION, on a scale from {low} (worst) to {high} (best). Reply with one line: 'Score: <number>'.",
        ),
        ("human", "QUESTION:\n{input}\n\nRESPONSE:\n{candidate}"),
    ]
)

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_SCORE_CUE = re.compile(rf"(?i)\b(?:score|rating)\b\s*(?:is|of)?\s*[:=]?\s*\**\s*({_NUMBER})")
_ANY_NUMBER = re.compile(_NUMBER)


def _fmt_number(v: float) -> str:
    return str(int(v)) if v.is_integer() else str(v)


def parse_judge_score(text: str) -> float:
    """The number after the last 'Score:'/'Rating:' cue, else the first number; NaN if none."""
    cues = _SCORE_CUE.findall(text)
    if cues:
        return float(cues[-1])
    first = _ANY_NUMBER.search(text)
    return float(first.group(0)) if first else math.nan


class LLMJudgeReward:
    """An LLM-as-judge: one judge call per candidate (batched, in parallel), score parsed from the reply.

    The prompt receives ``{input}`` (the question as text), ``{candidate}``, ``{low}`` and
    ``{high}``. A reply without a number, or with one outside ``score_range`` (unless
    ``clamp=True``), scores NaN: BestOfN then ranks that candidate worst for this reward.
    """

    def __init__(
        self,
        judge: BaseLanguageModel | Runnable,
        prompt: ChatPromptTemplate | str | None = None,
        *,
        score_range: tuple[float, float] = (1.0, 10.0),
        parser: Callable[[str], float] | None = None,
        clamp: bool = False,
        name: str = "llm_judge",
        max_concurrency: int | None = None,
    ) -> None:
        if not isinstance(judge, Runnable):
            raise ValueError(f"judge={judge!r} is not a LangChain chat model or Runnable")
        low, high = (float(v) for v in score_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"score_range={score_range!r} is invalid; allowed: (low, high) finite with low < high")
        if max_concurrency is not None and (not isinstance(max_concurrency, int) or max_concurrency < 1):
            raise ValueError(f"max_concurrency={max_concurrency!r} is invalid; allowed: an int >= 1 or None")
        if prompt is None:
            prompt = DEFAULT_JUDGE_PROMPT
        elif isinstance(prompt, str):
            prompt = ChatPromptTemplate.from_messages([("human", prompt)])
        missing = {"input", "candidate"} - set(prompt.input_variables)
        if missing:
            raise ValueError(
                f"prompt lacks the variable(s) {sorted(missing)}; allowed: a template using {{input}} and {{candidate}}"
            )
        extra = set(prompt.input_variables) - {"input", "candidate", "low", "high"}
        if extra:
            raise ValueError(f"prompt has unknown variable(s) {sorted(extra)}; allowed: input, candidate, low, high")
        self.judge = judge
        self.prompt = prompt
        self.score_range = (low, high)
        self.parser = parser or parse_judge_score
        self.clamp = clamp
        self.name = name
        self.max_concurrency = max_concurrency
        self._chain = prompt | judge

    def _inputs(self, input: Any, candidates: Sequence[ScoredCandidate]) -> list[dict[str, Any]]:
        question = input_text(input)
        low, high = self.score_range
        bounds = {"low": _fmt_number(low), "high": _fmt_number(high)}
        return [{"input": question, "candidate": c.text, **bounds} for c in candidates]

    def _config(self, config: RunnableConfig | None) -> RunnableConfig:
        out: RunnableConfig = dict(config or {})  # type: ignore[assignment]
        if self.max_concurrency is not None:
            current = out.get("max_concurrency")
            out["max_concurrency"] = self.max_concurrency if current is None else min(current, self.max_concurrency)
        return out

    def _parse(self, reply: Any) -> float:
        text = reply if isinstance(reply, str) else str(getattr(reply, "text", reply))
        try:
            value = float(self.parser(text))
        except (TypeError, ValueError):
            return math.nan
        low, high = self.score_range
        if math.isnan(value):
            return value
        if self.clamp:
            return min(max(value, low), high)
        return value if low <= value <= high else math.nan

    def score(
        self, input: Any, candidates: Sequence[ScoredCandidate], config: RunnableConfig | None = None
    ) -> list[float]:
        replies = self._chain.batch(self._inputs(input, candidates), self._config(config))
        return [self._parse(r) for r in replies]

    async def ascore(
        self, input: Any, candidates: Sequence[ScoredCandidate], config: RunnableConfig | None = None
    ) -> list[float]:
        replies = await self._chain.abatch(self._inputs(input, candidates), self._config(config))
        return [self._parse(r) for r in replies]

    def __repr__(self) -> str:
        return f"LLMJudgeReward({self.name!r}, range={self.score_range})"


# --------------------------------------------------------------------------- sequence classifier


class SequenceClassifierReward:
    """A Hugging Face sequence-classification reward model (``AutoModelForSequenceClassification``).

    ``model`` is a local folder / hub id (loaded now with ``from_pretrained``; offline unless
    ``local_files_only=False``) or a loaded model, then ``tokenizer`` is required. The score
    is ``logits[:, label_index]`` (0: the usual single-logit reward head). When the tokenizer
    has a chat template (or ``use_chat_template=True``) the pair is rendered as a
    conversation, user = input, assistant = candidate; otherwise it is encoded as a text pair.
    Candidates are scored in batches of ``batch_size`` (right padding); an input longer than
    ``max_length`` tokens is truncated from the left, so the end of the response is kept.
    If the model config has no ``pad_token_id`` it is set to the tokenizer's pad (or EOS)
    token, which HF's classifiers need to find each row's last token in a padded batch.
    """

    def __init__(
        self,
        model: str | Path | Any,
        tokenizer: Any | None = None,
        *,
        name: str = "sequence_classifier",
        label_index: int = 0,
        batch_size: int = 8,
        max_length: int | None = None,
        use_chat_template: bool | None = None,
        device: str | None = None,
        dtype: str | None = None,
        local_files_only: bool = True,
        **model_kwargs: Any,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is out of range; allowed: an int >= 1")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length={max_length!r} is out of range; allowed: an int >= 2 or None")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, (str, Path)):
            if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype={dtype!r} is not supported; allowed: 'float32', 'bfloat16', 'float16' or None")
            kwargs = dict(model_kwargs)
            if dtype is not None:
                kwargs["dtype"] = getattr(torch, dtype)
            try:
                loaded = AutoModelForSequenceClassification.from_pretrained(
                    str(model), local_files_only=local_files_only, **kwargs
                )
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model), local_files_only=local_files_only)
            except OSError as exc:
                raise ValueError(f"cannot load a sequence-classification model from {str(model)!r}: {exc}") from exc
            model = loaded
        elif tokenizer is None:
            raise ValueError("tokenizer=None with a loaded model; allowed: pass the model's tokenizer too")
        if not hasattr(model, "config") or not callable(model):
            raise ValueError(f"model={type(model).__name__} is not a transformers model; allowed: a path or a model")
        num_labels = int(getattr(model.config, "num_labels", 1))
        if not -num_labels <= label_index < num_labels:
            raise ValueError(
                f"label_index={label_index} is out of range; allowed: {-num_labels} <= label_index < {num_labels}"
            )
        if device is not None:
            model = model.to(device)
        model.eval()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template; allowed: False or None")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None)
        if pad is None:
            eos = tokenizer.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; allowed: a tokenizer with one of them")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad
        limit = max_length or min(
            int(getattr(tokenizer, "model_max_length", 0) or 0) or 1 << 30,
            int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 30,
            1 << 20,
        )
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.label_index = label_index
        self.batch_size = batch_size
        self.max_length = limit
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self._pad = int(pad)
        self._lock = threading.Lock()

    def encode(self, input: Any, candidate: str) -> list[int]:
        """Token ids the reward model reads for one (input, candidate) pair."""
        tok = self.tokenizer
        if self.use_chat_template:
            chat = [*to_chat_messages(input), {"role": "assistant", "content": candidate}]
            text = tok.apply_chat_template(chat, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(input_text(input), candidate)["input_ids"]
        ids = list(ids)
        return ids[-self.max_length :]

    def collate(self, encoded: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        """(input_ids, attention_mask) long tensors [B, T_max] of encoded rows, right-padded.

        The one batching rule of scoring, shared with training
        (:mod:`esamp_agents.selection.text_reward_training`) so both feed the model alike.
        """
        import torch

        if not encoded:
            raise ValueError("collate needs at least one encoded row")
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, row in enumerate(encoded):
            ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def score(self, input: Any, candidates: Sequence[ScoredCandidate]) -> list[float]:
        return self.score_texts(input, [c.text for c in candidates])

    def score_texts(self, input: Any, texts: Sequence[str]) -> list[float]:
        """Scores for raw candidate texts, in order."""
        import torch

        encoded = [self.encode(input, t) for t in texts]
        device = next(self.model.parameters()).device
        out: list[float] = []
        with self._lock, torch.no_grad():
            for start in range(0, len(encoded), self.batch_size):
                ids, mask = self.collate(encoded[start : start + self.batch_size])
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                out.extend(float(v) for v in logits[:, self.label_index].float().cpu())
        return out

    def __repr__(self) -> str:
        return f"SequenceClassifierReward({self.name!r}, label_index={self.label_index})"


__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "CallableReward",
    "LLMJudgeReward",
    "Reward",
    "RewardError",
    "ScoredCandidate",
    "SequenceClassifierReward",
    "as_prompt_value",
    "ascore_candidates",
    "check_scores",
    "input_messages",
    "input_text",
    "parse_judge_score",
    "reward_failure",
    "score_candidates",
]
