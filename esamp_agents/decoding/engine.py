"""The decode loop: P prompts x N samples in one batch, with optional ESamp.

One forward per step gives both taps ESamp needs (``hidden_states[1]``, the
output of block 1, and ``hidden_states[-1]``, the final-norm output) and the
states any :class:`DecodeObserver` asked for. Logits are computed here from the
final hidden state, so ESamp's bonus is projected through the LM head only for
the tokens that survive the sampling filters (see :mod:`esamp_agents.decoding.sampling`).

Per step, in the paper's synchronous order: Distiller predicts -> fuse ->
sample -> one Adam step on this step's live rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from transformers import StaticCache

from esamp_agents.decoding.distiller import BatchedDistiller
from esamp_agents.decoding.loading import LoadedModel, load_model
from esamp_agents.decoding.observers import DecodeObserver
from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.decoding.results import Candidate, GenerationResult, GenerationStats, PromptResult
from esamp_agents.decoding.sampling import Candidates, filter_candidates, sample_positions
from esamp_agents.decoding.text_tracking import TextTracker, cut_at_stop

TextCallback = Callable[[int, int, str], None]

# Above this share of the vocabulary, one dense projection is cheaper than gathering rows.
DENSE_PROJECTION_SHARE = 0.5


def _repeat_cache_rows(cache: Any, n: int) -> None:
    """Repeat every prompt's cached keys/values N times (prompt-major rows), so the
    prompt is prefilled once, not N times. Static layers have no such method yet."""
    if not isinstance(cache, StaticCache):
        cache.batch_repeat_interleave(n)
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys.repeat_interleave(n, dim=0)
            layer.values = layer.values.repeat_interleave(n, dim=0)
            layer.batch_size = layer.keys.shape[0]


@dataclass
class StreamEvent:
    """A piece of streamed text; the last event also carries the finished candidate."""

    text: str
    candidate: Candidate | None = None


class ESampEngine:
    """Samples N candidates per prompt from a local causal LM, with Exploratory Sampling.

    >>> from esamp_agents import ESampParams, SamplingParams
    >>> engine = ESampEngine("embedded")  # doctest: +SKIP
    >>> sampling, esamp = SamplingParams(n=4, max_new_tokens=8), ESampParams(beta=0.25)
    >>> out = engine.generate(["2 + 2 ="], sampling, esamp)  # doctest: +SKIP
    >>> [c.text for c in out[0].candidates]  # doctest: +SKIP
    """

    def __init__(self, model: LoadedModel | str = "embedded") -> None:
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self._base = self.loaded.model.base_model
        head = self.loaded.model.get_output_embeddings()
        self._head_weight: torch.Tensor = head.weight
        self._head_bias: torch.Tensor | None = getattr(head, "bias", None)
        self._softcap: float | None = getattr(self.loaded.config, "final_logit_softcapping", None)

    # ------------------------------------------------------------------ inputs
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.loaded.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_special_tokens=False))

    def _prepare(
        self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams, add_special_tokens: bool
    ) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of strings or token-id lists, not a single prompt")
        if len(prompts) == 0:
            raise ValueError("prompts=[] is empty; allowed: at least one prompt")
        window = self.loaded.context_window
        encoded: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ValueError(f"prompt {i} is empty ({prompt!r}); allowed: a non-blank string")
                ids = self.tokenize(prompt, add_special_tokens)
            else:
                if not all(isinstance(t, int) or (isinstance(t, torch.Tensor) and t.numel() == 1) for t in prompt):
                    raise TypeError(f"prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")
                ids = [int(t) for t in prompt]
                vocab = self.loaded.vocab_size
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            if not ids:
                raise ValueError(f"prompt {i} has no tokens; allowed: at least one token")
            if len(ids) + sampling.max_new_tokens > window:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens and max_new_tokens={sampling.max_new_tokens}: "
                    f"{len(ids) + sampling.max_new_tokens} exceeds the model's context window of {window} tokens; "
                    f"allowed: prompt tokens + max_new_tokens <= {window}"
                )
            encoded.append(ids)
        return encoded

    def _check_observers(self, observers: Sequence[DecodeObserver]) -> None:
        n_states = self.loaded.num_layers + 1
        for obs in observers:
            for layer in obs.layers:
                if not -n_states <= layer < n_states:
                    raise ValueError(
                        f"observer {type(obs).__name__} asks for layer {layer}; allowed: "
                        f"{-n_states} <= layer < {n_states} (0 = embeddings, {n_states - 1} = final norm)"
                    )

    # ------------------------------------------------------------------ logits
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden [rows, d] -> LM-head logits [rows, vocab] in float32, before any soft cap."""
        return F.linear(hidden, self._head_weight, self._head_bias).float()

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self._softcap:
            return torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _project(self, error: torch.Tensor, ids: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
        """W . error for each row's candidate tokens, without a full vocabulary pass when
        the filters leave few candidates (the union of survivors is projected once)."""
        weight = self._head_weight
        error = error.to(weight.dtype)
        if ids is None:
            return F.linear(error, weight).float()
        union = torch.unique(ids[keep])
        if union.numel() > DENSE_PROJECTION_SHARE * weight.shape[0]:
            return F.linear(error, weight).float().gather(-1, ids)
        projected = F.linear(error, weight.index_select(0, union)).float()  # [rows, |union|]
        where = torch.searchsorted(union, ids).clamp(max=union.numel() - 1)
        return projected.gather(-1, where)

    def _fuse(
        self, raw_logits: torch.Tensor, cands: Candidates, error: torch.Tensor, beta: float, temperature: float
    ) -> torch.Tensor:
        """Scores of pi_ref^(1+beta) / q_dist^beta on the filter survivors.

        In logits: (1+beta) l_ref - beta l_dist = l_ref + beta W (h_L - f(h_1)); the
        LM-head bias cancels. Both terms are divided by the temperature.
        """
        keep = torch.isfinite(cands.scores)
        bonus = self._project(error, cands.ids, keep)
        if self._softcap:  # Gemma-2 style capped logits: fuse before the cap
            raw = raw_logits if cands.ids is None else raw_logits.gather(-1, cands.ids)
            fused = self._cap(raw + beta * bonus) / temperature
        else:
            fused = cands.scores + (beta / temperature) * bonus
        return fused.masked_fill(~keep, float("-inf"))

    # ------------------------------------------------------------------ forward
    def _new_cache(self, max_len: int) -> Any:
        """A preallocated KV cache: a growing cache re-concatenates every layer's
        keys and values each step, which was half of CPU decode time at 4 x 16."""
        try:
            return StaticCache(config=self.loaded.config, max_cache_len=max_len)
        except (TypeError, ValueError, NotImplementedError):  # architectures without static-cache support
            return None

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        return self._base(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )

    # ------------------------------------------------------------------ main loop
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingParams | None = None,
        esamp: ESampParams | None = None,
        *,
        observers: Sequence[DecodeObserver] = (),
        on_text: TextCallback | None = None,
        add_special_tokens: bool = True,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Sample ``sampling.n`` candidates for each prompt in one batched decode.

        ``on_text(prompt_index, sample_index, delta)`` receives text as it becomes
        final (never text that could still turn into a stop string). ``cancel``
        ends the request early; unfinished candidates then end with "length".
        """
        sampling = sampling or SamplingParams()
        esamp = esamp or ESampParams()
        encoded = self._prepare(prompts, sampling, add_special_tokens)
        self._check_observers(observers)
        with self.loaded.lock, torch.no_grad():
            return self._decode(encoded, sampling, esamp, observers, on_text, cancel)

    def _decode(
        self,
        encoded: list[list[int]],
        sampling: SamplingParams,
        esamp: ESampParams,
        observers: Sequence[DecodeObserver],
        on_text: TextCallback | None,
        cancel: threading.Event | None,
    ) -> GenerationResult:
        loaded = self.loaded
        device = loaded.device
        n, num_prompts = sampling.n, len(encoded)
        rows = num_prompts * n
        d = loaded.hidden_size
        pad = loaded.pad_token_id
        greedy = sampling.greedy
        use_esamp = esamp.enabled and not greedy
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=device).manual_seed(seed)
        eos = torch.tensor([-1] if sampling.ignore_eos else (loaded.eos_token_ids or [-1]), device=device)
        n_states = loaded.num_layers + 1
        obs_layers = sorted({layer % n_states for obs in observers for layer in obs.layers})
        tracker = TextTracker(loaded.tokenizer, rows, sampling.stop, streaming=on_text is not None)

        # ---- prefill the P prompts once (left padding), then repeat the cache N times
        t0 = time.perf_counter()
        max_len = max(len(ids) for ids in encoded)
        input_ids = torch.full((num_prompts, max_len), pad, dtype=torch.long, device=device)
        total_len = max_len + sampling.max_new_tokens
        mask = torch.zeros((num_prompts, total_len), dtype=torch.long, device=device)
        for i, ids in enumerate(encoded):
            input_ids[i, max_len - len(ids) :] = torch.tensor(ids, device=device)
            mask[i, max_len - len(ids) :] = 1  # generated positions are always attended
        prefill_mask = mask[:, :max_len]
        positions = (prefill_mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(input_ids, prefill_mask, positions, self._new_cache(total_len))
        cache, hidden_states = out.past_key_values, out.hidden_states

        distiller: BatchedDistiller | None = None
        groups = 1 if esamp.shared_distiller else num_prompts  # Distillers: one per prompt, or one for all
        distiller_seconds = 0.0
        if use_esamp:
            t_d = time.perf_counter()
            init_gen = torch.Generator().manual_seed(seed ^ 0x5EED)
            distiller = BatchedDistiller(groups, d, esamp, device=device, generator=init_gen)
            if esamp.warm_start_steps:
                distiller.warm_start(
                    hidden_states[1].float().reshape(groups, -1, d),
                    hidden_states[-1].float().reshape(groups, -1, d),
                    prefill_mask.bool().reshape(groups, -1),
                    esamp.warm_start_steps,
                    esamp.warm_start_lr,
                )
            distiller_seconds += time.perf_counter() - t_d

        last = {i: hidden_states[i][:, -1].repeat_interleave(n, 0) for i in {1, n_states - 1, *obs_layers}}
        if n > 1:
            _repeat_cache_rows(cache, n)
        mask = mask.repeat_interleave(n, 0)
        next_pos = positions[:, -1].repeat_interleave(n, 0) + 1
        del out, hidden_states
        prefill_seconds = time.perf_counter() - t0

        for obs in observers:
            obs.on_start(num_prompts, n, d)

        live = torch.ones(rows, dtype=torch.bool, device=device)
        stopped_by_string = torch.zeros(rows, dtype=torch.bool, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        step_tokens: list[torch.Tensor] = []
        step_logprobs: list[torch.Tensor] = []
        step_top: list[tuple[torch.Tensor, torch.Tensor]] = []
        step_novelty: list[torch.Tensor] = []
        step_loss: list[torch.Tensor] = []
        want_top = sampling.top_logprobs

        next_input = torch.full((rows,), pad, dtype=torch.long, device=device)
        t1 = time.perf_counter()
        steps = 0
        for step in range(sampling.max_new_tokens):
            if step > 0:
                out = self._forward(next_input.unsqueeze(-1), mask[:, : max_len + step], next_pos.unsqueeze(-1), cache)
                cache = out.past_key_values
                last = {i: out.hidden_states[i][:, -1] for i in {1, n_states - 1, *obs_layers}}
                next_pos = next_pos + 1
                del out
            h_final = last[n_states - 1]
            raw_logits = self._logits(h_final)
            logits = self._cap(raw_logits)

            loss = None
            if greedy:
                tokens = logits.argmax(-1)
            else:
                cands = filter_candidates(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
                scores = cands.scores
                if distiller is not None and step > 0:
                    t_d = time.perf_counter()
                    pred, novelty, loss = distiller.predict_and_loss(
                        last[1].float().view(groups, -1, d),
                        h_final.float().view(groups, -1, d),
                        live.view(groups, -1),
                    )
                    error = h_final.float() - pred.detach().view(rows, d)
                    scores = self._fuse(raw_logits, cands, error, esamp.beta, sampling.temperature)
                    step_novelty.append(novelty.view(rows))
                    distiller_seconds += time.perf_counter() - t_d
                tokens = cands.vocab_ids(sample_positions(scores, generator))

            log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
            step_logprobs.append((logits.gather(-1, tokens.unsqueeze(-1)) - log_z).squeeze(-1))
            if want_top:
                top_values, top_ids = logits.topk(want_top, dim=-1)
                step_top.append((top_ids, top_values - log_z))
            step_tokens.append(tokens)
            for obs in observers:
                obs.on_step(step, {layer: last[layer % n_states] for layer in obs.layers}, tokens, live)

            if loss is not None and distiller is not None:
                t_d = time.perf_counter()
                distiller.step(loss)
                step_loss.append(loss.detach())
                distiller_seconds += time.perf_counter() - t_d

            lengths += live
            finished = live & torch.isin(tokens, eos)
            if tracker.active:
                self._track_text(tracker, tokens, live, finished, stopped_by_string, on_text, n)
                finished |= stopped_by_string
            live = live & ~finished
            steps = step + 1
            if not bool(live.any()) or (cancel is not None and cancel.is_set()):
                break
            next_input = torch.where(live, tokens, torch.full_like(tokens, pad))

        decode_seconds = time.perf_counter() - t1
        for obs in observers:
            obs.on_finish()

        results = self._collect(
            encoded, sampling, tracker, on_text, lengths, stopped_by_string,
            step_tokens, step_logprobs, step_top, step_novelty, step_loss, use_esamp,
        )  # fmt: skip
        stats = GenerationStats(
            prompts=num_prompts,
            samples_per_prompt=n,
            decode_steps=steps,
            generated_tokens=int(lengths.sum().item()),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            distiller_seconds=distiller_seconds,
        )
        return GenerationResult(results=results, stats=stats)

    @staticmethod
    def _track_text(
        tracker: TextTracker,
        tokens: torch.Tensor,
        live: torch.Tensor,
        finished: torch.Tensor,
        stopped_by_string: torch.Tensor,
        on_text: TextCallback | None,
        n: int,
    ) -> None:
        """Host-side text work, only for requests with stop strings or a listener."""
        host_tokens = tokens.tolist()
        host_live = live.tolist()
        host_finished = finished.tolist()
        for row, is_live in enumerate(host_live):
            if not is_live:
                continue
            if tracker.push(row, host_tokens[row]) and not host_finished[row]:
                stopped_by_string[row] = True
            elif on_text is not None and not host_finished[row]:
                delta = tracker.delta(row)
                if delta:
                    on_text(row // n, row % n, delta)

    def _collect(
        self,
        encoded: list[list[int]],
        sampling: SamplingParams,
        tracker: TextTracker,
        on_text: TextCallback | None,
        lengths: torch.Tensor,
        stopped_by_string: torch.Tensor,
        step_tokens: list[torch.Tensor],
        step_logprobs: list[torch.Tensor],
        step_top: list[tuple[torch.Tensor, torch.Tensor]],
        step_novelty: list[torch.Tensor],
        step_loss: list[torch.Tensor],
        use_esamp: bool,
    ) -> list[PromptResult]:
        """Move everything to the host once and build the candidates."""
        n = sampling.n
        tokens = torch.stack(step_tokens, 1).tolist()  # [rows, steps]
        logprobs = torch.stack(step_logprobs, 1).tolist()
        lengths_host = lengths.tolist()
        by_string = stopped_by_string.tolist()
        top_ids = top_lps = None
        if step_top:
            top_ids = torch.stack([t[0] for t in step_top], 1).tolist()  # [rows, steps, k]
            top_lps = torch.stack([t[1] for t in step_top], 1).tolist()
        novelty = None
        if use_esamp:
            first = [float("nan")] * len(tokens)
            later = torch.stack(step_novelty, 1).tolist() if step_novelty else [[] for _ in tokens]
            novelty = [[f, *rest] for f, rest in zip(first, later, strict=True)]
        losses = torch.stack(step_loss, 1).tolist() if step_loss else [[] for _ in encoded]
        if len(losses) == 1 < len(encoded):  # one shared Distiller: every prompt reports its curve
            losses = losses * len(encoded)
        eos = set(self.loaded.eos_token_ids)

        results: list[PromptResult] = []
        for p, prompt_ids in enumerate(encoded):
            candidates = []
            steps_live = 0
            for s in range(n):
                row = p * n + s
                length = lengths_host[row]
                steps_live = max(steps_live, length)
                ids = tokens[row][:length]
                text = tracker.decode(ids)
                stop_seq = None
                if by_string[row]:
                    text, stop_seq = cut_at_stop(text, sampling.stop)
                ended = by_string[row] or (not sampling.ignore_eos and length > 0 and ids[-1] in eos)
                if on_text is not None:
                    rest = tracker.delta(row, final_text=text)
                    if rest:
                        on_text(p, s, rest)
                candidates.append(
                    Candidate(
                        index=s,
                        text=text,
                        token_ids=ids,
                        logprobs=logprobs[row][:length],
                        finish_reason="stop" if ended else "length",
                        prompt_tokens=len(prompt_ids),
                        top_logprobs=(
                            [
                                list(zip(i, v, strict=True))
                                for i, v in zip(top_ids[row][:length], top_lps[row][:length], strict=True)
                            ]  # type: ignore[index]
                            if top_ids is not None
                            else None
                        ),
                        novelty=novelty[row][:length] if novelty is not None else None,
                        stop_sequence=stop_seq,
                    )
                )
            results.append(
                PromptResult(
                    prompt=tracker.decode(prompt_ids),
                    prompt_token_ids=prompt_ids,
                    candidates=candidates,
                    # decode steps >= 1 while any of this prompt's rows was live
                    distiller_loss=losses[p][: max(steps_live - 1, 0)] if use_esamp else [],
                )
            )
        return results

    # ------------------------------------------------------------------ streaming
    def stream(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        esamp: ESampParams | None = None,
        *,
        observers: Sequence[DecodeObserver] = (),
        add_special_tokens: bool = True,
    ) -> Iterator[StreamEvent]:
        """Stream one candidate's text (``sampling.n`` must be 1). Validation errors are
        raised here, before the first event; closing the iterator cancels decoding."""
        sampling = sampling or SamplingParams()
        if sampling.n != 1:
            raise ValueError(f"n={sampling.n} cannot be streamed; allowed: n=1 (use generate() for n > 1)")
        esamp = esamp or ESampParams()
        encoded = self._prepare([prompt], sampling, add_special_tokens)
        self._check_observers(observers)
        return self._stream_events(encoded[0], sampling, esamp, observers)

    def _stream_events(
        self, ids: list[int], sampling: SamplingParams, esamp: ESampParams, observers: Sequence[DecodeObserver]
    ) -> Iterator[StreamEvent]:
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                result = self.generate(
                    [ids], sampling, esamp, observers=observers, cancel=cancel,
                    on_text=lambda _p, _s, delta: events.put(("text", delta)),
                )  # fmt: skip
                events.put(("done", result[0].candidates[0]))
            except BaseException as exc:
                events.put(("error", exc))

        worker = threading.Thread(target=work, name="esamp-stream", daemon=True)
        worker.start()
        try:
            while True:
                kind, payload = events.get()
                if kind == "text":
                    yield StreamEvent(text=payload)
                elif kind == "done":
                    yield StreamEvent(text="", candidate=payload)
                    return
                else:
                    raise payload
        finally:
            cancel.set()
            worker.join()
