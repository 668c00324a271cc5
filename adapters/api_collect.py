"""Labelled candidates from any OpenAI-compatible endpoint, for training a logprob reward head.

The closed-API user's data: N candidates per problem sampled from the API itself with
``logprobs`` and ``top_logprobs``, graded, stored with exactly what a logprob head reads
(every token's string, bytes and logprob and its alternatives). Resumable and crash-safe like
:mod:`esamp_agents.hidden_reward.collect`, whose record rules it shares.

On-disk format (``FORMAT_VERSION`` 1), in ``out_dir``:

- ``manifest.json``: ``format`` (``esamp-agents/collect-api``), ``format_version``, ``model``
  (the API model name), ``sampling`` (n, temperature, top_p, max_tokens, top_logprobs, seed,
  extra_body), ``suffix`` and ``created``; ``base_url`` is recorded but may change between runs.
- ``records.jsonl``: one JSON line per candidate: ``problem_id``, ``task``, ``key``,
  ``question``, ``answer``, ``sample``, ``text``, ``extracted``, ``correct``, ``finish_reason``,
  ``tokens`` (per token ``[token, logprob, bytes, [[alt_token, alt_logprob, alt_bytes], ...]]``;
  ``bytes`` is null when it equals the token's UTF-8 encoding), ``call`` (one per problem) and
  ``call_records``. :func:`chat_logprobs` turns ``tokens`` back into OpenAI's chat shape.

Each problem is one request of ``n`` candidates with ``seed = seed + hash(problem id)``, so a
resumed run asks for the same candidates; several problems are in flight at once
(``concurrency``), which lets a batching server (``esamp-agents serve``) decode them together.
Retries, backoff and partial results are :func:`esamp_agents.adapters.sampling.sample_with_logprobs`'s.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from esamp_agents.adapters._fields import field_of, text_of
from esamp_agents.adapters.sampling import sample_with_logprobs
from esamp_agents.atomic import atomic_write_bytes
from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, Problem, extract_answer, grade
from esamp_agents.hidden_reward.collect import (
    CollectFormatError,
    append_records,
    call_seed,
    pending_problems,
    read_manifest,
    read_records,
)
from esamp_agents.hidden_reward.logprob_features import MAX_TOP_K
from esamp_agents.validation import check_int

FORMAT_NAME = "esamp-agents/collect-api"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MATCHED_FIELDS = ("format_version", "model", "sampling", "suffix")


@dataclass
class ApiCollectSummary:
    """What one :func:`collect_from_api` run did."""

    problems_done: int
    problems_skipped: int
    candidates: int
    positives: int
    tokens: int
    failed: list[str]
    """Problem ids whose request failed after the retries (not written; a rerun retries them)."""
    seconds: float = 0.0

    @property
    def positive_rate(self) -> float:
        return self.positives / self.candidates if self.candidates else math.nan


def _bytes_or_none(token: str, raw: Any) -> list[int] | None:
    if raw is None:
        return None
    raw = [int(b) for b in raw]
    return None if raw == list(token.encode("utf-8")) else raw


def compact_tokens(logprobs: Any) -> list[list[Any]]:
    """OpenAI chat ``logprobs`` (dict or object) -> the compact per-token lists stored in records."""
    content = field_of(logprobs, "content") or []
    out: list[list[Any]] = []
    for item in content:
        token = str(field_of(item, "token") or "")
        alts = [
            [
                str(field_of(a, "token") or ""),
                float(field_of(a, "logprob")),
                _bytes_or_none(str(field_of(a, "token") or ""), field_of(a, "bytes")),
            ]
            for a in (field_of(item, "top_logprobs") or [])
        ]
        out.append([token, float(field_of(item, "logprob")), _bytes_or_none(token, field_of(item, "bytes")), alts])
    return out


def _expand(token: str, raw: list[int] | None) -> list[int]:
    return list(token.encode("utf-8")) if raw is None else list(raw)


def chat_logprobs(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's ``tokens`` -> OpenAI chat logprobs ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for token, logprob, raw, alts in record["tokens"]:
        content.append({
            "token": token,
            "logprob": logprob,
            "bytes": _expand(token, raw),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": _expand(t, b)} for t, lp, b in alts],
        })  # fmt: skip
    return {"content": content}


def _manifest(model: str, base_url: str, sampling: dict[str, Any], suffix: str) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": model,
        "base_url": base_url,
        "sampling": json.loads(json.dumps(sampling)),
        "suffix": suffix,
        "created": datetime.now(UTC).isoformat(),
    }


WHAT = "an API collection (esamp_agents.adapters.api_collect)"


def read_api_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The folder's manifest (raises :class:`CollectFormatError` if missing or not an API collection)."""
    return read_manifest(out_dir, fmt=FORMAT_NAME, version=FORMAT_VERSION, what=WHAT)


def read_api_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """All complete records of an API collection, in file order (read only)."""
    return read_records(out_dir, fmt=FORMAT_NAME, version=FORMAT_VERSION, what=WHAT)


