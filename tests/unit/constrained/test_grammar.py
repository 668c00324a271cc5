"""Grammar creation: every bad case fails on creation with a GrammarError naming the problem,
and good ones accept exactly the texts they should (checked through the real tokenizer)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from esamp_agents.constrained.grammar import GRAMMAR_KINDS, Grammar, GrammarError


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, '"if", "then"'),
        ({"type": "strnig"}, "'strnig'"),
        ({"type": "integer", "minimum": "x"}, "at minimum"),
        ({"type": "string", "pattern": "(("}, "at pattern"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
        (True, "boolean schema"),
        ([{"type": "object"}], "type list is not supported"),
        ("{not json", "is not valid JSON"),
    ],
    ids=["not", "uniqueItems", "if-then", "bad-type", "bad-minimum", "bad-pattern", "unsatisfiable", "bool", "list",
         "bad-json-text"],
)  # fmt: skip
def test_bad_json_schemas_fail_on_creation_naming_the_problem(schema: Any, named: str) -> None:
    with pytest.raises(GrammarError) as info:
        Grammar.json_schema(schema)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError still catch it


def test_unenforceable_keyword_nested_under_defs_is_still_refused() -> None:
    schema = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {"X": {"not": {"const": 1}}}}
    with pytest.raises(GrammarError, match="not"):
        Grammar.json_schema(schema)


@pytest.mark.parametrize(
    ("pattern", "named"),
    [("((", "unclosed group"), ("a{2,1}", "invalid repetition count"), ("[z-a]", "invalid character class range"),
     ("", "empty"), (None, "empty or not a str")],
)  # fmt: skip
def test_bad_regexes_fail_on_creation(pattern: Any, named: str) -> None:
    with pytest.raises(GrammarError, match="regex") as info:
        Grammar.regex(pattern)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [("start: foo", 'unknown name: "foo"'), ("start: x\nx: /[/", "unclosed character class"),
     ("nothing here", "'start' rule"), (5, "'start' rule")],
)  # fmt: skip
def test_bad_lark_grammars_fail_on_creation(text: Any, named: str) -> None:
    with pytest.raises(GrammarError) as info:
        Grammar.lark(text)
    assert named in str(info.value)


def test_direct_construction_checks_kind_and_source() -> None:
    with pytest.raises(GrammarError, match="kind 'xml' is not supported; allowed: json_schema, json_object"):
        Grammar("xml", "a")  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="source must be a str, got int"):
        Grammar("regex", 5)  # type: ignore[arg-type]
    assert set(GRAMMAR_KINDS) == {"json_schema", "json_object", "regex", "lark"}


def test_schema_round_trip_and_value_semantics() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    g = Grammar.json_schema(schema)
    assert g.kind == "json_schema" and g.schema == schema
    assert Grammar.json_schema(json.dumps(schema)) == g  # JSON text and dict give the same grammar
    assert hash(g) == hash(Grammar.json_schema(dict(schema)))  # usable as a dict key (compiled once per engine)
    assert Grammar.json_object().schema == {"type": "object"}
    assert Grammar.regex("a+").schema is None and Grammar.lark('start: "a"').schema is None
    long = Grammar.regex("x" * 200)
    assert long.describe().endswith("...'") and len(long.describe()) < 100


def test_schema_grammar_is_compact_json(accepts: Any) -> None:
    g = Grammar.json_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a", "b"]}
    )
    assert accepts(g, '{"a": 1, "b": "x"}')
    assert not accepts(g, '{"a":1,"b":"x"}')  # the separators are fixed
    assert not accepts(g, '{\n  "a": 1, "b": "x"}')  # no free whitespace for a small model to loop in
    assert not accepts(g, '{"a": "1", "b": "x"}')
    assert not accepts(g, '{"a": 1}')  # required


def test_json_object_accepts_any_object_only(accepts: Any) -> None:
    g = Grammar.json_object()
    assert accepts(g, '{"k": [1, 2, {"n": null}], "s": "t"}')
    assert accepts(g, "{}")
    assert not accepts(g, "[1, 2]")
    assert not accepts(g, '"text"')


def test_regex_is_anchored_at_both_ends(accepts: Any) -> None:
    g = Grammar.regex(r"(yes|no)")
    assert accepts(g, "yes") and accepts(g, "no")
    assert not accepts(g, "yes!") and not accepts(g, "maybe yes")


def test_lark_grammar_with_json_rule(accepts: Any) -> None:
    g = Grammar.lark('start: "Answer: " num\nnum: /[0-9]{1,4}/')
    assert accepts(g, "Answer: 42")
    assert not accepts(g, "Answer: forty")
    j = Grammar.lark('start: "R=" obj\nobj: %json {"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                     '"required": ["ok"], "additionalProperties": false}')  # fmt: skip
    assert accepts(j, 'R={"ok": true}')
    assert not accepts(j, 'R={"ok": 1}')
