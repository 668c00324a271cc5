"""Tool calling without a model: specs, tool_choice, the call grammar, the parser, and how
tools and earlier tool turns reach a chat template (with and without tool support)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from esamp_agents.decoding.loading import LoadedModel
from esamp_agents.tool_calling import (
    CALL_CLOSE,
    CALL_OPEN,
    format_call,
    parse_tool_calls,
    render_for_template,
    resolve_tool_choice,
    template_reads_tools,
    tool_call_grammar,
    tool_specs,
)

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
ECHO = {"name": "echo", "description": "Repeat a text.", "parameters": {"type": "object",
        "properties": {"text": {"type": "string"}}, "required": ["text"]}}  # fmt: skip
SPECS = tool_specs([ADD, ECHO])


# ------------------------------------------------------------------ parse_tool_calls
def test_content_around_a_call_is_kept() -> None:
    call = f'{CALL_OPEN}{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}{CALL_CLOSE}'
    reply = parse_tool_calls(f"Let me add. {call} ok", SPECS)
    assert [(c.name, c.args) for c in reply.calls] == [("add", {"a": 1, "b": 2})]
    assert reply.content.startswith("Let me add.") and reply.content.endswith("ok")
    assert CALL_OPEN not in reply.content and not reply.invalid


def test_several_calls_each_get_a_unique_id() -> None:
    text = format_call("add", {"a": 1, "b": 2}) + "\n" + format_call("echo", {"text": "hi"})
    reply = parse_tool_calls(text, SPECS)
    assert [(c.name, c.args) for c in reply.calls] == [("add", {"a": 1, "b": 2}), ("echo", {"text": "hi"})]
    assert len({c.id for c in reply.calls}) == 2 and all(c.id.startswith("call_") for c in reply.calls)
    assert reply.content == "" and not reply.invalid


def test_close_tag_inside_a_json_string_does_not_end_the_call() -> None:
    text = format_call("echo", {"text": f"say {CALL_CLOSE} and {CALL_OPEN} literally"}) + " after"
    reply = parse_tool_calls(text, SPECS)
    assert [c.args for c in reply.calls] == [{"text": f"say {CALL_CLOSE} and {CALL_OPEN} literally"}]
    assert reply.content == "after"


def test_whitespace_inside_the_tags_is_allowed() -> None:
    # the Hermes/Qwen templates write "<tool_call>\n{...}\n</tool_call>"; unconstrained models copy it
    text = f'{CALL_OPEN}\n{{"name": "add", "arguments": {{"a": 3, "b": 4}}}}\n{CALL_CLOSE}'
    reply = parse_tool_calls(text, SPECS)
    assert [(c.name, c.args) for c in reply.calls] == [("add", {"a": 3, "b": 4})] and not reply.invalid


@pytest.mark.parametrize(
    "text",
    [f'{CALL_OPEN}{{"name": "echo", "arguments": {{"text": "ab', f'{CALL_OPEN}{{"name": "echo", "arguments": {{}}}}'],
    ids=["inside-json", "before-close-tag"],
)
def test_cut_off_call_is_invalid_not_a_call(text: str) -> None:
    reply = parse_tool_calls(text, SPECS)
    assert reply.calls == []
    assert len(reply.invalid) == 1 and "cut off before </tool_call>" in reply.invalid[0][1]


def test_unknown_tool_is_invalid_and_names_the_allowed_ones() -> None:
    reply = parse_tool_calls(format_call("multiply", {"a": 1}), SPECS)
    assert reply.calls == []
    (raw, why), = reply.invalid  # fmt: skip
    assert json.loads(raw)["name"] == "multiply" and "unknown tool 'multiply'" in why and "'add', 'echo'" in why
    # without specs any name is taken
    assert [c.name for c in parse_tool_calls(format_call("multiply", {"a": 1})).calls] == ["multiply"]


@pytest.mark.parametrize(
    ("payload", "why"),
    [('{"name": "add", "arguments": [1, 2]}', "'arguments' must be a JSON object"),
     ('{"name": "add", "arguments": "{\\"a\\": 1}"}', "'arguments' must be a JSON object"),
     ("[1, 2]", "JSON object with a string 'name'"), ('{"name": 7}', "JSON object with a string 'name'"),
     ("not json", "not valid JSON")],
)  # fmt: skip
def test_malformed_calls_are_invalid(payload: str, why: str) -> None:
    reply = parse_tool_calls(f"{CALL_OPEN}{payload}{CALL_CLOSE}", SPECS)
    assert reply.calls == [] and len(reply.invalid) == 1 and why in reply.invalid[0][1]


def test_bad_call_does_not_hide_a_good_one_after_it() -> None:
    text = f"{CALL_OPEN}oops{CALL_CLOSE} then {format_call('add', {'a': 5, 'b': 6})}"
    reply = parse_tool_calls(text, SPECS)
    assert [c.args for c in reply.calls] == [{"a": 5, "b": 6}] and len(reply.invalid) == 1
    assert reply.content == "then"


def test_plain_text_is_returned_as_is() -> None:
    reply = parse_tool_calls("  The answer is 4.\n", SPECS)
    assert reply.content == "  The answer is 4.\n" and reply.calls == [] and reply.invalid == []


def test_missing_arguments_mean_no_arguments() -> None:
    assert [c.args for c in parse_tool_calls(f'{CALL_OPEN}{{"name": "echo"}}{CALL_CLOSE}', SPECS).calls] == [{}]


# ------------------------------------------------------------------ resolve_tool_choice
@pytest.mark.parametrize(
    ("choice", "expected"),
    [(None, "auto"), ("auto", "auto"), ("none", "none"), ("any", "required"), ("required", "required"),
     (True, "required"), ("echo", "echo"), ({"type": "function", "function": {"name": "add"}}, "add"),
     ({"name": "echo"}, "echo")],
)  # fmt: skip
def test_tool_choice_forms(choice: Any, expected: str) -> None:
    assert resolve_tool_choice(choice, SPECS) == expected


def test_true_with_one_tool_picks_that_tool() -> None:
    assert resolve_tool_choice(True, SPECS[:1]) == "add"


@pytest.mark.parametrize(
    ("choice", "specs", "message"),
    [("multiply", SPECS, "'multiply' is not a bound tool"), ({"name": "multiply"}, SPECS, "not a bound tool"),
     ({"type": "function"}, SPECS, "names no tool"), (3, SPECS, "3 is not supported"),
     (False, SPECS, "False is not supported"), ("required", [], "no tools are bound"),
     (True, [], "no tools are bound"), ("auto", [], "no tools are bound")],
)  # fmt: skip
def test_bad_tool_choice_errors(choice: Any, specs: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_tool_choice(choice, specs)


def test_none_choice_needs_no_tools_and_has_no_grammar() -> None:
    assert resolve_tool_choice("none", []) == "none"
    assert tool_call_grammar(SPECS, "none") is None
    assert tool_call_grammar([], "auto") is None


# ------------------------------------------------------------------ tool_specs
@pytest.mark.parametrize(
    ("tool", "message"),
    [({"type": "function", "function": {"description": "no name"}}, "tool name None is not valid"),
     ({"name": "has space"}, "'has space' is not valid"),
     ({"name": "f", "parameters": {"type": "array"}}, "'f' has no object schema"),
     ({"name": "f", "parameters": "x"}, "'f' has no object schema"),
     ({"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strnig"}}}},
      "tool 'f': invalid JSON schema"),
     ({"type": "retrieval"}, "not a function tool"), ("add", "type str is not supported")],
)  # fmt: skip
def test_bad_tool_specs(tool: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tool_specs([tool])


def test_a_tool_given_twice_is_one_tool_the_first_definition_kept() -> None:
    specs = tool_specs([ADD, ECHO, {"name": "add", "description": "second"}])
    assert [s.name for s in specs] == ["add", "echo"]
    assert specs[0].description == "Add two integers." and specs[0].parameters["required"] == ["a", "b"]


def test_specs_from_both_openai_shapes() -> None:
    add, echo = SPECS
    assert (add.name, add.description, add.parameters["required"]) == ("add", "Add two integers.", ["a", "b"])
    assert echo.openai() == {"type": "function", "function": {**ECHO}}
    assert tool_specs([{"name": "ping"}])[0].parameters == {"type": "object", "properties": {}}


# ------------------------------------------------------------------ the call grammar
def test_required_grammar_takes_calls_to_any_tool_only(accepts: Any) -> None:
    g = tool_call_grammar(SPECS, "required")
    assert g is not None and g.kind == "lark"
    one = format_call("add", {"a": 1, "b": 2})
    assert accepts(g, one)
    assert accepts(g, one + "\n" + format_call("echo", {"text": "x"}))  # parallel calls
    assert not accepts(g, "The answer is 3.")
    assert not accepts(g, format_call("add", {"a": "1", "b": 2}))  # the tool's own schema
    assert not accepts(g, format_call("mul", {"a": 1, "b": 2}))


def test_named_grammar_takes_only_that_tool_and_one_call_when_not_parallel(accepts: Any) -> None:
    g = tool_call_grammar(SPECS, "echo", parallel=False)
    assert g is not None
    assert accepts(g, format_call("echo", {"text": "hi"}))
    assert not accepts(g, format_call("add", {"a": 1, "b": 2}))
    assert not accepts(g, format_call("echo", {"text": "a"}) + "\n" + format_call("echo", {"text": "b"}))


def test_auto_grammar_takes_text_or_calls(accepts: Any) -> None:
    g = tool_call_grammar(SPECS, "auto")
    assert g is not None
    assert accepts(g, "Hello there.\nBye.")
    assert accepts(g, format_call("add", {"a": 1, "b": 2}))
    assert not accepts(g, "<tool_call>broken")


def test_unenforceable_argument_schema_fails_when_the_grammar_is_made() -> None:
    specs = tool_specs([{"name": "f", "parameters": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}])  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot be enforced.*uniqueItems"):
        tool_call_grammar(specs, "required")


# ------------------------------------------------------------------ reaching the template
HISTORY = [
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "c1"}]},
    {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"},
]


def test_fallback_puts_tools_in_a_system_prompt_and_renders_tool_turns() -> None:
    messages, tools = render_for_template(HISTORY, SPECS, template_tools=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    lines = system.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["add", "echo"]  # one tool per line, as JSON
    assert "<tool_call>" in system and "<tool_response>" in system
    assert messages[2]["content"] == format_call("add", {"a": 1, "b": 2})  # the earlier call, written back
    assert messages[3]["content"] == "<tool_response>\n3\n</tool_response>"  # the result as a user turn


def test_fallback_appends_to_an_existing_system_prompt() -> None:
    messages, _ = render_for_template([{"role": "system", "content": "Be brief."}, *HISTORY[:1]], SPECS, False)
    assert len(messages) == 2 and messages[0]["content"].startswith("Be brief.\n\nYou can call these tools:")


def test_fallback_keeps_assistant_text_before_its_calls() -> None:
    turn = {**HISTORY[1], "content": "Adding."}
    messages, _ = render_for_template([HISTORY[0], turn], SPECS, False)
    assert messages[-1]["content"] == "Adding.\n" + format_call("add", {"a": 1, "b": 2})


def test_no_tools_and_no_tool_turns_pass_messages_through() -> None:
    messages, tools = render_for_template(HISTORY[:1], [], template_tools=False)
    assert messages == HISTORY[:1] and messages[0] is not HISTORY[0] and tools is None


def test_template_with_tools_gets_openai_shapes() -> None:
    messages, tools = render_for_template(HISTORY, SPECS, template_tools=True)
    assert tools == [s.openai() for s in SPECS]
    assert messages[1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    ]
    assert messages[2] == {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"}


class RecordingTokenizer:
    """A tokenizer whose chat template reads ``tools``: records what apply_chat_template got."""

    chat_template = "{% for t in tools %}{{ t }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls.append({"messages": messages, **kwargs})
        return "rendered"


def test_loaded_model_passes_tools_to_a_template_that_reads_them() -> None:
    tok = RecordingTokenizer()
    loaded = LoadedModel(model=None, tokenizer=tok, name="fake")
    assert loaded.template_reads_tools
    assert loaded.apply_chat_template(list(HISTORY), tools=SPECS) == "rendered"
    (call,) = tok.calls
    assert call["tools"] == [s.openai() for s in SPECS] and call["add_generation_prompt"] is True
    assert all(m["role"] != "system" for m in call["messages"])  # no fallback prompt when the template has tools
    loaded.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "tools" not in tok.calls[-1]  # no tools: no tools= argument


def test_smollm2_template_takes_the_fallback(tokenizer: Any) -> None:
    assert not template_reads_tools(tokenizer.chat_template)
    text = LoadedModel(model=None, tokenizer=tokenizer, name="embedded").apply_chat_template(list(HISTORY), SPECS)
    assert text.index("You can call these tools") < text.index("What is 1 + 2?") < text.rindex("<tool_response>\n3")
    assert text.rstrip().endswith("assistant")  # ends where the assistant's turn begins
