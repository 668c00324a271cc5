"""Few-row float32 matmuls on the CPU, in whichever operand order this machine runs faster.

A decode step multiplies one row per sequence by every weight matrix: ``x @ W^T`` with a few
rows. torch computes that product with MKL, and the same product can also be taken as
``(W @ x^T)^T`` (a single row given as two columns: one column falls back to a matrix-vector
kernel). Which is faster depends on the CPU: on an AMD EPYC host the transposed order streamed
the weights 1.4-3.9x faster at 1-7 rows (BENCHMARKS.md section 19); on an Intel Xeon host it was
2x *slower* at 1-3 rows and tied at 7-8 (section 20). So the order is measured, not assumed:
:func:`install` (which :func:`~esamp_agents.decoding.loading.load_model` calls on the models it
loads) times both orders on that model's own weights for every row count up to ``MAX_ROWS``
(about 1.5 s, once per process and thread count) and the transposed order is taken only for
the row counts where it won by ``MIN_SPEEDUP`` (smoothed over neighbouring row counts);
everything else keeps torch's own order. Same weights, same dot products, summed in another
order: results agree to float32 rounding (~1e-5 on the logits), not bit for bit.

Only float32 weights on the CPU with MKL are candidates; bfloat16 (oneDNN) was slower this way
and keeps torch's own. ``ESAMP_CPU_MATMUL`` overrides the measurement: ``auto`` (the default,
measure), ``torch`` (never transpose) or ``transposed`` (every row count up to ``MAX_ROWS``).
:func:`set_fast_rows` sets the rule by hand, :func:`torch_order` switches it off for a block
(benchmarks compare both orders in one run), :func:`uninstall` takes the layers back to
``nn.Linear``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

# Row counts measured as candidates for the transposed order: a decode batch of a few sequences.
# Past 8 rows the two orders tied or torch's won on the hosts measured (sections 19 and 20).
MAX_ROWS = 8
# The transposed order is taken only where it was at least this much faster (ties keep torch's).
MIN_SPEEDUP = 1.1
# Weights streamed per timed pass (plus any shape not yet included, e.g. the LM head): past the
# last-level caches measured (32-105 MB), so the passes read from memory as a decode step does,
# but bounded so that large models calibrate fast (~1.5 s on the embedded model's 274 MB).
CALIBRATION_BYTES = 160 * 2**20
CALIBRATION_REPS = 3
ENV_VAR = "ESAMP_CPU_MATMUL"
MODES = ("auto", "torch", "transposed")

_fast_rows: frozenset[int] = frozenset()  # row counts that take the transposed order (none until measured)
_disabled = 0  # > 0 inside :func:`torch_order` blocks
_calibrated_threads: set[int] = set()  # torch thread counts already measured in this process
_last: Calibration | None = None
_lock = threading.Lock()


@dataclass(frozen=True)
class Calibration:
    """Both orders timed per row count (the fastest of the repetitions, ms per pass over
    ``megabytes`` of the model's weights) and the row counts that take the transposed order."""

    rows: tuple[int, ...]
    torch_ms: tuple[float, ...]
    transposed_ms: tuple[float, ...]
    megabytes: float
    threads: int

    @property
    def speedups(self) -> tuple[float, ...]:
        return tuple(t / x for t, x in zip(self.torch_ms, self.transposed_ms, strict=True))

    @property
    def fast_rows(self) -> frozenset[int]:
        """Row counts whose speed-up, smoothed with their measured neighbours' (geometric mean), is
        at least ``MIN_SPEEDUP`` and whose own is at least 1: on a noisy machine one lucky timing
        must not flip a row count that both its neighbours say is slower."""
        s = self.speedups
        chosen = set()
        for i, r in enumerate(self.rows):
            window = s[max(0, i - 1) : i + 2]
            if s[i] >= 1.0 and math.prod(window) ** (1.0 / len(window)) >= MIN_SPEEDUP:
                chosen.add(r)
        return frozenset(chosen)


def mode_from_env() -> str:
    """``ESAMP_CPU_MATMUL`` checked (``auto`` when unset): raises before any work on a bad value."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not known; allowed: {', '.join(MODES)}")
    return mode


def fast_rows() -> frozenset[int]:
    """The row counts whose float32 CPU products take the transposed order in this process."""
    return _fast_rows


def set_fast_rows(rows: Iterable[int]) -> frozenset[int]:
    """Set the rule by hand (e.g. ``range(1, 8)``, or ``()`` for torch's order everywhere);
    returns the previous rule. Row counts must lie in 1..MAX_ROWS."""
    global _fast_rows
    chosen = frozenset(rows)
    bad = sorted(r for r in chosen if not isinstance(r, int) or not 1 <= r <= MAX_ROWS)
    if bad:
        raise ValueError(f"rows={bad!r} out of range; allowed: integers 1..{MAX_ROWS}")
    previous, _fast_rows = _fast_rows, chosen
    return previous


def last_calibration() -> Calibration | None:
    """The measurement behind the current rule (None when none ran: an override, or no MKL)."""
    return _last


def applies(rows: int, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a ``[rows, in] x [out, in]^T`` product takes the transposed order."""
    return (
        not _disabled
        and rows in _fast_rows
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and weight.device.type == "cpu"
        and x.device.type == "cpu"
        and torch.backends.mkl.is_available()
    )


def few_row_mm(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T`` for a 2-D ``x`` of a few rows, as ``(weight @ x^T)^T``; a contiguous
    ``[rows, out_features]`` result (written into ``out`` when given)."""
    rows = x.shape[0]
    columns = x if rows > 1 else torch.cat((x, x))  # one column would run the slow matrix-vector kernel
    product = torch.mm(weight, columns.t())
    if rows == 1:
        product = product[:, :1]
    if out is None:
        return product.t().contiguous()
    return out.copy_(product.t())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that takes :func:`few_row_mm` when :func:`applies`."""
    if x.numel() == 0 or x.dim() == 0:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if not applies(rows, weight, x):
        return F.linear(x, weight, bias)
    out = few_row_mm(x.reshape(rows, x.shape[-1]), weight)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``F.linear`` of a 2-D ``x`` written into ``out`` (``[rows, out_features]``), in the order
    :func:`applies` picks; torch's own is ``mm`` / ``addmm``, which is what ``F.linear`` calls."""
    if applies(x.shape[0], weight, x):
        few_row_mm(x, weight, out=out)
        return out if bias is None else out.add_(bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class FewRowLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose forward is :func:`linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


def calibration_weights(model: nn.Module, budget_bytes: int = CALIBRATION_BYTES) -> list[torch.Tensor]:
    """The model's float32 CPU linear weights in module order, each storage once, up to
    ``budget_bytes`` (every distinct shape kept at least once, e.g. the LM head)."""
    chosen: list[torch.Tensor] = []
    seen: set[int] = set()
    shapes: set[tuple[int, ...]] = set()
    total = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.data_ptr() in seen:
            continue
        size = weight.numel() * weight.element_size()
        if total + size > budget_bytes and tuple(weight.shape) in shapes:
            continue
        seen.add(weight.data_ptr())
        shapes.add(tuple(weight.shape))
        chosen.append(weight.detach())
        total += size
    return chosen


def measure(
    weights: list[torch.Tensor], rows: Iterable[int] = range(1, MAX_ROWS + 1), reps: int = CALIBRATION_REPS
) -> Calibration:
    """Time one pass over ``weights`` in both orders for each row count (alternating, the fastest
    of ``reps`` each: interference on a shared machine only ever slows a pass down)."""
    counts = tuple(rows)
    if not weights:
        raise ValueError("weights=[] is empty; measure needs at least one float32 weight matrix")
    if reps < 1:
        raise ValueError(f"reps={reps!r} out of range; allowed: reps >= 1")
    inputs = {w.shape[1]: torch.randn(MAX_ROWS, w.shape[1]) for w in weights}

    def one_pass(r: int, transposed: bool) -> float:
        start = time.perf_counter()
        for w in weights:
            x = inputs[w.shape[1]][:r]
            few_row_mm(x, w) if transposed else torch.mm(x, w.t())
        return (time.perf_counter() - start) * 1e3

    with torch.no_grad():
        one_pass(1, False), one_pass(1, True)  # first touches: page faults, MKL's buffers
        best: dict[tuple[int, bool], float] = {}
        for r in counts:
            for rep in range(reps):
                for transposed in (rep % 2 == 1, rep % 2 == 0):  # the leading order alternates
                    t = one_pass(r, transposed)
                    best[r, transposed] = min(best.get((r, transposed), t), t)
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    return Calibration(
        rows=counts,
        torch_ms=tuple(best[r, False] for r in counts),
        transposed_ms=tuple(best[r, True] for r in counts),
        megabytes=megabytes,
        threads=torch.get_num_threads(),
    )


def calibrate(model: nn.Module, *, force: bool = False) -> frozenset[int]:
    """Set the process-wide rule from ``ESAMP_CPU_MATMUL`` or, in ``auto`` mode, by timing both
    orders on ``model``'s weights (once per torch thread count unless ``force``); returns it."""
    global _last
    mode = mode_from_env()
    if mode == "torch" or not torch.backends.mkl.is_available():
        set_fast_rows(())
        return _fast_rows
    if mode == "transposed":
        set_fast_rows(range(1, MAX_ROWS + 1))
        return _fast_rows
    with _lock:
        threads = torch.get_num_threads()
        if threads in _calibrated_threads and not force:
            return _fast_rows
        weights = calibration_weights(model)
        if not weights:
            return _fast_rows
        result = measure(weights)
        _last = result
        set_fast_rows(result.fast_rows)
        _calibrated_threads.add(threads)
        speedups = ", ".join(f"{s:.2f}" for s in result.speedups)
        logger.info(
            "few-row matmul order measured (%d threads, %.0f MB): speed-ups %s -> transposed for rows %s",
            threads, result.megabytes, speedups, sorted(result.fast_rows) or "none",
        )  # fmt: skip
        return _fast_rows


def install(model: nn.Module, *, measure_order: bool = True) -> int:
    """Give every plain ``nn.Linear`` of ``model`` whose weight is float32 on the CPU the few-row
    path (it changes the layers' class, not their parameters) and, with ``measure_order``, settle
    which row counts take the transposed order (:func:`calibrate`); returns how many layers changed.
    A no-op without MKL (the measured orders are MKL's)."""
    if not torch.backends.mkl.is_available():
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.__class__ = FewRowLinear
            changed += 1
    if changed and measure_order:
        calibrate(model)
    return changed


def uninstall(model: nn.Module) -> int:
    """Undo :func:`install`: the layers compute with torch's own ``F.linear`` again."""
    changed = 0
    for module in model.modules():
        if type(module) is FewRowLinear:
            module.__class__ = nn.Linear
            changed += 1
    return changed


@contextmanager
def fast_rows_set_to(rows: Iterable[int]) -> Iterator[None]:
    """Within the block the rule is ``rows`` (see :func:`set_fast_rows`); the previous one after."""
    previous = set_fast_rows(rows)
    try:
        yield
    finally:
        set_fast_rows(previous)


@contextmanager
def torch_order() -> Iterator[None]:
    """Within the block every product computes in torch's own order, in every thread and model
    (the baseline of the benchmarks' A/B runs; not meant for concurrent use)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


__all__ = [
    "ENV_VAR", "MAX_ROWS", "MIN_SPEEDUP", "MODES", "Calibration", "FewRowLinear", "applies", "calibrate",
    "calibration_weights", "fast_rows", "fast_rows_set_to", "few_row_mm", "install", "last_calibration", "linear",
    "linear_into", "measure", "mode_from_env", "set_fast_rows", "torch_order", "uninstall",
]  # fmt: skip
