"""LangChain's standard chat-model suites (langchain-tests) run against ChatESamp.

Unit suite: construction with the standard parameters, tracing params, init time.
Integration suite: invoke/ainvoke/stream/astream/batch/stop/usage against the real
embedded model. Tool calling, structured output, JSON mode and multimodal input are
declared unsupported (a 135M text model), so those tests skip.
"""

from __future__ import annotations

from typing import Any

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from esamp_agents.decoding.loading import load_model
from esamp_agents.langchain.chat_model import ChatESamp


class _NoToolsMixin:
    """What a 135M text-only model can do: text in, text out."""

    @property
    def chat_model_class(self) -> type[ChatESamp]:
        return ChatESamp

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatESampUnit(_NoToolsMixin, ChatModelUnitTests):
    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Construction must not load weights: no loaded model here, and it stays cheap.
        return {"model": "embedded", "seed": 0}


class TestChatESampIntegration(_NoToolsMixin, ChatModelIntegrationTests):
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
