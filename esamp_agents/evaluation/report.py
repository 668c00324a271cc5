"""The eval report: ``results.json`` (JSON-safe, written atomically) and the markdown tables printed after a run."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esamp_agents.atomic import atomic_write_bytes

FORMAT_NAME = "esamp-agents/eval"
FORMAT_VERSION = 1
RESULTS = "results.json"
SELECTOR_LABELS = {
    "random": "random pick",
    "majority": "majority vote",
    "oracle": "oracle (any correct)",
    "argmax:mean_logprob": "highest mean logprob",
    "argmax:reward": "highest reward",
    "vote:reward": "reward-weighted vote",
    "vote:mean_logprob": "logprob-weighted vote",
}

Interval = dict[str, float | None]


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows): hosts of
    one VM kind differ, and some results (the few-row matmul order) depend on it."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where a measurement ran (platform, CPU count, torch version and threads): benchmark results
    record it beside their numbers, since speed figures mean nothing without the machine."""
    import os
    import platform

    import torch

    return {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats become null; tuples become lists, keys strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if math.isfinite(value) else None


def write_json(path: Path, data: Any) -> None:
    """Indented UTF-8 JSON, written atomically: a killed run never leaves half a file."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8"))


def _pct(v: Interval | None) -> str:
    return "-" if not v or v["mean"] is None else f"{100 * v['mean']:.1f} [{100 * v['low']:.1f}, {100 * v['high']:.1f}]"


def _val(v: Interval | None, fmt: str = ".3f") -> str:
    return "-" if not v or v["mean"] is None else format(v["mean"], fmt)


def format_summary(results: Mapping[str, Any]) -> str:
    """Two markdown tables: quality at the largest k (with 95% CIs), then diversity and cost."""
    k = max(results["settings"]["ks"])
    selectors = results["settings"]["selectors"]
    head = ["sampler", "accuracy", f"pass@{k}", *(f"{SELECTOR_LABELS.get(s, s)} @{k}" for s in selectors)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results["samplers"].items():
        cells = [name, _pct(r["accuracy"]), _pct(r["pass_at_k"][str(k)])]
        cells += [_pct(r["best_of_n"][s][str(k)]) for s in selectors]
        lines.append("| " + " | ".join(cells) + " |")
    head2 = [
        "sampler",
        "distinct answers",
        "distinct-1",
        "distinct-2",
        "emb. similarity",
        "Vendi",
        "perplexity",
        "mean tokens",
        "tokens",
        "seconds",
    ]
    lines += ["", "| " + " | ".join(head2) + " |", "|---" * len(head2) + "|"]
    for name, r in results["samplers"].items():
        d, g = r["diversity"], r["generation"]
        cells = [
            name,
            _val(d["distinct_answers"], ".2f"),
            _val(d["distinct_1"]),
            _val(d["distinct_2"]),
            _val(d["embedding_similarity"]),
            _val(d["vendi"], ".2f"),
            _val(r["perplexity"], ".2f"),
            f"{r['mean_tokens']:.1f}",
            str(g["tokens"]),
            "-" if g["seconds"] is None else f"{g['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RESULTS",
    "SELECTOR_LABELS",
    "Interval",
    "format_summary",
    "json_safe",
    "machine_info",
    "write_json",
]
