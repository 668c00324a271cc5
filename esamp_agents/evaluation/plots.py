"""The eval plots: Pass@k and Best-of-N@k curves with 95% CI bands, and diversity vs quality.

matplotlib is optional: :func:`write_plots` raises ImportError without it, and the harness
then records :data:`MATPLOTLIB_MISSING` instead of plots.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from esamp_agents.evaluation.report import SELECTOR_LABELS, Interval

PLOT_FILES = ("pass_at_k.png", "best_of_n.png", "diversity_quality.png")
MATPLOTLIB_MISSING = "plots skipped: matplotlib is not installed (pip install 'matplotlib>=3.8')"


def _series(by_k: Mapping[str, Interval], ks: Sequence[int]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(ks, mean, low, high) of the ks that have a value."""
    rows = [(k, by_k[str(k)]) for k in ks if by_k.get(str(k)) and by_k[str(k)]["mean"] is not None]
    return [k for k, _ in rows], [v["mean"] for _, v in rows], [v["low"] for _, v in rows], [v["high"] for _, v in rows]


def _style(i: int, count: int) -> tuple[Any, str]:
    """A distinct (color, marker) per sampler: matplotlib's 10 colors, then tab20 and other markers."""
    if count <= 10:
        return f"C{i}", "o"
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20), "osD^v<>p"[(i // 20) % 8]


def _curves(ax: Any, results: Mapping[str, Any], pick: Callable[[Mapping[str, Any]], Mapping[str, Interval]]) -> None:
    ks = results["settings"]["ks"]
    for i, (name, res) in enumerate(results["samplers"].items()):
        xs, mean, low, high = _series(pick(res), ks)
        color, marker = _style(i, len(results["samplers"]))
        ax.plot(xs, mean, marker=marker, color=color, label=name)
        ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (candidates)")
    ax.grid(True, alpha=0.3)


def _headline_selector(selectors: Sequence[str]) -> str:
    for s in ("vote:reward", "argmax:reward", "majority", "argmax:mean_logprob"):
        if s in selectors:
            return s
    return selectors[0]


def _save(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _legend(fig: Any, ax: Any) -> None:
    """One legend for the figure, below the panels, so it never hides a curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=9, frameon=False)


def write_plots(results: Mapping[str, Any], out_dir: str | Path) -> list[str]:
    """Pass@k and Best-of-N@k curves (95% CI bands) and diversity vs quality; returns the file names.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend change);
    raises ImportError when matplotlib is missing.
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    ks, selectors = results["settings"]["ks"], results["settings"]["selectors"]
    samplers = results["samplers"]
    k_max = max(ks)
    problems = results["problems"]
    where = f"{problems['count']} problems ({', '.join(problems['tasks'])}), n={results['settings']['n']}"
    written = []

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    _curves(ax, results, lambda r: r["pass_at_k"])
    ax.set_ylabel("pass@k (unbiased)")
    ax.set_title(f"Pass@k (95% CI), {where}", fontsize=10)
    _legend(fig, ax)
    _save(fig, out / PLOT_FILES[0])
    written.append(PLOT_FILES[0])

    cols = min(3, len(selectors))
    rows = math.ceil(len(selectors) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for j, sel in enumerate(selectors):
        ax = axes[j // cols][j % cols]
        _curves(ax, results, lambda r, sel=sel: r["best_of_n"][sel])
        ax.set_title(SELECTOR_LABELS.get(sel, sel), fontsize=10)
        if j % cols == 0:
            ax.set_ylabel("Best-of-N@k accuracy")
    for j in range(len(selectors), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    _legend(fig, axes[0][0])
    fig.suptitle(f"Best-of-N@k by selector (95% CI), {where}", fontsize=11)
    _save(fig, out / PLOT_FILES[1])
    written.append(PLOT_FILES[1])

    headline = _headline_selector(selectors)
    use_embed = any(r["diversity"].get("embedding_similarity") for r in samplers.values())
    x_key = "embedding_similarity" if use_embed else "distinct_2"
    x_label = (
        "mean pairwise embedding similarity (lower = more diverse)"
        if use_embed
        else "distinct-2 (higher = more diverse)"
    )
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    panels = (
        (axes[0], lambda r: r["pass_at_k"][str(k_max)], f"pass@{k_max}"),
        (
            axes[1],
            lambda r: r["best_of_n"][headline][str(k_max)],
            f"Best-of-N@{k_max}: {SELECTOR_LABELS.get(headline, headline)}",
        ),
    )
    for ax, pick, label in panels:
        for i, (name, res) in enumerate(samplers.items()):
            x, y = res["diversity"][x_key], pick(res)
            if not x or x["mean"] is None or y["mean"] is None:
                continue
            color, marker = _style(i, len(samplers))
            ax.errorbar(
                x["mean"],
                y["mean"],
                color=color,
                marker=marker,
                markersize=7,
                capsize=3,
                label=name,
                xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]],
            )
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    _legend(fig, axes[0])
    fig.suptitle(f"Diversity vs quality (95% CI), {where}", fontsize=11)
    _save(fig, out / PLOT_FILES[2])
    written.append(PLOT_FILES[2])
    return written


__all__ = ["MATPLOTLIB_MISSING", "PLOT_FILES", "write_plots"]
