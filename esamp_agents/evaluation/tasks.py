"""Reasoning tasks with exact graders: seeded arithmetic generators, benchmark loaders, grading.

Used for reward-model training data, Best-of-N evaluation and the demo, so the graders are strict:
the final answer is read from an explicit cue ("Answer: 12"), a ``\\boxed{}``, or the last number,
and compared exactly (no x100 leniency, "0.5" never matches "50").

Generated problems carry a ``key`` (the arithmetic fact, e.g. "7*5"); the train/test split is a
stable hash of the key, so a held-out fact never appears in training under any phrasing.
Answer extraction and comparison live in :mod:`esamp_agents.evaluation.answers` (re-exported here).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from esamp_agents.evaluation.answers import answers_match, extract_answer, last_boxed, parse_number

DEFAULT_SUFFIX = "Think step by step, then write the final answer as 'Answer: <number>'."

Split = Literal["all", "train", "test"]
SPLITS: tuple[str, ...] = ("all", "train", "test")
TRAIN_FRACTION = 0.4  # of keys; the rest (~60%) is held out for testing


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer; ``key`` is the identity used for train/test splitting."""

    id: str
    task: str
    question: str
    answer: str
    key: str

    def prompt(self, suffix: str = DEFAULT_SUFFIX) -> str:
        """The question followed by the answer-format instruction."""
        return f"{self.question} {suffix}" if suffix else self.question


# --------------------------------------------------------------------------- generators

_ARITH_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "What is {a} + {b}?",
        "Compute {a} + {b}.",
        "Calculate {a} plus {b}.",
        "What is the sum of {a} and {b}?",
        "What do you get when you add {a} and {b}?",
    ),
    "-": (
        "What is {a} - {b}?",
        "Compute {a} - {b}.",
        "Calculate {a} minus {b}.",
        "What is the difference between {a} and {b}?",
        "What do you get when you subtract {b} from {a}?",
    ),
    "*": (
        "What is {a} * {b}?",
        "Compute {a} * {b}.",
        "Calculate {a} times {b}.",
        "What is the product of {a} and {b}?",
        "What do you get when you multiply {a} by {b}?",
    ),
}

# The same single-digit + and * facts in other words (the ``single_digit_rephrased`` task): more
# training problems for a fact without touching the phrasings the single_digit test set uses.
_ARITH_REPHRASED: dict[str, tuple[str, ...]] = {
    "+": (
        "Add {a} and {b}.",
        "What is {a} plus {b}?",
        "Find {a} + {b}.",
        "How much is {a} plus {b}?",
        "Work out {a} + {b}.",
        "{a} + {b} = ?",
        "What number do you get if you add {b} to {a}?",
        "Evaluate the expression {a} + {b}.",
        "What is the total of {a} and {b}?",
        "Solve: {a} + {b}",
    ),
    "*": (
        "Multiply {a} by {b}.",
        "What is {a} times {b}?",
        "Find {a} * {b}.",
        "How much is {a} times {b}?",
        "Work out {a} * {b}.",
        "{a} * {b} = ?",
        "What is {a} multiplied by {b}?",
        "Evaluate the expression {a} * {b}.",
        "What do you get if you take {a} groups of {b}?",
        "Solve: {a} * {b}",
    ),
}

# Word-problem families: (templates, answer from the numbers). Numbers are 2..9 so every noun is plural.
_WORD_FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[int, int], int]]] = {
    "buy_more": (
        (
            "Tom has {a} apples and buys {b} more. How many apples does he have now?",
            "Sara has {a} books. Her friend gives her {b} more books. How many books does Sara have now?",
            "There are {a} birds on a tree. {b} more birds land on it. How many birds are on the tree now?",
            "Ben finds {a} coins on Monday and {b} coins on Tuesday. How many coins does he find in total?",
        ),
        lambda a, b: a + b,
    ),
    "give_away": (
        (
            "Sara had {a} stickers and gave away {b}. How many stickers does she have left?",
            "There were {a} cookies on a plate. Tom ate {b} of them. How many cookies are left on the plate?",
            "A bus had {a} passengers. At a stop, {b} passengers got off. How many passengers are on the bus now?",
            "Mia had {a} balloons. {b} of them popped. How many balloons does Mia have now?",
        ),
        lambda a, b: a - b,
    ),
    "groups": (
        (
            "A box holds {a} pens. How many pens are in {b} boxes?",
            "Each bag has {a} marbles. How many marbles are in {b} bags?",
            "There are {b} rows of chairs with {a} chairs in each row. How many chairs are there?",
            "Tom buys {b} packs of cards. Each pack has {a} cards. How many cards does Tom buy?",
        ),
        lambda a, b: a * b,
    ),
    "share": (
        (
            "Lily has {a} candies and shares them equally among {b} friends. How many candies does each friend get?",
            "There are {a} students split into {b} equal teams. How many students are in each team?",
            "{a} eggs are packed into {b} cartons with the same number in each. How many eggs are in each carton?",
            "A baker puts {a} muffins on {b} trays, the same number on each tray. How many muffins are on each tray?",
        ),
        lambda a, b: a // b,
    ),
}

