"""Training the ELHSR reward head on labelled candidates.

Candidates of one problem share a ``group``. Validation is split by group, so no problem
is seen in both splits, and the weights kept are those of the best validation epoch (the
reference release saved the last epoch instead). Features stay in the caller's dtype
(float16 is fine) and are padded and converted batch by batch, so fitting several GB of
features never holds a float32 copy of all of them.

Model selection: the epoch with the highest validation Best-of-N accuracy (argmax R per
problem is a correct candidate, over problems with at least one correct candidate); ties go
to the lower validation loss. Accuracy is what Best-of-N uses; the loss breaks the many ties
a small validation set gives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead
from esamp_agents.validation import check_int as _check_int
from esamp_agents.validation import check_range as _check_range

LossName = Literal["bce", "bradley_terry", "hinge"]
LOSSES: tuple[str, ...] = ("bce", "bradley_terry", "hinge")
PAIRWISE_LOSSES: tuple[str, ...] = ("bradley_terry", "hinge")


@dataclass
class Example:
    """One labelled candidate: token features [T, dim] (float16 or float32), T >= 1."""

    features: Tensor
    label: bool
    group: str


@dataclass
class FitResult:
    """The fitted head (best-validation weights), a JSON-able summary, and per-epoch history."""

    head: Any
    """A :class:`GatedLinearHead`, or the head passed to :func:`fit`."""
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    train_groups: list[str] = field(default_factory=list)
    val_groups: list[str] = field(default_factory=list)


def pad_features(features: Sequence[Tensor], *, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Stack [T_i, dim] tensors into [B, T_max, dim] (common dtype, zero padding) and a [B, T_max] bool mask."""
    if not features:
        raise ValueError("pad_features needs at least one tensor")
    dtype = features[0].dtype
    for f in features[1:]:
        dtype = torch.promote_types(dtype, f.dtype)
    t_max = max(f.shape[0] for f in features)
    out = torch.zeros((len(features), t_max, features[0].shape[1]), dtype=dtype, device=device)
    mask = torch.zeros((len(features), t_max), dtype=torch.bool, device=device)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f.to(device=device, dtype=dtype, non_blocking=True)
        mask[i, : f.shape[0]] = True
    return out, mask


def _groups_in_order(examples: Sequence[Example]) -> dict[str, list[int]]:
    by_group: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_group.setdefault(ex.group, []).append(i)
    return by_group


