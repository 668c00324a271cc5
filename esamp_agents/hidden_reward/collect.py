"""Labelled data for the hidden-state reward: sample, grade, store; appendable and resumable.

On-disk format (``FORMAT_VERSION`` 1), in ``out_dir``:

- ``manifest.json``: ``format``, ``format_version``, the model identity (``model``,
  ``hidden_size``, ``num_layers``), ``spec`` (the :class:`FeatureSpec` of stored features, or
  null), ``sampling`` and ``esamp`` (all parameters), ``suffix`` (the answer-format instruction
  appended to each question) and ``created`` (UTC, ISO 8601). A later run into the same folder
  must use the same model, spec, sampling, ESamp parameters and suffix.
- ``records.jsonl``: one JSON line per candidate: ``problem_id``, ``task``, ``key``,
  ``question``, ``answer`` (the reference), ``sample`` (index within its problem),
  ``prompt_token_ids``, ``token_ids``, ``text``, ``extracted`` (the answer read from the text, or
  null), ``correct``, ``mean_logprob``, ``finish_reason``, ``novelty_mean`` (mean Distiller
  novelty, null with ESamp off), ``logprobs`` (per token, under the model at temperature 1),
  ``top_logprobs`` (per token, the ``sampling.top_logprobs`` highest logprobs; null when 0),
  ``distiller_loss`` (the prompt's Distiller loss per decode step, on sample 0 only; else null),
  ``call`` and ``call_records`` (the engine call that made it and how many records that call
  wrote), and when features are stored ``shard`` (path relative to ``out_dir``), ``offset`` and
  ``length`` (its rows in the shard; ``length == len(token_ids)``).
- ``shards/shard-NNNNN.safetensors``: one per engine call (NNNNN = ``call``), holding a single
  float16 tensor ``features`` ``[sum of T, dim]``: the call's candidates' token features, in
  record order, captured by :class:`~esamp_agents.hidden_reward.features.TokenFeatureRecorder` during the
  same decode (no second pass). Written atomically BEFORE the call's records are appended.

Crash safety: each call's records are appended with one write, flushed and fsync'd. On resume,
a torn last line is cut away, the records of a call that did not write all its lines are
dropped (so its problems are redone whole), and shards no record points at are ignored and
overwritten. Each call samples with ``seed = sampling.seed + hash(problem ids of the call)``,
so a resumed run produces the same candidates as an uninterrupted one when the chunking of
the remaining problems is the same (same problem list, same ``prompts_per_call``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from esamp_agents.atomic import atomic_write_bytes
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.decoding.loading import LoadedModel
from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.decoding.results import Candidate
from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, Problem, extract_answer, grade
from esamp_agents.hidden_reward.features import TokenFeatureRecorder, posthoc_features
from esamp_agents.hidden_reward.head import FeatureSpec, check_compatible
from esamp_agents.hidden_reward.logprob_features import LOGPROB_FLOOR
from esamp_agents.hidden_reward.training import Example

FORMAT_NAME = "esamp-agents/collect"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
SHARDS = "shards"
FEATURES_TENSOR = "features"
MATCHED_FIELDS = (
    "format_version", "model", "hidden_size", "num_layers", "dtype", "spec", "sampling", "esamp", "suffix",
)  # fmt: skip
# Settings added after folders were first written, with the value those folders were made with.
LATER_ESAMP_FIELDS = {"shared_distiller": False, "distiller_update_every": 1}


class CollectFormatError(ValueError):
    """A collection folder cannot be read or does not match the requested settings."""


@dataclass
class CollectSummary:
    """What one :func:`collect` run did (skipped problems were complete before it started)."""

    problems_done: int
    problems_skipped: int
    candidates: int
    positives: int
    tokens: int
    calls: int
    seconds: float

    @property
    def positive_rate(self) -> float:
        return self.positives / self.candidates if self.candidates else float("nan")


# --------------------------------------------------------------------------- files


def shard_bytes(features: torch.Tensor, call: int) -> bytes:
    """One call's features as the bytes of its safetensors shard (float16)."""
    from safetensors.torch import save

    tensor = features.to(device="cpu", dtype=torch.float16).contiguous()
    return save({FEATURES_TENSOR: tensor}, metadata={"format": FORMAT_NAME, "call": str(call)})


def _plain(value: Any) -> Any:
    """JSON round trip, so stored and fresh settings compare alike (tuples -> lists)."""
    return json.loads(json.dumps(value))


