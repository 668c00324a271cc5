"""The logit-only reward: the ELHSR gated linear head on token logprobs, for closed APIs.

Closed models expose no hidden states, only per-token logprobs with at most 20 alternatives.
:class:`LogprobReward` turns those (features of :mod:`esamp_agents.hidden_reward.logprob_features`, a
documented DEVIATION from the paper's full-logit mode) into one score per candidate with a
:class:`~esamp_agents.hidden_reward.head.GatedLinearHead` whose spec has ``kind="logprobs"``. The same
features come from a local model's logits (:func:`local_features`), so a head trained offline
on the embedded model applies unchanged to API responses.

Inputs it scores: a LangChain ``ChatOpenAI`` result (``LLMResult``/``ChatResult``, or AIMessages /
ChatGenerations, each carrying ``response_metadata["logprobs"]``), an ``openai``
``ChatCompletion`` (all choices), a :class:`~esamp_agents.adapters.sampling.SampleResult`, and
plain dicts of those shapes (legacy completions logprobs included). As a Best-of-N reward (``name``, ``needs_logprobs``,
``score(input, candidates)``) it reads each candidate's ``generation_info["logprobs"]``.

Fallback policy, never a crash on what real APIs send:

- no logprobs at all (not requested, or a reasoning model that refuses them), or logprobs
  without any ``top_logprobs`` while the head reads ``top_k`` of them: ``on_missing="raise"``
  (default) raises :class:`LogprobsMissingError` saying to request ``logprobs=True,
  top_logprobs=k``; ``on_missing="nan"`` scores that candidate NaN (Best-of-N fusion then
  ranks it worst for this reward, with a warning);
- a refusal or an empty reply: no tokens to score; ``on_empty="nan"`` (default) or ``"zero"``
  (the head's value for no tokens);
- fewer than ``top_k`` alternatives on some tokens, ``-9999.0`` placeholders, null ``bytes``:
  handled by the features (missing entries read the floor); a reply that never has ``top_k``
  alternatives (``top_logprobs`` set lower than the head's ``top_k``) gives a warning.

Token accounting: :meth:`LogprobReward.score_with_report` counts prompt and candidate tokens
with the offline tiktoken encodings of :mod:`esamp_agents.adapters.encodings`. Sampling N
candidates with logprobs from a real API, with bounded retries, is
:func:`esamp_agents.adapters.sampling.sample_with_logprobs`.
"""

from __future__ import annotations

import importlib.resources
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from esamp_agents.adapters._fields import field_of, text_of
from esamp_agents.adapters.encodings import count_message_tokens, encoding_name_for, openai_encoding
from esamp_agents.hidden_reward.head import GatedLinearHead, IncompatibleHeadError, load_head
from esamp_agents.hidden_reward.logprob_features import (
    LogprobsMissingError,
    features_from_logits,
    features_from_openai,
    logprob_feature_dim,
    token_rows_from_openai,
)
from esamp_agents.hidden_reward.token_head import TokenTableHead

SHIPPED_LOGPROB_HEAD_FILE = "smollm2-135m-instruct-logprob.safetensors"
"""The logprob head shipped for the embedded model as ``esamp-agents serve`` serves it (plain
sampling, ``top_logprobs=20``), trained by ``benchmarks/logprob_reward.py``."""
LOGPROB_KINDS: tuple[str, ...] = ("logprobs", "logprob_tokens")


