"""What ``ESampLLM`` and ``ChatESamp`` share: fields, per-call parameter resolution,
lazy model access, OpenAI-shaped metadata and a thread bridge for async streaming.

Kept in one place so the two LangChain classes cannot drift apart in how they read
parameters or report candidates.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from langchain_core.caches import BaseCache
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import LangSmithParams
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, load_model
from esamp_agents.decoding.params import PARAM_KEYS, PARAMS, ESampParams, SamplingParams, build_params, param_names
from esamp_agents.decoding.results import Candidate
from esamp_agents.langchain.decode_rewards import CALL_EXTRA_KEYS, CallExtras, check_on_reward_error, check_rewards
from esamp_agents.openai_format import TokenRenderer, chat_logprobs

DEFAULT_MAX_TOKENS = 256
"""The LangChain classes' own token budget (not the engine's): kept explicit so changing
``SamplingParams``' default does not silently change every chain's output length."""
ALLOWED_DTYPES = ("auto", "float32", "bfloat16", "float16")

# Remote-API options that LangChain code (and the standard tests) pass to every chat
# model. A local model has no use for them; accepting them keeps drop-in swaps working.
IGNORED_KWARGS = frozenset(
    {
        "timeout",
        "request_timeout",
        "max_retries",
        "api_key",
        "base_url",
        "api_base",
        "organization",
        "default_headers",
        "default_query",
        "http_client",
        "http_async_client",
    }
)
# Keys LangChain itself may leave in the per-call kwargs; they never reach the engine.
_INTERNAL_CALL_KWARGS = frozenset({"stream", "ls_structured_output_format", "structured_output_format"})

# LangChain-only (type, default) where the table's differ: LangChain passes ``stop`` as a
# list or None, and the token budget is this integration's own.
_LANGCHAIN_FIELD_OVERRIDES: dict[str, tuple[Any, Any]] = {
    "max_tokens": (int, DEFAULT_MAX_TOKENS),
    "stop": (list[str] | None, None),
}

# Per-call keyword -> field name: every spelling in the parameter table, plus the two
# LangChain-side fields that are not engine parameters.
_CALL_KEYS: dict[str, str] = {
    "model": "model_name",
    "model_name": "model_name",
    "logprobs": "logprobs",
    **{key: spec.name for key, spec in PARAM_KEYS.items()},
}


def check_observers(observers: Any) -> tuple[Any, ...]:
    """Validate a per-call ``observers`` value before any model work; ``None`` means none.

    Each must look like a :class:`~esamp_agents.decoding.observers.DecodeObserver`: a ``layers``
    sequence of ints and callable ``on_start``/``on_step``/``on_finish``.
    """
    if observers is None:
        return ()
    if isinstance(observers, (str, bytes)) or not isinstance(observers, (Sequence, set, frozenset)):
        raise ValueError(
            f"observers={observers!r} is not a sequence; allowed: a list or tuple of DecodeObserver objects"
        )
    checked = tuple(observers)
    for i, obs in enumerate(checked):
        name = type(obs).__name__
        layers = getattr(obs, "layers", None)
        if (
            isinstance(layers, (str, bytes))
            or not isinstance(layers, Sequence)
            or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers)
        ):
            raise ValueError(f"observers[{i}] ({name}) has layers={layers!r}; allowed: a sequence of int layer indices")
        missing = [m for m in ("on_start", "on_step", "on_finish") if not callable(getattr(obs, m, None))]
        if missing:
            raise ValueError(
                f"observers[{i}] ({name}) lacks {', '.join(missing)}; allowed: a DecodeObserver "
                "(layers, on_start, on_step, on_finish)"
            )
    return checked


def split_observers(kwargs: dict[str, Any]) -> tuple[CallExtras, dict[str, Any]]:
    """Per-call kwargs -> (validated observers and decode-time rewards, the other kwargs):
    these never reach parameter resolution, identifying params or tracing."""
    if not any(key in kwargs for key in CALL_EXTRA_KEYS):
        return CallExtras(), kwargs
    rest = dict(kwargs)
    extras = CallExtras(
        observers=check_observers(rest.pop("observers", None)),
        rewards=check_rewards(rest.pop("rewards", None)),
        on_reward_error=check_on_reward_error(rest.pop("on_reward_error", "raise")),
    )
    return extras, rest


@dataclass(frozen=True)
class CallConfig:
    """Everything one call needs, validated before any model work."""

    model_name: str
    sampling: SamplingParams
    esamp: ESampParams
    logprobs: bool


def _as_stop_tuple(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop)


def _param_field(name: str) -> tuple[Any, Any]:
    """One table row -> a pydantic (annotation, Field): the field's doc becomes its
    description, and its other spellings (``max_new_tokens``, ``lr``) are accepted too."""
    spec = PARAM_KEYS[name]
    annotation, default = _LANGCHAIN_FIELD_OVERRIDES.get(name, (spec.type, spec.default))
    alias = AliasChoices(*spec.spellings) if spec.aliases else None
    return annotation, Field(default=default, description=spec.doc, validation_alias=alias)


if TYPE_CHECKING:

    class _ParamFields(BaseModel):
        """What type checkers and IDEs see; at run time the fields are generated from PARAMS
        (a unit test checks these names and types match the table)."""

        n: int
        max_tokens: int
        temperature: float
        top_k: int
        top_p: float
        min_p: float
        stop: list[str] | None
        seed: int | None
        top_logprobs: int
        ignore_eos: bool
        beta: float
        distiller_width: int
        distiller_lr: float
        adam_eps: float
        grad_clip: float
        warm_start_steps: int
        warm_start_lr: float
        shared_distiller: bool
        distiller_update_every: int

else:
    _ParamFields = create_model(
        "ESampParamFields",
        __doc__="The ESamp/sampling fields, one per row of PARAMS.",
        **{spec.name: _param_field(spec.name) for spec in PARAMS},
    )


class ESampLangChainMixin(_ParamFields):
    """Fields and helpers shared by ``ESampLLM`` and ``ChatESamp``.

    The ESamp/sampling fields are generated, one per row of
    :data:`esamp_agents.decoding.params.PARAMS` (``param_names()`` lists them: ``n``,
    ``temperature``, ..., ``max_tokens`` alias ``max_new_tokens``, ``distiller_lr`` alias ``lr``,
    ``ignore_eos``, ``shared_distiller``, ``distiller_update_every``), with the engine's defaults and docs, except
    ``max_tokens`` (:data:`DEFAULT_MAX_TOKENS`) and ``stop`` (``None``). Each is also a per-call
    keyword. ``n`` candidates are all returned by ``generate``; ``invoke`` returns the first.

    Subclasses must list this mixin before the LangChain base class so that its field
    defaults (notably ``cache=False``) win.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str = Field(default=EMBEDDED, alias="model")
    """``"embedded"`` (the bundled SmolLM2-135M-Instruct), an HF model id or a local path."""
    loaded_model: Any = Field(default=None, exclude=True, repr=False)
    """An already-loaded :class:`LoadedModel` (skips loading; never serialised)."""
    device: str | None = None
    """Device for lazy loading (default: cuda if available, else cpu)."""
    dtype: str = "auto"
    """Weights dtype for lazy loading: 'auto', 'float32', 'bfloat16' or 'float16'."""

    logprobs: bool = False
    """Return per-token logprobs (OpenAI shape) in each candidate's metadata (implied by ``top_logprobs > 0``)."""

    streaming: bool = False
    """Stream tokens to callbacks during ``invoke`` (requires ``n=1`` for the chat model)."""
    cache: BaseCache | bool | None = Field(default=False, exclude=True)
    """Off by default: a cache would replay the same N 'diverse' samples for a repeated prompt."""

    # -- construction-time validation ------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_kwargs(cls, data: Any) -> Any:
        """Typos must fail loudly; remote-API options (timeout, api_key...) are dropped."""
        if not isinstance(data, dict):
            return data
        known: set[str] = set()
        for name, info in cls.model_fields.items():
            known.add(name)
            if info.alias:
                known.add(info.alias)
            if isinstance(info.validation_alias, AliasChoices):
                known.update(c for c in info.validation_alias.choices if isinstance(c, str))
            elif isinstance(info.validation_alias, str):
                known.add(info.validation_alias)
        unknown = sorted(k for k in data if k not in known and k not in IGNORED_KWARGS)
        if unknown:
            allowed = ", ".join(sorted(k for k in known if not k.startswith("_")))
            raise ValueError(f"unknown parameter(s) {unknown} for {cls.__name__}; allowed: {allowed}")
        return {k: v for k, v in data.items() if k not in IGNORED_KWARGS}

    @field_validator("loaded_model")
    @classmethod
    def _check_loaded_model(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, LoadedModel):
            raise ValueError(
                f"loaded_model={type(value).__name__} is not a LoadedModel; use load_model(...) "
                "or the from_model(model, tokenizer=...) constructor"
            )
        return value

    @model_validator(mode="after")
    def _validate_params(self) -> ESampLangChainMixin:
        """Build the engine's parameter objects once so bad values fail at construction."""
        if self.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; allowed: {', '.join(map(repr, ALLOWED_DTYPES))}")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError(
                f"model={self.model_name!r} is empty; allowed: 'embedded', an HF model id, or a local path"
            )
        if self.loaded_model is not None and "model_name" not in self.model_fields_set:
            self.model_name = self.loaded_model.name
        config = self._resolve_call(None, {})
        if self.streaming and config.sampling.n != 1:
            raise ValueError(f"n={config.sampling.n} with streaming=True; allowed: n=1 when streaming")
        return self

    # -- per-call resolution -------------------------------------------------------------

    def _resolve_call(self, stop: Sequence[str] | str | None, kwargs: dict[str, Any]) -> CallConfig:
        """Fields overridden by per-call kwargs -> validated params (raises ValueError)."""
        values: dict[str, Any] = {name: getattr(self, name) for name in set(_CALL_KEYS.values())}
        for key, value in kwargs.items():
            if key in _CALL_KEYS:
                values[_CALL_KEYS[key]] = value
            elif key not in IGNORED_KWARGS and key not in _INTERNAL_CALL_KWARGS:
                allowed = ", ".join(sorted(_CALL_KEYS))
                raise ValueError(f"unknown keyword argument {key!r} for {type(self).__name__}; allowed: {allowed}")
        if stop is not None:
            values["stop"] = stop
        model_name = values["model_name"]
        if not isinstance(model_name, str) or not model_name.strip():
            raise ValueError(f"model={model_name!r} is empty; allowed: 'embedded', an HF model id, or a local path")
        logprobs = values["logprobs"]
        if not isinstance(logprobs, bool):
            raise ValueError(f"logprobs={logprobs!r} must be True or False")
        sampling, esamp = build_params({name: values[name] for name in param_names()})
        return CallConfig(model_name, sampling, esamp, logprobs or sampling.top_logprobs > 0)

    def _resolve_model(self, model_name: str) -> LoadedModel:
        """The instance's model, or (lazily, via the shared registry) the one named per call."""
        if self.loaded_model is not None and model_name == self.model_name:
            return self.loaded_model
        return load_model(model_name, device=self.device, dtype=self.dtype)

    def _engine(self, loaded: LoadedModel) -> Any:
        return engine_for(loaded)

    # -- per-call observers -----------------------------------------------------------------

    def _cache_enabled(self) -> bool:
        if self.cache is False:
            return False
        return isinstance(self.cache, BaseCache) or get_llm_cache() is not None

    def _check_call_observers(self, kwargs: dict[str, Any]) -> None:
        """Fail before any callback or cache lookup: a cache hit would skip decoding, so the
        observers and decode-time rewards would silently see nothing (or only the uncached prompts)."""
        extras, _ = split_observers(kwargs)
        if extras and self._cache_enabled():
            what = "observers" if extras.observers else "rewards"
            raise ValueError(
                f"{what} with cache={self.cache!r} (or a global LLM cache); allowed: cache=False "
                f"when passing {what} (a cached reply is not decoded, so they would see nothing)"
            )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """LangChain's ``generate``, plus per-call ``observers=[DecodeObserver, ...]`` and
        ``rewards=[decode-time reward, ...]`` (see :mod:`esamp_agents.langchain.decode_rewards`)
        that read hidden states during this very decode (not part of the identifying params)."""
        self._check_call_observers(kwargs)
        return super().generate(*args, **kwargs)  # type: ignore[misc]

    async def agenerate(self, *args: Any, **kwargs: Any) -> Any:
        """Async ``generate``; accepts ``observers`` and ``rewards`` like :meth:`generate`."""
        self._check_call_observers(kwargs)
        return await super().agenerate(*args, **kwargs)  # type: ignore[misc]

    # -- LangChain plumbing shared by both classes ---------------------------------------

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """The model and every parameter of the table (so a cache or trace tells calls apart)."""
        params = {name: getattr(self, name) for name in param_names()}
        return {"model_name": self.model_name, **params, "logprobs": self.logprobs}

    def _call_value(self, kwargs: dict[str, Any], name: str) -> Any:
        """A parameter's per-call value under any of its spellings, else the field's."""
        for key in PARAM_KEYS[name].spellings:
            if key in kwargs:
                return kwargs[key]
        return getattr(self, name)

    def _ls_params(self, model_type: str, stop: Sequence[str] | str | None, kwargs: dict[str, Any]) -> LangSmithParams:
        model_name = kwargs.get("model", kwargs.get("model_name", self.model_name))
        params = LangSmithParams(ls_provider="esamp", ls_model_name=str(model_name), ls_model_type=model_type)  # type: ignore[typeddict-item]
        temperature = self._call_value(kwargs, "temperature")
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
            params["ls_temperature"] = float(temperature)
        max_tokens = self._call_value(kwargs, "max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            params["ls_max_tokens"] = max_tokens
        stops = _as_stop_tuple(stop if stop is not None else self._call_value(kwargs, "stop"))
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (no special tokens; never downloads GPT-2)."""
        if self.custom_get_token_ids is not None:  # type: ignore[attr-defined]
            return self.custom_get_token_ids(text)  # type: ignore[attr-defined]
        tokenizer = self._resolve_model(self.model_name).tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False))


# -- engines ----------------------------------------------------------------------------


def engine_for(loaded: LoadedModel) -> Any:
    """The shared ESampEngine of ``loaded``: concurrent calls from any instance (threads, ``abatch``,
    BestOfN's parallel samples, LangGraph branches) join one continuously batched decode."""
    from esamp_agents.decoding.engine import ESampEngine

    return ESampEngine.shared(loaded)


# -- metadata ---------------------------------------------------------------------------


def candidate_info(
    candidate: Candidate,
    *,
    model_name: str,
    logprobs: bool,
    renderer: TokenRenderer | None,
    eos_ids: Sequence[int],
) -> dict[str, Any]:
    """One candidate's ``generation_info`` (= the chat message's ``response_metadata``)."""
    info: dict[str, Any] = {
        "finish_reason": candidate.finish_reason,
        "model_name": model_name,
        "candidate_index": candidate.index,
        "prompt_tokens": candidate.prompt_tokens,
        "completion_tokens": candidate.completion_tokens,
        "mean_logprob": candidate.mean_logprob,
    }
    if candidate.stop_sequence is not None:
        info["stop_sequence"] = candidate.stop_sequence
    if "constraint_satisfied" in candidate.extras:  # the reply had a grammar: is it complete under it?
        info["constraint_satisfied"] = candidate.extras["constraint_satisfied"]
    if candidate.novelty is not None:
        finite = [v for v in candidate.novelty if not math.isnan(v)]
        info["novelty_mean"] = sum(finite) / len(finite) if finite else float("nan")
    if logprobs and renderer is not None:
        info["logprobs"] = chat_logprobs(candidate, renderer, eos_ids)
    return info


def combine_usage(outputs: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Merge per-call ``llm_output`` dicts: usage summed, distiller curves concatenated."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    losses: list[list[float]] = []
    model_name: str | None = None
    for out in outputs:
        if not out:
            continue
        for key, value in (out.get("token_usage") or {}).items():
            usage[key] = usage.get(key, 0) + int(value)
        losses.extend(out.get("distiller_loss") or [])
        model_name = model_name or out.get("model_name")
    combined: dict[str, Any] = {"token_usage": usage, "distiller_loss": losses}
    if model_name:
        combined["model_name"] = model_name
    return combined


def check_prompts(prompts: Sequence[str]) -> None:
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt {i} is {prompt!r}; allowed: a non-empty string")


# -- async bridge -----------------------------------------------------------------------

T = TypeVar("T")
_ITEM, _ERROR, _DONE = 0, 1, 2


async def iterate_in_thread(make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator in ONE dedicated thread and yield its items asynchronously.

    One thread for the whole iteration matters: the engine holds the model's RLock across
    the stream, and an RLock must be released by the thread that took it (a thread pool
    could resume the generator on another thread).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    cancelled = threading.Event()

    def post(kind: int, payload: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancelled.set()

    def produce() -> None:
        try:
            iterator = make_iter()
            try:
                for item in iterator:
                    if cancelled.is_set():
                        break
                    post(_ITEM, item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:
            post(_ERROR, exc)
        else:
            post(_DONE, None)

    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(produce,), name="esamp-stream", daemon=True)
    thread.start()
    try:
        while True:
            kind, payload = await queue.get()
            if kind == _ITEM:
                yield payload
            elif kind == _ERROR:
                raise payload
            else:
                return
    finally:
        cancelled.set()


__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_TOKENS",
    "IGNORED_KWARGS",
    "CallConfig",
    "ESampLangChainMixin",
    "candidate_info",
    "check_observers",
    "check_prompts",
    "combine_usage",
    "engine_for",
    "iterate_in_thread",
    "split_observers",
]
