"""``ChatESamp``: the ESamp sampler as a LangChain chat model (N candidate replies per call)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticToolsParser
from langchain_core.output_parsers.pydantic import PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import run_in_executor
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from esamp_agents.constrained.grammar import closed_schema
from esamp_agents.decoding.loading import EMBEDDED, LoadedModel, load_model
from esamp_agents.decoding.results import Candidate
from esamp_agents.langchain.common import (
    CallConfig,
    ESampLangChainMixin,
    candidate_info,
    combine_usage,
    iterate_in_thread,
    split_observers,
)
from esamp_agents.langchain.decode_rewards import CALL_EXTRA_KEYS, CallExtras, DecodeRewards
from esamp_agents.langchain.tools import (
    CallConstraint,
    ToolTextGate,
    message_chunk,
    reply_message,
    response_grammar,
    split_constraint,
    to_openai_tools,
)
from esamp_agents.messages import to_chat_messages
from esamp_agents.openai_format import prompt_usage, renderer_for
from esamp_agents.tool_calling import ToolSpec, tool_specs

_HAS_CHUNK_POSITION = "chunk_position" in AIMessageChunk.model_fields
StructuredMethod = Literal["json_schema", "function_calling", "json_mode"]
STRUCTURED_METHODS: tuple[str, ...] = ("json_schema", "function_calling", "json_mode")


def _usage_metadata(usage: dict[str, int]) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
    )


class ChatESamp(ESampLangChainMixin, BaseChatModel):
    """Exploratory Sampling as a LangChain chat model: ``n`` diverse replies per call.

    Messages are rendered with the model's own chat template. Weights load lazily on
    first use through the shared registry (many instances share one copy and one lock,
    so concurrent and async calls are safe). ``invoke`` returns the first reply only, as
    for every LangChain chat model; ``generate`` returns all ``n``. Each reply's
    ``response_metadata`` has the finish reason, token counts, mean logprob, ESamp
    novelty, ``model_name`` and, when ``logprobs``/``top_logprobs`` is set, logprobs in
    OpenAI's ``{"content": [...]}`` shape. ``usage_metadata`` counts the whole request
    (prompt once, output of all ``n`` replies), as ChatOpenAI does. ``llm_output`` carries
    token usage and the Distiller's loss curve.

    Caching is off by default (``cache=False``): a cache keyed on messages and parameters
    would replay the very same N samples, defeating diverse sampling. Pass ``cache=True``
    (or a cache object) to opt in.

    Decode-time rewards: a per-call ``rewards=[reward, ...]`` (objects with ``name`` and
    ``make_observer(loaded_model)``, e.g. ``HiddenStateReward.shipped()``) scores every reply
    during that call's decode, at no extra forward pass; each reply's ``response_metadata``
    then has ``"rewards": {name: score}``. A failing reward raises ``RewardError`` unless
    ``on_reward_error="skip"`` (then ``"reward_errors": {name: message}`` says why). A
    per-call ``observers=[DecodeObserver, ...]`` reads hidden states the same way. Both work
    with ``generate``/``invoke``/``stream``, require caching off (the default), and are not
    part of the identifying or traced invocation params.

    Tool calling and structured output work by grammar-constrained decoding, so even the
    embedded 135M model always emits well-formed calls and schema-valid JSON:
    ``bind_tools(tools, tool_choice=...)`` (``auto``, ``any``/``required``, ``none``, a tool
    name; one call per reply unless ``parallel_tool_calls=True``: small models asked for "one
    or more" tend to repeat a call until cut off) gives replies with ``tool_calls`` (ids, parsed args) and
    ``finish_reason="tool_calls"``; ``with_structured_output(schema, method=...)`` supports
    ``json_schema`` (default), ``function_calling`` and ``json_mode``, and ``include_raw``. A
    reply cut off by ``max_tokens`` lands in ``invalid_tool_calls``, never in ``tool_calls``.
    The tools reach the model through its chat template when it reads ``tools``, otherwise in
    the system prompt (format: :mod:`esamp_agents.tool_calling`). A per-call ``grammar=``
    (:class:`~esamp_agents.constrained.Grammar`) constrains a reply to any JSON schema, regex or
    Lark grammar.

    Example:
        .. code-block:: python

            from langchain_core.messages import HumanMessage

            from esamp_agents.langchain.chat_model import ChatESamp

            chat = ChatESamp(model="embedded", n=3, max_tokens=24, seed=0)
            result = chat.generate([[HumanMessage("Name a colour.")]])
            replies = [g.text for g in result.generations[0]]  # 3 replies
            first = chat.invoke("Name a colour.")  # an AIMessage, the first reply
            for chunk in chat.stream("Name a colour.", n=1):
                print(chunk.content, end="")
    """

    @classmethod
    def from_model(
        cls, model: str | LoadedModel | Any = EMBEDDED, *, tokenizer: Any | None = None, **kwargs: Any
    ) -> ChatESamp:
        """Load ``model`` now (name, path, LoadedModel, or HF model + ``tokenizer``)."""
        loaded = load_model(model, tokenizer=tokenizer, device=kwargs.get("device"), dtype=kwargs.get("dtype", "auto"))
        if isinstance(model, str):
            kwargs.setdefault("model", model)
        return cls(loaded_model=loaded, **kwargs)

    @classmethod
    def from_model_id(cls, model_id: str = EMBEDDED, **kwargs: Any) -> ChatESamp:
        """Load the model named ``model_id`` now rather than on first use."""
        return cls.from_model(model_id, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "esamp-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        # Observers and rewards are per-call plumbing, not model parameters: keep them out of traces.
        for key in CALL_EXTRA_KEYS:
            kwargs.pop(key, None)
        return super()._get_invocation_params(stop=stop, **kwargs)

    def _check_call_observers(self, kwargs: dict[str, Any]) -> None:
        """Also refuse, before any callback, a per-call ``n`` that cannot stream when this call streams."""
        super()._check_call_observers(kwargs)
        streams = bool(kwargs["stream"]) if "stream" in kwargs else self.streaming
        n = kwargs.get("n", self.n)
        if streams and n != 1:
            raise ValueError(f"n={n!r} with streaming=True; allowed: n=1 when streaming")

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None], /) -> dict[str, Any]:
        return combine_usage(llm_outputs)

    def render_prompt(
        self, messages: Sequence[BaseMessage], model_name: str | None = None, tools: Sequence[ToolSpec] = ()
    ) -> str:
        """The exact prompt text the model sees for ``messages`` (chat template applied, tools shown)."""
        if not messages:
            raise ValueError("messages=[] is empty; allowed: at least one message")
        loaded = self._resolve_model(model_name or self.model_name)
        return loaded.apply_chat_template(to_chat_messages(list(messages)), tools)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens of ``messages`` once the chat template is applied (with ``tools`` shown)."""
        specs = tool_specs(to_openai_tools(tools)) if tools else []
        loaded = self._resolve_model(self.model_name)
        return len(loaded.tokenizer.encode(self.render_prompt(messages, tools=specs), add_special_tokens=False))

    # -- tools and structured output ---------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, BaseMessage]:
        """Bind tools (``BaseTool``, functions, pydantic models, OpenAI dicts); replies then carry
        ``tool_calls``. ``tool_choice``: "auto" (default: text or calls), "any"/"required", "none",
        a tool name, or ``True`` (the only tool). ``strict`` is accepted for ChatOpenAI parity:
        calls always follow the schemas here. Bad tools or choices raise now, before any decoding."""
        formatted = to_openai_tools(tools)
        if strict is not None and not isinstance(strict, bool):
            raise ValueError(f"strict={strict!r} must be True, False or None")
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        split_constraint({"tools": formatted, **kwargs})  # every conflict is reported at bind time
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: StructuredMethod = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Replies parsed into ``schema`` (pydantic class, TypedDict or JSON schema dict).

        ``method``: "json_schema" (default: the reply is JSON constrained to the schema),
        "function_calling" (a forced call of a tool with that schema) or "json_mode" (a JSON
        object; ``schema`` optional, and when given the object is held to it as well).
        ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}``. Unsupported schema
        features raise now, before any decoding.
        """
        if kwargs:
            raise ValueError(f"unknown keyword arguments {sorted(kwargs)}; allowed: method, include_raw, strict")
        if method not in STRUCTURED_METHODS:
            raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(STRUCTURED_METHODS)}")
        if schema is None and method != "json_mode":
            raise ValueError(f"schema is required for method={method!r}; only 'json_mode' works without one")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            assert schema is not None
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=name, parallel_tool_calls=False, ls_structured_output_format=trace
            )
            parser = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        else:
            if schema is not None:  # json_mode with a schema is held to it too: a reply the parser rejects helps no one
                json_schema = closed_schema(convert_to_json_schema(schema))  # no keys beyond the schema's
                name = str(json_schema.get("title") or "response")
                response_format: dict[str, Any] = {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": json_schema, "strict": bool(strict)},
                }
            else:
                response_format = {"type": "json_object"}
            response_grammar(response_format)  # an unsupported schema fails here
            llm = self.bind(response_format=response_format, ls_structured_output_format=trace)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()  # type: ignore[arg-type]
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")

    # -- generation ------------------------------------------------------------------------

    def _info(self, candidate: Candidate, call: CallConfig, loaded: LoadedModel) -> dict[str, Any]:
        renderer = renderer_for(loaded.tokenizer) if call.logprobs else None
        return candidate_info(
            candidate,
            model_name=call.model_name,
            logprobs=call.logprobs,
            renderer=renderer,
            eos_ids=loaded.eos_token_ids,
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        constraint, kwargs = split_constraint(kwargs)
        extras, kwargs = split_observers(kwargs)
        call = self._resolve_call(stop, kwargs)
        loaded = self._resolve_model(call.model_name)
        prompt = self.render_prompt(messages, call.model_name, constraint.prompt_tools)
        scoring = DecodeRewards(extras.rewards, loaded, extras.on_reward_error)
        observers = extras.observers + scoring.observers
        result = self._engine(loaded).generate(
            [prompt], call.sampling, call.esamp, observers=observers, add_special_tokens=False,
            grammar=constraint.grammar,
        )  # fmt: skip
        prompt_result = result[0]
        usage = prompt_usage(prompt_result)
        scores = scoring.per_candidate([len(prompt_result.candidates)])[0]
        generations = []
        for c, extra in zip(prompt_result.candidates, scores, strict=True):
            message, finish = reply_message(c, constraint, usage_metadata=_usage_metadata(usage))
            info = {**self._info(c, call, loaded), **extra, "finish_reason": finish}
            generations.append(ChatGeneration(message=message, generation_info=info))
        llm_output = {
            "token_usage": usage,
            "model_name": call.model_name,
            "distiller_loss": [list(prompt_result.distiller_loss)],
        }
        return ChatResult(generations=generations, llm_output=llm_output)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Validate on the event loop (cheap, fails fast); load and decode in a worker thread.
        self._resolve_call(stop, split_observers(split_constraint(kwargs)[1])[1])
        sync_manager = run_manager.get_sync() if run_manager else None
        return await run_in_executor(None, self._generate, messages, stop, sync_manager, **kwargs)

    # -- streaming -------------------------------------------------------------------------

    def _stream_call(
        self, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[CallConfig, CallExtras, CallConstraint]:
        constraint, kwargs = split_constraint(kwargs)
        extras, kwargs = split_observers(kwargs)
        call = self._resolve_call(stop, kwargs)
        if call.sampling.n != 1:
            raise ValueError(f"n={call.sampling.n} cannot be streamed; allowed: n=1 (use generate() for N replies)")
        return call, extras, constraint

    def _chunks(
        self,
        messages: list[BaseMessage],
        call: CallConfig,
        extras: CallExtras | None = None,
        constraint: CallConstraint | None = None,
    ) -> Iterator[ChatGenerationChunk]:
        extras = extras or CallExtras()
        constraint = constraint or CallConstraint()
        loaded = self._resolve_model(call.model_name)
        prompt = self.render_prompt(messages, call.model_name, constraint.prompt_tools)
        scoring = DecodeRewards(extras.rewards, loaded, extras.on_reward_error)
        observers = extras.observers + scoring.observers
        events = self._engine(loaded).stream(
            prompt, call.sampling, call.esamp, observers=observers, add_special_tokens=False,
            grammar=constraint.grammar,
        )  # fmt: skip
        gate = ToolTextGate(constraint.calls_tools)
        for event in events:
            if event.candidate is None:
                text = gate.push(event.text)
                if text:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=text))
                continue
            candidate = event.candidate
            usage = _usage_metadata(
                {
                    "prompt_tokens": candidate.prompt_tokens,
                    "completion_tokens": candidate.completion_tokens,
                    "total_tokens": candidate.prompt_tokens + candidate.completion_tokens,
                }
            )
            extra: dict[str, Any] = {"chunk_position": "last"} if _HAS_CHUNK_POSITION else {}
            info = {**self._info(candidate, call, loaded), **scoring.per_candidate([1])[0][0]}
            if gate.decided:  # a held-back tool call: the whole reply, parsed, in the last chunk
                message, info["finish_reason"] = reply_message(candidate, constraint)
                chunk = message_chunk(message, usage_metadata=usage, **extra)
            else:
                chunk = AIMessageChunk(content=gate.push(event.text), usage_metadata=usage, **extra)
            yield ChatGenerationChunk(message=chunk, generation_info=info)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call, extras, constraint = self._stream_call(stop, kwargs)
        for chunk in self._chunks(messages, call, extras, constraint):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call, extras, constraint = self._stream_call(stop, kwargs)
        async for chunk in iterate_in_thread(lambda: self._chunks(messages, call, extras, constraint)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


__all__ = ["ChatESamp"]
