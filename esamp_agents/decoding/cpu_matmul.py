"""Few-row float32 matmuls on the CPU, taken the way MKL runs them fast.

A decode step multiplies one row per sequence by every weight matrix: ``x @ W^T`` with a few
rows. torch computes that product with MKL, whose kernel for this operand order streams the
weights at 5-11 GB/s on the benchmark machine with 1-7 rows (a quarter of its bandwidth or
less), and more slowly at 2-3 rows than at 1. The same product taken as ``(W @ x^T)^T``
streams them at 14-26 GB/s; a single row must be given as two columns (one column falls back
to a matrix-vector kernel as slow as the original). Same weights, same dot products, summed
in another order: results agree to float32 rounding (~1e-5 on the logits), not bit for bit.
BENCHMARKS.md section 19 has the measurements and the rule's limits.

Only float32 weights on the CPU with MKL take this path; bfloat16 (oneDNN) was slower this
way and keeps torch's own. :func:`install` puts the path into an already loaded model's
``nn.Linear`` layers (:func:`~esamp_agents.decoding.loading.load_model` does so for the models it
loads; objects you pass in are left as they are); :func:`uninstall` takes it out again, and
:func:`torch_order` switches it off for a block (benchmarks compare both orders in one run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

# Up to this many rows the transposed order was 1.4-3.9x faster in every run (BENCHMARKS.md
# section 19); at 8 rows the two tie, at 12 torch's is faster, from 16 to 128 they are within
# a few percent and at 256 torch's wins: there torch's own order is kept.
MAX_ROWS = 7
_disabled = 0  # > 0 inside :func:`torch_order` blocks


def applies(rows: int, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a ``[rows, in] x [out, in]^T`` product takes the transposed order."""
    return (
        not _disabled
        and rows <= MAX_ROWS
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


def install(model: nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` whose weight is float32 on the CPU the few-row
    path (it changes the layers' class, not their parameters); returns how many it changed.
    A no-op without MKL (then the measurement behind the rule does not apply)."""
    if not torch.backends.mkl.is_available():
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            module.__class__ = FewRowLinear
            changed += 1
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
    "MAX_ROWS", "FewRowLinear", "applies", "few_row_mm", "install", "linear", "linear_into", "torch_order", "uninstall",
]  # fmt: skip
