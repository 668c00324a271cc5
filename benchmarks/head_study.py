"""A larger, more varied training set for the shipped hidden-state head, and how far heads transfer (#20).

    python benchmarks/head_study.py collect            # all candidates (resumable; ~1 h on 2 cores)
    python benchmarks/head_study.py analyse            # heads, ablations, transfer; writes results.json
    python benchmarks/head_study.py collect --scale 0.02 --work-dir /tmp/hs   # smoke run
    python benchmarks/head_study.py collect-more       # every single-digit train problem at plain T=0.7 x 8
    python benchmarks/head_study.py analyse-more       # the shipped recipe on those alone
    python benchmarks/head_study.py confirm --fresh benchmarks/out/esamp_study/single_digit/generations/vanilla
                                                       # its heads, a second seed, on a fresh held-out sample

Data (``collect``), every set written by :func:`esamp_agents.hidden_reward.collect.collect` with
every layer's token features captured during the decode:

- ``train/<family>/<condition>``: the train split of seven task families, each problem under one
  of four sampling conditions taken in turn (plain T=0.7, ESamp with the package defaults at
  T=0.7, plain T=1.0, plain T=0.4); 8 candidates per problem for plain T=0.7, 4 for the others
  (the 2-core budget: more problems rather than more candidates per problem). Problems whose computation is a
  single-digit fact held out by the section-1 test (e.g. "7 boxes of 5 pens" when 7*5 is a
  test fact) are left out of training in every family.
- ``test/section1``: the section-1 held-out set (200 single-digit test problems x 16 plain
  candidates, T=0.7, seed 0), on which the shipped head is compared with the current one.
- ``test/section1_esamp``: the first 100 of those problems x 8 ESamp candidates (transfer
  between plain and ESamp candidates).
- ``test/<family>``: 40 test-split problems x 8 plain candidates of each other family
  (leave-one-family-out).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from esamp_agents import ESampParams, SamplingParams, load_model
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.evaluation.tasks import Problem, generate_problems, key_split
from esamp_agents.hidden_reward.collect import collect
from esamp_agents.hidden_reward.features import hidden_spec
from esamp_agents.recipes.word_problems import generate_word_problems

OUT = Path(__file__).resolve().parent / "out" / "head_study"
TOP_K = 20
MAX_NEW_TOKENS = 64
SEED = 0

# family -> training problems drawn (before the section-1 leak filter removes some)
TRAIN_FAMILIES: dict[str, int] = {
    "single_digit": 240,
    "single_digit_sub": 90,
    "two_digit_addsub": 120,
    "word_problems": 200,
    "calculator_word_problems": 150,
    "unit_conversions": 120,
    "comparisons": 120,
}
SECTION1_FAMILY = "single_digit"
FAMILY_TEST_PROBLEMS = 40


@dataclass(frozen=True)
class Condition:
    """One way of sampling candidates: the temperature and whether ESamp is on (package defaults)."""

    name: str
    temperature: float
    esamp: bool

    def params(self) -> ESampParams:
        return ESampParams() if self.esamp else ESampParams(beta=0.0)


CONDITIONS: tuple[Condition, ...] = (
    Condition("plain_t07", 0.7, False),
    Condition("esamp_t07", 0.7, True),
    Condition("plain_t10", 1.0, False),
    Condition("plain_t04", 0.4, False),
)


def family_problems(family: str, count: int, split: str, seed: int = SEED) -> list[Problem]:
    if family == "calculator_word_problems":
        return generate_word_problems(count, seed=seed, split=split)  # type: ignore[arg-type]
    return generate_problems(family, count, seed=seed, split=split)  # type: ignore[arg-type]


_SINGLE_DIGIT_FACT = {"buy_more": "+", "groups": "*", "add": "+", "mul": "*"}


def uses_section1_test_fact(problem: Problem) -> bool:
    """Whether the problem computes a single-digit + or * fact (``a op b``, the order section 1 keys
    facts by) that the section-1 test holds out, so training on it would leak a test fact under
    another phrasing."""
    m = re.fullmatch(r"(\d)([+*])(\d)", problem.key)
    if m:
        a, op, b = m.groups()
    else:
        m = re.fullmatch(r"(\w+):(\d+),(\d+)", problem.key)
        if not m or m.group(1) not in _SINGLE_DIGIT_FACT or max(int(m.group(2)), int(m.group(3))) > 9:
            return False
        a, op, b = m.group(2), _SINGLE_DIGIT_FACT[m.group(1)], m.group(3)
    return key_split(f"{a}{op}{b}") == "test"


def training_sets(scale: float) -> dict[tuple[str, str], list[Problem]]:
    """(family, condition) -> problems: each family's train split, leak-filtered, conditions in turn."""
    sets: dict[tuple[str, str], list[Problem]] = {}
    for family, count in TRAIN_FAMILIES.items():
        drawn = family_problems(family, max(len(CONDITIONS), round(count * scale)), "train")
        kept = [p for p in drawn if not uses_section1_test_fact(p)]
        for i, cond in enumerate(CONDITIONS):
            sets[(family, cond.name)] = kept[i :: len(CONDITIONS)]
    return sets


