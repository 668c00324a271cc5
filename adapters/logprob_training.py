"""Training a logprob reward head on candidates collected from an API (:mod:`.api_collect`).

Two head forms read what an OpenAI-style API returns:

- ``kind="logprobs"``: statistics of each token's top-k logprobs
  (:mod:`esamp_agents.hidden_reward.logprob_features`), a plain gated linear head (58 numbers);
- ``kind="logprob_tokens"``: the same statistics plus token identity, a
  :class:`~esamp_agents.hidden_reward.token_head.TokenTableHead` whose tables are indexed by
  the tokens' bytes (``index="vocab"``: every byte string seen in training; ``"hash:B"``: B
  hashed buckets), tied to a local model's token embedding while training (``tables="embedding"``,
  the default for a vocab index: similar tokens start alike, which helps with little data) or
  learned free (``tables="free"``); the checkpoint keeps plain tables either way.

The head records the API model's name (``base_model``) and refuses responses of another model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esamp_agents.adapters.api_collect import chat_logprobs, read_api_manifest, read_api_records
from esamp_agents.hidden_reward.head import FeatureSpec
from esamp_agents.hidden_reward.logprob_features import (
    MAX_TOP_K,
    features_from_openai,
    logprob_feature_dim,
    token_bytes,
    token_rows_from_openai,
)
from esamp_agents.hidden_reward.token_head import TokenTableHead, token_spec
from esamp_agents.hidden_reward.token_index import MAX_BUCKETS, TokenIndex
from esamp_agents.hidden_reward.training import Example, FitResult, fit

HEAD_KINDS: tuple[str, ...] = ("logprobs", "logprob_tokens")
TABLES: tuple[str, ...] = ("free", "embedding")


def parse_index(text: str) -> tuple[str, int]:
    """``"vocab"`` or ``"hash:B"`` -> (kind, buckets); raises ValueError naming the allowed forms."""
    if text == "vocab":
        return "vocab", 0
    kind, _, buckets = text.partition(":")
    if kind == "hash" and buckets.isdigit() and 2 <= int(buckets) <= MAX_BUCKETS:
        return "hash", int(buckets)
    raise ValueError(f"index={text!r} is not understood; allowed: vocab, or hash:B with 2 <= B <= {MAX_BUCKETS}")


def default_tables(index: str) -> str:
    """Tied to an embedding for a vocab index (measured best, BENCHMARKS.md section 12), free for hashed rows."""
    return "free" if index.startswith("hash") else "embedding"


def byte_counts(records: Sequence[dict[str, Any]]) -> Counter[bytes]:
    """How often each token byte string occurs in the records, chosen or offered."""
    counts: Counter[bytes] = Counter()
    for r in records:
        for item in chat_logprobs(r)["content"]:
            counts[token_bytes(item)] += 1
            for alt in item["top_logprobs"]:
                counts[token_bytes(alt)] += 1
    return counts


def local_embedding(index: TokenIndex, loaded: Any) -> torch.Tensor:
    """A local model's input embedding of every vocab row, scaled to unit overall std: a row whose
    bytes are one local token gets that token's vector, others the mean over a re-tokenisation,
    the unseen row zeros. The API's tokenizer need not be the local one."""
    from esamp_agents.openai_format import renderer_for

    if index.kind != "vocab":
        raise ValueError(f"tables='embedding' needs a vocab index, not {index.kind!r} (hashed rows mix tokens)")
    table = loaded.model.get_input_embeddings().weight.detach().float().cpu()
    by_bytes = renderer_for(loaded.tokenizer).ids_by_bytes()
    out = torch.zeros(index.size, table.shape[1])
    for row, raw in enumerate(index.tokens):
        if by_bytes.get(raw, table.shape[0]) < table.shape[0]:
            out[row] = table[by_bytes[raw]]
            continue
        ids = loaded.tokenizer(raw.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if ids:
            out[row] = table[ids].mean(0)
    std = out[: len(index.tokens)].std() if index.tokens else torch.tensor(1.0)
    return out / (std if float(std) > 0 else 1.0)


def candidate_features(records: Sequence[dict[str, Any]], head: Any) -> list[torch.Tensor]:
    """Each record's features as ``head`` reads them: packed rows for a token head, statistics for a
    statistics head or a ``kind="logprobs"`` :class:`FeatureSpec`."""
    top_k = head.top_k if isinstance(head, FeatureSpec) else head.spec.top_k
    if isinstance(head, TokenTableHead):
        return [token_rows_from_openai(chat_logprobs(r), top_k, head.index) for r in records]
    return [features_from_openai(chat_logprobs(r), top_k) for r in records]


def new_head(
    records: Sequence[dict[str, Any]],
    model: str,
    *,
    kind: str = "logprob_tokens",
    index: str = "vocab",
    tables: str | None = None,
    top_k: int = MAX_TOP_K,
    loaded: Any = None,
) -> Any:
    """An untrained head for ``records`` (None for ``kind="logprobs"``: :func:`fit` builds it from the spec).

    ``tables=None``: tied to an embedding for a vocab index (``loaded``'s, by default the
    embedded model's; measured best in BENCHMARKS.md section 12), free for a hashed one.
    """
    if kind not in HEAD_KINDS:
        raise ValueError(f"kind={kind!r} is not a logprob head kind; allowed: {', '.join(HEAD_KINDS)}")
    tables = tables or default_tables(index)
    if tables not in TABLES:
        raise ValueError(f"tables={tables!r} is invalid; allowed: {', '.join(TABLES)}")
    if kind == "logprobs":
        return None
    index_kind, buckets = parse_index(index)
    token_index = TokenIndex.hashed(buckets) if index_kind == "hash" else TokenIndex.from_counts(byte_counts(records))
    head = TokenTableHead(token_spec(model, top_k, token_index), token_index)
    if tables == "embedding":
        if token_index.kind != "vocab":
            raise ValueError(f"tables='embedding' needs index='vocab', not {index!r} (hashed rows mix tokens)")
        if loaded is None:
            from esamp_agents.decoding.loading import EMBEDDED, load_model

            loaded = load_model(EMBEDDED)
        head.tie_to_embedding(local_embedding(token_index, loaded))
    return head


def stats_spec(model: str, top_k: int = MAX_TOP_K) -> FeatureSpec:
    """The spec of a statistics-only logprob head for ``model``'s logprobs."""
    return FeatureSpec(
        kind="logprobs", dim=logprob_feature_dim(top_k), base_model=model, hidden_size=1, num_layers=1, top_k=top_k
    )


def train_logprob_head(
    data: str | Path | Sequence[dict[str, Any]],
    *,
    model: str | None = None,
    kind: str = "logprob_tokens",
    index: str = "vocab",
    tables: str | None = None,
    top_k: int | None = None,
    loaded: Any = None,
    problems: set[str] | None = None,
    **fit_kwargs: Any,
) -> FitResult:
    """Fit a logprob head on an API collection folder (or its records); ``fit_kwargs`` go to
    :func:`esamp_agents.hidden_reward.training.fit` (lr, epochs, seed, val_fraction, loss...).

    ``model`` defaults to the folder's API model name and ``top_k`` to the ``top_logprobs`` it was
    collected with (given records: the most alternatives any token has); ``problems`` keeps only
    those problem ids.
    A vocab index is built from ALL given records (the head then has no row for tokens seen only
    in left-out problems, like any token it meets later for the first time).
    """
    if isinstance(data, (str, Path)):
        manifest = read_api_manifest(data)
        model = model or str(manifest["model"])
        top_k = top_k or int(manifest["sampling"]["top_logprobs"])
        records: Sequence[dict[str, Any]] = read_api_records(data)
    else:
        records = data
    if top_k is None:
        top_k = max((len(t[3]) for r in records for t in r["tokens"]), default=0)
        if top_k < 1:
            raise ValueError("the records carry no top_logprobs; collect with top_logprobs >= 1")
    if not model:
        raise ValueError("model= is needed when records are given directly (the API model the head will score)")
    if problems is not None:
        records = [r for r in records if r["problem_id"] in problems]
    if not records:
        raise ValueError("no records to train on (an empty collection, or problems= matched none)")
    head = new_head(records, model, kind=kind, index=index, tables=tables, top_k=top_k, loaded=loaded)
    spec = head.spec if head is not None else stats_spec(model, top_k)
    feats = candidate_features(records, head if head is not None else spec)
    examples = [
        Example(f, bool(r["correct"]), str(r["problem_id"])) for f, r in zip(feats, records, strict=True) if f.shape[0]
    ]
    result = fit(examples, spec, head=head, **fit_kwargs)
    if isinstance(result.head, TokenTableHead):
        result.head.materialise()
    result.head.training_summary.update(
        {"api_model": model, "head_kind": kind, "index": index if kind == "logprob_tokens" else None,
         "tables": (tables or default_tables(index)) if kind == "logprob_tokens" else None}
    )  # fmt: skip
    return result


__all__ = [
    "HEAD_KINDS",
    "TABLES",
    "byte_counts",
    "candidate_features",
    "default_tables",
    "local_embedding",
    "new_head",
    "parse_index",
    "stats_spec",
    "train_logprob_head",
]