# Unit conversions: (factor, phrasings of "a big units in small ones", phrasings of the reverse).
# Factors are never single-digit, so no conversion computes a single-digit arithmetic fact.
_UNIT_FAMILIES: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {
    "m_cm": (
        100,
        ("How many centimeters are in {a} meters?", "Convert {a} meters to centimeters.",
         "A rope is {a} meters long. How long is it in centimeters?"),
        ("How many meters are {a} centimeters?", "Convert {a} centimeters to meters.",
         "A ribbon is {a} centimeters long. How many meters is that?"),
    ),
    "h_min": (
        60,
        ("How many minutes are in {a} hours?", "Convert {a} hours to minutes.",
         "A trip takes {a} hours. How many minutes is that?"),
        ("How many hours are {a} minutes?", "Convert {a} minutes to hours.",
         "A movie marathon lasts {a} minutes. How many hours is that?"),
    ),
    "kg_g": (
        1000,
        ("How many grams are in {a} kilograms?", "Convert {a} kilograms to grams.",
         "A bag of rice weighs {a} kilograms. How many grams is that?"),
        ("How many kilograms are {a} grams?", "Convert {a} grams to kilograms.",
         "A parcel weighs {a} grams. How many kilograms is that?"),
    ),
    "ft_in": (
        12,
        ("How many inches are in {a} feet?", "Convert {a} feet to inches.",
         "A board is {a} feet long. How long is it in inches?"),
        ("How many feet are {a} inches?", "Convert {a} inches to feet.",
         "A shelf is {a} inches wide. How many feet is that?"),
    ),
    "day_h": (
        24,
        ("How many hours are in {a} days?", "Convert {a} days to hours.",
         "A holiday lasts {a} days. How many hours is that?"),
        ("How many days are {a} hours?", "Convert {a} hours to days.",
         "A journey lasts {a} hours. How many days is that?"),
    ),
}  # fmt: skip

# Comparisons of two two-digit numbers: the answer is the larger ("max") or the smaller ("min").
_COMPARE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "max": (
        "Which number is larger, {a} or {b}?",
        "What is the larger of {a} and {b}?",
        "Which is bigger: {a} or {b}?",
    ),
    "min": (
        "Which number is smaller, {a} or {b}?",
        "What is the smaller of {a} and {b}?",
        "Which is less: {a} or {b}?",
    ),
}

TASK_NAMES: tuple[str, ...] = (
    "single_digit",
    "single_digit_add",
    "single_digit_mul",
    "single_digit_sub",
    "single_digit_rephrased",
    "two_digit_addsub",
    "word_problems",
    "unit_conversions",
    "comparisons",
)


@dataclass(frozen=True)
class _Item:
    key: str
    answer: int
    templates: tuple[str, ...]
    a: int
    b: int


def _arith_items(
    ops: str, low: int, high: int, templates: dict[str, tuple[str, ...]] = _ARITH_TEMPLATES
) -> list[_Item]:
    items = []
    for op in ops:
        for a in range(low, high + 1):
            for b in range(low, high + 1):
                if op == "-" and a < b:
                    continue
                answer = a + b if op == "+" else a - b if op == "-" else a * b
                items.append(_Item(f"{a}{op}{b}", answer, templates[op], a, b))
    return items


def _word_items() -> list[_Item]:
    items = []
    for family, (templates, solve) in _WORD_FAMILIES.items():
        for x in range(2, 10):
            for y in range(2, 10):
                if family == "give_away" and y > x:
                    continue
                a, b = (x * y, y) if family == "share" else (x, y)  # share: a total that divides evenly
                items.append(_Item(f"{family}:{a},{b}", solve(a, b), templates, a, b))
    return items


