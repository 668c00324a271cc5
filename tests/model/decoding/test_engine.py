"""The decode loop on the real embedded model."""

from __future__ import annotations

import pytest
import torch

from esamp_agents import ESampParams, SamplingParams
from esamp_agents.decoding.engine import ESampEngine
from esamp_agents.decoding.sampling import filter_candidates

PLAIN = ESampParams(beta=0.0)


@pytest.fixture(scope="module")
def chat_prompt(embedded) -> str:
    return embedded.apply_chat_template([{"role": "user", "content": "What is 3 + 4? Answer briefly."}])


def tokens_of(result) -> list[list[int]]:
    return [c.token_ids for pr in result for c in pr.candidates]


def test_plain_sampling_matches_hf_generate_tokens(engine: ESampEngine, embedded) -> None:
    """Same seed, same filters (full vocabulary): the very same tokens as HF generate."""
    prompt = "The three primary colours are"
    ids = engine.tokenize(prompt)
    ours = engine.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0.8, top_k=0, seed=11), PLAIN)
    torch.manual_seed(11)
    hf = embedded.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=16, pad_token_id=embedded.pad_token_id,
    )  # fmt: skip
    hf_new = hf[0, len(ids) :].tolist()
    cand = ours[0].candidates[0]
    assert cand.token_ids == hf_new[: len(cand.token_ids)]


