"""Task generators, loaders and the strict answer extraction / grading (no model needed)."""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

from esamp_agents.evaluation import tasks
from esamp_agents.evaluation.tasks import (
    DEFAULT_SUFFIX,
    TASK_NAMES,
    Problem,
    answers_match,
    extract_answer,
    generate_problems,
    grade,
    load_gsm8k,
    load_math,
    load_problems,
    load_svamp,
)

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
WORD_SOLVERS = {
    "buy_more": operator.add,
    "give_away": operator.sub,
    "groups": operator.mul,
    "share": operator.floordiv,
}


def _all(task: str, split: str = "all") -> list[Problem]:
    return generate_problems(task, tasks.available_problems(task, split), seed=0, split=split)


UNIT_FACTORS = {"m_cm": 100, "h_min": 60, "kg_g": 1000, "ft_in": 12, "day_h": 24}


def _expected(p: Problem) -> int:
    """The answer computed from the key alone, independently of the generator."""
    if p.task == "unit_conversions":
        pair, number = p.key.split(":")
        big, small = pair.split("_")
        assert number in p.question
        if f"{big}_{small}" in UNIT_FACTORS:
            return int(number) * UNIT_FACTORS[f"{big}_{small}"]
        factor = UNIT_FACTORS[f"{small}_{big}"]
        assert int(number) % factor == 0
        return int(number) // factor
    if p.task == "comparisons":
        which, numbers = p.key.split(":")
        a, b = map(int, numbers.split(","))
        assert a != b and str(a) in p.question and str(b) in p.question
        assert ("larg" in p.question or "bigger" in p.question) == (which == "max")
        return {"max": max, "min": min}[which](a, b)
    if p.task == "word_problems":
        family, numbers = p.key.split(":")
        a, b = map(int, numbers.split(","))
        assert str(a) in p.question and str(b) in p.question
        if family == "share":
            assert a % b == 0
        return WORD_SOLVERS[family](a, b)
    m = re.fullmatch(r"(\d+)([+*-])(\d+)", p.key)
    assert m, p.key
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    assert re.search(rf"\b{a}\b", p.question) and re.search(rf"\b{b}\b", p.question)
    return OPS[op](a, b)


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generated_answers_are_right_and_in_range(task):
    problems = _all(task)
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.task == task
        assert p.id == f"{task}:{p.key}:t{p.id.rsplit(':t', 1)[1]}"
        assert int(p.answer) == _expected(p) >= 0
        assert p.answer == str(int(p.answer))
        m = re.fullmatch(r"(\d+)[+*-](\d+)", p.key)
        if task.startswith("single_digit"):
            assert 1 <= int(m.group(1)) <= 9 and 1 <= int(m.group(2)) <= 9
        elif task == "two_digit_addsub":
            assert 10 <= int(m.group(1)) <= 99 and 10 <= int(m.group(2)) <= 99
    keyed_by_operator = task.startswith("single_digit") or task == "two_digit_addsub"
    ops = {re.sub(r"\d", "", p.key) for p in problems} if keyed_by_operator else None
    expected_ops = {
        "single_digit": {"+", "*"},
        "single_digit_add": {"+"},
        "single_digit_mul": {"*"},
        "single_digit_sub": {"-"},
        "single_digit_rephrased": {"+", "*"},
        "two_digit_addsub": {"+", "-"},
        "word_problems": None,
        "unit_conversions": None,
        "comparisons": None,
    }[task]
    assert ops == expected_ops


def test_single_digit_has_every_fact_under_several_phrasings():
    problems = _all("single_digit")
    keys = {p.key for p in problems}
    assert len(keys) == 162
    assert len(problems) == len(keys) * 5
    assert len({p.question for p in problems}) == len(problems)
    assert {p.question for p in problems if p.key == "7*5"} >= {"What is 7 * 5?", "Calculate 7 times 5."}


def test_rephrased_single_digit_has_the_same_facts_in_other_words():
    """More training problems per fact; the single_digit phrasings (its test set's) never recur."""
    plain, rephrased = _all("single_digit"), _all("single_digit_rephrased")
    assert {p.key for p in rephrased} == {p.key for p in plain}
    assert len(rephrased) == 162 * 10
    assert not {p.question for p in rephrased} & {p.question for p in plain}
    assert {p.key for p in _all("single_digit_rephrased", "test")} == {p.key for p in _all("single_digit", "test")}
    assert {p.question for p in rephrased if p.key == "7*5"} >= {"Multiply 7 by 5.", "7 * 5 = ?"}