def _unit_items() -> list[_Item]:
    """Both directions of every conversion for 2..12 big units (keys ``m_cm:7`` and ``cm_m:700``)."""
    items = []
    for name, (factor, forward, reverse) in _UNIT_FAMILIES.items():
        big, small = name.split("_")
        for n in range(2, 13):
            items.append(_Item(f"{big}_{small}:{n}", n * factor, forward, n, 0))
            items.append(_Item(f"{small}_{big}:{n * factor}", n, reverse, n * factor, 0))
    return items


def _compare_items() -> list[_Item]:
    """Larger and smaller of distinct two-digit pairs on a fixed grid (keys ``max:47,52``)."""
    items = []
    for which, templates in _COMPARE_TEMPLATES.items():
        for a in range(12, 99, 7):
            for b in range(13, 99, 6):
                if a != b:
                    items.append(_Item(f"{which}:{a},{b}", max(a, b) if which == "max" else min(a, b), templates, a, b))
    return items


def _task_items(task: str) -> list[_Item]:
    if task == "single_digit":
        return _arith_items("+*", 1, 9)
    if task == "single_digit_add":
        return _arith_items("+", 1, 9)
    if task == "single_digit_mul":
        return _arith_items("*", 1, 9)
    if task == "single_digit_sub":
        return _arith_items("-", 1, 9)
    if task == "single_digit_rephrased":
        return _arith_items("+*", 1, 9, _ARITH_REPHRASED)
    if task == "two_digit_addsub":
        return _arith_items("+-", 10, 99)
    if task == "word_problems":
        return _word_items()
    if task == "unit_conversions":
        return _unit_items()
    if task == "comparisons":
        return _compare_items()
    raise ValueError(f"task={task!r} is unknown; allowed: {', '.join(TASK_NAMES)}")


def key_split(key: str) -> Literal["train", "test"]:
    """The split of a problem key: a stable hash (the same in every process and Python version)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "train" if int.from_bytes(digest[:8], "big") / 2**64 < TRAIN_FRACTION else "test"


def _check_task_split(task: str, split: str) -> None:
    if not isinstance(task, str) or task not in TASK_NAMES:
        raise ValueError(f"task={task!r} is unknown; allowed: {', '.join(TASK_NAMES)}")
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; allowed: {', '.join(SPLITS)}")


def _pool(task: str, split: str) -> list[_Item]:
    items = _task_items(task)
    return items if split == "all" else [it for it in items if key_split(it.key) == split]


def available_problems(task: str, split: Split = "all") -> int:
    """How many distinct problems (key x phrasing) ``task`` has in ``split``."""
    _check_task_split(task, split)
    return sum(len(it.templates) for it in _pool(task, split))


def generate_problems(task: str, count: int, seed: int = 0, split: Split = "all") -> list[Problem]:
    """``count`` distinct seeded problems of ``task`` in a seeded random order.

    The order is a seeded shuffle of all problems in the split, so a smaller ``count`` with the
    same seed gives a prefix of a larger one.
    """
    _check_task_split(task, split)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"count={count!r} must be an integer >= 1")
    pool = _pool(task, split)
    offsets = [0]
    for it in pool:
        offsets.append(offsets[-1] + len(it.templates))
    total = offsets[-1]
    if not 1 <= count <= total:
        raise ValueError(
            f"count={count} is out of range; allowed: 1 <= count <= {total} "
            f"(distinct {task} problems in split {split!r})"
        )
    order = list(range(total))
    random.Random(seed).shuffle(order)
    out = []
    for index in order[:count]:
        i = bisect.bisect_right(offsets, index) - 1
        item, t = pool[i], index - offsets[i]
        question = item.templates[t].format(a=item.a, b=item.b)
        out.append(Problem(f"{task}:{item.key}:t{t}", task, question, str(item.answer), item.key))
    return out


# --------------------------------------------------------------------------- loaders


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _read_jsonl(path: str | Path, name: str) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} file {path}: line {lineno} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{name} file {path}: line {lineno} is not a JSON object")
            rows.append((lineno, row))
    return rows


def _field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: missing or empty {name!r} field")
    return value.strip()


def load_gsm8k(path: str | Path) -> list[Problem]:
    """GSM8K jsonl (``question``, ``answer`` ending in ``#### N``); ids are ``gsm8k:00000`` by position."""
    problems = []
    for i, (lineno, row) in enumerate(_read_jsonl(path, "gsm8k")):
        where = f"gsm8k file {path}: line {lineno}"
        question, solution = _field(row, "question", where), _field(row, "answer", where)
        if "####" not in solution:
            raise ValueError(f"{where}: the answer has no '#### N' final line")
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise ValueError(f"{where}: the answer's '####' line is empty")
        pid = f"gsm8k:{i:05d}"
        problems.append(Problem(pid, "gsm8k", question, answer, pid))
    return problems


def load_svamp(path: str | Path) -> list[Problem]:
    """SVAMP json list (``Body``, ``Question``, float ``Answer``); ids are ``svamp:<ID>`` (or by position)."""
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"svamp file {path} is not JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"svamp file {path}: expected a JSON list of problems")
    problems = []
    for i, row in enumerate(rows):
        where = f"svamp file {path}: item {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object")
        body, question = _field(row, "Body", where), _field(row, "Question", where)
        value = row.get("Answer")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: 'Answer' must be a finite number, got {value!r}")
        pid = f"svamp:{row['ID']}" if isinstance(row.get("ID"), str) and row["ID"] else f"svamp:{i:05d}"
        problems.append(Problem(pid, "svamp", f"{body} {question}", _format_number(value), pid))
    return problems