def split_groups(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the groups (not the candidates) into (train, validation).

    Stratified by kind of group (some correct and some wrong / all correct / none correct),
    so validation gets its share of problems that Best-of-N accuracy and pairwise losses can
    use. ``val_fraction > 0`` puts at least one group in each split.
    """
    _check_range("val_fraction", val_fraction, 0.0, 1.0, high_open=True, allowed="0 <= val_fraction < 1")
    by_group = _groups_in_order(examples)
    names = list(by_group)
    if val_fraction == 0:
        return names, []
    if len(names) < 2:
        raise ValueError(
            f"val_fraction={val_fraction} needs at least 2 groups (problems) so that neither the train nor the "
            f"validation split is empty, got {len(names)}; use val_fraction=0 or add problems"
        )
    strata: list[list[str]] = [[], [], []]
    for name in names:
        labels = [bool(examples[i].label) for i in by_group[name]]
        strata[0 if any(labels) and not all(labels) else 1 if all(labels) else 2].append(name)
    gen = torch.Generator().manual_seed(seed)
    keyed: list[tuple[float, int, str]] = []
    for s, members in enumerate(strata):
        order = torch.randperm(len(members), generator=gen).tolist()
        keyed.extend(((pos + 0.5) / len(members), s, members[j]) for pos, j in enumerate(order))
    keyed.sort(key=lambda k: (k[0], k[1]))
    n_val = min(max(round(val_fraction * len(names)), 1), len(names) - 1)
    val = {name for _, _, name in keyed[:n_val]}
    return [n for n in names if n not in val], [n for n in names if n in val]


def bon_accuracy(rewards: Tensor, labels: Sequence[bool], groups: Sequence[str]) -> float:
    """Share of groups with >= 1 correct candidate whose argmax-reward candidate is correct (NaN if none)."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    hits = total = 0
    r = rewards.detach().float().cpu()
    for idx in by_group.values():
        if not any(labels[i] for i in idx):
            continue
        total += 1
        best = idx[int(torch.argmax(r[idx]))]
        hits += bool(labels[best])
    return hits / total if total else math.nan


def score_examples(head: GatedLinearHead, features: Sequence[Tensor], *, batch_size: int = 64) -> Tensor:
    """R for each [T_i, dim] feature tensor, in float32 on CPU (no grad)."""
    _check_int("batch_size", batch_size, 1)
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            feats, mask = pad_features(features[start : start + batch_size], device=head.device)
            out.append(head(feats, mask).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _loss_terms(rewards: Tensor, labels: Tensor, group_ids: Tensor, loss: str, margin: float) -> tuple[Tensor, int]:
    """(sum of per-item losses, number of items): candidates for BCE, (correct, wrong) pairs otherwise."""
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(rewards, labels, reduction="sum"), rewards.shape[0]
    pos = labels > 0.5
    pairs = (group_ids[:, None] == group_ids[None, :]) & pos[:, None] & ~pos[None, :]
    diff = (rewards[:, None] - rewards[None, :])[pairs]
    terms = F.softplus(-diff) if loss == "bradley_terry" else F.relu(margin - diff)
    return terms.sum(), int(diff.numel())


def _feature_stats(examples: Sequence[Example], indices: Sequence[int], dim: int) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population std over all tokens of ``indices``, merged one example at a
    time in float64 (Chan et al.), so no copy of the whole data set is made."""
    n = 0
    mean = torch.zeros(dim, dtype=torch.float64)
    m2 = torch.zeros(dim, dtype=torch.float64)
    for i in indices:
        x = examples[i].features.to(device="cpu", dtype=torch.float64)
        nb = x.shape[0]
        mb = x.mean(0)
        m2b = (x - mb).pow_(2).sum(0)
        delta = mb - mean
        total = n + nb
        mean += delta * (nb / total)
        m2 += m2b + delta.pow(2) * (n * nb / total)
        n = total
    std = (m2 / max(n, 1)).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features: leave unscaled
    return mean, std


def _check_examples(examples: Sequence[Example], spec: FeatureSpec) -> list[bool]:
    if not isinstance(spec, FeatureSpec):
        raise ValueError(f"spec must be a FeatureSpec, got {type(spec).__name__}")
    if len(examples) == 0:
        raise ValueError("examples is empty; fit needs labelled candidates")
    labels = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise ValueError(f"examples[{i}] is a {type(ex).__name__}, not an Example")
        f = ex.features
        if not isinstance(f, Tensor) or not f.is_floating_point():
            raise ValueError(f"examples[{i}].features must be a float tensor, got {getattr(f, 'dtype', type(f))}")
        if f.dim() != 2 or f.shape[0] < 1 or f.shape[1] != spec.dim:
            raise ValueError(
                f"examples[{i}].features has shape {tuple(f.shape)} but the spec needs [T >= 1, {spec.dim}]"
            )
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"examples[{i}].features holds NaN or infinite values")
        if isinstance(ex.label, bool) or (isinstance(ex.label, int) and ex.label in (0, 1)):
            labels.append(bool(ex.label))
        else:
            raise ValueError(f"examples[{i}].label={ex.label!r} must be a bool")
        if not isinstance(ex.group, str) or not ex.group:
            raise ValueError(f"examples[{i}].group={ex.group!r} must be a non-empty string (the problem id)")
    return labels


def _check_hyperparams(
    loss: str, gate: bool, standardize: bool, epochs: int, lr: float, weight_decay: float, groups_per_step: int,
    val_fraction: float, patience: int, hinge_margin: float, seed: int, progress: bool, device: str,
) -> None:  # fmt: skip
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not a known loss; allowed: {', '.join(LOSSES)}")
    for name, flag in (("gate", gate), ("standardize", standardize), ("progress", progress)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r} must be True or False")
    _check_int("epochs", epochs, 1, 100_000)
    _check_range("lr", lr, 0.0, 1.0, low_open=True, allowed="0 < lr <= 1")
    _check_range("weight_decay", weight_decay, 0.0, 1.0, allowed="0 <= weight_decay <= 1")
    _check_int("groups_per_step", groups_per_step, 1)
    _check_range("val_fraction", val_fraction, 0.0, 1.0, high_open=True, allowed="0 <= val_fraction < 1")
    _check_int("patience", patience, 1)
    _check_range("hinge_margin", hinge_margin, 0.0, 1e6, low_open=True, allowed="0 < hinge_margin <= 1e6")
    _check_int("seed", seed, 0, 2**63 - 1)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:0')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def fit(
    examples: Sequence[Example],
    spec: FeatureSpec,
    *,
    loss: LossName = "bce",
    gate: bool = True,
    standardize: bool = True,
    epochs: int = 40,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    groups_per_step: int = 8,
    val_fraction: float = 0.2,
    patience: int = 5,
    hinge_margin: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    device: str = "cpu",
    head: torch.nn.Module | None = None,
) -> FitResult:
    """Train a :class:`GatedLinearHead` on labelled candidates with AdamW; see the module docstring.

    ``head``: an untrained head of another form to fit instead (e.g. a
    :class:`~esamp_agents.hidden_reward.token_head.TokenTableHead`); its ``spec`` must be ``spec``
    and its ``gate`` ``gate``; its weights are re-initialised from the seed.

    Batches are whole groups (``groups_per_step`` problems per step), shuffled each epoch by a
    seeded generator: the same seed and data give the same weights. ``bce`` treats R as a logit;
    ``bradley_terry`` (-log sigmoid(R_c - R_i)) and ``hinge`` (max(0, margin - (R_c - R_i))) average
    over all (correct, wrong) pairs within a problem, so problems without both labels are skipped.
    Early stopping after ``patience`` epochs without a better validation score; ``val_fraction=0``
    trains all epochs and keeps the last.
    """
    _check_hyperparams(
        loss, gate, standardize, epochs, lr, weight_decay, groups_per_step, val_fraction, patience, hinge_margin,
        seed, progress, device,
    )  # fmt: skip
    labels = _check_examples(examples, spec)
    by_group = _groups_in_order(examples)
    mixed = {g for g, idx in by_group.items() if len({labels[i] for i in idx}) == 2}
    if loss in PAIRWISE_LOSSES and not mixed:
        raise ValueError(
            f"loss={loss!r} needs (correct, wrong) pairs within a problem, but no group has both a correct and a "
            "wrong candidate; use loss='bce' or add candidates"
        )
    started = time.perf_counter()
    train_groups, val_groups = split_groups(examples, val_fraction, seed)
    fit_groups = [g for g in train_groups if g in mixed] if loss in PAIRWISE_LOSSES else list(train_groups)
    if not fit_groups:
        raise ValueError(
            f"loss={loss!r}: every group with both a correct and a wrong candidate went to validation "
            f"(val_fraction={val_fraction}); lower val_fraction, change seed, or add problems"
        )
    train_idx = [i for g in train_groups for i in by_group[g]]
    val_idx = [i for g in val_groups for i in by_group[g]]

    gen = torch.Generator().manual_seed(seed)
    if head is None:
        head = GatedLinearHead(spec, gate=gate)
    elif getattr(head, "spec", None) != spec or getattr(head, "gate", None) != gate:
        raise ValueError(
            f"head reads {getattr(head, 'spec', None)!r} (gate={getattr(head, 'gate', None)!r}); "
            f"fit was asked for {spec!r} (gate={gate!r})"
        )
    head.init_weights(gen)
    if standardize:
        head.set_standardisation(*_feature_stats(examples, train_idx, spec.dim))
    head.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def batch_of(groups: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx = [i for g in groups for i in by_group[g]]
        feats, mask = pad_features([examples[i].features for i in idx], device=device)
        y = torch.tensor([float(labels[i]) for i in idx], device=device)
        gid = torch.tensor([k for k, g in enumerate(groups) for _ in by_group[g]], device=device)
        return feats, mask, y, gid

    def evaluate() -> tuple[float, float]:
        head.eval()
        total, count, rewards = 0.0, 0, []
        with torch.no_grad():
            for start in range(0, len(val_groups), groups_per_step):
                feats, mask, y, gid = batch_of(val_groups[start : start + groups_per_step])
                r = head(feats, mask)
                s, c = _loss_terms(r, y, gid, loss, hinge_margin)
                total, count = total + float(s), count + c
                rewards.append(r.cpu())
        val_loss = total / count if count else math.nan
        acc = bon_accuracy(torch.cat(rewards), [labels[i] for i in val_idx], [examples[i].group for i in val_idx])
        return val_loss, acc

    from tqdm.auto import tqdm

    history: list[dict[str, Any]] = []
    best_state: dict[str, Tensor] | None = None
    best_key: tuple[float, float] | None = None
    best_epoch, stale, stopped_early = 0, 0, False
    bar = tqdm(range(1, epochs + 1), desc="reward head", unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        order = torch.randperm(len(fit_groups), generator=gen).tolist()
        step_losses = []
        for start in range(0, len(order), groups_per_step):
            feats, mask, y, gid = batch_of([fit_groups[k] for k in order[start : start + groups_per_step]])
            s, c = _loss_terms(head(feats, mask), y, gid, loss, hinge_margin)
            batch_loss = s / c
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            step_losses.append(float(batch_loss.detach()))
        row: dict[str, Any] = {"epoch": epoch, "train_loss": sum(step_losses) / len(step_losses)}
        if val_groups:
            val_loss, acc = evaluate()
            row["val_loss"], row["val_bon_accuracy"] = _none_if_nan(val_loss), _none_if_nan(acc)
            key = (-1.0 if math.isnan(acc) else acc, -math.inf if math.isnan(val_loss) else -val_loss)
            if best_key is None or key > best_key:
                best_key, best_epoch, stale = key, epoch, 0
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            else:
                stale += 1
            bar.set_postfix(train_loss=f"{row['train_loss']:.4f}", val_acc=f"{acc:.3f}")
        else:
            best_epoch = epoch
            bar.set_postfix(train_loss=f"{row['train_loss']:.4f}")
        history.append(row)
        if val_groups and stale >= patience:
            stopped_early = epoch < epochs
            break
    bar.close()
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()

    best = history[best_epoch - 1]
    n_pos = sum(labels[i] for i in train_idx)
    summary: dict[str, Any] = {
        "loss": loss,
        "selection": "val_bon_accuracy, ties by lower val_loss" if val_groups else "last epoch (no validation)",
        "n_train_problems": len(train_groups),
        "n_train_problems_used": len(fit_groups),
        "n_val_problems": len(val_groups),
        "n_train_candidates": len(train_idx),
        "n_val_candidates": len(val_idx),
        "train_positive_rate": n_pos / len(train_idx),
        "val_positive_rate": (sum(labels[i] for i in val_idx) / len(val_idx)) if val_idx else None,
        "val_problems_with_correct": sum(any(labels[i] for i in by_group[g]) for g in val_groups),
        "train_tokens": sum(int(examples[i].features.shape[0]) for i in train_idx),
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "best_epoch": best_epoch,
        "best_val_bon_accuracy": best.get("val_bon_accuracy"),
        "best_val_loss": best.get("val_loss"),
        "train_loss_at_best": best["train_loss"],
        "num_parameters": head.num_parameters,
        "seconds": round(time.perf_counter() - started, 3),
        "seed": seed,
        "hyperparams": {
            "gate": gate,
            "standardize": standardize,
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "groups_per_step": groups_per_step,
            "val_fraction": val_fraction,
            "patience": patience,
            "hinge_margin": hinge_margin,
            "optimizer": "AdamW",
        },
    }
    head.training_summary = summary
    return FitResult(head=head, summary=summary, history=history, train_groups=train_groups, val_groups=val_groups)


__all__ = [
    "LOSSES",
    "Example",
    "FitResult",
    "bon_accuracy",
    "fit",
    "pad_features",
    "score_examples",
    "split_groups",
]