def _check_args(
    problems: Sequence[Problem], n: int, top_logprobs: int, temperature: float, max_tokens: int, concurrency: int
) -> None:
    check_int("n", n, 1, 128)
    check_int("top_logprobs", top_logprobs, 1, MAX_TOP_K)
    check_int("max_tokens", max_tokens, 1)
    check_int("concurrency", concurrency, 1, 64)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError(f"temperature={temperature!r} is out of range; allowed: 0 <= temperature <= 2")
    ids: set[str] = set()
    for i, p in enumerate(problems):
        if not isinstance(p, Problem):
            raise ValueError(f"problems[{i}] is a {type(p).__name__}, not a Problem")
        if p.id in ids:
            raise ValueError(f"problem id {p.id!r} appears twice; ids must be unique (resuming is keyed by id)")
        ids.add(p.id)


def _records(problem: Problem, choices: Sequence[Any], call: int) -> list[dict[str, Any]]:
    records = []
    for i, choice in enumerate(choices):
        message = field_of(choice, "message")
        text = text_of(field_of(message, "content")) if message is not None else str(field_of(choice, "text") or "")
        records.append({
            "problem_id": problem.id,
            "task": problem.task,
            "key": problem.key,
            "question": problem.question,
            "answer": problem.answer,
            "sample": i,
            "text": text,
            "extracted": extract_answer(text),
            "correct": bool(grade(problem, text)),
            "finish_reason": field_of(choice, "finish_reason"),
            "tokens": compact_tokens(field_of(choice, "logprobs")),
            "call": call,
            "call_records": len(choices),
        })  # fmt: skip
    return records


def collect_from_api(
    client: Any,
    model: str,
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    n: int = 8,
    temperature: float = 0.7,
    top_p: float | None = None,
    max_tokens: int = 64,
    top_logprobs: int = MAX_TOP_K,
    seed: int = 0,
    extra_body: Mapping[str, Any] | None = None,
    suffix: str = DEFAULT_SUFFIX,
    concurrency: int = 4,
    max_retries: int = 3,
    timeout: float = 120.0,
    progress: bool = True,
) -> ApiCollectSummary:
    """Sample ``n`` candidates per problem from ``client`` (an ``openai.OpenAI``), grade, append to ``out_dir``.

    Problems already complete in ``out_dir`` are skipped; a problem whose request fails after
    ``max_retries`` is reported in ``failed`` and not written (a rerun asks again). Settings
    must match the folder's manifest (``base_url`` may differ). ``extra_body`` goes to every
    request (e.g. ``{"top_k": 50, "beta": 0}`` for ``esamp-agents serve``).
    """
    _check_args(problems, n, top_logprobs, temperature, max_tokens, concurrency)
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r} is empty; allowed: the API's model name")
    if extra_body is not None and not isinstance(extra_body, Mapping):
        raise ValueError(f"extra_body={extra_body!r} must be a mapping (JSON object) or None")
    sampling = {
        "n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
        "top_logprobs": top_logprobs, "seed": seed, "extra_body": dict(extra_body or {}),
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fresh = _manifest(model, str(getattr(client, "base_url", "") or ""), sampling, suffix)
    if (out / MANIFEST).exists():
        stored = read_api_manifest(out)
        for name in MATCHED_FIELDS:
            if stored.get(name) != fresh[name]:
                raise CollectFormatError(
                    f"{out} was collected with a different {name} (stored {stored.get(name)!r}, now {fresh[name]!r}); "
                    "resume with the same settings or collect into another folder"
                )
    else:
        atomic_write_bytes(out / MANIFEST, (json.dumps(fresh, indent=2) + "\n").encode("utf-8"))
    pending, first_call = pending_problems(out, problems)
    summary = ApiCollectSummary(0, len(problems) - len(pending), 0, 0, 0, [])
    create: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
    if top_p is not None:
        create["top_p"] = top_p
    if extra_body:
        create["extra_body"] = dict(extra_body)

    def one(problem: Problem) -> Any:
        messages = [{"role": "user", "content": problem.prompt(suffix)}]
        return sample_with_logprobs(
            client, messages, n, model, top_logprobs=top_logprobs, max_retries=max_retries, timeout=timeout,
            raise_on_error=False, seed=call_seed(seed, [problem.id]) % 2**31, **create,
        )  # fmt: skip

    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(pending), disable=not progress, unit="problem", desc="collect-api")
    calls = {p.id: first_call + i for i, p in enumerate(pending)}
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            queue = list(pending)
            running: dict[Future[Any], Problem] = {}
            while queue or running:
                while queue and len(running) < concurrency:
                    p = queue.pop(0)
                    running[pool.submit(one, p)] = p
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    problem = running.pop(future)
                    result = future.result()
                    if result.error is not None or len(result.choices) < n:
                        summary.failed.append(problem.id)
                    else:
                        records = _records(problem, result.choices[:n], calls[problem.id])
                        append_records(out, records)
                        summary.problems_done += 1
                        summary.candidates += len(records)
                        summary.positives += sum(r["correct"] for r in records)
                        summary.tokens += sum(len(r["tokens"]) for r in records)
                    bar.update(1)
                    bar.set_postfix(correct=f"{summary.positive_rate:.1%}", failed=len(summary.failed))
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ApiCollectSummary",
    "chat_logprobs",
    "collect_from_api",
    "compact_tokens",
    "read_api_manifest",
    "read_api_records",
]
