"""Reward features from token logprobs: what a closed API gives, and the same from local logits.

A DEVIATION from the ELHSR paper, whose logits mode reads the full-vocabulary logits at
every response position. OpenAI-style APIs return, per generated token, its logprob and at
most 20 ``top_logprobs``; these features are built from exactly that, so a head trained
offline on a local model's logits applies unchanged to API responses.

Per content token (``k`` = the head's ``top_k``), ``k + 8`` values:

- the top-k logprobs, sorted descending; missing entries (an API sent fewer than k) and
  placeholders (OpenAI's ``-9999.0``) read :data:`LOGPROB_FLOOR`;
- the chosen token's logprob;
- its rank among the top-k as ``rank / k`` (0 = the most likely token), and a flag for
  "not in the top-k" (then the rank reads 1);
- the top-k probability mass, the entropy of the top-k (unnormalised, ``-sum p log p``)
  and of the top-k renormalised to sum 1;
- the margin between the two most likely tokens, and the chosen token's gap to the top.

Ranks are computed from VALUES (how many alternatives have a strictly higher logprob), not
from token strings, so the local path and the API path agree whatever the tokenizer's
string rendering. Alignment: an API's logprobs describe the distribution that produced each
token, i.e. the previous position's logits; the local path reads the same logits.
Only content tokens count: the closing end-of-turn token, which APIs do not show, is left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

LOGPROB_FLOOR = -30.0
"""Stands for "not given" and clamps placeholders such as OpenAI's -9999.0."""
MAX_TOP_K = 20
EXTRA_FEATURES = 8


class LogprobsMissingError(ValueError):
    """A response carries no token logprobs (ask the API for ``logprobs=True``)."""


def logprob_feature_dim(top_k: int) -> int:
    """Feature width for ``top_k`` alternatives per token."""
    _check_top_k(top_k)
    return top_k + EXTRA_FEATURES


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k={top_k!r} is out of range; allowed: 1 <= top_k <= {MAX_TOP_K}")


def token_features(chosen: torch.Tensor, top: torch.Tensor, top_k: int) -> torch.Tensor:
    """``chosen`` [T] logprobs and ``top`` [T, m] alternatives (any order, NaN/-inf/-9999 = missing)
    -> features [T, top_k + 8] in float32."""
    _check_top_k(top_k)
    chosen = chosen.float()
    top = top.float()
    if top.dim() != 2 or chosen.dim() != 1 or top.shape[0] != chosen.shape[0]:
        shapes = f"chosen {tuple(chosen.shape)} and top {tuple(top.shape)}"
        raise ValueError(f"shapes {shapes} do not match; need [T] and [T, m]")
    t = chosen.shape[0]
    floor = torch.tensor(LOGPROB_FLOOR)
    top = torch.where(torch.isfinite(top), top, floor).clamp(min=LOGPROB_FLOOR, max=0.0)
    chosen = torch.where(torch.isfinite(chosen), chosen, floor).clamp(min=LOGPROB_FLOOR, max=0.0)
    if top.shape[1] < top_k:
        top = torch.cat([top, floor.expand(t, top_k - top.shape[1])], dim=1)
    top = top.sort(dim=1, descending=True).values[:, :top_k]
    given = top > LOGPROB_FLOOR
    probs = top.exp() * given
    mass = probs.sum(1)
    entropy = -(probs * top).sum(1)
    renorm = probs / mass.clamp(min=1e-12).unsqueeze(1)
    renorm_entropy = -(renorm * renorm.clamp(min=1e-30).log()).sum(1)
    higher = ((top > chosen.unsqueeze(1) + 1e-6) & given).sum(1).float()
    outside = (higher >= given.sum(1).float()) & ~(top - chosen.unsqueeze(1)).abs().lt(1e-6).any(1)
    rank = torch.where(outside, torch.ones_like(higher), higher / top_k)
    second = top[:, 1] if top_k > 1 else top[:, 0]
    extra = torch.stack(
        [chosen, rank, outside.float(), mass, entropy, renorm_entropy, top[:, 0] - second, top[:, 0] - chosen], dim=1
    )
    return torch.cat([top, extra], dim=1)


def features_from_logits(logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor, top_k: int) -> torch.Tensor:
    """Local path: ``logits`` [T, vocab] that produced ``token_ids`` [T] -> features [T, top_k + 8]."""
    _check_top_k(top_k)
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    top = logprobs.topk(top_k, dim=-1).values
    return token_features(chosen.cpu(), top.cpu(), top_k)


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _as_float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _content(logprobs: Any, top_k: int) -> list[Any] | None:
    """The ``content`` list of OpenAI chat logprobs; None for a refusal; raises when logprobs are missing."""
    _check_top_k(top_k)
    if logprobs is None:
        raise LogprobsMissingError(
            "the response has no logprobs: request them (OpenAI: logprobs=True, top_logprobs=20; "
            "LangChain: ChatOpenAI(logprobs=True, top_logprobs=20)); reasoning models refuse them"
        )
    content = _field(logprobs, "content")
    if content is None:
        if _field(logprobs, "refusal"):
            return None
        raise LogprobsMissingError("logprobs has no 'content' list: expected OpenAI chat-completions logprobs")
    return list(content)