def test_sets(scale: float) -> dict[str, tuple[list[Problem], int, Condition]]:
    """name -> (problems, candidates per problem, condition)."""
    plain, esamp = CONDITIONS[0], CONDITIONS[1]
    section1 = family_problems(SECTION1_FAMILY, max(4, round(200 * scale)), "test")
    sets = {
        "section1": (section1, 16 if scale >= 0.5 else 4, plain),
        "section1_esamp": (section1[: max(2, len(section1) // 2)], 8 if scale >= 0.5 else 4, esamp),
    }
    for family in TRAIN_FAMILIES:
        if family != SECTION1_FAMILY:
            sets[family] = (family_problems(family, max(4, round(FAMILY_TEST_PROBLEMS * scale)), "test"), 8, plain)
    return sets


def more_single_digit() -> list[Problem]:
    """Every single-digit train problem not already sampled at plain T=0.7 (for ``collect-more``)."""
    taken = {p.id for p in training_sets(1.0)[(SECTION1_FAMILY, CONDITIONS[0].name)]}
    return [p for p in family_problems(SECTION1_FAMILY, 285, "train") if p.id not in taken]


def collect_more(args: argparse.Namespace) -> None:
    """The rest of the single-digit train split at plain T=0.7 x 8 (the section-1 condition)."""
    loaded = load_model("embedded", device="cpu")
    engine = ESampEngine(loaded)
    problems = more_single_digit()[: max(1, round(225 * args.scale))]
    cond = CONDITIONS[0]
    sampling = SamplingParams(n=8, max_new_tokens=MAX_NEW_TOKENS, temperature=cond.temperature, seed=SEED,
                              top_logprobs=TOP_K)  # fmt: skip
    out = args.work_dir / "train" / SECTION1_FAMILY / "plain_t07_more"
    summary = collect(engine, problems, out, sampling=sampling, esamp=cond.params(),
                      spec=hidden_spec(loaded, "all"), prompts_per_call=16, progress=False)  # fmt: skip
    print(f"[collect-more] {out.relative_to(args.work_dir)}: {len(problems)} x 8 {summary}", flush=True)


def collect_all(args: argparse.Namespace) -> None:
    loaded = load_model("embedded", device="cpu")
    engine = ESampEngine(loaded)
    spec = hidden_spec(loaded, "all")
    train, tests = training_sets(args.scale), test_sets(args.scale)
    n_train = 8 if args.scale >= 0.5 else 4
    jobs: list[tuple[Path, list[Problem], int, Condition]] = []
    # The order puts what the bar needs first, so a stopped run can already be analysed.
    jobs.append((args.work_dir / "test" / "section1", *tests.pop("section1")))
    for family in TRAIN_FAMILIES:
        jobs.append((args.work_dir / "train" / family / CONDITIONS[0].name, train[(family, CONDITIONS[0].name)],
                     n_train, CONDITIONS[0]))  # fmt: skip
    for name, (problems, n, cond) in tests.items():
        if name != "section1_esamp":
            jobs.append((args.work_dir / "test" / name, problems, n, cond))
    for cond in CONDITIONS[1:]:
        for family in TRAIN_FAMILIES:  # half the candidates: more problems per CPU-hour
            jobs.append((args.work_dir / "train" / family / cond.name, train[(family, cond.name)],
                         max(2, n_train // 2), cond))  # fmt: skip
        if cond.esamp:
            jobs.append((args.work_dir / "test" / "section1_esamp", *tests["section1_esamp"]))
    total = sum(len(p) * n for _, p, n, _ in jobs)
    print(f"[collect] {len(jobs)} sets, {sum(len(p) for _, p, _, _ in jobs)} problems, {total} candidates", flush=True)
    for out, problems, n, cond in jobs:
        if not problems:
            continue
        sampling = SamplingParams(n=n, max_new_tokens=MAX_NEW_TOKENS, temperature=cond.temperature, seed=SEED,
                                  top_logprobs=TOP_K)  # fmt: skip
        t = time.perf_counter()
        summary = collect(engine, problems, out, sampling=sampling, esamp=cond.params(), spec=spec,
                          prompts_per_call=max(1, 128 // n), progress=False)  # fmt: skip
        print(f"[collect] {out.relative_to(args.work_dir)}: {len(problems)} x {n} ({cond.name}) "
              f"{summary} in {time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["collect", "analyse", "collect-more", "analyse-more", "confirm"])
    p.add_argument("--work-dir", type=Path, default=OUT)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of every set's problems (smoke runs)")
    p.add_argument("--fresh", type=Path, default=None, help="confirm: a collect folder of fresh held-out problems")
    p.add_argument("--save-head", type=Path, default=None, help="analyse: also save the head chosen on validation")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error(f"--scale={args.scale} is out of range; allowed: 0 < scale <= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stage == "collect":
        collect_all(args)
    elif args.stage == "collect-more":
        collect_more(args)
    else:
        root = str(Path(__file__).resolve().parent.parent)
        if root not in sys.path:  # run as a script: make the benchmarks package importable
            sys.path.insert(0, root)
        from benchmarks.head_study_analysis import analyse, analyse_more, confirm

        {"analyse": analyse, "analyse-more": analyse_more, "confirm": confirm}[args.stage](args)


if __name__ == "__main__":
    main()