def test_beta_zero_fusion_is_exactly_plain(engine: ESampEngine) -> None:
    """With beta = 0 the fused scores equal the plain scores bit for bit, so the same
    seed samples the same tokens whatever the Distiller predicts."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, engine.loaded.hidden_size, generator=g)
    raw = engine._logits(hidden)
    error = torch.randn(3, engine.loaded.hidden_size, generator=g) * 10
    for top_k, top_p in ((50, 1.0), (0, 1.0), (0, 0.9)):
        cands = filter_candidates(raw, 0.7, top_k, top_p, 0.0)
        fused = engine._fuse(raw, cands, error, 0.0, 0.7)
        assert torch.equal(fused, cands.scores)


def test_beta_zero_run_is_reproducible_and_builds_no_distiller(engine: ESampEngine, chat_prompt: str) -> None:
    sp = SamplingParams(n=3, max_new_tokens=12, seed=5)
    a = engine.generate([chat_prompt], sp, PLAIN, add_special_tokens=False)
    b = engine.generate([chat_prompt], sp, PLAIN, add_special_tokens=False)
    assert tokens_of(a) == tokens_of(b)
    assert a.stats.distiller_seconds == 0.0
    assert all(c.novelty is None for c in a[0].candidates) and a[0].distiller_loss == []


def test_esamp_bonus_only_on_survivors_and_sparse_equals_dense(engine: ESampEngine) -> None:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, engine.loaded.hidden_size, generator=g)
    error = torch.randn(4, engine.loaded.hidden_size, generator=g)
    raw = engine._logits(hidden)
    dense_bonus = torch.nn.functional.linear(error, engine._head_weight)
    cands = filter_candidates(raw, 0.7, 50, 0.95, 0.0)
    fused = engine._fuse(raw, cands, error, 0.25, 0.7)
    keep = torch.isfinite(cands.scores)
    expected = ((1.25 * raw - 0.25 * (raw - dense_bonus)) / 0.7).gather(-1, cands.ids)
    torch.testing.assert_close(fused[keep], expected[keep], atol=1e-4, rtol=1e-5)
    assert torch.isinf(fused[~keep]).all()


def test_distiller_loss_falls_during_a_real_run(engine: ESampEngine, chat_prompt: str) -> None:
    sp = SamplingParams(n=4, max_new_tokens=40, seed=3, stop=("<|im_end|>",))
    out = engine.generate(  # the paper's fresh Distiller: it must learn from the decode alone
        [chat_prompt.replace("briefly", "in detail")], sp, ESampParams.paper(), add_special_tokens=False
    )
    losses = out[0].distiller_loss
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    cand = out[0].candidates[0]
    assert cand.novelty is not None and len(cand.novelty) == cand.completion_tokens
    assert cand.novelty[1] > 0


def test_candidates_carry_logprobs_counts_and_finish_reason(engine: ESampEngine, chat_prompt: str) -> None:
    sp = SamplingParams(n=2, max_new_tokens=10, seed=2, top_logprobs=3)
    out = engine.generate([chat_prompt, "Once upon a time"], sp, ESampParams(beta=0.25), add_special_tokens=False)
    assert len(out) == 2 and all(len(pr.candidates) == 2 for pr in out)
    for pr in out:
        for c in pr.candidates:
            assert 1 <= c.completion_tokens <= 10
            assert len(c.logprobs) == c.completion_tokens and all(lp <= 0 for lp in c.logprobs)
            assert c.top_logprobs is not None and all(len(t) == 3 for t in c.top_logprobs)
            # the chosen token's logprob is at most the best top logprob
            assert all(lp <= top[0][1] + 1e-5 for lp, top in zip(c.logprobs, c.top_logprobs, strict=True))
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "length":
                assert c.completion_tokens == 10
            assert c.prompt_tokens == len(pr.prompt_token_ids)
    assert out.stats.generated_tokens == sum(c.completion_tokens for pr in out for c in pr.candidates)


def test_multi_token_stop_string_is_cut(engine: ESampEngine) -> None:
    prompt = "Count: 1, 2, 3, 4,"
    out = engine.generate([prompt], SamplingParams(n=2, max_new_tokens=20, temperature=0.0, stop=(" 7, 8",)), PLAIN)
    cand = out[0].candidates[0]
    assert cand.finish_reason == "stop" and cand.stop_sequence == " 7, 8"
    assert cand.text == " 5, 6,", cand.text
    assert "7" not in cand.text


def test_streamed_text_equals_the_final_text(engine: ESampEngine) -> None:
    events = list(engine.stream("Count: 1, 2, 3,", SamplingParams(max_new_tokens=14, seed=0, stop=(" 9",))))
    final = events[-1].candidate
    assert final is not None
    assert "".join(e.text for e in events) == final.text
    assert len(events) > 3


def test_observer_sees_the_states_that_produced_each_token(engine: ESampEngine) -> None:
    class Recorder:
        layers = (1, -1)

        def __init__(self) -> None:
            self.steps: list[tuple[int, dict[int, torch.Tensor], torch.Tensor, torch.Tensor]] = []
            self.started = self.finished = False

        def on_start(self, num_prompts: int, samples_per_prompt: int, hidden_size: int) -> None:
            self.started = (num_prompts, samples_per_prompt, hidden_size) == (1, 2, 576)

        def on_step(self, step, hidden, token_ids, live) -> None:  # type: ignore[no-untyped-def]
            self.steps.append((step, {k: v.clone() for k, v in hidden.items()}, token_ids.clone(), live.clone()))

        def on_finish(self) -> None:
            self.finished = True

    rec = Recorder()
    out = engine.generate(["Hello, my name is"], SamplingParams(n=2, max_new_tokens=8, seed=4), PLAIN, observers=[rec])
    assert rec.started and rec.finished
    cand = out[0].candidates[0]
    assert len(rec.steps) >= cand.completion_tokens
    for t, (step, hidden, token_ids, live) in enumerate(rec.steps[: cand.completion_tokens]):
        assert step == t and hidden[1].shape == (2, 576) and bool(live[0])
        logprob = torch.log_softmax(engine._logits(hidden[-1]), -1)[0, token_ids[0]]
        assert abs(logprob.item() - cand.logprobs[t]) < 1e-4


def test_bad_prompts_fail_before_decoding(engine: ESampEngine) -> None:
    with pytest.raises(ValueError, match="empty"):
        engine.generate(["  "], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompts=\\[\\] is empty"):
        engine.generate([], SamplingParams(max_new_tokens=2))
    with pytest.raises(TypeError, match="single prompt"):
        engine.generate("a bare string", SamplingParams(max_new_tokens=2))  # type: ignore[arg-type]
    window = engine.loaded.context_window
    with pytest.raises(ValueError, match=f"context window of {window}"):
        engine.generate([[1] * window], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[10**9]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="n=2 cannot be streamed"):
        engine.stream("hi", SamplingParams(n=2))


def test_left_padding_does_not_change_greedy_output(engine: ESampEngine) -> None:
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    alone = engine.generate(["The sky is"], greedy, PLAIN)[0].candidates[0].token_ids
    batched = engine.generate(["Write one long sentence about the history of Rome:", "The sky is"], greedy, PLAIN)
    assert batched[1].candidates[0].token_ids == alone


def _outputs(result) -> list[tuple]:
    """Everything a candidate carries, comparable with == (the first novelty is NaN)."""
    return [
        (c.token_ids, c.logprobs, c.novelty and c.novelty[1:], c.finish_reason, c.text, pr.distiller_loss)
        for pr in result
        for c in pr.candidates
    ]


def test_seeded_esamp_tokens_are_pinned(engine: ESampEngine, embedded) -> None:
    """Seeded ESamp with the defaults (warm start included) samples the tokens the loop sampled
    before it was split into prefill/step/finish. Re-record if torch's CPU kernels change."""
    ids = embedded.chat_token_ids([{"role": "user", "content": "What is 17 * 23? Think step by step."}])
    out = engine.generate([ids], SamplingParams(n=4, max_new_tokens=12, seed=5), ESampParams())
    assert [c.token_ids for c in out[0].candidates] == [
        [2068, 7529, 216, 33, 39, 1672, 216, 34, 35, 28, 1066, 623],
        [2068, 7529, 216, 33, 39, 1672, 216, 34, 35, 28, 1066, 623],
        [33, 39, 1672, 216, 34, 35, 446, 216, 35, 40, 33, 198],
        [2068, 5482, 451, 28, 339, 523, 1477, 260, 4953, 282, 17385, 411],
    ]
    assert out[0].candidates[0].logprobs[:2] == pytest.approx([-1.2011, -1.0729], abs=1e-4)