def shipped_logprob_head_path() -> Path:
    """Where the shipped logprob head is installed (package data of ``esamp_agents.heads``)."""
    path = Path(str(importlib.resources.files("esamp_agents") / "heads" / SHIPPED_LOGPROB_HEAD_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"the shipped logprob head is missing from the installation: {path}")
    return path


OnMissing = Literal["raise", "nan"]
OnEmpty = Literal["nan", "zero"]
ON_MISSING: tuple[str, ...] = ("raise", "nan")
ON_EMPTY: tuple[str, ...] = ("nan", "zero")

# --------------------------------------------------------------------------- reading candidates


@dataclass
class CandidateLogprobs:
    """What the reward needs from one candidate: its OpenAI chat logprobs, text and refusal."""

    logprobs: Any
    text: str = ""
    refusal: str | None = None


def _from_completion_shape(lp: Any) -> Any:
    """Legacy completions logprobs (tokens, token_logprobs, top_logprobs) -> the chat shape."""
    if not isinstance(lp, Mapping) or "token_logprobs" not in lp:
        return lp
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or [None] * len(values)
    content = []
    for token, value, top in zip(tokens, values, tops, strict=False):
        alternatives = [{"token": k, "logprob": v} for k, v in (top or {}).items()]
        content.append({"token": token, "logprob": value, "top_logprobs": alternatives})
    return {"content": content}


def read_candidate(obj: Any) -> CandidateLogprobs:
    """One candidate in any supported form -> :class:`CandidateLogprobs`."""
    if isinstance(obj, CandidateLogprobs):
        return obj
    generation_info = field_of(obj, "generation_info")
    message = field_of(obj, "message")
    output = field_of(obj, "output")
    if output is not None and generation_info is not None:  # a Best-of-N ScoredCandidate
        meta = getattr(output, "response_metadata", None) or {}
        lp = (generation_info or {}).get("logprobs", meta.get("logprobs"))
        refusal = (getattr(output, "additional_kwargs", None) or {}).get("refusal")
        return CandidateLogprobs(_from_completion_shape(lp), str(field_of(obj, "text", "") or ""), refusal)
    if message is not None:
        meta = field_of(message, "response_metadata")
        if meta is not None or generation_info is not None:  # a LangChain ChatGeneration
            lp = (meta or {}).get("logprobs", (generation_info or {}).get("logprobs"))
            refusal = (getattr(message, "additional_kwargs", None) or {}).get("refusal")
            return CandidateLogprobs(lp, text_of(getattr(message, "content", "")), refusal)
        # an OpenAI choice (object or dict)
        return CandidateLogprobs(
            field_of(obj, "logprobs"), text_of(field_of(message, "content")), field_of(message, "refusal") or None
        )
    meta = getattr(obj, "response_metadata", None)
    if meta is not None:  # a LangChain message
        refusal = (getattr(obj, "additional_kwargs", None) or {}).get("refusal")
        return CandidateLogprobs(meta.get("logprobs"), text_of(getattr(obj, "content", "")), refusal)
    if generation_info is not None or hasattr(obj, "text"):  # a LangChain (LLM) Generation
        lp = (generation_info or {}).get("logprobs")
        return CandidateLogprobs(_from_completion_shape(lp), str(field_of(obj, "text", "") or ""))
    if isinstance(obj, Mapping):
        if "logprobs" not in obj and (obj.get("content") is None or isinstance(obj.get("content"), list)):
            # bare chat logprobs
            return CandidateLogprobs(obj)
        # a completions choice, or response_metadata
        return CandidateLogprobs(_from_completion_shape(obj.get("logprobs")), str(obj.get("text") or ""))
    content = getattr(obj, "content", ())
    if content is None or isinstance(content, list):  # a bare logprobs object (openai ChoiceLogprobs)
        return CandidateLogprobs(obj)
    raise ValueError(
        f"cannot read logprobs from a {type(obj).__name__}; allowed: an OpenAI choice or ChatCompletion, a LangChain "
        "AIMessage/ChatGeneration/ChatResult/LLMResult, a Best-of-N candidate, or dicts of those shapes"
    )


def read_candidates(response: Any) -> list[CandidateLogprobs]:
    """Every candidate of a response (ChatCompletion, SampleResult, ChatResult, single-prompt
    LLMResult, a list of candidates, or one candidate)."""
    generations = field_of(response, "generations")
    if isinstance(generations, list):
        if generations and isinstance(generations[0], list):  # LLMResult: one list per prompt
            if len(generations) != 1:
                raise ValueError(
                    f"the result holds {len(generations)} prompts; score one at a time: "
                    "[reward.score_response(g) for g in result.generations]"
                )
            generations = generations[0]
        return [read_candidate(g) for g in generations]
    choices = field_of(response, "choices")
    if choices is not None:
        ordered = sorted(choices, key=lambda c: field_of(c, "index", 0) or 0)
        return [read_candidate(c) for c in ordered]
    if isinstance(response, (list, tuple)):
        return [read_candidate(c) for c in response]
    return [read_candidate(response)]


def _top_counts(logprobs: Any) -> list[int]:
    content = field_of(logprobs, "content") or []
    return [len(field_of(item, "top_logprobs") or []) for item in content]


# --------------------------------------------------------------------------- local features


def local_features(loaded: Any, prompt_ids: Sequence[int], response_ids: Sequence[int], top_k: int) -> torch.Tensor:
    """The same features from a local model: one forward of prompt + response, the logits that
    produced each response token (position t-1 for token t) -> [len(response), top_k + 8]."""
    if not prompt_ids:
        raise ValueError("prompt_ids=[] is empty; allowed: at least one token (the logits of the first reply token)")
    if not response_ids:
        return torch.zeros((0, logprob_feature_dim(top_k)))
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=loaded.device)
    with loaded.lock, torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0]
    p = len(prompt_ids)
    return features_from_logits(logits[p - 1 : p - 1 + len(response_ids)], list(response_ids), top_k)


# --------------------------------------------------------------------------- the reward


