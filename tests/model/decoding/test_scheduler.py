"""Continuous batching on the real model: a call that joins a busy batch gets what it gets alone."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from esamp_agents import ESampParams, Grammar, SamplingParams
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.decoding.results import GenerationResult
from esamp_agents.decoding.scheduler import _Batch
from tests.fakes import wait_for

PLAIN = ESampParams(beta=0.0)
LONG = SamplingParams(n=2, max_new_tokens=24, seed=1, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(embedded) -> ESampEngine:
    """The reference: the same model decoding one call at a time on the caller's thread."""
    return ESampEngine(embedded, batching=False)


@pytest.fixture
def batched(embedded) -> ESampEngine:
    return ESampEngine(embedded)


def chat(embedded, text: str) -> str:
    return embedded.apply_chat_template([{"role": "user", "content": text}])


def outputs(result: GenerationResult) -> list[list[Any]]:
    return [[(c.token_ids, c.finish_reason, c.text) for c in pr.candidates] for pr in result]


def max_logprob_gap(a: GenerationResult, b: GenerationResult) -> float:
    gaps = [
        abs(x - y)
        for pa, pb in zip(a, b, strict=True)
        for ca, cb in zip(pa.candidates, pb.candidates, strict=True)
        for x, y in zip(ca.logprobs, cb.logprobs, strict=True)
    ]
    return max(gaps, default=0.0)


class Background:
    """A call decoding in another thread (started before the calls under test, to keep the batch busy)."""

    def __init__(self, engine: ESampEngine, fn: Callable[[], GenerationResult]) -> None:
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None

        def work() -> None:
            try:
                self.result = fn()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=work)
        self.thread.start()
        scheduler = engine.scheduler
        assert scheduler is not None
        assert wait_for(lambda: scheduler.stats.rows_in_flight > 0, timeout=60)

    def join(self) -> GenerationResult:
        self.thread.join(timeout=300)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def concurrently(fns: list[Callable[[], GenerationResult]]) -> list[GenerationResult]:
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results


CONFIGS = {
    "greedy": (SamplingParams(n=1, max_new_tokens=12, temperature=0.0), PLAIN),
    "seeded-plain": (SamplingParams(n=2, max_new_tokens=12, seed=3), PLAIN),
    "seeded-esamp-topk": (SamplingParams(n=2, max_new_tokens=12, seed=5, top_k=50), ESampParams(beta=0.25)),
    "esamp-whole-vocabulary": (SamplingParams(n=2, max_new_tokens=12, seed=11, top_k=0), ESampParams(beta=0.25)),
    "stop-and-top-logprobs": (
        SamplingParams(n=2, max_new_tokens=12, seed=7, stop=("\n",), top_logprobs=3),
        ESampParams(beta=0.5),
    ),
}


def test_calls_that_join_a_busy_batch_get_what_they_get_alone(embedded, alone, batched) -> None:
    """Greedy, seeded plain sampling, seeded ESamp, stop strings and top logprobs: the very same
    tokens and texts with and without company; logprobs differ at most by float rounding."""
    questions = ["7 + 5 =", "Name a colour.", "A haiku?", "Why is the sky blue?", "Hi!"]
    prompts = {name: chat(embedded, q) for name, q in zip(CONFIGS, questions, strict=True)}
    reference = {name: alone.generate([prompts[name]], *CONFIGS[name], add_special_tokens=False) for name in CONFIGS}
    long_prompt = chat(embedded, "Tell me a long story about a dragon.")
    long_alone = alone.generate([long_prompt], LONG, PLAIN, add_special_tokens=False)

    background = Background(batched, lambda: batched.generate([long_prompt], LONG, PLAIN, add_special_tokens=False))
    joined = concurrently(
        [
            (lambda name=name: batched.generate([prompts[name]], *CONFIGS[name], add_special_tokens=False))
            for name in CONFIGS
        ]
    )
    long_joined = background.join()

    stats = batched.scheduler.stats  # type: ignore[union-attr]
    assert stats.joined_running >= len(CONFIGS) and stats.peak_jobs >= 3 and stats.rebuilds >= 1
    for name, result in zip(CONFIGS, joined, strict=True):
        assert outputs(result) == outputs(reference[name]), name
        assert max_logprob_gap(result, reference[name]) < 1e-3, name
    assert outputs(long_joined) == outputs(long_alone)
    assert [len(c.token_ids) for c in long_joined[0].candidates] == [24, 24]


