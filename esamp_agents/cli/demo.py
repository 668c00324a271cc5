"""The demo: sample N ESamp candidates per arithmetic question in one engine call, then choose.

Questions are seeded single-digit sums and products from the HELD-OUT split of
:mod:`esamp_agents.evaluation.tasks` (never used to train the shipped reward head), small enough for the
embedded 135M model to get right some of the time, so a chooser has something to choose
between. The default chooser is the shipped hidden-state reward head (ELHSR), scoring every
candidate during the same decode (no second pass) and voting with those scores; majority
vote and mean logprob are there to compare.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from esamp_agents.decoding.loading import EMBEDDED
from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.decoding.results import Candidate
from esamp_agents.evaluation import tasks

SUFFIX = tasks.DEFAULT_SUFFIX
DEMO_BETA = ESampParams.beta
"""The package default (0.1, with the warm start): the least harmful ESamp configuration of the
small-scale study (BENCHMARKS.md section 8); the paper's 0.25 cut arithmetic accuracy here."""
MAX_QUESTIONS = 50

# A chooser sees one question's candidates and their extracted answers (same order)
# and returns the chosen answer, or None when it cannot choose.
Chooser = Callable[[Sequence[Candidate], Sequence[int | None]], int | None]


@dataclass(frozen=True)
class Question:
    text: str
    answer: int

    @property
    def prompt(self) -> str:
        return f"{self.text} {SUFFIX}"