def make_manifest(
    loaded: LoadedModel, spec: FeatureSpec | None, sampling: SamplingParams, esamp: ESampParams, suffix: str
) -> dict[str, Any]:
    """The manifest a folder collected with these settings has (compared on resume)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": loaded.name,
        "hidden_size": loaded.hidden_size,
        "num_layers": loaded.num_layers,
        "dtype": loaded.dtype_name,
        "spec": spec.to_dict() if spec is not None else None,
        "sampling": _plain(asdict(sampling)),
        "esamp": _plain(asdict(esamp)),
        "suffix": suffix,
        "created": datetime.now(UTC).isoformat(),
    }


def manifest_json(out_dir: str | Path) -> Any:
    """The parsed ``manifest.json`` of a folder, whatever wrote it (raises :class:`CollectFormatError`
    when it is missing or not JSON): lets a reader tell the collection formats apart."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise CollectFormatError(f"{path} does not exist: {out_dir} is not a collection folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CollectFormatError(f"{path} is not valid JSON: {exc}") from exc


def read_manifest(
    out_dir: str | Path,
    *,
    fmt: str = FORMAT_NAME,
    version: int = FORMAT_VERSION,
    what: str = "written by esamp_agents.hidden_reward.collect",
) -> dict[str, Any]:
    """The folder's manifest (raises :class:`CollectFormatError` if missing or foreign); ``fmt``,
    ``version`` and ``what`` (for the message) name another collection format that shares these rules."""
    manifest = manifest_json(out_dir)
    path = Path(out_dir) / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CollectFormatError(f"{path} was not {what} (format={found!r}, expected {fmt!r})")
    if manifest.get("format_version") != version:
        raise CollectFormatError(
            f"{path} has format_version {manifest.get('format_version')!r}; this package reads {version}"
        )
    return manifest


