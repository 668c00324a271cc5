"""What a constraint allows, as a value: a JSON schema, any JSON object, a regex, or a Lark grammar.

A :class:`Grammar` is checked when it is made (a schema that is not valid JSON Schema, a
keyword the grammar engine cannot enforce, a regex or Lark grammar that does not compile:
:class:`GrammarError`, naming the problem), so a bad one fails before any decoding starts.
The engine behind it is `llguidance <https://github.com/guidance-ai/llguidance>`_ (MIT, no
dependencies, a token mask in ~20 us per row on this CPU; it refuses JSON Schema keywords it
cannot enforce, where others silently ignore them). See ``ARCHITECTURE.md`` for the choice.

JSON is generated compactly (``", "`` and ``": "`` separators, no other whitespace): a small
model given free whitespace can spend its whole token budget on newlines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import llguidance

GrammarKind = Literal["json_schema", "json_object", "regex", "lark"]
GRAMMAR_KINDS: tuple[GrammarKind, ...] = ("json_schema", "json_object", "regex", "lark")

# Applied to every JSON schema (the schema's own "x-guidance" key, if any, wins).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar or schema that cannot constrain decoding (the message says what and why)."""


def _canonical_schema(schema: Any) -> dict[str, Any]:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"JSON schema {schema[:80]!r} is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        raise GrammarError(f"JSON schema {schema!r} is a boolean schema; allowed: an object schema (a dict)")
    if not isinstance(schema, Mapping):
        raise GrammarError(f"JSON schema of type {type(schema).__name__} is not supported; allowed: dict or JSON text")
    return dict(schema)


def check_json_schema(schema: Any) -> dict[str, Any]:
    """``schema`` as a dict, after checking it is valid JSON Schema (by ``jsonschema``, when installed)."""
    schema = _canonical_schema(schema)
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema ships with the test extra and langchain
        return schema
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(map(str, exc.path)) or "(root)"
        raise GrammarError(f"invalid JSON schema at {where}: {exc.message}") from None
    return schema


def closed_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists
    ``properties`` and says nothing about extra keys (what OpenAI's strict mode requires).

    JSON Schema allows any extra key by default, and a small model takes the chance (e.g. a
    ``"type": "integer"`` copied from the prompt into a tool's arguments); tool arguments and
    LangChain's structured output use this, a user's own ``Grammar.json_schema`` does not.
    """
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {key: closed_schema(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def schema_grammar_text(schema: Mapping[str, Any]) -> str:
    """llguidance's grammar for ``schema``, compact JSON (see :data:`JSON_OPTIONS`)."""
    return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=dict(JSON_OPTIONS))  # type: ignore[arg-type]


def _validate(text: str, what: str) -> None:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise GrammarError(f"{what} cannot be enforced: {'; '.join(messages)}")


@dataclass(frozen=True)
class Grammar:
    """A constraint on generated text. Make one with a class method; it is checked on creation.

    >>> Grammar.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})  # doctest: +ELLIPSIS
    Grammar(kind='json_schema', ...)
    >>> Grammar.regex(r"(yes|no)")
    Grammar(kind='regex', source='(yes|no)')
    """

    kind: GrammarKind
    source: str  # the schema as JSON text, the regex, or the Lark grammar

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"grammar kind {self.kind!r} is not supported; allowed: {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(self.source, str):
            raise GrammarError(f"grammar source must be a str, got {type(self.source).__name__}")
        _validate(self.engine_text(), self.describe())

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Grammar:
        """Output is one JSON value valid against ``schema`` (a dict or JSON text)."""
        checked = check_json_schema(schema)
        return cls("json_schema", json.dumps(checked))

    @classmethod
    def json_object(cls) -> Grammar:
        """Output is one JSON object, any keys (OpenAI's ``response_format={"type": "json_object"}``)."""
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """The whole output matches ``pattern`` (Rust ``regex`` syntax, anchored at both ends)."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(f"regex {pattern!r} is empty or not a str; allowed: a non-empty pattern")
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Grammar:
        """The output is a sentence of a Lark grammar (llguidance's dialect: ``start:`` rule, ``%json``)."""
        if not isinstance(grammar, str) or "start" not in grammar:
            raise GrammarError("a Lark grammar must be a str with a 'start' rule")
        return cls("lark", grammar)

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema (``{"type": "object"}`` for ``json_object``), or None for regex/Lark."""
        if self.kind == "json_schema":
            return dict(json.loads(self.source))
        return {"type": "object"} if self.kind == "json_object" else None

    def describe(self) -> str:
        short = self.source if len(self.source) <= 80 else self.source[:77] + "..."
        return f"{self.kind} grammar" + (f" {short!r}" if short else "")

    def engine_text(self) -> str:
        """The grammar in llguidance's own format."""
        schema = self.schema
        if schema is not None:
            return schema_grammar_text(schema)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        return llguidance.LLMatcher.grammar_from_lark(self.source)


__all__ = [
    "GRAMMAR_KINDS",
    "JSON_OPTIONS",
    "Grammar",
    "GrammarError",
    "GrammarKind",
    "check_json_schema",
    "closed_schema",
]
