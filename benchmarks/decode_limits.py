"""Where a decode step's time goes, against what the hardware allows (issue #19).

    python benchmarks/decode_limits.py                      # everything below
    python benchmarks/decode_limits.py --skip-accuracy      # speed only (~3 minutes)

1. The machine: memory bandwidth (a large copy and a large read) and GEMM peak (float32, bfloat16).
2. The embedded model's cost per decode step: bytes of weights read, FLOPs per generated token,
   hence the limits: at 1 x 1 a step cannot beat bytes / bandwidth; at 4 x 16 it cannot beat
   rows x FLOPs / peak (nor bytes / bandwidth).
3. Measured plain decode (ESamp off) at 1 x 1 and 4 x 16 in float32 and bfloat16, against those limits.
4. The Distiller's update per step at each batch shape: autograd (the code before issue #19) vs
   the hand-written gradients, and its parts (forward, gradients, Adam).
5. float32 vs bfloat16 accuracy on the single-digit task (plain sampling, same seed), to pick the
   CPU default dtype on evidence.

Results go to benchmarks/out/decode_limits.json (written atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding.distiller import BatchedDistiller
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.evaluation.report import machine_info
from esamp_agents.evaluation.tasks import answers_match, extract_answer, generate_problems, grade

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.throughput import prompts_for  # noqa: E402


def median_seconds(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_limits() -> dict[str, float]:
    """Bandwidth from a 512 MB copy (read + write) and a 512 MB read; GEMM peak from 2048^3 matmuls."""
    big = torch.empty(128 * 2**20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(big)
    copy_s = median_seconds(lambda: dst.copy_(big), reps=5)
    read_s = median_seconds(big.sum, reps=5)
    out: dict[str, float] = {
        "copy_gb_per_s": 2 * big.numel() * 4 / copy_s / 1e9,
        "read_gb_per_s": big.numel() * 4 / read_s / 1e9,
    }
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dtype)
        seconds = median_seconds(lambda a=a: a @ a, reps=5)
        out[f"gemm_{str(dtype).removeprefix('torch.')}_gflops"] = 2 * 2048**3 / seconds / 1e9
    return out


def model_costs(engine: ESampEngine) -> dict[str, float]:
    """Weights read per decode step (every matrix once; the tied LM head counts once, as the logits
    read it) and FLOPs per generated token (2 per weight, plus the LM head)."""
    model = engine.loaded.model
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    head = engine._head_weight.numel()
    weights_read = matrices + head  # the input embedding is a lookup: one row per token
    element = engine._head_weight.element_size()
    return {
        "weights_read_per_step": weights_read,
        "bytes_per_step": weights_read * element,
        "flops_per_token": 2.0 * weights_read,
        "element_bytes": element,
    }


def plain_decode(engine: ESampEngine, p: int, n: int, tokens: int, reps: int) -> dict[str, float]:
    prompts = prompts_for(engine, p)
    sampling = SamplingParams(n=n, max_new_tokens=tokens, seed=1, ignore_eos=True)
    off = ESampParams(beta=0.0)
    engine.generate(prompts, SamplingParams(n=n, max_new_tokens=4, seed=1, ignore_eos=True), off)
    runs = []
    for _ in range(reps):
        out = engine.generate(prompts, sampling, off)
        runs.append((out.stats.decode_seconds / max(out.stats.decode_steps, 1), out.stats.generated_tokens
                     / (out.stats.decode_seconds + out.stats.prefill_seconds)))  # fmt: skip
    return {
        "step_ms": 1e3 * statistics.median(r[0] for r in runs),
        "tokens_per_s": statistics.median(r[1] for r in runs),
    }


def autograd_update(dist: BatchedDistiller, h1: torch.Tensor, target: torch.Tensor, live: torch.Tensor) -> None:
    """One update the way the code before issue #19 did it: autograd, fresh gradients, a norm pass."""
    weights = dist.weights
    with torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        x = h1
        for b in range(2):
            w_gate, w_up, w_down = weights[3 * b : 3 * b + 3]
            x = x + torch.bmm(F.silu(torch.bmm(x, w_gate)) * torch.bmm(x, w_up), w_down)
        live_f = live.float()
        loss = (((target - x) ** 2).sum(-1) * live_f).sum(-1) / live_f.sum(-1).clamp(min=1.0)
        loss.sum().backward()
    grads = [w.grad for w in weights]
    sq = torch.stack([g.pow(2).flatten(1).sum(-1) for g in grads]).sum(0)
    scale = (0.5 / (sq.sqrt() + 1e-6)).clamp(max=1.0).view(-1, 1, 1)
    for g in grads:
        g.mul_(scale)
    dist.optimizer.step()
    for w in weights:
        w.requires_grad_(False)


