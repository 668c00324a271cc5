"""ESamp's cost against the size of the model it runs beside (#19).

    python benchmarks/esamp_scale.py                          # 135m, 1b, 3b at 1x1 and 4x1, ~20 min
    python benchmarks/esamp_scale.py --scales 135m --reps 1   # smoke run

Section 14 explained ESamp's cost on the embedded model as memory traffic: one Distiller update
streams its weights, gradients and Adam moments about ten times, and the Distiller (two SwiGLU
blocks, 6 x hidden x width parameters) is 1% of a 135M model's weights, against ~0.1% of the
paper's 8B. This script tests that explanation on the decode loop itself: the same engine, the
same Distiller width, beside Llama models of growing size. Only the embedded model's weights are
real; the larger models (TinyLlama-1.1B's and Llama-3.2-3B's shapes, the embedded tokenizer's
vocabulary) have random weights, which cost the same per token (every row decodes the full
budget, EOS ignored). Modes as in ``throughput.py``: ``off``, ``on`` (the paper's recipe) and
``default`` (ESampParams(): beta 0.1 + the 20-step warm start), interleaved, medians; the
Distiller's share is its own time inside the loop. Results: benchmarks/out/esamp_scale.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.throughput import OUT, bench_shape, cpu_matmul_rule, parse_shape
from esamp_agents import ESampParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.decoding import cpu_matmul
from esamp_agents.decoding.distiller import NUM_BLOCKS
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.decoding.loading import LoadedModel
from esamp_agents.evaluation.report import machine_info

# Llama shapes (hidden, layers, MLP width, heads, key/value heads); "135m" is the embedded model itself.
SCALES: dict[str, tuple[int, int, int, int, int] | None] = {
    "135m": None,
    "1b": (2048, 22, 5632, 32, 4),  # TinyLlama-1.1B
    "3b": (3072, 28, 8192, 24, 8),  # Llama-3.2-3B
}


def build(scale: str, embedded: LoadedModel) -> LoadedModel:
    """The embedded model, or a random-weight Llama of ``scale``'s shape with its tokenizer."""
    shape = SCALES[scale]
    if shape is None:
        return embedded
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, mlp, heads, kv = shape
    base = embedded.config
    config = LlamaConfig(
        vocab_size=base.vocab_size, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
        rms_norm_eps=base.rms_norm_eps, tie_word_embeddings=True, bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id, pad_token_id=getattr(base, "pad_token_id", None),
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = embedded.model.generation_config
    cpu_matmul.install(model)
    return load_model(model, tokenizer=embedded.tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", choices=list(SCALES), default=list(SCALES))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 1), (4, 1)])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT / "esamp_scale.json")
    args = parser.parse_args()
    if args.reps < 1 or args.new_tokens < 1:
        parser.error(f"--reps={args.reps} and --new-tokens={args.new_tokens} must both be >= 1")
    # bench_shape's settings: the paper's recipe for ``on``, no HF comparison
    args.modes, args.no_hf, args.beta, args.warm_start_steps = ["off", "on", "default"], True, 0.25, 0
    args.temperature, args.top_k, args.top_p, args.every = 0.7, 50, 1.0, 1

    embedded = load_model("embedded", device="cpu")
    width = ESampParams().distiller_width
    results: list[dict[str, Any]] = []
    for scale in args.scales:
        t0 = time.perf_counter()
        loaded = build(scale, embedded)
        params = sum(p.numel() for p in loaded.model.parameters())
        distiller = NUM_BLOCKS * 3 * loaded.hidden_size * width
        print(f"{scale}: {params / 1e6:.0f} M parameters, Distiller {distiller / 1e6:.2f} M per prompt "
              f"({100 * distiller / params:.2f}%), built in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        engine = ESampEngine(loaded)
        rows = []
        for p, n in args.shapes:
            row = bench_shape(engine, p, n, args)
            rows.append({k: v for k, v in row.items() if k != "raw"})
            share = {m: f"{100 * row['modes'][m]['median_distiller_share']:.1f}%" for m in ("on", "default")}
            print(f"  {p}x{n}: off {row['modes']['off']['median_tokens_per_s']:.2f} tok/s, on/off "
                  f"{row['paired_on_off']['median']:.3f}, on share {share['on']}, default share {share['default']}",
                  flush=True)  # fmt: skip
        results.append({
            "scale": scale, "parameters": params, "hidden_size": loaded.hidden_size, "layers": loaded.num_layers,
            "distiller_parameters_per_prompt": distiller, "cpu_matmul": cpu_matmul_rule(), "rows": rows,
        })  # fmt: skip
        del engine
        if loaded is not embedded:
            del loaded
        gc.collect()
    atomic_write_json(args.out, {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(), "distiller_width": width, "new_tokens": args.new_tokens, "reps": args.reps,
        "results": results,
    })  # fmt: skip
    header = "model | parameters | Distiller / model | shape | off tok/s | on / off (paired) | on share | default share"
    print(f"\n| {header} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        fraction = 100 * r["distiller_parameters_per_prompt"] / r["parameters"]
        for row in r["rows"]:
            m, paired = row["modes"], row["paired_on_off"]
            share = {k: f"{100 * m[k]['median_distiller_share']:.1f}%" for k in ("on", "default")}
            spread = f"{paired['median']:.3f} [{paired['min']:.3f}-{paired['max']:.3f}]"
            print(f"| {r['scale']} | {r['parameters'] / 1e6:,.0f} M | {fraction:.2f}% | {row['shape']} "
                  f"| {m['off']['median_tokens_per_s']:.2f} | {spread} "
                  f"| {share['on']} | {share['default']} |")  # fmt: skip


if __name__ == "__main__":
    main()