def test_the_lean_decode_step_samples_what_hf_forward_samples(engine: ESampEngine, chat_prompt: str) -> None:
    """The embedded model (Llama architecture) decodes through the lean step; HF's forward, on the
    same seed, samples the same tokens with the same log-probabilities, ESamp on."""
    from esamp_agents.decoding import fast_decode

    assert engine.uses_lean_decode_step
    sp = SamplingParams(n=3, max_new_tokens=12, seed=9)
    lean = engine.generate([chat_prompt, "Name a colour:"], sp, ESampParams(beta=0.3), add_special_tokens=False)
    with fast_decode.hf_forward():
        hf = engine.generate([chat_prompt, "Name a colour:"], sp, ESampParams(beta=0.3), add_special_tokens=False)
    assert tokens_of(lean) == tokens_of(hf)
    for a, b in zip(lean, hf, strict=True):
        for x, y in zip(a.candidates, b.candidates, strict=True):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_sparse_projection_equals_dense(engine: ESampEngine) -> None:
    g = torch.Generator().manual_seed(2)
    error = torch.randn(3, engine.loaded.hidden_size, generator=g)
    ids = torch.randint(0, engine.loaded.vocab_size, (3, 40), generator=g)
    dense = torch.nn.functional.linear(error, engine._head_weight).gather(-1, ids)
    torch.testing.assert_close(engine._project(error, ids), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine._project(error, None), torch.nn.functional.linear(error, engine._head_weight))


def test_rare_live_checks_and_text_tracking_change_nothing(engine: ESampEngine, embedded, chat_prompt: str) -> None:
    """Asking the device whether rows are live only every k steps, or reading it from the host
    copy that text tracking keeps, gives the very same candidates, steps and token counts."""
    sp = SamplingParams(n=3, max_new_tokens=40, seed=0)
    colour = embedded.apply_chat_template([{"role": "user", "content": "Name one colour. Answer with one word."}])
    prompts = [chat_prompt, colour]
    every_step = engine.generate(prompts, sp, ESampParams(), add_special_tokens=False)
    assert every_step.stats.decode_steps < 35  # every row ended early: the rare check runs steps past that
    engine._live_check_every = 7
    try:
        rarely = engine.generate(prompts, sp, ESampParams(), add_special_tokens=False)
    finally:
        engine._live_check_every = None
    tracked = engine.generate(prompts, sp, ESampParams(), add_special_tokens=False, on_text=lambda p, s, t: None)
    for other in (rarely, tracked):
        assert _outputs(other) == _outputs(every_step)
        assert other.stats.decode_steps == every_step.stats.decode_steps
        assert other.stats.generated_tokens == every_step.stats.generated_tokens