def test_generation_is_deterministic_and_seeded():
    a = generate_problems("single_digit", 50, seed=3)
    assert a == generate_problems("single_digit", 50, seed=3)
    assert a != generate_problems("single_digit", 50, seed=4)
    assert len({p.id for p in a}) == 50
    # A smaller count is a prefix of a larger one with the same seed.
    assert generate_problems("single_digit", 20, seed=3) == a[:20]


def test_generation_is_the_same_in_another_process():
    """No dependence on PYTHONHASHSEED or process state."""
    code = (
        "from esamp_agents.evaluation.tasks import generate_problems;"
        "print([p.id for p in generate_problems('two_digit_addsub', 30, seed=11, split='test')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
    ).stdout.strip()
    assert out == str([p.id for p in generate_problems("two_digit_addsub", 30, seed=11, split="test")])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_splits_are_disjoint_by_key_and_cover_all(task):
    train, test, every = _all(task, "train"), _all(task, "test"), _all(task)
    train_keys, test_keys = {p.key for p in train}, {p.key for p in test}
    assert not train_keys & test_keys
    assert train_keys | test_keys == {p.key for p in every}
    assert {p.id for p in train} | {p.id for p in test} == {p.id for p in every}
    assert len(train) + len(test) == len(every)
    assert 0.25 < len(train_keys) / len(train_keys | test_keys) < 0.55


def test_split_is_by_key_across_tasks():
    """A held-out fact is held out in every task that has it (the split hashes the key only)."""
    test_keys = {p.key for p in _all("single_digit", "test")}
    for p in _all("single_digit_add", "train") + _all("single_digit_mul", "train"):
        assert p.key not in test_keys
    assert tasks.key_split("7*5") == tasks.key_split("7*5")


def test_single_digit_has_enough_held_out_problems():
    assert tasks.available_problems("single_digit", "test") >= 200
    held_out = generate_problems("single_digit", 200, seed=0, split="test")
    train_keys = {p.key for p in _all("single_digit", "train")}
    assert len({p.id for p in held_out}) == 200
    assert not {p.key for p in held_out} & train_keys


def test_prompt_appends_the_suffix():
    p = generate_problems("single_digit_add", 1)[0]
    assert p.prompt() == f"{p.question} {DEFAULT_SUFFIX}"
    assert p.prompt("Answer briefly.") == f"{p.question} Answer briefly."
    assert "Answer: <number>" in DEFAULT_SUFFIX


@pytest.mark.parametrize(
    ("kwargs", "pieces"),
    [
        ({"task": "nope", "count": 1}, ["task='nope'", "single_digit", "word_problems"]),
        ({"task": "single_digit", "count": 0}, ["count=0", "1 <= count <= 810"]),
        ({"task": "single_digit", "count": -2}, ["count=-2", "1 <= count"]),
        ({"task": "single_digit", "count": 811}, ["count=811", "1 <= count <= 810"]),
        ({"task": "single_digit", "count": 526, "split": "test"}, ["count=526", "<= 525", "'test'"]),
        ({"task": "single_digit", "count": 2.0}, ["count=2.0", "integer"]),
        ({"task": "single_digit", "count": True}, ["count=True", "integer"]),
        ({"task": "single_digit", "count": 5, "split": "dev"}, ["split='dev'", "all, train, test"]),
        ({"task": "single_digit", "count": 5, "seed": "1"}, ["seed='1'", "integer"]),
    ],
)
def test_generate_errors_name_the_value_and_the_allowed_range(kwargs, pieces):
    with pytest.raises(ValueError) as info:
        generate_problems(**kwargs)
    for piece in pieces:
        assert piece in str(info.value)


def test_load_problems_generator_specs():
    assert load_problems("single_digit:7") == generate_problems("single_digit", 7)
    assert load_problems("word_problems:5:9") == generate_problems("word_problems", 5, seed=9)
    assert load_problems("single_digit:5:2:test") == generate_problems("single_digit", 5, seed=2, split="test")