@dataclass
class LogprobScoreReport:
    """Scores plus token accounting for one response."""

    scores: list[float]
    tokens: list[int]
    """Tokens with logprobs per candidate (the API's own tokenisation)."""
    text_tokens: list[int]
    """Each candidate's text counted with ``encoding`` (tiktoken, offline)."""
    encoding: str
    prompt_tokens: int | None = None
    """The prompt counted with ``encoding`` (OpenAI's chat recipe), when a prompt was given."""
    usage: dict[str, Any] | None = None
    """The response's own ``usage``, when it has one."""
    missing: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)


class LogprobReward:
    """The ELHSR gated linear head on top-k logprob features: one score per candidate.

    >>> reward = LogprobReward("head.safetensors")  # doctest: +SKIP
    >>> llm = ChatOpenAI(model="gpt-4o-mini", logprobs=True, top_logprobs=reward.top_logprobs, n=8)  # doctest: +SKIP
    >>> reward.score_response(llm.generate([[("human", "2+2?")]]))  # doctest: +SKIP

    ``head`` is a :class:`GatedLinearHead` (``kind="logprobs"``: statistics only), a
    :class:`~esamp_agents.hidden_reward.token_head.TokenTableHead` (``kind="logprob_tokens"``:
    statistics plus token identity), or a checkpoint path of either. ``on_missing`` and
    ``on_empty`` are the fallback policy described in the module docstring. Request
    ``top_logprobs=reward.top_logprobs`` (the head's ``top_k``).

    A token head learned the tokens of ONE model (its spec's ``base_model``): a response that
    names another model raises :class:`IncompatibleHeadError` (``check_model=False`` allows it).
    """

    needs_logprobs = True

    def __init__(
        self,
        head: GatedLinearHead | str | Path,
        *,
        on_missing: OnMissing = "raise",
        on_empty: OnEmpty = "nan",
        name: str = "logprob_reward",
        model_name: str = "gpt-4o",
        check_model: bool = True,
    ) -> None:
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing={on_missing!r} is invalid; allowed: {', '.join(ON_MISSING)}")
        if on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty={on_empty!r} is invalid; allowed: {', '.join(ON_EMPTY)}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} is empty; allowed: a non-empty string")
        encoding_name_for(model_name)
        if not isinstance(check_model, bool):
            raise ValueError(f"check_model={check_model!r} must be True or False")
        if isinstance(head, (str, Path)):
            head = load_head(head)
        if not isinstance(head, (GatedLinearHead, TokenTableHead)):
            raise ValueError(f"head={head!r} is invalid; allowed: a GatedLinearHead, a TokenTableHead or a checkpoint")
        if head.spec.kind not in LOGPROB_KINDS:
            raise IncompatibleHeadError(
                f"the head reads kind={head.spec.kind!r} features; LogprobReward needs a head of kind "
                f"{' or '.join(map(repr, LOGPROB_KINDS))}"
            )
        self.head: GatedLinearHead | TokenTableHead = head.eval()
        self.check_model = check_model
        self.on_missing = on_missing
        self.on_empty = on_empty
        self.name = name
        self.model_name = model_name

    @classmethod
    def shipped(cls, **kwargs: Any) -> LogprobReward:
        """The head trained for the embedded model as ``esamp-agents serve`` serves it (model name
        ``embedded``, plain sampling, ``top_logprobs=20``); see BENCHMARKS.md for what it is worth."""
        return cls(shipped_logprob_head_path(), **kwargs)

    def check_response_model(self, model: str | None) -> None:
        """Raise :class:`IncompatibleHeadError` when a token head meets another model's response."""
        if not self.check_model or model is None or self.head.spec.kind != "logprob_tokens":
            return
        if model != self.head.spec.base_model:
            raise IncompatibleHeadError(
                f"this logprob head learned the tokens of model {self.head.spec.base_model!r} but the response "
                f"comes from {model!r}; use a head trained on {model!r} (esamp-agents collect --api-base-url ...; "
                "train-reward --kind logprob_tokens) or pass check_model=False"
            )

    @property
    def top_logprobs(self) -> int:
        """How many alternatives per token to request (the head's ``top_k``)."""
        return self.head.spec.top_k

    # ---- features
    def features(self, candidate: Any) -> torch.Tensor:
        """One candidate -> [T, dim] features; raises :class:`LogprobsMissingError` when unusable."""
        c = read_candidate(candidate)
        if c.logprobs is None and (c.refusal or not c.text):
            return torch.zeros((0, self.head.spec.dim))  # a refusal or empty reply without logprobs
        if c.logprobs is not None and field_of(c.logprobs, "content") is None and not c.text:
            return torch.zeros((0, self.head.spec.dim))  # e.g. {"content": null, "refusal": "..."}
        if isinstance(self.head, TokenTableHead):
            feats = token_rows_from_openai(c.logprobs, self.top_logprobs, self.head.index)
        else:
            feats = features_from_openai(c.logprobs, self.top_logprobs)
        counts = _top_counts(c.logprobs)
        if counts and max(counts) == 0:
            raise LogprobsMissingError(
                f"the response has logprobs but no top_logprobs, and this head reads the top {self.top_logprobs}: "
                f"request them (OpenAI: logprobs=True, top_logprobs={self.top_logprobs}; "
                f"ChatOpenAI(logprobs=True, top_logprobs={self.top_logprobs}))"
            )
        if counts and max(counts) < self.top_logprobs:
            warnings.warn(
                f"the response has at most {max(counts)} top_logprobs per token but the head reads "
                f"{self.top_logprobs}: missing ones read as the floor; request top_logprobs={self.top_logprobs}",
                stacklevel=3,
            )
        return feats

    def score_features(self, features: Sequence[torch.Tensor]) -> list[float]:
        """[T_i, dim] tensors -> one head score each (0 for T = 0)."""
        if not features:
            return []
        from esamp_agents.hidden_reward.training import pad_features

        x, mask = pad_features([f.float() for f in features])
        with torch.no_grad():
            return [float(v) for v in self.head(x, mask)]

    # ---- scoring
    def score_with_report(
        self, response: Any, *, prompt: Sequence[Any] | str | None = None, model_name: str | None = None
    ) -> LogprobScoreReport:
        """Scores of every candidate in ``response`` plus token counts (see :class:`LogprobScoreReport`)."""
        candidates = read_candidates(response)
        self.check_response_model(model_name or self._response_model(response))
        feats: list[torch.Tensor] = []
        missing: list[int] = []
        for i, c in enumerate(candidates):
            try:
                feats.append(self.features(c))
            except LogprobsMissingError as exc:
                if self.on_missing == "raise":
                    raise LogprobsMissingError(f"candidate {i}: {exc}") from exc
                missing.append(i)
                feats.append(torch.zeros((0, self.head.spec.dim)))
        scores = self.score_features(feats)
        empty = [i for i, f in enumerate(feats) if f.shape[0] == 0 and i not in missing]
        for i in missing:
            scores[i] = math.nan
        if self.on_empty == "nan":
            for i in empty:
                scores[i] = math.nan
        name = model_name or self._response_model(response) or self.model_name
        encoding = openai_encoding(name)
        prompt_tokens = None
        if prompt is not None:
            prompt_tokens = count_message_tokens([prompt] if isinstance(prompt, str) else prompt, name)
        usage = field_of(response, "usage") if not isinstance(response, (list, tuple)) else None
        if usage is not None and not isinstance(usage, Mapping):
            usage = usage.model_dump() if hasattr(usage, "model_dump") else dict(vars(usage))
        return LogprobScoreReport(
            scores=scores,
            tokens=[int(f.shape[0]) for f in feats],
            text_tokens=[len(encoding.encode_ordinary(c.text)) for c in candidates],
            encoding=encoding.name,
            prompt_tokens=prompt_tokens,
            usage=dict(usage) if usage else None,
            missing=missing,
            empty=empty,
        )

    @staticmethod
    def _response_model(response: Any) -> str | None:
        name = field_of(response, "model") if not isinstance(response, (list, tuple)) else None
        if isinstance(name, str) and name:
            return name
        llm_output = field_of(response, "llm_output")
        if isinstance(llm_output, Mapping) and isinstance(llm_output.get("model_name"), str):
            return str(llm_output["model_name"])
        return None

    def score_response(self, response: Any) -> list[float]:
        """One float per candidate of ``response`` (any form :func:`read_candidates` reads)."""
        return self.score_with_report(response).scores

    def score(self, input: Any, candidates: Sequence[Any]) -> list[float]:
        """Best-of-N reward protocol: ``candidates`` carry ``generation_info["logprobs"]``."""
        return self.score_response(list(candidates))

    def score_local(self, loaded: Any, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> list[float]:
        """Scores from a local model's logits for the same tokens (offline training/validation;
        statistics heads only: a token head reads an API's token bytes)."""
        if isinstance(self.head, TokenTableHead):
            raise ValueError("score_local reads statistics only; score a token head on API responses (score_response)")
        return self.score_features([local_features(loaded, prompt_ids, r, self.top_logprobs) for r in responses])

    def __repr__(self) -> str:
        return f"LogprobReward(top_k={self.top_logprobs}, on_missing={self.on_missing!r}, on_empty={self.on_empty!r})"


__all__ = [
    "LOGPROB_KINDS",
    "ON_EMPTY",
    "ON_MISSING",
    "SHIPPED_LOGPROB_HEAD_FILE",
    "CandidateLogprobs",
    "LogprobReward",
    "LogprobScoreReport",
    "LogprobsMissingError",
    "OnEmpty",
    "OnMissing",
    "local_features",
    "read_candidate",
    "read_candidates",
    "shipped_logprob_head_path",
]
