"""Shared pieces for the constrained-decoding model tests: chat prompts and a checker."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.decoding.results import Candidate


def chat(engine: ESampEngine, text: str, **kw: Any) -> list[int]:
    return engine.loaded.chat_token_ids([{"role": "user", "content": text}], **kw)


def assert_complete_and_valid(candidate: Candidate, schema: dict[str, Any], max_new_tokens: int) -> Any:
    """The candidate ended by its grammar (not cut), parses, and validates against ``schema``."""
    assert len(candidate.token_ids) < max_new_tokens, f"hit max_new_tokens: {candidate.text!r}"
    assert candidate.finish_reason == "stop", candidate.text
    assert candidate.extras["constraint_satisfied"] is True, candidate.text
    value = json.loads(candidate.text)
    jsonschema.validate(value, schema)
    return value