def load_math(path: str | Path) -> list[Problem]:
    """MATH / MATH-500 jsonl (``problem``, ``answer`` in LaTeX, or else the solution's last ``\\boxed{}``).

    Ids are ``math:<unique_id>`` when the file has one, else ``math:00000`` by position.
    """
    problems = []
    for i, (lineno, row) in enumerate(_read_jsonl(path, "math")):
        where = f"math file {path}: line {lineno}"
        question = _field(row, "problem", where)
        answer = row.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            answer = last_boxed(row.get("solution") or "")
            if answer is None:
                raise ValueError(f"{where}: no 'answer' field and no \\boxed{{}} in the solution")
        uid = row.get("unique_id")
        pid = f"math:{uid}" if isinstance(uid, str) and uid else f"math:{i:05d}"
        problems.append(Problem(pid, "math", question, answer.strip(), pid))
    return problems


_LOADERS: dict[str, Callable[[str | Path], list[Problem]]] = {
    "gsm8k": load_gsm8k,
    "svamp": load_svamp,
    "math": load_math,
}


def load_problems(spec: str) -> list[Problem]:
    """Problems from a spec: ``task:count[:seed[:split]]`` for a generator, or ``gsm8k|svamp|math:PATH``."""
    usage = f"allowed: TASK:COUNT[:SEED[:SPLIT]] with TASK in {', '.join(TASK_NAMES)}, or {'|'.join(_LOADERS)}:PATH"
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"problems spec {spec!r} is malformed; {usage}")
    name, rest = spec.split(":", 1)
    if name in _LOADERS:
        if not rest:
            raise ValueError(f"problems spec {spec!r} has no file path; {usage}")
        if not Path(rest).is_file():
            raise FileNotFoundError(f"problems spec {spec!r}: no such file: {rest}")
        return _LOADERS[name](rest)
    if name not in TASK_NAMES:
        raise ValueError(f"problems spec {spec!r}: task {name!r} is unknown; {usage}")
    parts = rest.split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"problems spec {spec!r} is malformed; {usage}")
    ints = []
    for label, text in zip(("count", "seed"), parts[:2], strict=False):
        try:
            ints.append(int(text))
        except ValueError:
            raise ValueError(f"problems spec {spec!r}: {label}={text!r} is not an integer; {usage}") from None
    count, seed = ints[0], ints[1] if len(ints) > 1 else 0
    split = parts[2] if len(parts) == 3 else "all"
    return generate_problems(name, count, seed=seed, split=split)  # type: ignore[arg-type]


def grade(problem: Problem, text: str) -> bool:
    """Whether a model's output ``text`` states ``problem``'s answer (strict extraction, exact comparison)."""
    return answers_match(extract_answer(text), problem.answer)


def grade_all(problems: Sequence[Problem], texts: Sequence[str]) -> list[bool]:
    """``grade`` for parallel lists of problems and outputs."""
    if len(problems) != len(texts):
        raise ValueError(f"{len(problems)} problems but {len(texts)} texts; they must pair up")
    return [grade(p, t) for p, t in zip(problems, texts, strict=True)]


__all__ = [
    "DEFAULT_SUFFIX",
    "SPLITS",
    "TASK_NAMES",
    "Problem",
    "answers_match",
    "available_problems",
    "extract_answer",
    "generate_problems",
    "grade",
    "grade_all",
    "key_split",
    "load_gsm8k",
    "load_math",
    "load_problems",
    "load_svamp",
    "parse_number",
]