def test_a_grammar_constrained_call_joins_a_plain_batch(embedded, alone, batched) -> None:
    colour = {"type": "string", "maxLength": 12}
    schema = {"type": "object", "properties": {"colour": colour}, "required": ["colour"], "additionalProperties": False}
    grammar = Grammar.json_schema(schema)
    prompt = chat(embedded, "Give a colour as JSON.")
    sp = SamplingParams(n=2, max_new_tokens=32, seed=2, temperature=0.7)
    reference = alone.generate([prompt], sp, PLAIN, add_special_tokens=False, grammar=grammar)

    long_prompt = chat(embedded, "Describe the sea.")
    background = Background(batched, lambda: batched.generate([long_prompt], LONG, PLAIN, add_special_tokens=False))
    result = batched.generate([prompt], sp, PLAIN, add_special_tokens=False, grammar=grammar)
    background.join()

    assert outputs(result) == outputs(reference)
    for c in result[0].candidates:
        if c.extras["constraint_satisfied"]:
            assert set(json.loads(c.text)) == {"colour"}


def test_cancelling_one_call_leaves_the_others_undisturbed(embedded, alone, batched) -> None:
    prompt = chat(embedded, "Name three fruits.")
    sp = SamplingParams(n=2, max_new_tokens=12, seed=4)
    reference = alone.generate([prompt], sp, PLAIN, add_special_tokens=False)
    cancel = threading.Event()
    steps: list[int] = []

    def cancel_after_three(p: int, s: int, delta: str) -> None:
        steps.append(1)
        if len(steps) >= 3:
            cancel.set()

    long_prompt = chat(embedded, "Write a poem.")
    background = Background(
        batched,
        lambda: batched.generate(
            [long_prompt], LONG, PLAIN, add_special_tokens=False, cancel=cancel, on_text=cancel_after_three
        ),
    )
    result = batched.generate([prompt], sp, PLAIN, add_special_tokens=False)
    cancelled = background.join()

    assert outputs(result) == outputs(reference)
    assert all(c.finish_reason == "length" and len(c.token_ids) < LONG.max_new_tokens for c in cancelled[0].candidates)


def test_a_failing_call_fails_alone(embedded, alone, batched) -> None:
    """An observer that raises fails its own call; the call beside it still completes, unchanged."""

    class Broken:
        layers = (-1,)

        def on_start(self, *args: Any) -> None:
            pass

        def on_step(self, step: int, *args: Any) -> None:
            if step == 3:
                raise RuntimeError("observer broke")

        def on_finish(self) -> None:
            pass

    prompt = chat(embedded, "Name a river.")
    sp = SamplingParams(n=1, max_new_tokens=16, seed=9)
    reference = alone.generate([prompt], sp, PLAIN, add_special_tokens=False)
    background = Background(batched, lambda: batched.generate([prompt], sp, PLAIN, add_special_tokens=False))
    with pytest.raises(RuntimeError, match="observer broke"):
        batched.generate([chat(embedded, "Hello")], LONG, PLAIN, add_special_tokens=False, observers=[Broken()])
    assert outputs(background.join()) == outputs(reference)


