"""Pydantic models of the server's API in OpenAI's shapes, for ``/openapi.json`` only.

They document requests and responses; they never validate a request:
:func:`esamp_agents.serving.protocol.parse_request` does, so every refusal keeps its one
message and OpenAI's error shape (a 400, never FastAPI's 422). The models are kept loose where
the protocol is richer (message content parts, tool schemas) and strict where it is simple
(ranges), so the schema states what a valid request looks like.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from esamp_agents.decoding.params import MAX_TOP_LOGPROBS
from esamp_agents.serving.protocol import MAX_N, MAX_STOP


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Closed):
    include_usage: bool | None = Field(None, description="send a last chunk with the request's usage")


class ChatMessage(_Closed):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(None, description="text, or a list of {type: 'text'} parts")
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, description="the call a tool turn answers")


class _Sampling(_Closed):
    model: str = Field(description="the served model name (see /v1/models)")
    n: int | None = Field(None, ge=1, le=MAX_N, description="candidates per prompt")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, description=f"a string or up to {MAX_STOP} strings")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = Field(None, description="server-sent events, one chunk per text delta of each choice")
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0, description="extra: top-k filter (0 = off)")
    min_p: float | None = Field(None, ge=0, lt=1, description="extra: min-p filter")
    ignore_eos: bool | None = Field(None, description="extra: decode past the end-of-turn token")
    beta: float | None = Field(None, ge=0, description="extra: ESamp's exploration strength (0 = off)")
    distiller_width: int | None = Field(None, ge=1, description="extra: ESamp's Distiller width")
    distiller_lr: float | None = Field(None, gt=0, description="extra: the Distiller's learning rate")
    lr: float | None = Field(None, gt=0, description="extra: the same as distiller_lr")
    adam_eps: float | None = Field(None, gt=0, description="extra: the Distiller's Adam epsilon")
    grad_clip: float | None = Field(None, gt=0, description="extra: the Distiller's gradient clip")
    warm_start_steps: int | None = Field(None, ge=0, description="extra: Distiller warm-start steps on the prompt")
    warm_start_lr: float | None = Field(None, gt=0, description="extra: the warm start's learning rate")
    shared_distiller: bool | None = Field(None, description="extra: one Distiller for all prompts")
    distiller_update_every: int | None = Field(
        None, ge=1, le=1024, description="extra: train the Distiller once per this many decode steps"
    )
    user: str | None = None
    metadata: dict[str, Any] | None = None
    frequency_penalty: float | None = Field(None, description="only 0 is served")
    presence_penalty: float | None = Field(None, description="only 0 is served")
    logit_bias: dict[str, float] | None = Field(None, description="only {} is served")


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: OpenAI's fields and ESamp's extras."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs=true")
    tools: list[dict[str, Any]] | None = Field(None, description="OpenAI function tools")
    tool_choice: str | dict[str, Any] | None = Field(None, description="'auto', 'none', 'required' or a function")
    parallel_tool_calls: bool | None = Field(None, description="default false here (one call per reply)")
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt (or several, or token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token")
    best_of: int | None = Field(None, description="absent, 1 or n")


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionChoice(_Open):
    index: int
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Model(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Open):
    """OpenAI's error shape, for every refusal (400, 401, 404, 405, 413, 500, 503)."""

    error: ErrorDetail


class Health(_Open):
    status: Literal["ok"]


REQUEST_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest)

__all__ = [
    "REQUEST_MODELS",
    "ChatCompletion",
    "ChatCompletionRequest",
    "Completion",
    "CompletionRequest",
    "ErrorResponse",
    "Health",
    "Model",
    "ModelList",
]
