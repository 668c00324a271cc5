"""Seeded arithmetic word problems with exact answers, for the calculator agent and its benchmark.

Four families (add, take away, equal groups, share equally), each a set of two-digit facts and
four phrasings. A problem's split is a stable hash of its fact (e.g. ``"mul:12,7"``), so the
held-out (``"test"``) facts never appear among the ``"train"`` examples an agent's prompt shows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

from esamp_agents.evaluation.tasks import SPLITS, Problem, key_split
from esamp_agents.validation import check_int

TASK = "calculator_word_problems"

_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "add": (
        "+",
        (
            "Tom has {a} apples and buys {b} more. How many apples does he have now?",
            "A library has {a} books and gets {b} new books. How many books does it have now?",
            "There are {a} birds on a tree and {b} more birds land on it. How many birds are on the tree now?",
            "Ben scored {a} points in one game and {b} in the next. How many points did he score in total?",
        ),
    ),
    "sub": (
        "-",
        (
            "Sara had {a} stickers and gave away {b}. How many stickers does she have left?",
            "A bus had {a} passengers. At a stop, {b} passengers got off. How many passengers are on the bus now?",
            "There were {a} cookies in a jar. Tom ate {b} of them. How many cookies are left in the jar?",
            "A shop had {a} shirts and sold {b}. How many shirts does the shop have left?",
        ),
    ),
    "mul": (
        "*",
        (
            "Each box holds {a} pens. How many pens are in {b} boxes?",
            "A farmer plants {b} rows with {a} trees in each row. How many trees does he plant?",
            "Each bag has {a} marbles. How many marbles are in {b} bags?",
            "A ticket costs {a} dollars. How many dollars do {b} tickets cost?",
        ),
    ),
    "div": (
        "/",
        (
            "Lily has {a} candies and shares them equally among {b} friends. How many candies does each friend get?",
            "{a} students are split into {b} equal teams. How many students are in each team?",
            "A baker puts {a} muffins on {b} trays, the same number on each tray. How many muffins are on each tray?",
            "{a} eggs are packed into {b} cartons with the same number in each. How many eggs are in each carton?",
        ),
    ),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family_facts(family: str) -> list[tuple[int, int]]:
    """Every (a, b) of a family: two-digit sums and differences, products and exact quotients."""
    if family == "add":
        return [(a, b) for a in range(11, 100, 3) for b in range(11, 100, 4)]
    if family == "sub":
        return [(a, b) for a in range(30, 100, 3) for b in range(11, a - 4, 4)]
    if family == "mul":
        return [(a, b) for a in range(3, 26) for b in range(3, 13) if a != b]
    return [(q * b, b) for q in range(3, 26) for b in range(3, 13) if q != b]


def _answer(family: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b}[family]


def generate_word_problems(
    count: int,
    seed: int = 0,
    split: Literal["all", "train", "test"] = "test",
    families: Sequence[str] = FAMILIES,
) -> list[Problem]:
    """``count`` seeded arithmetic word problems with exact integer answers (``Problem.answer``).

    The families take turns (so a count of 8 has two of each of four families); within a family
    facts and phrasings are drawn by a ``random.Random(seed)``, without repeats. ``split``: the
    stable hash of the fact (e.g. ``"mul:12,7"``) decides train or test, so the default held-out
    ``"test"`` problems never share a fact with the ``"train"`` examples shown in the agent's prompt.
    The same arguments always give the same problems.
    """
    check_int("count", count, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")
    families = list(families)
    unknown = [f for f in families if f not in _FAMILIES]
    if not families or unknown:
        raise ValueError(f"families={families!r} has unknown or no entries; allowed: a non-empty subset of {FAMILIES}")
    rng = random.Random(seed)
    pools: dict[str, list[tuple[int, int]]] = {}
    for family in families:
        facts = [f for f in _family_facts(family) if split == "all" or key_split(f"{family}:{f[0]},{f[1]}") == split]
        rng.shuffle(facts)
        pools[family] = facts
    total = sum(map(len, pools.values()))
    if count > total:
        raise ValueError(f"count={count} is out of range; allowed: 1 <= count <= {total} (split {split!r})")
    out: list[Problem] = []
    turn = 0
    while len(out) < count:
        family = families[turn % len(families)]
        turn += 1
        if not pools[family]:
            continue
        a, b = pools[family].pop()
        templates = _FAMILIES[family][1]
        t = rng.randrange(len(templates))
        key = f"{family}:{a},{b}"
        question = templates[t].format(a=a, b=b)
        out.append(Problem(f"{TASK}:{key}:t{t}", TASK, question, str(_answer(family, a, b)), key))
    return out


def worked_example(family: str) -> tuple[str, str, int, int, int]:
    """(question, operator, a, b, answer) of a fixed train-split fact of ``family``, for prompts."""
    op, templates = _FAMILIES[family]
    a, b = next(f for f in _family_facts(family) if f[0] > 20 and key_split(f"{family}:{f[0]},{f[1]}") == "train")
    return templates[1].format(a=a, b=b), op, a, b, _answer(family, a, b)


def problem_numbers(text: str) -> list[Fraction]:
    """The numbers written in ``text`` (digits only, as word problems state them; a sentence's
    full stop after a number is not a decimal point)."""
    return [Fraction(m) for m in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w|\.\d)", text.replace(",", ""))]


__all__ = ["FAMILIES", "TASK", "generate_word_problems", "problem_numbers", "worked_example"]
