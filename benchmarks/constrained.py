"""Constrained decoding on the embedded model: what the grammar buys, and what the mask costs.

(a) Validity without vs with a grammar, same prompts, same sampling:

* tool calls: the tools are in the system prompt either way (SmolLM2's template has no tool
  support, so ``render_for_template``'s fallback writes them there). "without" decodes
  freely and parses the reply with ``parse_tool_calls``; "with" decodes under
  ``tool_call_grammar(specs, "required", parallel=False)``. A sample is a *valid call* when
  it holds at least one ``<tool_call>`` block and none is invalid, *schema-valid* when, in
  addition, every call names a bound tool and its arguments validate against that tool's
  schema (``jsonschema``), and *right tool* when it calls the tool the prompt was written for.
* structured output: the prompt asks for JSON matching a schema (the schema is in the
  prompt); "without" is read strictly (``json.loads`` of the whole reply) and leniently (the
  first ``{...}`` span, e.g. inside a code fence), then validated; "with" decodes under
  ``Grammar.json_schema(schema)``.

(b) Mask cost: decode tokens/s with vs without a constraint at P x N shapes, modes
interleaved (order alternating per repetition), medians and [min-max] over repetitions.
Every row generates exactly ``--new-tokens`` tokens: ``ignore_eos`` and grammars that cannot
be complete within that many tokens (a regex of exactly ``--regex-chars`` characters, and a
JSON object whose one string field has a ``minLength`` far above it), so no end token is
ever allowed and every mode does the same work. The constraint stage's own time is read by
wrapping ``GrammarConstraint.apply``/``advance`` with timers, and ``apply`` is split into
llguidance's mask computation and the rest (bitmask -> logits), measured on the side.

    python benchmarks/constrained.py
    python benchmarks/constrained.py --prompts 10 --samples 4 --reps 3 --skip-validity

Results go to benchmarks/out/constrained.json (written atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import torch

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.atomic import atomic_write_json
from esamp_agents.constrained.grammar import Grammar
from esamp_agents.constrained.matcher import GrammarConstraint
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.evaluation.report import machine_info
from esamp_agents.tool_calling import ToolSpec, parse_tool_calls, tool_call_grammar, tool_specs

OUT = Path(__file__).resolve().parent / "out"

TOOLS = tool_specs([
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression and return the number.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "maxLength": 40, "description": "e.g. 12 * (3 + 4)"}},
            "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a quantity from one unit to another.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "maxLength": 16},
            "to_unit": {"type": "string", "maxLength": 16}},
            "required": ["value", "from_unit", "to_unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "web_search", "description": "Search the web and return the top results.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 60},
            "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email.",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string", "maxLength": 40},
            "subject": {"type": "string", "maxLength": 40},
            "body": {"type": "string", "maxLength": 80}},
            "required": ["to", "subject", "body"], "additionalProperties": False}}},
])  # fmt: skip

TOOL_PROMPTS: list[tuple[str, str]] = [  # (user prompt, the tool it is written for)
    ("What is 1234 * 5678?", "calculator"),
    ("Compute (17 + 25) / 6.", "calculator"),
    ("What's 2 to the power of 20?", "calculator"),
    ("How much is 15% of 240?", "calculator"),
    ("Add 3.75 and 19.4 for me.", "calculator"),
    ("What's the weather like in Paris right now?", "get_weather"),
    ("Is it cold in Oslo today? Use fahrenheit.", "get_weather"),
    ("Tell me the current temperature in Tokyo.", "get_weather"),
    ("Do I need an umbrella in London?", "get_weather"),
    ("How hot is it in Cairo in celsius?", "get_weather"),
    ("Convert 10 miles to kilometers.", "convert_units"),
    ("How many pounds is 72 kg?", "convert_units"),
    ("Convert 350 fahrenheit to celsius.", "convert_units"),
    ("How many liters are in 3 gallons?", "convert_units"),
    ("Turn 5 feet into meters.", "convert_units"),
    ("Search the web for the latest news on fusion energy.", "web_search"),
    ("Find me three recipes for vegan lasagna.", "web_search"),
    ("Who won the 2022 football world cup? Look it up.", "web_search"),
    ("Look up reviews of the Framework laptop.", "web_search"),
    ("Search for Python asyncio tutorials.", "web_search"),
    ("Email bob@example.com that the meeting moved to 3pm.", "send_email"),
    ("Send alice@example.org a thank-you note for the gift.", "send_email"),
    ("Write to team@example.com: the release is delayed to Friday.", "send_email"),
    ("Email my landlord at landlord@example.com that the sink is broken.", "send_email"),
    ("Send carol@example.net the agenda: budget, hiring, roadmap.", "send_email"),
]

JSON_TASKS: list[tuple[str, dict[str, Any]]] = [  # (what to describe, schema)
    ("a person", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
     "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
     "additionalProperties": False}),
    ("a book", {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
     "author": {"type": "string", "maxLength": 30}, "year": {"type": "integer", "minimum": 1400, "maximum": 2100}},
     "required": ["title", "author", "year"], "additionalProperties": False}),
    ("a product in a shop", {"type": "object", "properties": {
     "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
     "price": {"type": "number", "minimum": 0, "maximum": 10000}, "in_stock": {"type": "boolean"}},
     "required": ["sku", "price", "in_stock"], "additionalProperties": False}),
    ("a shopping list", {"type": "object", "properties": {"items": {"type": "array",
     "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 5}}, "required": ["items"],
     "additionalProperties": False}),
    ("a T-shirt order", {"type": "object", "properties": {"size": {"enum": ["S", "M", "L", "XL"]},
     "color": {"enum": ["red", "green", "blue", "black"]},
     "quantity": {"type": "integer", "minimum": 1, "maximum": 20}},
     "required": ["size", "color", "quantity"], "additionalProperties": False}),
    ("a point on a map", {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
     "lon": {"type": "number", "minimum": -180, "maximum": 180}, "label": {"type": "string", "maxLength": 30}},
     "required": ["lat", "lon"], "additionalProperties": False}),
    ("a calendar event", {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
     "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
     "attendees": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4}},
     "required": ["title", "date"], "additionalProperties": False}),
    ("a movie rating", {"type": "object", "properties": {"movie": {"type": "string", "maxLength": 40},
     "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "review": {"anyOf": [{"type": "string",
     "maxLength": 60}, {"type": "null"}]}}, "required": ["movie", "stars", "review"], "additionalProperties": False}),
    ("a city", {"type": "object", "$defs": {"coords": {"type": "object", "properties": {"lat": {"type": "number"},
     "lon": {"type": "number"}}, "required": ["lat", "lon"], "additionalProperties": False}},
     "properties": {"name": {"type": "string", "maxLength": 30}, "population": {"type": "integer", "minimum": 0},
     "location": {"$ref": "#/$defs/coords"}}, "required": ["name", "population", "location"],
     "additionalProperties": False}),
    ("a recipe", {"type": "object", "properties": {"dish": {"type": "string", "maxLength": 30},
     "minutes": {"type": "integer", "minimum": 1, "maximum": 600},
     "vegetarian": {"type": "boolean"}}, "required": ["dish", "minutes", "vegetarian"], "additionalProperties": False}),
]  # fmt: skip

MASK_QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Describe how a bicycle works to a child.",
    "What are three ways to improve sleep? Explain each.",
    "Explain why the sky is blue.",
]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        p, n = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape {text!r} must look like PxN, e.g. 4x16") from exc
    if p < 1 or n < 1 or p > len(MASK_QUESTIONS):
        raise argparse.ArgumentTypeError(f"shape {text!r}: need 1 <= P <= {len(MASK_QUESTIONS)} and N >= 1")
    return p, n


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------ (a) validity
def judge_tool_reply(text: str, expected: str, specs: Sequence[ToolSpec]) -> dict[str, bool]:
    reply = parse_tool_calls(text, specs)
    valid_call = bool(reply.calls) and not reply.invalid
    schemas = {s.name: s.parameters for s in specs}
    schema_valid = valid_call
    for call in reply.calls if valid_call else []:
        try:
            jsonschema.validate(call.args, schemas[call.name])
        except jsonschema.ValidationError:
            schema_valid = False
    return {
        "valid_call": valid_call,
        "schema_valid": schema_valid,
        "right_tool": schema_valid and any(c.name == expected for c in reply.calls),
    }


def _validates(value: Any, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def judge_json_reply(text: str, schema: dict[str, Any]) -> dict[str, bool]:
    strict = False
    with contextlib.suppress(ValueError):
        strict = _validates(json.loads(text), schema)
    lenient = strict
    span = re.search(r"\{.*\}", text, re.DOTALL)
    if not lenient and span:
        with contextlib.suppress(ValueError):
            lenient = _validates(json.loads(span.group(0)), schema)
    return {"strict_valid": strict, "lenient_valid": lenient}


def rates(judged: list[dict[str, bool]]) -> dict[str, float]:
    return {key: sum(j[key] for j in judged) / len(judged) for key in judged[0]}


def run_batches(
    engine: ESampEngine,
    prompts: list[list[int]],
    grammars: list[Grammar | None] | None,
    sampling: SamplingParams,
    esamp: ESampParams,
    batch: int,
) -> tuple[list[Any], dict[str, float]]:
    """All prompts, ``batch`` at a time: (candidates per prompt, totals)."""
    candidates: list[Any] = []
    seconds = tokens = 0.0
    lengths: list[str] = []
    for i, part in enumerate(chunks(prompts, batch)):
        gs = None if grammars is None else list(grammars[i * batch : i * batch + len(part)])
        start = time.perf_counter()
        out = engine.generate(list(part), sampling, esamp, grammar=gs)
        seconds += time.perf_counter() - start
        tokens += out.stats.generated_tokens
        for result in out.results:
            candidates.append(result.candidates)
            lengths += [c.finish_reason for c in result.candidates]
    return candidates, {
        "seconds": seconds,
        "generated_tokens": tokens,
        "cut_by_length": lengths.count("length") / len(lengths),
    }


def bench_validity(engine: ESampEngine, args: argparse.Namespace) -> dict[str, Any]:
    sampling = SamplingParams(
        n=args.samples, max_new_tokens=args.valid_tokens, temperature=args.temperature, seed=args.seed
    )
    esamp = ESampParams(beta=args.beta)
    loaded = engine.loaded
    out: dict[str, Any] = {}

    tool_cases = TOOL_PROMPTS[: args.prompts]
    prompts = [loaded.chat_token_ids([{"role": "user", "content": q}], tools=TOOLS) for q, _ in tool_cases]
    grammar = tool_call_grammar(TOOLS, "required", parallel=False)
    tools_rows: dict[str, Any] = {}
    for mode in ("without", "with"):
        print(f"  tool calls, {mode} grammar: {len(prompts)} prompts x {args.samples}", flush=True)
        grammars = None if mode == "without" else [grammar] * len(prompts)
        cands, totals = run_batches(engine, prompts, grammars, sampling, esamp, args.batch)
        judged = [judge_tool_reply(c.text, expected, TOOLS) for (_, expected), cs in zip(tool_cases, cands, strict=True)
                  for c in cs]  # fmt: skip
        tools_rows[mode] = {**rates(judged), **totals, "samples": len(judged),
                            "examples": [cs[0].text for cs in cands[:3]]}  # fmt: skip
    out["tool_calls"] = tools_rows

    tasks = (JSON_TASKS * (1 + args.prompts // len(JSON_TASKS)))[: min(args.prompts, len(JSON_TASKS))]
    prompts = [
        loaded.chat_token_ids([{"role": "user", "content": (
            f"Describe {what} as a JSON object that matches this JSON schema. Reply with the JSON only.\n"
            f"{json.dumps(schema)}")}])
        for what, schema in tasks
    ]  # fmt: skip
    json_rows: dict[str, Any] = {}
    for mode in ("without", "with"):
        print(f"  structured output, {mode} grammar: {len(prompts)} prompts x {args.samples}", flush=True)
        grammars = None if mode == "without" else [Grammar.json_schema(s) for _, s in tasks]
        cands, totals = run_batches(engine, prompts, grammars, sampling, esamp, args.batch)
        judged = [judge_json_reply(c.text, schema) for (_, schema), cs in zip(tasks, cands, strict=True) for c in cs]
        json_rows[mode] = {**rates(judged), **totals, "samples": len(judged),
                           "examples": [cs[0].text for cs in cands[:3]]}  # fmt: skip
    out["structured_output"] = json_rows
    return out


# ------------------------------------------------------------------ (b) mask cost
class _TimedMask:
    """Forwards everything to a matcher or executor, timing its ``unsafe_compute_mask_ptr``."""

    def __init__(self, inner: Any, timer: StageTimer) -> None:
        self._inner, self._timer = inner, timer

    def unsafe_compute_mask_ptr(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._inner.unsafe_compute_mask_ptr(*args)
        finally:
            self._timer.mask += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class StageTimer:
    """Times the constraint stage inside real decodes: ``GrammarConstraint.apply`` and
    ``advance`` (wrapped class-wide), and within ``apply`` llguidance's mask computation
    (the executor, or the one matcher when a single row is constrained, is wrapped)."""

    def __init__(self) -> None:
        self.apply = self.advance = self.mask = 0.0
        self._orig: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> StageTimer:
        for name in ("apply", "advance"):
            orig = getattr(GrammarConstraint, name)
            self._orig[name] = orig

            def timed(obj: Any, *a: Any, _orig: Callable[..., Any] = orig, _name: str = name) -> Any:
                start = time.perf_counter()
                try:
                    return _orig(obj, *a)
                finally:
                    setattr(self, _name, getattr(self, _name) + time.perf_counter() - start)

            setattr(GrammarConstraint, name, timed)
        init = GrammarConstraint.__init__
        self._orig["__init__"] = init

        def wrapped_init(obj: Any, *a: Any, **k: Any) -> None:
            init(obj, *a, **k)
            if obj._executor is not None:
                obj._executor = _TimedMask(obj._executor, self)
            elif len(obj.matchers) == 1:  # the executor takes real matchers; one row goes through the matcher
                obj.matchers[0] = _TimedMask(obj.matchers[0], self)

        GrammarConstraint.__init__ = wrapped_init  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._orig.items():
            setattr(GrammarConstraint, name, orig)


def mask_grammars(args: argparse.Namespace) -> dict[str, Grammar]:
    return {
        "regex": Grammar.regex(f"[a-z ,.]{{{args.regex_chars}}}"),
        "json": Grammar.json_schema(
            {
                "type": "object",
                "properties": {"story": {"type": "string", "minLength": args.regex_chars}},
                "required": ["story"],
                "additionalProperties": False,
            }
        ),
    }


def run_mask_mode(
    engine: ESampEngine, prompts: list[list[int]], sampling: SamplingParams, grammar: Grammar | None
) -> dict[str, float]:
    with StageTimer() as timer:
        start = time.perf_counter()
        out = engine.generate(prompts, sampling, ESampParams(beta=0.0), grammar=grammar)
        seconds = time.perf_counter() - start
    expected = len(prompts) * sampling.n * sampling.max_new_tokens
    if out.stats.generated_tokens != expected:  # a grammar that ended early would compare unlike work
        raise RuntimeError(f"generated {out.stats.generated_tokens} tokens, expected {expected}")
    return {
        "seconds": seconds,
        "decode_seconds": out.stats.decode_seconds,
        "tokens": out.stats.generated_tokens,
        "apply_seconds": timer.apply,
        "advance_seconds": timer.advance,
        "mask_seconds": timer.mask,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_mask_shape(engine: ESampEngine, p: int, n: int, args: argparse.Namespace) -> dict[str, Any]:
    prompts = [engine.loaded.chat_token_ids([{"role": "user", "content": q}]) for q in MASK_QUESTIONS[:p]]
    sampling = SamplingParams(n=n, max_new_tokens=args.new_tokens, temperature=args.temperature, seed=1234,
                              ignore_eos=True)  # fmt: skip
    grammars: dict[str, Grammar | None] = {"off": None, **mask_grammars(args)}
    modes = list(grammars)
    for mode in modes:  # warm-up, not recorded
        run_mask_mode(engine, prompts, sampling, grammars[mode])
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for rep in range(args.reps):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        for mode in order:
            runs[mode].append(run_mask_mode(engine, prompts, sampling, grammars[mode]))
        print(f"  {p}x{n} rep {rep + 1}/{args.reps}: "
              + ", ".join(f"{m} {runs[m][-1]['tokens'] / runs[m][-1]['decode_seconds']:.1f} tok/s" for m in modes),
              flush=True)  # fmt: skip
    row: dict[str, Any] = {"shape": f"{p}x{n}", "modes": {}, "raw": runs}
    for mode in modes:
        rate = [r["tokens"] / r["decode_seconds"] for r in runs[mode]]
        share = [(r["apply_seconds"] + r["advance_seconds"]) / r["decode_seconds"] for r in runs[mode]]
        per_step_ms = [1e3 * (r["apply_seconds"] + r["advance_seconds"]) / args.new_tokens for r in runs[mode]]
        split = {  # ms per step, medians: llguidance's mask, the rest of apply (bitmask -> logits), advance
            "llguidance_mask_ms": statistics.median(1e3 * r["mask_seconds"] / args.new_tokens for r in runs[mode]),
            "bitmask_to_logits_ms": statistics.median(
                1e3 * (r["apply_seconds"] - r["mask_seconds"]) / args.new_tokens for r in runs[mode]
            ),
            "advance_ms": statistics.median(1e3 * r["advance_seconds"] / args.new_tokens for r in runs[mode]),
        }
        row["modes"][mode] = {"tokens_per_s": spread(rate), "constraint_share": spread(share),
                              "constraint_ms_per_step": spread(per_step_ms), "split_ms_per_step": split}  # fmt: skip
        if mode != "off":
            paired = [1 - (r["tokens"] / r["decode_seconds"]) / (o["tokens"] / o["decode_seconds"])
                      for r, o in zip(runs[mode], runs["off"], strict=True)]  # fmt: skip
            row["modes"][mode]["cost_paired"] = spread(paired)
            row["modes"][mode]["cost_of_medians"] = 1 - statistics.median(rate) / statistics.median(
                [r["tokens"] / r["decode_seconds"] for r in runs["off"]]
            )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=25, help="tool-call prompts (<= 25); JSON tasks: min(this, 10)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt in (a)")
    parser.add_argument("--valid-tokens", type=int, default=96, help="max_new_tokens in (a)")
    parser.add_argument("--batch", type=int, default=10, help="prompts per generate call in (a)")
    parser.add_argument("--beta", type=float, default=0.0, help="ESamp beta in (a) (0 = plain sampling)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 1), (4, 16)])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per row in (b)")
    parser.add_argument("--regex-chars", type=int, default=2000, help="length the (b) grammars require")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-validity", action="store_true")
    parser.add_argument("--skip-mask", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT / "constrained.json")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(TOOL_PROMPTS):
        parser.error(f"--prompts={args.prompts}: allowed 1..{len(TOOL_PROMPTS)}")
    if args.reps < 1 or args.new_tokens < 1 or args.samples < 1:
        parser.error("--reps, --new-tokens and --samples must be >= 1")

    started = time.perf_counter()
    print(f"{dt.datetime.now().isoformat(timespec='seconds')} on {platform.platform()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)  # fmt: skip
    engine = ESampEngine(load_model("embedded", device="cpu"))
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if not args.skip_validity:
        print("(a) validity without vs with a grammar", flush=True)
        result["validity"] = bench_validity(engine, args)
    if not args.skip_mask:
        print("(b) mask cost", flush=True)
        result["mask_cost"] = [bench_mask_shape(engine, p, n, args) for p, n in args.shapes]
    result["total_seconds"] = time.perf_counter() - started
    atomic_write_json(args.out, result)

    if "validity" in result:
        v = result["validity"]
        print("\n| set | grammar | samples | valid call / strict JSON | schema-valid / lenient JSON | right tool | "
              "cut by length | tok/s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for mode, r in v["tool_calls"].items():
            print(f"| tool calls | {mode} | {r['samples']} | {r['valid_call']:.1%} | {r['schema_valid']:.1%} | "
                  f"{r['right_tool']:.1%} | {r['cut_by_length']:.1%} | "
                  f"{r['generated_tokens'] / r['seconds']:.1f} |")  # fmt: skip
        for mode, r in v["structured_output"].items():
            print(f"| JSON schema | {mode} | {r['samples']} | {r['strict_valid']:.1%} | {r['lenient_valid']:.1%} | "
                  f"- | {r['cut_by_length']:.1%} | {r['generated_tokens'] / r['seconds']:.1f} |")  # fmt: skip
    if "mask_cost" in result:
        print("\n| shape | mode | decode tok/s median [min-max] | cost vs off (paired median [min-max]) | "
              "constraint stage ms/step | share of decode |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for row in result["mask_cost"]:
            for mode, m in row["modes"].items():
                t, s, ms = m["tokens_per_s"], m["constraint_share"], m["constraint_ms_per_step"]
                cost = (f"{m['cost_paired']['median']:+.1%} [{m['cost_paired']['min']:+.1%}, "
                        f"{m['cost_paired']['max']:+.1%}]") if "cost_paired" in m else "-"  # fmt: skip
                print(f"| {row['shape']} | {mode} | {t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}] | {cost} | "
                      f"{ms['median']:.2f} | {s['median']:.1%} |")  # fmt: skip
        print("\nconstraint stage per step (ms, medians): llguidance mask + bitmask->logits + advance")
        for row in result["mask_cost"]:
            for mode, m in row["modes"].items():
                if mode != "off":
                    sp = m["split_ms_per_step"]
                    print(f"  {row['shape']} {mode}: {sp['llguidance_mask_ms']:.2f} + {sp['bitmask_to_logits_ms']:.2f} "
                          f"+ {sp['advance_ms']:.2f}")  # fmt: skip
    print(f"\ntotal {result['total_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
