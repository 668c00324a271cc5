"""One KV cache for several decode jobs: their blocks of rows, right-aligned in one static cache.

Every row of a batch writes its next key/value at the same column (the model is fed one token
per row per step), so jobs that were prefilled apart are placed right-aligned: a job whose
state covers ``w`` columns sits in columns ``[W - w, W)`` of a batch ``W`` columns wide, and
its attention mask is zero to the left. Rebuilding copies each job's block once (from its own
prefill cache, or from the previous batch cache); columns no remaining job uses are dropped
then, and the capacity covers every job's remaining tokens, so a batch never has to grow
between rebuilds. Positions are per row, so the shift changes nothing a row computes.

Only caches made of plain :class:`~transformers.cache_utils.StaticLayer` layers can be merged
(no sliding windows or offloading): :func:`mergeable` says so, and the scheduler then runs
such a model's calls one at a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer


def mergeable(cache: Any) -> bool:
    """Whether ``cache`` is a static cache of plain (full-attention, on-device) layers."""
    if type(cache) is not StaticCache or getattr(cache, "offloading", False):
        return False
    return all(type(layer) is StaticLayer for layer in cache.layers)


@dataclass
class Block:
    """Where one job's rows are now: ``rows`` rows from ``row`` of ``cache``, its ``width``
    columns ending at column ``end`` (exclusive)."""

    cache: Any
    row: int
    rows: int
    end: int
    width: int


def merge(config: Any, blocks: Sequence[Block], capacity: int) -> tuple[StaticCache, int]:
    """A new static cache holding ``blocks`` one after another (rows), right-aligned; and its width.

    ``capacity`` is the number of columns to allocate (at least the widest block)."""
    width = max(b.width for b in blocks)
    if capacity < width:
        raise ValueError(f"capacity={capacity} is smaller than the widest block ({width} columns)")
    rows = sum(b.rows for b in blocks)
    merged = StaticCache(config=config, max_cache_len=capacity)
    for i, layer in enumerate(merged.layers):
        first = blocks[0].cache.layers[i]
        heads, k_dim, v_dim = first.keys.shape[1], first.keys.shape[-1], first.values.shape[-1]
        layer.lazy_initialization(
            first.keys.new_empty(rows, heads, 0, k_dim), first.values.new_empty(rows, heads, 0, v_dim)
        )
        row = 0
        for b in blocks:
            source = b.cache.layers[i]
            src_cols = slice(b.end - b.width, b.end)
            dst_cols = slice(width - b.width, width)
            layer.keys[row : row + b.rows, :, dst_cols] = source.keys[b.row : b.row + b.rows, :, src_cols]
            layer.values[row : row + b.rows, :, dst_cols] = source.values[b.row : b.row + b.rows, :, src_cols]
            row += b.rows
        layer.cumulative_length.fill_(width)
    return merged, width


def merged_mask(masks: Sequence[tuple[torch.Tensor, int]], width: int, capacity: int) -> torch.Tensor:
    """The batch's attention mask: each job's ``(mask, width)`` right-aligned at ``width``, and
    every column from ``width`` on (the tokens still to be fed) attended by every row."""
    rows = sum(m.shape[0] for m, _ in masks)
    out = torch.ones((rows, capacity), dtype=torch.long, device=masks[0][0].device)
    row = 0
    for mask, w in masks:
        out[row : row + mask.shape[0], : width - w] = 0
        out[row : row + mask.shape[0], width - w : width] = mask[:, :w]
        row += mask.shape[0]
    return out


def repeat_cache_rows(cache: Any, n: int) -> None:
    """Repeat every prompt's cached keys/values N times (prompt-major rows), so the
    prompt is prefilled once, not N times. Static layers have no such method yet."""
    if not isinstance(cache, StaticCache):
        cache.batch_repeat_interleave(n)
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.repeat_interleave(n, dim=0)
            layer.values = layer.values.repeat_interleave(n, dim=0)
            layer.batch_size = layer.keys.shape[0]


def cache_argument(model: Any) -> str:
    """The name a model's forward takes its KV cache by: recent transformers (5.24 here) renamed
    ``past_key_values`` to ``cache`` and warn on the old name (removed in 5.40); older releases
    only know the old one, so the range in pyproject.toml stays as it is."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - an uninspectable forward
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


__all__ = ["Block", "cache_argument", "merge", "mergeable", "merged_mask", "repeat_cache_rows"]
