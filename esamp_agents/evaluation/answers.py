"""Reading a model's final answer and comparing it with a reference, strictly.

The final answer is read from an explicit cue ("Answer: 12"), a ``\\boxed{}``, or the last
number, and compared exactly (no x100 leniency, "0.5" never matches "50"): the graders of
:mod:`esamp_agents.evaluation.tasks` and every benchmark's accuracy rest on these two functions.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# --------------------------------------------------------------------------- answer extraction

# A cue before the final answer: "Answer:", "answer is", "final answer must be", "answer = ".
_CUE_RE = re.compile(
    r"\banswer\b(?:\s*(?:is|must be|will be|would be|should be|equals)\b)?(?P<sep>[\s:=*$'\"`]*)", re.IGNORECASE
)
# A plain number: optional minus (not after a word, so "12-7" gives 12 and 7), thousands separators, decimals.
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"(?:(?<![\w)\]}}])-)?{_NUM}")
_PLAIN_NUMBER_RE = re.compile(rf"[+-]?(?:{_NUM}|\.\d+)")
_PROSE_WORD_RE = re.compile(r"[A-Za-z]{2,}")
_ARITHMETIC_RE = re.compile(r"[\d\s.,+\-*/×÷()^]+")
_SENTENCE_END_RE = re.compile(r"\.(?=\s)")
_OPENERS = ("\\(", "\\[", "$", "**", "*", "'", '"', "`")


def _balanced(text: str, open_at: int) -> str | None:
    """The content of the brace group opening at ``text[open_at]``, or None when it never closes."""
    depth = 0
    i = open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last non-empty ``\\boxed{...}`` (or ``\\fbox``) in ``text``, braces balanced."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        content = _balanced(text, m.end() - 1)
        if content is not None and content.strip():
            return content.strip()
    return None


def _cut_closer(span: str) -> str:
    """Cut at the first unescaped '$', '\\)', '\\]', '**', quote or backtick (the answer's closing wrapper)."""
    i = 0
    while i < len(span):
        ch = span[i]
        if ch == "\\":
            if span[i : i + 2] in ("\\)", "\\]"):
                return span[:i]
            i += 2
            continue
        if ch in "$'\"`" or span.startswith("**", i):
            return span[:i]
        i += 1
    return span


def _cut_prose(span: str) -> tuple[str, bool]:
    """Cut before the first English word (2+ letters outside braces, not a LaTeX command); says if it cut."""
    depth = 0
    i = 0
    while i < len(span):
        ch = span[i]
        if ch == "\\":
            m = re.match(r"\\[A-Za-z]+|\\.", span[i:])
            i += len(m.group(0)) if m else 1
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth <= 0 and ch.isalpha():
            m = _PROSE_WORD_RE.match(span, i)
            if m:
                return span[:i], True
            i += 1
            while i < len(span) and span[i].isalpha():
                i += 1
            continue
        i += 1
    return span, False


def _canonical(answer: str) -> str:
    """A plain number as digits ("1,234" -> "1234", "\\$18.90" -> "18.90", "50%" -> "50"); else unchanged."""
    norm = _normalize(answer)
    if _PLAIN_NUMBER_RE.fullmatch(norm):
        return norm.replace(",", "").lstrip("+")
    return answer


def _cue_answer(text: str, start: int, colon: bool) -> str | None:
    """The answer right after a cue, or None when what follows is not an answer (prose, a placeholder)."""
    span = text[start:].split("\n", 1)[0].strip()
    stripped = True
    while stripped:
        stripped = False
        for opener in _OPENERS:
            if span.startswith(opener):
                span, stripped = span[len(opener) :].lstrip(), True
    if re.match(r"\\(?:boxed|fbox)\s*\{", span):
        content = _balanced(span, span.index("{"))
        return _canonical(content.strip()) if content and content.strip() else None
    span = _cut_closer(span)
    m = _SENTENCE_END_RE.search(span)
    if m:
        span = span[: m.start()]
    whole = span.strip().rstrip(".,;:!?* ")
    expr, cut = _cut_prose(span)
    expr = expr.strip().rstrip(".,;:!?* ")
    if not expr:
        # "Answer: Evelyn": a single word is an answer only after an explicit "Answer:".
        if colon and re.fullmatch(r"[A-Za-z]+", whole):
            return whole
        return None
    if cut and expr.isalpha():
        return None  # "the answer is a simple sum": an article, not an answer
    if not (expr[0].isalnum() or expr[0] in "-+.\\([{"):
        return None  # "Answer: <number>" echoed from the instruction
    if "=" in expr:
        lhs, rhs = expr.rsplit("=", 1)
        lhs, rhs = lhs.strip(), rhs.strip()
        if _PLAIN_NUMBER_RE.fullmatch(rhs) and (_ARITHMETIC_RE.fullmatch(lhs) or re.fullmatch(r"[A-Za-z]", lhs)):
            expr = rhs  # "7 * 5 = 35", "x = 5"
    return _canonical(expr)


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``: after the last answer cue, else the last ``\\boxed{}``, else the last number.

    Cues are "Answer:", "answer is", "answer must be", "answer =" (any case; ``**``, ``$`` and
    spaces around are skipped). Plain numbers come back as digits ("1,234" -> "1234", "-3",
    "2.5"); anything else (MATH LaTeX) as written. None when the text has no answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    text = text.replace("\u2212", "-")
    for m in reversed(list(_CUE_RE.finditer(text))):
        answer = _cue_answer(text, m.end(), ":" in m.group("sep"))
        if answer is not None:
            return answer
    boxed = last_boxed(text)
    if boxed is not None:
        return _canonical(boxed)
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


# --------------------------------------------------------------------------- comparison

_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_MIXED_RE = re.compile(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}")
_SLASH_RE = re.compile(r"([+-]?\d+)/([+-]?\d+)")
_UNITS_RE = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}(?:\^\{?\d\}?)?$")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}")