def make_questions(count: int, seed: int = 0) -> list[Question]:
    """``count`` seeded single-digit sum/product questions from the held-out ("test") split."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_QUESTIONS:
        raise ValueError(f"questions={count!r} is out of range; allowed: 1 <= questions <= {MAX_QUESTIONS}")
    problems = tasks.generate_problems("single_digit", count, seed=seed, split="test")
    return [Question(p.question, int(p.answer)) for p in problems]


def extract_answer(text: str) -> int | None:
    """The final answer as an integer (``tasks.extract_answer``'s rules), or None when it is not a whole number."""
    answer = tasks.extract_answer(text)
    value = tasks.parse_number(answer) if answer is not None else None
    return int(value) if value is not None and value.denominator == 1 else None


def majority_vote(candidates: Sequence[Candidate], answers: Sequence[int | None]) -> int | None:
    """The most frequent answer; ties go to the answer whose best candidate has the higher mean logprob."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None

    def best_logprob(answer: int) -> float:
        lps = [c.mean_logprob for c, a in zip(candidates, answers, strict=True) if a == answer]
        finite = [lp for lp in lps if math.isfinite(lp)]
        return max(finite) if finite else -math.inf

    return max(counts, key=lambda a: (counts[a], best_logprob(a)))


def max_logprob(candidates: Sequence[Candidate], answers: Sequence[int | None]) -> int | None:
    """The answer of the candidate with the highest mean token logprob (a weak baseline)."""
    scored = [
        (c.mean_logprob, a)
        for c, a in zip(candidates, answers, strict=True)
        if a is not None and math.isfinite(c.mean_logprob)
    ]
    return max(scored, key=lambda t: t[0])[1] if scored else None


def _reward(candidate: Candidate) -> float:
    value = candidate.extras.get("reward")
    if value is None:
        raise ValueError("this chooser needs reward scores: run the demo with a reward chooser so they are computed")
    return float(value)


def reward_vote(candidates: Sequence[Candidate], answers: Sequence[int | None]) -> int | None:
    """Answers weighted by sigmoid(reward) (the head is trained as a logit of "correct"); heaviest wins."""
    totals: dict[int, float] = {}
    for c, a in zip(candidates, answers, strict=True):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + 1.0 / (1.0 + math.exp(-_reward(c)))
    return max(totals, key=lambda a: totals[a]) if totals else None


def reward_argmax(candidates: Sequence[Candidate], answers: Sequence[int | None]) -> int | None:
    """The answer of the candidate the reward head scores highest (ties: the first)."""
    scored = [(_reward(c), -c.index, a) for c, a in zip(candidates, answers, strict=True) if a is not None]
    return max(scored)[2] if scored else None


CHOOSERS: dict[str, Chooser] = {
    "reward-vote": reward_vote,
    "reward": reward_argmax,
    "majority": majority_vote,
    "logprob": max_logprob,
}
REWARD_CHOOSERS = frozenset({"reward-vote", "reward"})


@dataclass
class QuestionReport:
    question: Question
    candidates: list[Candidate]
    answers: list[int | None]
    chosen: int | None

    @property
    def correct(self) -> bool:
        return self.chosen == self.question.answer

    @property
    def any_correct(self) -> bool:
        return self.question.answer in self.answers


@dataclass
class DemoReport:
    rows: list[QuestionReport]
    load_seconds: float
    generate_seconds: float
    generated_tokens: int

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.rows) / len(self.rows)

    @property
    def pass_at_n(self) -> float:
        return sum(r.any_correct for r in self.rows) / len(self.rows)

    @property
    def per_sample_accuracy(self) -> float:
        answers = [a == r.question.answer for r in self.rows for a in r.answers]
        return sum(answers) / len(answers)


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def print_report(report: DemoReport, out: TextIO, *, chooser_name: str = "reward-vote") -> None:
    for qi, row in enumerate(report.rows, start=1):
        q = row.question
        print(f"Q{qi}. {q.text}  (expected {q.answer})", file=out)
        print(f"  {'#':>2}  {'answer':>6}  {'reward':>6}  {'mean lp':>7}  text", file=out)
        for c, a in zip(row.candidates, row.answers, strict=True):
            lp = f"{c.mean_logprob:7.3f}" if math.isfinite(c.mean_logprob) else f"{'n/a':>7}"
            reward = c.extras.get("reward")
            rw = f"{reward:+6.2f}" if reward is not None else f"{'-':>6}"
            mark = "*" if a is not None and a == q.answer else " "
            print(f"  {c.index:>2}  {'-' if a is None else a:>6}{mark} {rw}  {lp}  {_short(c.text, 52)}", file=out)
        verdict = "correct" if row.correct else "wrong"
        chosen = "none" if row.chosen is None else row.chosen
        print(f"  chosen ({chooser_name}): {chosen}  -> {verdict}\n", file=out)
    k = len(report.rows)
    n = len(report.rows[0].candidates) if report.rows else 0
    rate = report.generated_tokens / report.generate_seconds if report.generate_seconds > 0 else float("nan")
    print(f"accuracy ({chooser_name}): {sum(r.correct for r in report.rows)}/{k} = {report.accuracy:.0%}", file=out)
    print(f"pass@{n} (any candidate right): {report.pass_at_n:.0%}", file=out)
    print(f"per-sample accuracy: {report.per_sample_accuracy:.0%}  (* marks a right candidate)", file=out)
    print(
        f"time: model load {report.load_seconds:.1f} s, generation {report.generate_seconds:.1f} s "
        f"({report.generated_tokens} tokens, {rate:.1f} tok/s)",
        file=out,
    )


def run_demo(
    *,
    model: str = EMBEDDED,
    questions: int = 4,
    n: int = 8,
    beta: float = DEMO_BETA,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    seed: int = 0,
    chooser: Chooser = reward_vote,
    device: str | None = None,
    dtype: str = "auto",
    out: TextIO | None = None,
) -> DemoReport:
    """Run the demo and print its table to ``out`` (stdout by default); returns the report."""
    out = out if out is not None else sys.stdout
    # Validate everything before the model loads.
    qs = make_questions(questions, seed)
    sampling = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    esamp = ESampParams(beta=beta)
    chooser_name = next((k for k, v in CHOOSERS.items() if v is chooser), getattr(chooser, "__name__", "custom"))

    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import load_model

    needs_reward = chooser_name in REWARD_CHOOSERS
    print(f"loading model {model!r} ...", file=out, flush=True)
    t0 = time.perf_counter()
    loaded = load_model(model, device=device, dtype=dtype)
    observers = []
    if needs_reward:
        from esamp_agents.hidden_reward.reward import HiddenStateReward

        observers.append(HiddenStateReward.shipped(loaded).make_observer(loaded))
    load_seconds = time.perf_counter() - t0
    engine = ESampEngine(loaded)
    prompts = [loaded.apply_chat_template([{"role": "user", "content": q.prompt}]) for q in qs]
    print(
        f"sampling {n} candidates for each of {len(qs)} questions (beta={beta}, T={temperature}, "
        f"max {max_new_tokens} tokens) in one engine call ...\n",
        file=out,
        flush=True,
    )
    t1 = time.perf_counter()
    result = engine.generate(prompts, sampling, esamp, observers=observers, add_special_tokens=False)
    generate_seconds = time.perf_counter() - t1
    if observers:  # the head scored every candidate while it was written
        for pr, rewards in zip(result.results, observers[0].rewards(), strict=True):
            for c, r in zip(pr.candidates, rewards, strict=True):
                c.extras["reward"] = r

    rows = []
    for q, pr in zip(qs, result.results, strict=True):
        answers = [extract_answer(c.text) for c in pr.candidates]
        rows.append(QuestionReport(q, pr.candidates, answers, chooser(pr.candidates, answers)))
    report = DemoReport(rows, load_seconds, generate_seconds, result.stats.generated_tokens)
    print_report(report, out, chooser_name=chooser_name)
    return report


__all__ = [
    "CHOOSERS",
    "DEMO_BETA",
    "SUFFIX",
    "Chooser",
    "DemoReport",
    "Question",
    "QuestionReport",
    "extract_answer",
    "majority_vote",
    "make_questions",
    "max_logprob",
    "print_report",
    "reward_argmax",
    "reward_vote",
    "run_demo",
]
