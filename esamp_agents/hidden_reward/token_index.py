"""Token identity for logprob heads: API tokens (bytes) -> rows of a head's per-token tables.

An API reports tokens as strings and bytes in ITS tokenizer, which the client may not have.
A logprob head that keeps token identity therefore indexes tokens by their bytes, with one
of two indexes, both stored inside the head's checkpoint so scoring needs no tokenizer:

- ``vocab``: the distinct byte strings seen in the training data (chosen tokens and their
  alternatives), one row each, plus a last row for every unseen token. Exact identity, any API.
- ``hash``: ``blake2b(bytes) mod buckets``: no vocabulary at all, so the same head applies to
  another tokenizer's tokens that spell the same bytes; collisions share a row.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from esamp_agents.validation import check_int

INDEX_KINDS: tuple[str, ...] = ("vocab", "hash")
MAX_BUCKETS = 1 << 20


def _hash_row(raw: bytes, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") % buckets


class TokenIndex:
    """Maps token bytes to table rows; ``size`` rows in all (``vocab``: the last is "unseen")."""

    def __init__(self, kind: str, *, tokens: Sequence[bytes] = (), buckets: int = 0) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"token index kind={kind!r} is unknown; allowed: {', '.join(INDEX_KINDS)}")
        self.kind = kind
        if kind == "hash":
            check_int("buckets", buckets, 2, MAX_BUCKETS)
            if tokens:
                raise ValueError("a hash index stores no tokens")
            self.buckets = buckets
            self.tokens: tuple[bytes, ...] = ()
            self._rows: dict[bytes, int] = {}
        else:
            self.buckets = 0
            self.tokens = tuple(bytes(t) for t in tokens)
            self._rows = {t: i for i, t in enumerate(self.tokens)}
            if len(self._rows) != len(self.tokens):
                raise ValueError("a vocab index's tokens must be distinct")

    @classmethod
    def hashed(cls, buckets: int) -> TokenIndex:
        return cls("hash", buckets=buckets)

    @classmethod
    def from_counts(cls, counts: Counter[bytes], *, min_count: int = 1) -> TokenIndex:
        """A vocab index of the byte strings seen at least ``min_count`` times (most frequent first)."""
        check_int("min_count", min_count, 1)
        kept = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
        return cls("vocab", tokens=kept)

    @property
    def size(self) -> int:
        """Table rows: the buckets, or the tokens plus one row for unseen tokens."""
        return self.buckets if self.kind == "hash" else len(self.tokens) + 1

    @property
    def unseen_row(self) -> int | None:
        return None if self.kind == "hash" else len(self.tokens)

    def row(self, raw: bytes) -> int:
        if self.kind == "hash":
            return _hash_row(raw, self.buckets)
        return self._rows.get(raw, len(self.tokens))

    def rows(self, raws: Iterable[bytes]) -> list[int]:
        return [self.row(r) for r in raws]

    @property
    def name(self) -> str:
        """How the spec names it: ``vocab`` or ``hash``."""
        return self.kind

    # ---- stored in the head's checkpoint
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``token_bytes`` (uint8, all tokens concatenated) and ``token_offsets`` (int64, len + 1); empty for hash."""
        if self.kind == "hash":
            return {}
        offsets = [0]
        for t in self.tokens:
            offsets.append(offsets[-1] + len(t))
        data = b"".join(self.tokens)
        return {
            "token_bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
            if data
            else torch.zeros(0, dtype=torch.uint8),
            "token_offsets": torch.tensor(offsets, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, kind: str, size: int, tensors: dict[str, torch.Tensor]) -> TokenIndex:
        """Rebuild from :meth:`to_tensors`; raises ValueError when the tensors are inconsistent."""
        if kind == "hash":
            return cls.hashed(size)
        if kind != "vocab":
            raise ValueError(f"token index kind={kind!r} is unknown; allowed: {', '.join(INDEX_KINDS)}")
        data, offsets = tensors.get("token_bytes"), tensors.get("token_offsets")
        if data is None or offsets is None:
            raise ValueError("a vocab index needs the tensors token_bytes and token_offsets")
        if data.dtype != torch.uint8 or offsets.dtype != torch.int64 or data.dim() != 1 or offsets.dim() != 1:
            raise ValueError("token_bytes must be 1-D uint8 and token_offsets 1-D int64")
        if offsets.numel() != size:
            raise ValueError(f"token_offsets has {offsets.numel()} entries; a vocab index of {size} rows needs {size}")
        if int(offsets[0]) != 0 or int(offsets[-1]) != data.numel():
            raise ValueError(
                f"token_offsets must run from 0 to len(token_bytes)={data.numel()}, "
                f"not from {int(offsets[0])} to {int(offsets[-1])}"
            )
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("token_offsets must not decrease")
        raw = bytes(data.tolist())
        bounds = offsets.tolist()
        return cls("vocab", tokens=[raw[a:b] for a, b in itertools.pairwise(bounds)])

    def __repr__(self) -> str:
        return (
            f"TokenIndex(hash, buckets={self.buckets})"
            if self.kind == "hash"
            else f"TokenIndex(vocab, {self.size} rows)"
        )


__all__ = ["INDEX_KINDS", "MAX_BUCKETS", "TokenIndex"]