def test_the_row_cap_holds_and_a_call_larger_than_it_runs_alone(embedded) -> None:
    engine = ESampEngine(embedded, max_batch_rows=4)
    prompt = chat(embedded, "Say something.")
    three = SamplingParams(n=3, max_new_tokens=12, seed=1, ignore_eos=True)
    two = SamplingParams(n=2, max_new_tokens=8, seed=2, ignore_eos=True)
    concurrently(
        [
            lambda: engine.generate([prompt], three, PLAIN, add_special_tokens=False),
            lambda: engine.generate([prompt], two, PLAIN, add_special_tokens=False),
        ]
    )
    stats = engine.scheduler.stats  # type: ignore[union-attr]
    assert stats.peak_rows == 3 and stats.joined_running == 0  # 3 + 2 rows would pass the cap of 4
    big = engine.generate([prompt], SamplingParams(n=6, max_new_tokens=6, seed=1, ignore_eos=True), PLAIN)
    assert [len(c.token_ids) for c in big[0].candidates] == [6] * 6 and stats.peak_rows == 6
    assert stats.waiting == 0 and wait_for(lambda: stats.rows_in_flight == 0)


def test_batching_off_and_a_bad_row_cap_are_checked(embedded) -> None:
    assert ESampEngine(embedded, batching=False).scheduler is None
    with pytest.raises(ValueError, match="max_batch_rows"):
        ESampEngine(embedded, max_batch_rows=0)
    with pytest.raises(TypeError, match="batching"):
        ESampEngine(embedded, batching="yes")  # type: ignore[arg-type]


def test_a_lone_call_decodes_on_its_callers_thread_and_hands_longer_company_on(embedded, alone, batched) -> None:
    """The first call drives the loop on its own thread (no thread switch: GNU OpenMP throttles a
    second decoding thread's kernels, BENCHMARKS.md section 18); a longer call that joined goes on
    in a scheduler thread once the first returns, and still gets what it gets alone."""
    short, longer = chat(embedded, "Count to five."), chat(embedded, "Tell me about owls.")
    sp_short = SamplingParams(n=1, max_new_tokens=10, seed=1, ignore_eos=True)
    sp_long = SamplingParams(n=2, max_new_tokens=40, seed=2, ignore_eos=True)
    reference = alone.generate([longer], sp_long, PLAIN, add_special_tokens=False)
    threads: dict[str, list[threading.Thread]] = {"short": [], "long": []}

    def on(name: str) -> Callable[..., None]:
        return lambda *args: threads[name].append(threading.current_thread())

    background = Background(
        batched, lambda: batched.generate([short], sp_short, PLAIN, add_special_tokens=False, on_token=on("short"))
    )
    joined = batched.generate([longer], sp_long, PLAIN, add_special_tokens=False, on_token=on("long"))
    background.join()

    assert set(threads["short"]) == {background.thread}  # decoded where it was called
    drivers = list(dict.fromkeys(threads["long"]))  # in order of first appearance
    assert drivers[0] is background.thread and len(drivers) == 2 and drivers[1].name == "esamp-batch"
    assert outputs(joined) == outputs(reference)
    scheduler = batched.scheduler
    assert scheduler is not None and wait_for(lambda: not scheduler.on_scheduler_thread() and scheduler._thread is None)


def test_an_interrupt_on_the_driving_thread_fails_its_company_with_a_clear_error(
    embedded, batched, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C reaches the thread that drives the loop: that caller gets its KeyboardInterrupt,
    the call decoding beside it a RuntimeError that says so (the half-done step fails both), and
    the engine serves the next call."""
    original = _Batch.feed

    def interrupted_once(self: _Batch) -> None:
        if self.merged:  # the first forward of both calls together
            monkeypatch.setattr(_Batch, "feed", original)
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(_Batch, "feed", interrupted_once)
    background = Background(
        batched, lambda: batched.generate([chat(embedded, "A long story?")], LONG, PLAIN, add_special_tokens=False)
    )
    with pytest.raises(RuntimeError, match=r"interrupted \(KeyboardInterrupt\) on the thread driving it"):
        batched.generate([chat(embedded, "Hi")], LONG, PLAIN, add_special_tokens=False)
    with pytest.raises(KeyboardInterrupt):
        background.join()
    after = batched.generate([chat(embedded, "Hi")], SamplingParams(n=1, max_new_tokens=3, ignore_eos=True), PLAIN)
    assert len(after[0].candidates[0].token_ids) == 3