def _normalize(s: str) -> str:
    """MATH-style normal form: no spaces, \\left/\\right, $, units, degrees or percent signs; \\dfrac -> \\frac."""
    s = s.strip().replace("\u2212", "-")
    s = _UNITS_RE.sub("", s)
    s = _WRAPPER_RE.sub(r"\1", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", "")):
        s = s.replace(old, new)
    for junk in ("\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$", "^{\\circ}", "^\\circ", "°"):
        s = s.replace(junk, "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    if s.count("=") == 1 and re.match(r"[A-Za-z]=", s):
        s = s[2:]  # "x=5" -> "5"
    return s


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number: "12", "-3", "0.5", "1,234", "3/4", "\\frac{1}{2}", "1\\frac{4}{5}"; else None."""
    s = _normalize(text)
    if _PLAIN_NUMBER_RE.fullmatch(s):
        return Fraction(s.replace(",", ""))
    for regex in (_SLASH_RE, _FRAC_RE):
        m = regex.fullmatch(s)
        if m:
            sign, num, den = ("", *m.groups()) if regex is _SLASH_RE else m.groups()
            if int(den) == 0:
                return None
            value = Fraction(int(num), int(den))
            return -value if sign == "-" else value
    m = _MIXED_RE.fullmatch(s)
    if m and int(m.group(3)) != 0:
        return int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3)))
    return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether an extracted answer equals the reference.

    Numbers compare by value (integers exactly, others to a relative 1e-6; "12.0" == "12",
    "3/4" == "0.75", but "0.5" != "50"); anything else compares as normalised LaTeX text.
    """
    if predicted is None:
        return False
    p, r = _normalize(predicted), _normalize(reference)
    if not p:
        return False
    a, b = parse_number(p), parse_number(r)
    if a is not None and b is not None:
        if a == b:
            return True
        if a.denominator == 1 and b.denominator == 1:
            return False
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return p == r


__all__ = ["answers_match", "extract_answer", "last_boxed", "parse_number"]