def distiller_cost(p: int, n: int, reps: int) -> dict[str, Any]:
    """Milliseconds per update of P Distillers on N rows each (warm caches: a lower bound in the loop)."""
    params = ESampParams.paper()
    g = torch.Generator().manual_seed(0)
    h1, target = torch.randn(p, n, 576, generator=g), torch.randn(p, n, 576, generator=g)
    live = torch.ones(p, n, dtype=torch.bool)
    dist = BatchedDistiller(p, 576, params, generator=g)
    old = BatchedDistiller(p, 576, params, generator=g)

    def new_step() -> None:
        dist.predict_and_loss(h1, target, live)
        dist.step()

    def forward_and_grads() -> None:
        dist.predict_and_loss(h1, target, live)
        pending, dist._pending = dist._pending, None
        assert pending is not None
        dist._write_clipped_grads(pending)

    with torch.no_grad():
        row: dict[str, Any] = {
            "shape": f"{p}x{n}",
            "autograd_ms": 1e3 * median_seconds(lambda: autograd_update(old, h1, target, live), reps),
            "hand_written_ms": 1e3 * median_seconds(new_step, reps),
            "forward_ms": 1e3 * median_seconds(lambda: dist.predict_and_loss(h1, target, live), reps),
            "forward_and_clipped_grads_ms": 1e3 * median_seconds(forward_and_grads, reps),
            "adam_ms": 1e3 * median_seconds(dist.optimizer.step, reps),
            "parameters": p * dist.num_parameters_per_prompt,
        }
    row["speedup"] = row["autograd_ms"] / row["hand_written_ms"]
    print(f"  Distiller {row['shape']}: autograd {row['autograd_ms']:.2f} ms, hand-written "
          f"{row['hand_written_ms']:.2f} ms ({row['speedup']:.2f}x)", flush=True)  # fmt: skip
    return row


def accuracy(engine: ESampEngine, problems: int, n: int, tokens: int) -> dict[str, float]:
    """Per-sample and majority accuracy of plain sampling (T 0.7, top-k 50) and greedy accuracy."""
    items = generate_problems("single_digit", problems, seed=19, split="test")
    prompts = [engine.loaded.chat_token_ids([{"role": "user", "content": q.prompt()}]) for q in items]
    sampled = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=tokens, seed=0), ESampParams(beta=0.0))
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=tokens), ESampParams(beta=0.0))
    per_sample, majority, greedy_ok = [], [], []
    for problem, result, g in zip(items, sampled.results, greedy.results, strict=True):
        texts = [c.text for c in result.candidates]
        per_sample += [grade(problem, t) for t in texts]
        answers = [a for a in (extract_answer(t) for t in texts) if a is not None]
        top = Counter(answers).most_common(1)
        majority.append(bool(top) and answers_match(top[0][0], problem.answer))
        greedy_ok.append(grade(problem, g.candidates[0].text))
    return {
        "problems": problems,
        "samples": n,
        "per_sample_accuracy": sum(per_sample) / len(per_sample),
        "majority_accuracy": sum(majority) / len(majority),
        "greedy_accuracy": sum(greedy_ok) / len(greedy_ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT / "decode_limits.json")
    args = parser.parse_args()
    for name in ("new_tokens", "reps", "problems", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")

    print("machine limits", flush=True)
    limits = machine_limits()
    print(f"  {limits}", flush=True)
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/decode_limits.py", *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "limits": limits,
        "dtypes": {},
    }
    for dtype in ("float32", "bfloat16"):
        engine = ESampEngine(load_model("embedded", device="cpu", dtype=dtype), batching=False)
        costs = model_costs(engine)
        entry: dict[str, Any] = {"costs": costs, "shapes": {}}
        gemm = limits[f"gemm_{dtype}_gflops"] * 1e9
        for p, n in ((1, 1), (4, 16)):
            measured = plain_decode(engine, p, n, args.new_tokens, args.reps)
            rows = p * n
            bandwidth_ms = 1e3 * costs["bytes_per_step"] / (limits["read_gb_per_s"] * 1e9)
            compute_ms = 1e3 * rows * costs["flops_per_token"] / gemm
            limit_ms = max(bandwidth_ms, compute_ms)
            measured.update({"bandwidth_limit_ms": bandwidth_ms, "compute_limit_ms": compute_ms,
                             "limit_tokens_per_s": rows / (limit_ms / 1e3),
                             "share_of_limit": limit_ms / measured["step_ms"]})  # fmt: skip
            entry["shapes"][f"{p}x{n}"] = measured
            print(f"  {dtype} {p}x{n}: {measured}", flush=True)
        if not args.skip_accuracy:
            entry["accuracy"] = accuracy(engine, args.problems, args.samples, args.new_tokens + 16)
            print(f"  {dtype} accuracy: {entry['accuracy']}", flush=True)
        result["dtypes"][dtype] = entry
        del engine
    print("Distiller update per step", flush=True)
    result["distiller"] = [
        distiller_cost(p, n, max(args.reps * 10, 20)) for p, n in ((1, 1), (4, 1), (4, 16), (16, 16))
    ]
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
