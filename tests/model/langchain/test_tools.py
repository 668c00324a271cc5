"""ChatESamp tool calling and structured output on the real embedded model: forced calls parse and
validate, ToolMessages come back into the conversation, structured output parses into every schema
kind, cut-off calls are never valid, streaming sends a call whole, ESamp and Best-of-N work over calls."""

from __future__ import annotations

import jsonschema
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from esamp_agents import ChatESamp, ESampLLM
from esamp_agents.constrained import Grammar
from esamp_agents.selection.best_of_n import BestOfN


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


class Pet(TypedDict):
    kind: str
    legs: int


@pytest.fixture(scope="module")
def chat(embedded) -> ChatESamp:
    return ChatESamp(loaded_model=embedded, max_tokens=48, temperature=0.7, seed=0)


def _args_valid(call: dict, tool_obj) -> None:
    jsonschema.validate(call["args"], tool_obj.tool_call_schema.model_json_schema())


def test_forced_calls_parse_validate_and_round_trip_through_a_tool_message(chat):
    bound = chat.bind_tools([multiply, weather], tool_choice="multiply")
    question = HumanMessage("What is 6 times 7?")
    reply = bound.invoke([question])
    assert reply.response_metadata["finish_reason"] == "tool_calls" and not reply.invalid_tool_calls
    (call,) = reply.tool_calls
    assert call["name"] == "multiply" and call["id"].startswith("call_")
    _args_valid(call, multiply)
    result = multiply.invoke(call)  # a ToolMessage with the call's id
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    prompt = chat.render_prompt([question, reply, result])
    assert '<tool_call>{"name": "multiply"' in prompt and f"<tool_response>\n{result.content}\n" in prompt
    follow = chat.bind_tools([multiply, weather], tool_choice="none").invoke([question, reply, result])
    assert isinstance(follow.content, str) and follow.content and not follow.tool_calls


def test_required_choice_over_two_tools_with_n_candidates_and_esamp(chat):
    # a binding's .generate does not pass the bound kwargs (LangChain's RunnableBinding): give them per call
    bound = chat.bind_tools([multiply, weather], tool_choice="any")
    result = chat.generate([[HumanMessage("Weather in Paris?")]], **bound.kwargs, n=3, beta=0.25)
    replies = [g.message for g in result.generations[0]]
    assert len(replies) == 3
    for reply in replies:
        assert isinstance(reply, AIMessage) and len(reply.tool_calls) == 1, reply
        call = reply.tool_calls[0]
        _args_valid(call, multiply if call["name"] == "multiply" else weather)


def test_a_cut_off_call_is_invalid_never_valid(chat):
    reply = chat.bind_tools([weather], tool_choice="weather").invoke("Weather in Paris?", max_tokens=6)
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.response_metadata["constraint_satisfied"] is False
    assert reply.tool_calls == [] and reply.invalid_tool_calls


def test_structured_output_for_every_schema_kind_and_method(chat):
    person = chat.with_structured_output(Person).invoke("Invent a person.")
    assert isinstance(person, Person)
    pet = chat.with_structured_output(Pet, method="function_calling").invoke("Describe a pet.")
    assert set(pet) == {"kind", "legs"} and isinstance(pet["legs"], int)
    schema = {
        "title": "Color",
        "type": "object",
        "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
    }
    color = chat.with_structured_output(schema).invoke("A colour, please.")
    jsonschema.validate(color, schema)
    assert set(color) <= {"hex"}
    raw = chat.with_structured_output(Person, method="json_mode", include_raw=True).invoke("Invent a person.")
    assert isinstance(raw["raw"], AIMessage) and isinstance(raw["parsed"], Person) and raw["parsing_error"] is None
    anything = chat.with_structured_output(method="json_mode").invoke("Any JSON object.")
    assert isinstance(anything, dict)


def test_streaming_sends_a_tool_call_whole_and_text_as_it_comes(chat):
    chunks = list(chat.bind_tools([weather], tool_choice="any").stream("Weather in Oslo?"))
    assert all(not c.content for c in chunks[:-1])  # nothing of the raw <tool_call> text leaks
    merged: AIMessageChunk = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "weather"
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    text = list(chat.bind_tools([weather], tool_choice="none").stream("Say hello.", max_tokens=8))
    assert len(text) > 1 and "".join(str(c.content) for c in text)


def test_best_of_n_over_tool_calls_in_one_batched_decode(embedded):
    from esamp_agents import HiddenStateReward

    model = ChatESamp(loaded_model=embedded, max_tokens=48, temperature=0.8, seed=1)
    best = BestOfN(
        model.bind_tools([multiply], tool_choice="any"), n=4, rewards=[HiddenStateReward.shipped()],
        include_candidates=True,
    )  # fmt: skip
    out = best.invoke([HumanMessage("What is 12 times 3?")])
    assert out.output.tool_calls and out.output.tool_calls[0]["name"] == "multiply"
    assert len(out.candidates) == 4 and all("hidden_state" in c.scores or c.scores for c in out.candidates)
    assert all(c.text.startswith("<tool_call>") for c in out.candidates if c.output.tool_calls)


def test_esamp_llm_takes_a_grammar(embedded):
    llm = ESampLLM(loaded_model=embedded, max_tokens=16, seed=0)
    result = llm.generate(["The answer is"], grammar=Grammar.regex(r" (yes|no)\."), n=2)
    for g in result.generations[0]:
        assert g.text in {" yes.", " no."} and g.generation_info["constraint_satisfied"] is True
    json_text = llm.invoke("A JSON object:", response_format={"type": "json_object"}, max_tokens=32)
    assert json_text.startswith("{")