def test_row_constraint_masks_before_the_filters_and_finishes_rows(engine: ESampEngine) -> None:
    """The seam for constrained decoding: a forbidden token never comes back through ESamp's
    fusion, and a constraint can finish a row."""
    allowed_ids = (11, 12)

    class TwoTokensThenDone:
        def __init__(self) -> None:
            self.steps = 0

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(logits, dtype=torch.bool)
            mask[:, list(allowed_ids)] = True
            return logits.masked_fill(~mask, float("-inf"))

        def advance(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor | None:
            self.steps += 1
            return torch.full_like(live, self.steps >= 5)

    encoded = [engine.tokenize("Once upon a time")]
    sp = SamplingParams(n=3, max_new_tokens=10, seed=1, top_k=50)
    for esamp, on_text in ((ESampParams(beta=2.0), None), (PLAIN, None), (ESampParams(beta=2.0), lambda p, s, t: None)):
        with engine.loaded.lock, torch.no_grad():
            out = engine._decode(encoded, sp, esamp, (), on_text, None, constraints=[TwoTokensThenDone()])
        for c in out[0].candidates:
            assert len(c.token_ids) == 5 and set(c.token_ids) <= set(allowed_ids)


def test_on_token_reports_every_token_with_its_logprob_as_drawn(engine: ESampEngine, chat_prompt: str) -> None:
    """What streams of per-token logprobs read: the same tokens, logprobs and alternatives as the result."""
    seen: dict[tuple[int, int], list[tuple[int, float, list[tuple[int, float]] | None]]] = {}
    sp = SamplingParams(n=2, max_new_tokens=8, seed=3, top_logprobs=2)
    out = engine.generate(
        [chat_prompt], sp, ESampParams(beta=0.25), add_special_tokens=False,
        on_token=lambda p, s, token, lp, top: seen.setdefault((p, s), []).append((token, lp, top)),
    )  # fmt: skip
    for c in out[0].candidates:
        got = seen[(0, c.index)]
        assert [t for t, _, _ in got] == c.token_ids
        assert [lp for _, lp, _ in got] == pytest.approx(c.logprobs, abs=1e-6)
        assert [top for _, _, top in got] == [[(i, pytest.approx(v, abs=1e-6)) for i, v in t] for t in c.top_logprobs]


def test_overlapped_distiller_updates_sample_the_same_candidates(engine: ESampEngine, embedded) -> None:
    """The update beside the next forward (a worker thread here, a side stream on CUDA) trains on the
    same rows and is waited for before the next prediction: same tokens, novelty and losses."""
    prompts = [
        embedded.chat_token_ids([{"role": "user", "content": "What is 17 * 23? Think step by step."}]),
        embedded.chat_token_ids([{"role": "user", "content": "Name two colours."}]),
    ]
    sp = SamplingParams(n=3, max_new_tokens=16, seed=3)
    before = engine.overlap_distiller
    try:
        runs = {}
        for overlap in (False, True):
            engine.overlap_distiller = overlap
            runs[overlap] = engine.generate(prompts, sp, ESampParams(beta=0.25))
    finally:
        engine.overlap_distiller = before
    assert _outputs(runs[True]) == _outputs(runs[False])
    assert runs[True][0].distiller_loss  # ESamp really ran


def test_training_every_k_steps_first_updates_after_k_steps_and_overlaps_exactly(engine: ESampEngine, embedded) -> None:
    """distiller_update_every=4: the Distiller's first update comes after 4 predictions (so its
    second loss still comes from the warm-started weights, unlike every step's); overlapped or not,
    the same tokens."""
    prompts = [embedded.chat_token_ids([{"role": "user", "content": "What is 17 * 23? Think step by step."}])]
    sp = SamplingParams(n=2, max_new_tokens=12, seed=5)
    before = engine.overlap_distiller
    try:
        runs = {}
        for every, overlap in ((1, False), (4, False), (4, True)):
            engine.overlap_distiller = overlap
            runs[every, overlap] = engine.generate(prompts, sp, ESampParams(distiller_update_every=every))[0]
    finally:
        engine.overlap_distiller = before
    every_step, every_4 = runs[1, False].distiller_loss, runs[4, False].distiller_loss
    assert len(every_4) == len(every_step) == 11
    assert every_4[0] == pytest.approx(every_step[0], rel=1e-6)  # both before any online update
    assert every_4[1] != pytest.approx(every_step[1], rel=1e-6)  # every step: one update in already
    assert _outputs([runs[4, True]]) == _outputs([runs[4, False]])


def test_overlap_setting_is_checked() -> None:
    with pytest.raises(TypeError, match="overlap_distiller='yes' must be True, False or None"):
        ESampEngine("embedded", overlap_distiller="yes")  # type: ignore[arg-type]