def check_manifest(stored: dict[str, Any], fresh: dict[str, Any], out_dir: Path) -> None:
    """Raise :class:`CollectFormatError` naming the first setting in which ``stored`` differs."""
    for name in MATCHED_FIELDS:
        a, b = stored.get(name), fresh[name]
        if name == "esamp" and isinstance(a, dict):
            a = {**LATER_ESAMP_FIELDS, **a}
        if a == b or (name == "dtype" and name not in stored):  # folders from before dtype was recorded
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts = [
                f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
            detail = "; ".join(parts)
        else:
            detail = f"stored {a!r}, now {b!r}"
        raise CollectFormatError(
            f"{out_dir} was collected with a different {name} ({detail}); "
            "resume with the same settings or collect into another folder"
        )


def read_lines(path: Path) -> tuple[list[bytes], bool]:
    """Complete lines of ``records.jsonl`` and whether a torn (unterminated) last line follows."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    lines = [line for line in data[:cut].split(b"\n") if line.strip()]
    return lines, cut < len(data)


def parse_records(lines: list[bytes], path: Path) -> tuple[list[tuple[bytes, dict]], set[int]]:
    """Records of complete calls (with their raw lines) and the calls found incomplete."""
    parsed: list[tuple[bytes, dict]] = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as exc:
            raise CollectFormatError(f"{path} line {number} is not valid JSON ({exc}); the file is damaged") from exc
        if not isinstance(record, dict) or not isinstance(record.get("call"), int):
            raise CollectFormatError(f"{path} line {number} is not a collection record")
        parsed.append((line, record))
    counts = Counter(r["call"] for _, r in parsed)
    incomplete = {r["call"] for _, r in parsed if r.get("call_records") != counts[r["call"]]}
    kept = [(line, r) for line, r in parsed if r["call"] not in incomplete]
    seen: set[tuple[str, int]] = set()
    for _, r in kept:
        ident = (r["problem_id"], r["sample"])
        if ident in seen:
            raise CollectFormatError(f"{path} holds problem {ident[0]!r} sample {ident[1]} twice; the file is damaged")
        seen.add(ident)
    return kept, incomplete


def read_records(out_dir: str | Path, **manifest: Any) -> list[dict[str, Any]]:
    """All complete records, in file order (read only: a torn last line and the records of an
    unfinished call are left out, not removed; :func:`collect` removes them when it resumes).
    ``manifest`` (fmt, version, what) go to :func:`read_manifest` for another format's folder."""
    path = Path(out_dir) / RECORDS
    read_manifest(out_dir, **manifest)
    lines, _torn = read_lines(path)
    kept, _ = parse_records(lines, path)
    return [r for _, r in kept]


def repair_records(out_dir: Path) -> list[dict[str, Any]]:
    """Cut a torn last line and drop unfinished calls' records in place; return what stays."""
    path = out_dir / RECORDS
    lines, torn = read_lines(path)
    kept, incomplete = parse_records(lines, path)
    if torn or incomplete:
        atomic_write_bytes(path, b"".join(line + b"\n" for line, _ in kept))
    return [r for _, r in kept]


# --------------------------------------------------------------------------- collecting


def call_seed(base: int, problem_ids: Sequence[str]) -> int:
    """The seed of one engine call: ``base`` + a stable hash of its problem ids (mod 2**63)."""
    digest = hashlib.sha256("\x1f".join(problem_ids).encode("utf-8")).digest()
    return (base + int.from_bytes(digest[:8], "big")) % 2**63


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _floor(value: float) -> float:
    """JSON has no -inf: a token of probability 0 (only under filters) is stored at the feature floor."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


def _record(
    problem: Problem, prompt_ids: list[int], cand: Candidate, call: int, call_records: int, loss: list[float]
) -> dict[str, Any]:
    novelty = [v for v in (cand.novelty or []) if math.isfinite(v)]
    return {
        "problem_id": problem.id,
        "task": problem.task,
        "key": problem.key,
        "question": problem.question,
        "answer": problem.answer,
        "sample": cand.index,
        "prompt_token_ids": prompt_ids,
        "token_ids": cand.token_ids,
        "text": cand.text,
        "extracted": extract_answer(cand.text),
        "correct": bool(grade(problem, cand.text)),
        "mean_logprob": _finite(cand.mean_logprob),
        "finish_reason": cand.finish_reason,
        "novelty_mean": sum(novelty) / len(novelty) if novelty else None,
        "logprobs": [_floor(v) for v in cand.logprobs],
        "top_logprobs": [[_floor(v) for _, v in alts] for alts in cand.top_logprobs] if cand.top_logprobs else None,
        "distiller_loss": [_finite(v) for v in loss] if cand.index == 0 and loss else None,
        "call": call,
        "call_records": call_records,
    }


def check_collect_args(
    engine: ESampEngine,
    problems: Sequence[Problem],
    sampling: SamplingParams,
    esamp: ESampParams,
    spec: FeatureSpec | None,
    prompts_per_call: int,
    suffix: str,
) -> None:
    if not isinstance(engine, ESampEngine):
        raise ValueError(f"engine must be an ESampEngine, got {type(engine).__name__}")
    if not isinstance(sampling, SamplingParams) or not isinstance(esamp, ESampParams):
        raise ValueError("sampling must be SamplingParams and esamp ESampParams")
    if sampling.seed is None:
        raise ValueError(
            "sampling.seed=None; collect needs an integer seed so that a resumed run reproduces its samples"
        )
    if isinstance(prompts_per_call, bool) or not isinstance(prompts_per_call, int) or prompts_per_call < 1:
        raise ValueError(f"prompts_per_call={prompts_per_call!r} is out of range; allowed: an integer >= 1")
    if not isinstance(suffix, str):
        raise ValueError(f"suffix={suffix!r} must be a string")
    ids: set[str] = set()
    for i, p in enumerate(problems):
        if not isinstance(p, Problem):
            raise ValueError(f"problems[{i}] is a {type(p).__name__}, not a Problem")
        if p.id in ids:
            raise ValueError(f"problem id {p.id!r} appears twice; ids must be unique (resuming is keyed by id)")
        ids.add(p.id)
    if spec is not None:
        if not isinstance(spec, FeatureSpec) or spec.kind != "hidden":
            raise ValueError(f"spec must be a FeatureSpec of kind 'hidden' (or None), got {spec!r}")
        loaded = engine.loaded
        check_compatible(spec, base_model=loaded.name, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)


@dataclass
class CallOutput:
    """What one engine call produced: its records (in order) and its shard's bytes (or None)."""

    call: int
    records: list[dict[str, Any]]
    shard: bytes | None


@dataclass
class CollectPlan:
    """The work a run has left: ``chunks[i]`` is engine call ``first_call + i``."""

    out: Path
    chunks: list[list[Problem]]
    first_call: int
    summary: CollectSummary


def pending_problems(out: Path, problems: Sequence[Problem]) -> tuple[list[Problem], int]:
    """Repair an interrupted folder, then (the problems it does not hold yet, the next call number);
    a stored id with another question raises :class:`CollectFormatError`."""
    existing = repair_records(out)
    stored_questions = {r["problem_id"]: r["question"] for r in existing}
    for p in problems:
        if p.id in stored_questions and stored_questions[p.id] != p.question:
            raise CollectFormatError(
                f"problem id {p.id!r} is stored in {out} with question {stored_questions[p.id]!r} "
                f"but given with {p.question!r}; ids must name the same problem"
            )
    pending = [p for p in problems if p.id not in stored_questions]
    return pending, max((r["call"] for r in existing), default=-1) + 1


def append_records(out: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append one call's records with one write, flushed and fsync'd (a crash tears at most this call)."""
    payload = "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(out / RECORDS, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def plan_collect(
    loaded: LoadedModel,
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    sampling: SamplingParams,
    esamp: ESampParams,
    spec: FeatureSpec | None,
    prompts_per_call: int,
    suffix: str,
) -> CollectPlan:
    """Write or check the manifest, repair an interrupted folder and chunk the pending problems.

    Shared by :func:`collect` and the Ray path, so both number calls and chunk problems alike
    (the same calls get the same seeds, hence the same candidates).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fresh = make_manifest(loaded, spec, sampling, esamp, suffix)
    if (out / MANIFEST).exists():
        check_manifest(read_manifest(out), fresh, out)
    else:
        atomic_write_bytes(out / MANIFEST, (json.dumps(fresh, indent=2) + "\n").encode("utf-8"))

    pending, first_call = pending_problems(out, problems)
    chunks = [pending[i : i + prompts_per_call] for i in range(0, len(pending), prompts_per_call)]
    return CollectPlan(out, chunks, first_call, CollectSummary(0, len(problems) - len(pending), 0, 0, 0, 0, 0.0))


def collect(
    engine: ESampEngine,
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    sampling: SamplingParams,
    esamp: ESampParams,
    spec: FeatureSpec | None = None,
    prompts_per_call: int = 4,
    progress: bool = True,
    suffix: str = DEFAULT_SUFFIX,
) -> CollectSummary:
    """Sample ``sampling.n`` candidates per problem, grade them and append them to ``out_dir``.

    Problems already complete in ``out_dir`` are skipped; the rest go to the engine
    ``prompts_per_call`` at a time, as chat-template prompts. With ``spec`` the token features
    are captured during the same decode and stored in float16 shards; with ``spec=None`` only
    tokens and labels are stored (:func:`load_examples` can recompute features post hoc).
    For many problems on many processes or machines see :func:`esamp_agents.hidden_reward.collect_ray.collect_ray`.
    """
    check_collect_args(engine, problems, sampling, esamp, spec, prompts_per_call, suffix)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    plan = plan_collect(
        engine.loaded, problems, out_dir, sampling=sampling, esamp=esamp, spec=spec,
        prompts_per_call=prompts_per_call, suffix=suffix,
    )  # fmt: skip
    summary = plan.summary
    bar = tqdm(total=sum(map(len, plan.chunks)), disable=not progress, unit="problem", desc="collect")
    try:
        for i, chunk in enumerate(plan.chunks):
            output = generate_call(engine, chunk, plan.first_call + i, sampling, esamp, spec, suffix)
            write_call(plan.out, output, summary)
            bar.update(len(chunk))
            bar.set_postfix(correct=f"{summary.positive_rate:.1%}")
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def generate_call(
    engine: ESampEngine,
    chunk: Sequence[Problem],
    call: int,
    sampling: SamplingParams,
    esamp: ESampParams,
    spec: FeatureSpec | None,
    suffix: str = DEFAULT_SUFFIX,
) -> CallOutput:
    """One engine call: generate and grade ``chunk`` (nothing is written; see :func:`write_call`)."""
    loaded = engine.loaded
    prompts = [loaded.chat_token_ids([{"role": "user", "content": p.prompt(suffix)}]) for p in chunk]
    call_sampling = replace(sampling, seed=call_seed(int(sampling.seed or 0), [p.id for p in chunk]))
    recorder = TokenFeatureRecorder(spec) if spec is not None else None
    result = engine.generate(
        prompts, call_sampling, esamp, observers=[recorder] if recorder else (), add_special_tokens=False
    )
    call_records = len(chunk) * sampling.n
    records: list[dict[str, Any]] = []
    for problem, prompt_ids, pr in zip(chunk, prompts, result.results, strict=True):
        records.extend(_record(problem, prompt_ids, c, call, call_records, pr.distiller_loss) for c in pr.candidates)
    shard = None
    if recorder is not None:
        feats = [f for row in recorder.features() for f in row]
        offset = 0
        name = f"{SHARDS}/shard-{call:05d}.safetensors"
        for record, f in zip(records, feats, strict=True):
            if f.shape[0] != len(record["token_ids"]):
                raise RuntimeError(f"recorded {f.shape[0]} feature rows for {len(record['token_ids'])} tokens")
            record.update(shard=name, offset=offset, length=int(f.shape[0]))
            offset += int(f.shape[0])
        shard = shard_bytes(torch.cat(feats), call)
    return CallOutput(call, records, shard)


def write_call(out: Path, output: CallOutput, summary: CollectSummary) -> None:
    """Write a call's shard atomically, THEN append its records with one fsync'd write."""
    records = output.records
    if output.shard is not None:
        atomic_write_bytes(out / SHARDS / f"shard-{output.call:05d}.safetensors", output.shard)
    append_records(out, records)
    summary.problems_done += len({r["problem_id"] for r in records})
    summary.calls += 1
    summary.candidates += len(records)
    summary.positives += sum(r["correct"] for r in records)
    summary.tokens += sum(len(r["token_ids"]) for r in records)


# --------------------------------------------------------------------------- loading


def _from_shards(out: Path, records: list[dict[str, Any]], spec: FeatureSpec) -> list[torch.Tensor]:
    from safetensors import safe_open

    feats: list[torch.Tensor] = []
    handles: dict[str, Any] = {}
    try:
        for r in records:
            name = r.get("shard")
            if name is None:
                raise CollectFormatError(f"record of problem {r['problem_id']!r} sample {r['sample']} has no shard")
            if name not in handles:
                path = out / name
                if not path.is_file():
                    raise CollectFormatError(f"shard {path} referenced by the records is missing")
                handles[name] = safe_open(str(path), framework="pt", device="cpu")
            part = handles[name].get_slice(FEATURES_TENSOR)
            rows, dim = part.get_shape()
            offset, length = r["offset"], r["length"]
            if dim != spec.dim or offset + length > rows or length != len(r["token_ids"]):
                raise CollectFormatError(
                    f"shard {name} ([{rows}, {dim}]) cannot hold rows {offset}..{offset + length} of width {spec.dim} "
                    f"for {len(r['token_ids'])} tokens (problem {r['problem_id']!r} sample {r['sample']})"
                )
            feats.append(part[offset : offset + length])
    finally:
        handles.clear()
    return feats


def load_examples(
    out_dir: str | Path, *, loaded: LoadedModel | None = None, spec: FeatureSpec | None = None
) -> list[Example]:
    """Labelled examples (features ``[T, dim]`` float16, ``label = correct``, ``group = problem_id``).

    Stored features are read from the shards when the folder has them and ``spec`` is None or
    equal to the stored one. Otherwise they are recomputed post hoc (one forward per batch of
    candidates, no generation), which needs ``loaded`` (the model that wrote the candidates)
    and ``spec``.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    stored = FeatureSpec.from_dict(manifest["spec"]) if manifest.get("spec") is not None else None
    records = read_records(out)
    if stored is not None and (spec is None or spec == stored):
        feats = _from_shards(out, records, stored)
    else:
        if loaded is None or spec is None:
            why = "stores no features (collected with spec=None)" if stored is None else "stores other features"
            raise ValueError(f"{out} {why}: pass loaded= (the model that wrote it) and spec= to recompute them")
        if loaded.name != manifest["model"]:
            raise ValueError(f"{out} was written by model {manifest['model']!r}, not {loaded.name!r}")
        feats = posthoc_features(
            loaded, [r["prompt_token_ids"] for r in records], [r["token_ids"] for r in records], spec
        )
    return [
        Example(features=f, label=bool(r["correct"]), group=str(r["problem_id"]))
        for r, f in zip(records, feats, strict=True)
    ]


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CallOutput",
    "CollectFormatError",
    "CollectPlan",
    "CollectSummary",
    "append_records",
    "call_seed",
    "check_collect_args",
    "check_manifest",
    "collect",
    "generate_call",
    "load_examples",
    "make_manifest",
    "manifest_json",
    "parse_records",
    "pending_problems",
    "plan_collect",
    "read_lines",
    "read_manifest",
    "read_records",
    "repair_records",
    "shard_bytes",
    "write_call",
]