@pytest.mark.parametrize(
    ("spec", "error", "piece"),
    [
        ("single_digit", ValueError, "TASK:COUNT"),
        ("bogus:5", ValueError, "'bogus' is unknown"),
        ("single_digit:many", ValueError, "count='many'"),
        ("single_digit:5:x", ValueError, "seed='x'"),
        ("single_digit:5:1:dev", ValueError, "split='dev'"),
        ("single_digit:5:1:test:extra", ValueError, "malformed"),
        ("gsm8k:", ValueError, "no file path"),
        ("gsm8k:/nonexistent/file.jsonl", FileNotFoundError, "/nonexistent/file.jsonl"),
    ],
)
def test_load_problems_errors(spec, error, piece):
    with pytest.raises(error, match=re.escape(piece)):
        load_problems(spec)


# --------------------------------------------------------------------------- loaders


def test_load_gsm8k(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "Q one?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "Q two?", "answer": "big\n#### 1,234"},
        {"question": "Q three?", "answer": "owes\n#### -7"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = load_gsm8k(path)
    assert [p.answer for p in problems] == ["5", "1234", "-7"]
    assert [p.id for p in problems] == ["gsm8k:00000", "gsm8k:00001", "gsm8k:00002"]
    assert problems[0] == Problem("gsm8k:00000", "gsm8k", "Q one?", "5", "gsm8k:00000")
    assert grade(problems[1], "so 1,234 in all. Answer: 1,234")
    assert load_problems(f"gsm8k:{path}") == problems

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1.*####"):
        load_gsm8k(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_gsm8k(bad)


def test_load_svamp(tmp_path):
    path = tmp_path / "svamp.json"
    rows = [
        {"ID": "chal-1", "Body": "Tom has 5 pens.", "Question": "He buys 3 more. How many?", "Answer": 8.0},
        {"ID": "chal-2", "Body": "A cake is cut in 4.", "Question": "What is 2 / 4?", "Answer": 0.5},
    ]
    path.write_text(json.dumps(rows))
    problems = load_svamp(path)
    assert problems[0] == Problem(
        "svamp:chal-1", "svamp", "Tom has 5 pens. He buys 3 more. How many?", "8", "svamp:chal-1"
    )
    assert problems[1].answer == "0.5"
    assert grade(problems[1], "Answer: 0.5") and not grade(problems[1], "Answer: 50")
    assert load_problems(f"svamp:{path}") == problems

    path.write_text(json.dumps([{"ID": "x", "Body": "B", "Question": "Q?", "Answer": "eight"}]))
    with pytest.raises(ValueError, match=r"item 0.*'Answer' must be a finite number"):
        load_svamp(path)


def test_load_math(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}", "level": 1},
        {"problem": "Point?", "solution": "...", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "unique_id": "t/1"},
        {"problem": "No answer field", "solution": "So $\\boxed{\\dfrac{3}{4}}$.", "level": 2},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    problems = load_math(path)
    assert [p.id for p in problems] == ["math:00000", "math:t/1", "math:00002"]
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "\\left( 3, \\frac{\\pi}{2} \\right)", "\\dfrac{3}{4}"]
    assert grade(problems[0], "Answer: 0.5") and grade(problems[0], "thus $\\boxed{\\dfrac12}$")
    assert grade(problems[1], "The answer is $(3, \\frac{\\pi}{2})$.")
    assert grade(problems[2], "Answer: 3/4") and not grade(problems[2], "Answer: 75")
    assert load_problems(f"math:{path}") == problems


@pytest.mark.parametrize(
    ("name", "filename", "loader", "size"),
    [
        ("gsm8k", "gsm8k_test.jsonl", load_gsm8k, 1319),
        ("svamp", "svamp.json", load_svamp, 1000),
        ("math", "math500_test.jsonl", load_math, 500),
    ],
)
def test_shared_benchmarks_grade_their_own_references(name, filename, loader, size):
    path = DATA / filename
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared benchmark data exists only in the development checkout)")
    problems = loader(path)
    assert len(problems) == size
    assert len({p.id for p in problems}) == size
    assert all(p.task == name and p.question and p.answer for p in problems)
    for template in ("Answer: {}", "The final answer is $\\boxed{{{}}}$."):
        graded = [grade(p, template.format(p.answer)) for p in problems]
        assert sum(graded) >= 0.99 * size, [p.answer for p, ok in zip(problems, graded, strict=True) if not ok][:20]


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        # cue forms
        ("7 + 5 = 12. Answer: 12", "12"),
        ("Answer: 3 ... wait, Answer: **14**", "14"),
        ("**Answer:** 42", "42"),
        ("answer = 6", "6"),
        ("ANSWER: 9", "9"),
        ("The answer is 8, then 9 more", "8"),
        ("4 + 9 is 13. So the final answer must be 13. I would have 14", "13"),
        ("The final answer is $12$.", "12"),
        ("Answer:\n12", "12"),
        ("Answer: 12 apples", "12"),
        ("Answer: 7 * 5 = 35", "35"),
        ("Answer: x = 5", "5"),
        ("Answer: 12.", "12"),
        ("Answer: 50%", "50"),
        ("Answer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: 3/4", "3/4"),
        ("Answer: \\boxed{7}", "7"),
        ("Answer: 6 - 5i", "6 - 5i"),
        # an echoed instruction or a prose cue is not an answer
        ("write the answer as 'Answer: <number>'. 5 + 3 = 8", "8"),
        ("I think the answer is correct. 12-7=5", "5"),
        ("the answer is a simple sum: 5", "5"),
        # boxed (balanced braces), and a cue beats a box
        ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed{1,234}", "1234"),
        ("Answer: 4 even though \\boxed{5}", "4"),
        # last-number fallback
        ("First 3, then 4, so 7", "7"),
        ("The result is 12.0", "12.0"),
        ("12-7", "7"),
        ("it owes -3", "-3"),
        ("about 2.5", "2.5"),
        ("in all 1,234 coins", "1234"),
        ("Answer: -3", "-3"),
        ("Answer: \u22127", "-7"),
        # nothing
        ("no digits here", None),
        ("", None),
        ("Answer: <number>", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="must be a string"):
        extract_answer(12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("predicted", "reference", "match"),
    [
        ("12", "12", True),
        ("12.0", "12", True),
        ("0.5", "50", False),
        ("50", "0.5", False),
        ("0.75", "3/4", True),
        ("3/4", "\\frac{3}{4}", True),
        ("0.5", "\\dfrac{1}{2}", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("1234", "1,234", True),
        ("1000000", "1000001", False),  # integers compare exactly, not to a tolerance
        ("0.3333333", "\\frac{1}{3}", True),
        ("0.33", "\\frac{1}{3}", False),
        ("30", "30^\\circ", True),
        ("10", "10\\%", True),
        ("864", "864 \\mbox{ inches}^2", True),
        ("18.90", "\\$18.90", True),
        ("Evelyn", "\\text{Evelyn}", True),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("2x+3", "y = 2x + 3", True),
        ("3, 5, 7", "3,5,7", True),
        ("2\\sqrt{5}", "3\\sqrt{5}", False),
        ("1\\frac{4}{5}", "9/5", True),
        ("1/0", "1", False),
        ("", "", False),
        (None, "12", False),
    ],
)
def test_answers_match(predicted, reference, match):
    assert answers_match(predicted, reference) is match


def test_grade_uses_the_final_answer():
    p = Problem("t:1", "t", "What is 7 * 5?", "35", "7*5")
    assert grade(p, "7 * 5 = 35. Answer: 35")
    assert grade(p, "Answer: **35.0**")
    assert not grade(p, "Answer: 35 ... no wait. Answer: 36")
    assert not grade(p, "I don't know")
    assert tasks.grade_all([p, p], ["Answer: 35", "Answer: 3"]) == [True, False]
    with pytest.raises(ValueError, match="2 problems but 1 texts"):
        tasks.grade_all([p, p], ["Answer: 35"])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_generated_problem_grades_its_own_answer(task):
    for p in generate_problems(task, 60, seed=1):
        assert grade(p, f"Let me think. {p.question} Answer: {p.answer}")
        assert not grade(p, f"Answer: {int(p.answer) + 1}")
