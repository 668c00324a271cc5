"""A lean decode-step forward for Llama-architecture models: HF's arithmetic without its module stack.

A decode step feeds one token per row. HF's Llama forward dispatches about the same ~80 tensor
ops per layer as this one, but around them it runs Python: nested module calls, output-capturing
decorators, keyword plumbing, a causal mask built every step, the static cache's
``index_copy_``, and attention over every preallocated cache column. On a 30-layer model with
32-wide layers (where the arithmetic is negligible) that is 2x the step's time, and at one row of
the embedded model it is a fifth of the step on a CPU (BENCHMARKS.md section 21).
:class:`LlamaDecodeStep` computes the same step from the same weights into the same
:class:`~transformers.StaticCache` in one function: fused RMSNorm, rotary on the query and key
heads, the new key/value written at the step's column, attention over the columns written so far
(keys and values sliced, not masked), SwiGLU. Prefill, other architectures, other caches,
training, flash attention and dynamic RoPE keep HF's forward (:func:`unsupported_reason` says
why a model is not served).

``ESAMP_FAST_DECODE=0`` (or :func:`hf_forward` for a block) switches it off.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from esamp_agents.decoding import cpu_matmul
from esamp_agents.decoding.batch_cache import mergeable

ENV_VAR = "ESAMP_FAST_DECODE"
# RoPE types whose inverse frequencies are fixed at load (dynamic ones change with the length).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})
ATTENTION_IMPLEMENTATIONS = frozenset({"sdpa", "eager", None})
# scaled_dot_product_attention's enable_gqa (grouped-query heads without repeating the keys) is torch 2.5's
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
_lock = threading.Lock()
_hf_blocks = 0  # open hf_forward() blocks


def enabled_from_env() -> bool:
    """``ESAMP_FAST_DECODE``: unset or ``1`` = on, ``0`` = HF's forward for every step."""
    value = os.environ.get(ENV_VAR, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r} is not allowed: use 1 (the lean decode step) or 0 (HF's forward)")
    return value == "1"


@contextlib.contextmanager
def hf_forward() -> Iterator[None]:
    """Every decode step in this process runs HF's own forward while the block lasts (the
    scheduler decodes on its own thread, so this is not per thread): for A/B runs."""
    global _hf_blocks
    with _lock:
        _hf_blocks += 1
    try:
        yield
    finally:
        with _lock:
            _hf_blocks -= 1


def _rope_type(config: Any) -> str:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(rope.get("rope_type", rope.get("type", "default")))


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`LlamaDecodeStep` cannot serve ``model`` (a ``...ForCausalLM``), or None if it can."""
    try:
        from transformers.models.llama import modeling_llama as llama
    except ImportError:  # pragma: no cover - transformers always ships Llama
        return "transformers has no Llama implementation"
    if not _SDPA_HAS_GQA:
        return f"torch {torch.__version__} has no grouped-query scaled_dot_product_attention (needs >= 2.5)"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if type(base) is not llama.LlamaModel or layers is None or len(layers) == 0:
        return f"{type(model).__name__} is not a Llama architecture model"
    for layer in layers:
        parts = (
            (layer, llama.LlamaDecoderLayer),
            (layer.self_attn, llama.LlamaAttention),
            (layer.mlp, llama.LlamaMLP),
            (layer.input_layernorm, llama.LlamaRMSNorm),
            (layer.post_attention_layernorm, llama.LlamaRMSNorm),
        )
        for module, expected in parts:
            if type(module) is not expected:
                return f"{type(module).__name__} replaces {expected.__name__} (its forward may differ)"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act={config.hidden_act!r} (only silu)"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={config.pretraining_tp}"
    if _rope_type(config) not in STATIC_ROPE_TYPES:
        return f"rope type {_rope_type(config)!r} (only {sorted(STATIC_ROPE_TYPES)})"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        return f"attention implementation {implementation!r} (only sdpa or eager)"
    return None


class LlamaDecodeStep:
    """One decode step (one token per row) of a Llama-architecture model: HF's result, without its module stack.

    Returns what the engine's forward returns: the cache (updated in place, its
    ``cumulative_length`` advanced as HF's would be) and every layer's hidden states, index 0 the
    embeddings and the last the final norm's output, each ``[rows, 1, hidden]``.
    """

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean decode step cannot serve this model: {reason}")
        self.model = model
        self.base = model.model
        config = model.config
        first = self.base.layers[0].self_attn
        self.head_dim: int = first.head_dim
        self.heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.eps: float = float(config.rms_norm_eps)
        self.scale: float = float(first.scaling)

    def serves(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> bool:
        """Whether this call is a step it computes: one token per row into a plain static cache whose
        next column is the mask's last (checked on the CPU, where reading it costs nothing), in
        inference."""
        if _hf_blocks or self.model.training or torch.is_grad_enabled():
            return False
        if input_ids.dim() != 2 or input_ids.shape[1] != 1 or cache is None or not mergeable(cache):
            return False
        first = cache.layers[0]
        if not getattr(first, "is_initialized", False) or mask.shape[1] > first.keys.shape[2]:
            return False
        if first.keys.shape[0] != input_ids.shape[0]:
            return False
        return first.keys.device.type != "cpu" or int(first.cumulative_length) == mask.shape[1] - 1

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # HF normalises in float32 and casts back before the weight
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def __call__(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[Any, list[torch.Tensor]]:
        base, rows, width = self.base, input_ids.shape[0], mask.shape[1]
        column = width - 1
        x = base.embed_tokens(input_ids)  # [rows, 1, d]
        states = [x]
        rotary = base.rotary_emb
        freqs = positions.reshape(rows, 1, 1, 1).float() * rotary.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if rotary.attention_scaling != 1.0:
            cos, sin = cos * rotary.attention_scaling, sin * rotary.attention_scaling
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        attend = mask.reshape(rows, 1, 1, width).bool()
        linear, heads, kv_heads, head_dim = cpu_matmul.linear, self.heads, self.kv_heads, self.head_dim
        for layer, kv in zip(base.layers, cache.layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm.weight)
            q = linear(h, attn.q_proj.weight, attn.q_proj.bias).view(rows, 1, heads, head_dim).transpose(1, 2)
            k = linear(h, attn.k_proj.weight, attn.k_proj.bias).view(rows, 1, kv_heads, head_dim).transpose(1, 2)
            v = linear(h, attn.v_proj.weight, attn.v_proj.bias).view(rows, kv_heads, head_dim)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            kv.keys[:, :, column] = k[:, :, 0]
            kv.values[:, :, column] = v
            kv.cumulative_length.add_(1)
            out = F.scaled_dot_product_attention(
                q, kv.keys[:, :, :width], kv.values[:, :, :width], attn_mask=attend, scale=self.scale, enable_gqa=True
            )
            x = x + linear(out.transpose(1, 2).reshape(rows, 1, heads * head_dim), attn.o_proj.weight, attn.o_proj.bias)
            h = self._norm(x, layer.post_attention_layernorm.weight)
            gate = linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
            states.append(x)
        states[-1] = base.norm(x)
        return cache, states


def for_model(model: nn.Module) -> LlamaDecodeStep | None:
    """The lean step for ``model`` when it is supported and ``ESAMP_FAST_DECODE`` allows, else None."""
    if not enabled_from_env() or unsupported_reason(model) is not None:
        return None
    return LlamaDecodeStep(model)


__all__ = ["ENV_VAR", "LlamaDecodeStep", "enabled_from_env", "for_model", "hf_forward", "unsupported_reason"]