def _values(content: Sequence[Any], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.full((len(content),), math.nan)
    top = torch.full((len(content), top_k), math.nan)
    for i, item in enumerate(content):
        chosen[i] = _as_float(_field(item, "logprob"))
        alternatives = _field(item, "top_logprobs") or []
        given = (_as_float(_field(a, "logprob")) for a in alternatives)
        values = sorted((v for v in given if math.isfinite(v)), reverse=True)[:top_k]
        if values:
            top[i, : len(values)] = torch.tensor(values)
    return chosen, top


def features_from_openai(logprobs: Any, top_k: int) -> torch.Tensor:
    """OpenAI chat ``choice.logprobs`` (``{"content": [{token, logprob, bytes, top_logprobs}]}``,
    as a dict or the ``openai`` object) -> features [T, top_k + 8].

    Tolerates what real APIs send: fewer alternatives than ``top_k``, ``-9999.0``
    placeholders, null ``bytes``, null ``top_logprobs``. An empty reply gives ``[0, dim]``
    (the head scores it 0). ``None`` (logprobs not requested, or refused by the model)
    raises :class:`LogprobsMissingError`.
    """
    content = _content(logprobs, top_k)
    if content is None:
        return torch.zeros((0, logprob_feature_dim(top_k)))
    return token_features(*_values(content, top_k), top_k)


# --------------------------------------------------------------------------- token identity


def token_row_dim(top_k: int) -> int:
    """Width of a packed token row: ``[statistics (top_k + 8) | chosen row | top_k alt rows | top_k alt weights]``."""
    return logprob_feature_dim(top_k) + 1 + 2 * top_k


def token_bytes(item: Any) -> bytes:
    """A logprob entry's exact bytes (``bytes`` when the API sent them, else the token's UTF-8)."""
    raw = _field(item, "bytes")
    if raw is not None:
        try:
            return bytes(int(b) for b in raw)
        except (TypeError, ValueError):
            pass
    return str(_field(item, "token") or "").encode("utf-8")


def pack_token_rows(
    stats: torch.Tensor, chosen_rows: torch.Tensor, alt_rows: torch.Tensor, alt_logprobs: torch.Tensor
) -> torch.Tensor:
    """Statistics [T, k + 8], chosen rows [T], alternative rows [T, k] and their logprobs [T, k]
    (NaN = missing) -> packed rows [T, token_row_dim(k)]; alternatives weigh their top-k-renormalised
    probability (missing ones 0)."""
    given = torch.isfinite(alt_logprobs) & (alt_logprobs > LOGPROB_FLOOR)
    probs = torch.where(given, alt_logprobs.clamp(max=0.0), torch.full_like(alt_logprobs, -math.inf)).exp()
    weights = probs / probs.sum(1, keepdim=True).clamp(min=1e-12)
    rows = torch.where(given, alt_rows, torch.zeros_like(alt_rows))
    return torch.cat([stats, chosen_rows.float().unsqueeze(1), rows.float(), weights.float()], dim=1)


def token_rows_from_openai(logprobs: Any, top_k: int, index: Any) -> torch.Tensor:
    """OpenAI chat logprobs -> packed token rows [T, token_row_dim(top_k)], tokens mapped by their
    bytes with ``index`` (a :class:`~esamp_agents.hidden_reward.token_index.TokenIndex`)."""
    content = _content(logprobs, top_k)
    if content is None or not content:
        return torch.zeros((0, token_row_dim(top_k)))
    stats = token_features(*_values(content, top_k), top_k)
    t = len(content)
    chosen_rows = torch.zeros(t, dtype=torch.long)
    alt_rows = torch.zeros((t, top_k), dtype=torch.long)
    alt_logprobs = torch.full((t, top_k), math.nan)
    for i, item in enumerate(content):
        chosen_rows[i] = index.row(token_bytes(item))
        alternatives = [
            a for a in (_field(item, "top_logprobs") or []) if math.isfinite(_as_float(_field(a, "logprob")))
        ]
        alternatives.sort(key=lambda a: -_as_float(_field(a, "logprob")))  # the same top-k as the statistics
        for j, alt in enumerate(alternatives[:top_k]):
            alt_rows[i, j] = index.row(token_bytes(alt))
            alt_logprobs[i, j] = _as_float(_field(alt, "logprob"))
    return pack_token_rows(stats, chosen_rows, alt_rows, alt_logprobs)


__all__ = [
    "EXTRA_FEATURES",
    "LOGPROB_FLOOR",
    "MAX_TOP_K",
    "LogprobsMissingError",
    "features_from_logits",
    "features_from_openai",
    "logprob_feature_dim",
    "pack_token_rows",
    "token_bytes",
    "token_features",
    "token_row_dim",
    "token_rows_from_openai",
]
