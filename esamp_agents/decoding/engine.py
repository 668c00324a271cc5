"""The decode loop: P prompts x N samples in one batch, with optional ESamp.

One forward per step gives both taps ESamp needs (``hidden_states[1]``, the
output of block 1, and ``hidden_states[-1]``, the final-norm output) and the
states any :class:`DecodeObserver` asked for. Logits are computed here from the
final hidden state, so ESamp's bonus is projected through the LM head only for
the tokens that survive the sampling filters (see :mod:`esamp_agents.decoding.sampling`).

The loop reads top to bottom (:meth:`ESampEngine._decode`): prefill, then per new
token feed -> sample -> record -> retire, around one
:class:`~esamp_agents.decoding.state.DecodeState`. Per step, in the paper's
synchronous order: Distiller predicts -> fuse -> sample -> one Adam step on this
step's live rows. The step asks the device nothing it does not need: each host read
of a device value waits for all queued work, so the accelerator would idle while the
host launches the next step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.nn import functional as F
from transformers import StaticCache

from esamp_agents.constrained.grammar import Grammar
from esamp_agents.constrained.rows import row_constraints
from esamp_agents.decoding import cpu_matmul, fast_decode
from esamp_agents.decoding.batch_cache import cache_argument, repeat_cache_rows
from esamp_agents.decoding.distiller import BatchedDistiller
from esamp_agents.decoding.loading import LoadedModel, load_model
from esamp_agents.decoding.observers import DecodeObserver
from esamp_agents.decoding.params import DEFAULT_MAX_BATCH_ROWS, ESampParams, SamplingParams
from esamp_agents.decoding.results import GenerationResult, GenerationStats
from esamp_agents.decoding.sampling import Candidates, filter_candidates, log_normaliser, sample_positions
from esamp_agents.decoding.scheduler import BatchScheduler
from esamp_agents.decoding.state import (
    DecodeJob,
    DecodeState,
    Proposal,
    Request,
    RowConstraint,
    TextCallback,
    TokenCallback,
    Workspace,
)
from esamp_agents.decoding.streaming import StreamEvent, stream_events
from esamp_agents.decoding.text_tracking import TextTracker, host_text_step
from esamp_agents.validation import check_int

# When the candidates of all rows together number more than this share of the vocabulary,
# one dense projection reads less of the LM head than gathering each row's candidates.
DENSE_PROJECTION_SHARE = 0.5
# Without text tracking, an accelerator is asked "is any row still live?" only every this many
# steps: at most this many minus one steps run after the last row finished (their outputs are
# dropped: every row's outputs are cut at its length). On the CPU the question costs nothing.
LIVE_CHECK_EVERY = 8
_SHARED_LOCK = threading.Lock()
# Whether the Distiller's update runs beside the model's next forward (a side CUDA stream, a worker
# thread on the CPU) by default, per device type; the tokens are the same either way
# (BENCHMARKS.md section 14 measured the CPU choice).
OVERLAP_BY_DEFAULT = {"cuda": True, "cpu": False}


class ESampEngine:
    """Samples N candidates per prompt from a local causal LM, with Exploratory Sampling.

    >>> from esamp_agents import ESampParams, SamplingParams
    >>> engine = ESampEngine("embedded")  # doctest: +SKIP
    >>> sampling, esamp = SamplingParams(n=4, max_new_tokens=8), ESampParams(beta=0.25)
    >>> out = engine.generate(["2 + 2 ="], sampling, esamp)  # doctest: +SKIP
    >>> [c.text for c in out[0].candidates]  # doctest: +SKIP

    ``overlap_distiller``: run each Distiller update beside the model's next forward (a side CUDA
    stream; a worker thread on the CPU) instead of before it. The tokens are the same either way;
    None picks per device (:data:`OVERLAP_BY_DEFAULT`: on for CUDA, off for the CPU, where two
    cores gain nothing dependable from it: BENCHMARKS.md section 14).
    """

    def __init__(
        self,
        model: LoadedModel | str = "embedded",
        *,
        batching: bool = True,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        overlap_distiller: bool | None = None,
    ) -> None:
        if not isinstance(batching, bool):
            raise TypeError(f"batching={batching!r} must be True or False")
        if overlap_distiller is not None and not isinstance(overlap_distiller, bool):
            raise TypeError(f"overlap_distiller={overlap_distiller!r} must be True, False or None (auto)")
        check_int("max_batch_rows", max_batch_rows, 1)
        self.batching = batching
        self.max_batch_rows = max_batch_rows
        self._scheduler: BatchScheduler | None = None
        self._scheduler_lock = threading.Lock()
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self._base = self.loaded.model.base_model
        head = self.loaded.model.get_output_embeddings()
        self._head_weight: torch.Tensor = head.weight
        self._head_bias: torch.Tensor | None = getattr(head, "bias", None)
        self._softcap: float | None = getattr(self.loaded.config, "final_logit_softcapping", None)
        self._cache_name = cache_argument(self._base)
        self._decode_step = fast_decode.for_model(self.loaded.model)  # Llama decode steps without HF's module stack
        self._live_check_every: int | None = None  # None: every step on the CPU, LIVE_CHECK_EVERY elsewhere
        if overlap_distiller is None:
            overlap_distiller = OVERLAP_BY_DEFAULT.get(self.loaded.device.type, False)
        self.overlap_distiller = overlap_distiller

    @classmethod
    def shared(cls, loaded: LoadedModel) -> ESampEngine:
        """The one engine of ``loaded`` that every caller can share (LangChain classes use it), so
        their concurrent calls decode in one continuously batched decode."""
        with _SHARED_LOCK:
            engine = loaded.__dict__.get("_shared_engine")
            if engine is None:
                engine = cls(loaded)
                loaded.__dict__["_shared_engine"] = engine
            return engine

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
    def _logits(self, hidden: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """Final hidden [rows, d] -> LM-head logits [rows, vocab] in float32, before any soft cap.

        ``workspace``: float32 weights write into its ``logits`` buffer (the same matmul, no fresh
        [rows, vocab] tensor per step); other dtypes convert into a fresh float32 tensor."""
        weight, bias = self._head_weight, self._head_bias
        if workspace is None or weight.dtype != torch.float32 or hidden.dtype != torch.float32:
            return F.linear(hidden, weight, bias).float()
        out = workspace.get("logits", (hidden.shape[0], weight.shape[0]), torch.float32, hidden.device)
        return cpu_matmul.linear_into(hidden, weight, bias, out)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self._softcap:
            return torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _project(self, error: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """W . error for each row's candidate tokens, without a full vocabulary pass when
        the filters leave few candidates. Shapes alone pick the path (no data-dependent
        size such as a union of survivors, which would make the host wait for the device)."""
        weight = self._head_weight
        error = error.to(weight.dtype)
        if self._projects_densely(ids):
            dense = cpu_matmul.linear(error, weight).float()
            return dense if ids is None else dense.gather(-1, ids)
        rows_w = weight.index_select(0, ids.flatten()).view(*ids.shape, -1)  # [rows, k, d]
        return torch.bmm(rows_w, error.unsqueeze(-1)).squeeze(-1).float()

    def _fuse(
        self,
        raw_logits: torch.Tensor,
        cands: Candidates,
        error: torch.Tensor,
        beta: float,
        temperature: float,
        bonus: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of pi_ref^(1+beta) / q_dist^beta on the filter survivors.

        In logits: (1+beta) l_ref - beta l_dist = l_ref + beta W (h_L - f(h_1)); the
        LM-head bias cancels. Both terms are divided by the temperature. ``bonus``: W . error
        on the candidates when the caller projected it already (for several jobs at once).
        """
        keep = torch.isfinite(cands.scores)
        if bonus is None:
            bonus = self._project(error, cands.ids)
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

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[Any, Sequence[torch.Tensor]]:
        """One model call: (the KV cache to pass next time, every layer's hidden states)."""
        step = self._decode_step
        if step is not None and step.serves(input_ids, mask, cache):
            return step(input_ids, mask, positions, cache)
        out = self._base(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=True,
            **{self._cache_name: cache},
        )
        return getattr(out, self._cache_name), out.hidden_states

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
        grammar: Grammar | Sequence[Grammar | None] | None = None,
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """Sample ``sampling.n`` candidates for each prompt in one batched decode.

        ``on_text(prompt_index, sample_index, delta)`` receives text as it becomes
        final (never text that could still turn into a stop string); ``on_token(prompt_index,
        sample_index, token_id, logprob, top)`` every sampled token of a live row as it is drawn
        (``top``: its ``sampling.top_logprobs`` alternatives, else None). ``cancel``
        ends the request early; unfinished candidates then end with "length".
        ``grammar`` constrains the output: one :class:`Grammar` for every row, or a list
        with one entry (a Grammar or None) per prompt or per row (prompt-major). A
        constrained candidate's ``extras["constraint_satisfied"]`` says whether its text is
        complete under its grammar (False when ``max_new_tokens`` or a stop string cut it).
        """
        sampling = sampling or SamplingParams()
        esamp = esamp or ESampParams()
        encoded = self._prepare(prompts, sampling, add_special_tokens)
        self._check_observers(observers)
        constraints = self._constraints(grammar, len(encoded), sampling)
        scheduler = self.scheduler
        if scheduler is None or scheduler.on_scheduler_thread():  # alone (or nested in a callback)
            with self.loaded.lock, torch.no_grad():
                return self._decode(encoded, sampling, esamp, observers, on_text, cancel, constraints, on_token)
        cancel = cancel or threading.Event()  # so an interrupted wait can cancel the job
        return scheduler.run(DecodeJob(encoded, sampling, esamp, observers, on_text, cancel, constraints, on_token))

    @property
    def uses_lean_decode_step(self) -> bool:
        """Whether decode steps run :class:`~esamp_agents.decoding.fast_decode.LlamaDecodeStep`, not HF's forward."""
        return self._decode_step is not None

    @property
    def scheduler(self) -> BatchScheduler | None:
        """The continuous-batching scheduler concurrent calls share (None with ``batching=False``)."""
        if not self.batching:
            return None
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = BatchScheduler(self, self.max_batch_rows)
            return self._scheduler

    def _constraints(
        self, grammar: Grammar | Sequence[Grammar | None] | None, prompts: int, sampling: SamplingParams
    ) -> tuple[RowConstraint, ...]:
        return row_constraints(grammar, prompts, sampling.n, self.loaded)

    def _decode(
        self,
        encoded: list[list[int]],
        sampling: SamplingParams,
        esamp: ESampParams,
        observers: Sequence[DecodeObserver],
        on_text: TextCallback | None,
        cancel: threading.Event | None,
        constraints: Sequence[RowConstraint] = (),
        on_token: TokenCallback | None = None,
    ) -> GenerationResult:
        """One call decoded alone on this thread: prefill, then one step per new token until every
        row has finished (the scheduler runs the very same steps for many calls at once)."""
        job = DecodeJob(encoded, sampling, esamp, observers, on_text, cancel, constraints, on_token)
        self._start(job)
        while not self._step(job):
            assert job.state is not None
            self._feed(job.state, job.tokens)
        return self._complete(job)

    def _start(self, job: DecodeJob) -> None:
        """Prefill the job's prompts (its state holds the logits' hidden states for the first token)."""
        job.state = self._prefill(
            job.encoded, job.sampling, job.esamp, job.observers, job.on_text, job.constraints, job.on_token
        )
        for obs in job.observers:
            obs.on_start(len(job.encoded), job.sampling.n, self.loaded.hidden_size)
        job.live_check_every = self._live_check_every or (1 if self.loaded.device.type == "cpu" else LIVE_CHECK_EVERY)
        job.decode_started = time.perf_counter()

    def _step(self, job: DecodeJob, proposal: Proposal | None = None) -> bool:
        """Sample -> record -> retire one token per row of ``job``; True when the job is finished.

        ``proposal``: the step up to ESamp's bonus when the caller prepared it (the scheduler does,
        to compute every job's logits and dense bonus in one projection each); None: here."""
        state, sampling = job.state, job.sampling
        assert state is not None
        if proposal is None:
            proposal = self._propose(state, sampling)
        tokens = self._draw(state, sampling, job.esamp, proposal)
        self._record(state, tokens, proposal.model_logits, proposal.loss, sampling, job.observers)
        self._retire(state, tokens, job.on_text, sampling.n, job.on_token)
        job.tokens = tokens
        last = state.step + 1 == sampling.max_new_tokens
        cancelled = job.cancel is not None and job.cancel.is_set()
        return last or cancelled or self._all_finished(state, job.live_check_every)

    def _complete(self, job: DecodeJob) -> GenerationResult:
        """The finished job's result (everything moves to the host once)."""
        assert job.state is not None
        for obs in job.observers:
            obs.on_finish()
        return self._finish(job.state, job.sampling, job.on_text, time.perf_counter() - job.decode_started)

    # ------------------------------------------------------------------ prefill
    def _prefill(
        self,
        encoded: list[list[int]],
        sampling: SamplingParams,
        esamp: ESampParams,
        observers: Sequence[DecodeObserver],
        on_text: TextCallback | None,
        constraints: Sequence[RowConstraint],
        on_token: TokenCallback | None = None,
    ) -> DecodeState:
        """Prefill the P prompts once (left padding), build the Distillers, then repeat the cache N times."""
        loaded = self.loaded
        device = loaded.device
        n, num_prompts = sampling.n, len(encoded)
        rows, d, pad = num_prompts * n, loaded.hidden_size, loaded.pad_token_id
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator(device=device).manual_seed(seed)
        eos_ids = frozenset([-1] if sampling.ignore_eos else (loaded.eos_token_ids or [-1]))
        n_states = loaded.num_layers + 1
        taps = {1, n_states - 1, *(layer % n_states for obs in observers for layer in obs.layers)}
        listening = on_text is not None or on_token is not None
        tracker = TextTracker(loaded.tokenizer, rows, sampling.stop, streaming=listening)

        t0 = time.perf_counter()
        max_len = max(len(ids) for ids in encoded)
        input_ids = torch.full((num_prompts, max_len), pad, dtype=torch.long, device=device)
        mask = torch.zeros((num_prompts, max_len + sampling.max_new_tokens), dtype=torch.long, device=device)
        for i, ids in enumerate(encoded):
            input_ids[i, max_len - len(ids) :] = torch.tensor(ids, device=device)
            mask[i, max_len - len(ids) :] = 1  # generated positions are always attended
        prefill_mask = mask[:, :max_len]
        positions = (prefill_mask.cumsum(-1) - 1).clamp(min=0)
        cache, hidden_states = self._forward(input_ids, prefill_mask, positions, self._new_cache(mask.shape[1]))

        distiller: BatchedDistiller | None = None
        groups = 1 if esamp.shared_distiller else num_prompts  # Distillers: one per prompt, or one for all
        distiller_seconds = 0.0
        if esamp.enabled and not sampling.greedy:
            t_d = time.perf_counter()
            init_gen = torch.Generator().manual_seed(seed ^ 0x5EED)
            distiller = BatchedDistiller(
                groups, d, esamp, device=device, generator=init_gen, overlap=self.overlap_distiller
            )
            if esamp.warm_start_steps:
                distiller.warm_start(
                    hidden_states[1].float().reshape(groups, -1, d),
                    hidden_states[-1].float().reshape(groups, -1, d),
                    prefill_mask.bool().reshape(groups, -1),
                    esamp.warm_start_steps,
                    esamp.warm_start_lr,
                )
            distiller_seconds += time.perf_counter() - t_d

        hidden = {i: hidden_states[i][:, -1].repeat_interleave(n, 0) for i in taps}
        if n > 1:
            repeat_cache_rows(cache, n)
        del hidden_states
        return DecodeState(
            requests=[Request(i, ids, range(i * n, (i + 1) * n)) for i, ids in enumerate(encoded)],
            cache=cache,
            mask=mask.repeat_interleave(n, 0),
            positions=positions[:, -1].repeat_interleave(n, 0) + 1,
            width=max_len,
            hidden=hidden,
            generator=generator,
            eos_ids=eos_ids,
            eos=torch.tensor(sorted(eos_ids), device=device),
            tracker=tracker,
            distiller=distiller,
            groups=groups,
            live=torch.ones(rows, dtype=torch.bool, device=device),
            lengths=torch.zeros(rows, dtype=torch.long, device=device),
            stopped_by_string=torch.zeros(rows, dtype=torch.bool, device=device),
            completed=torch.zeros(rows, dtype=torch.bool, device=device),
            host_live=[True] * rows if tracker.active else None,
            constraints=tuple(constraints),
            prefill_seconds=time.perf_counter() - t0,
            distiller_seconds=distiller_seconds,
        )

    # ------------------------------------------------------------------ one step
    def _feed(self, state: DecodeState, tokens: torch.Tensor) -> None:
        """Run the model on the tokens just sampled (pad for finished rows); keep the tapped states."""
        next_input = torch.where(state.live, tokens, torch.full_like(tokens, self.loaded.pad_token_id))
        state.width += 1
        state.cache, hidden_states = self._forward(
            next_input.unsqueeze(-1), state.mask[:, : state.width], state.positions.unsqueeze(-1), state.cache
        )
        state.hidden = {i: hidden_states[i][:, -1] for i in state.hidden}
        state.positions = state.positions + 1
        state.step += 1

    def _propose(
        self,
        state: DecodeState,
        sampling: SamplingParams,
        raw_logits: torch.Tensor | None = None,
    ) -> Proposal:
        """logits -> row constraints -> filters -> (ESamp) the Distiller's error: everything before the bonus.

        The logprobs are read from the model's logits (before any constraint, as before any filter)."""
        h_final = state.hidden[self.loaded.num_layers]
        if raw_logits is None:
            raw_logits = self._logits(h_final, state.workspace)
        model_logits = logits = self._cap(raw_logits)
        for constraint in state.constraints:  # before the filters: fusion only touches finite survivors
            logits = constraint.apply(logits)
        if sampling.greedy:
            return Proposal(model_logits, raw_logits, greedy=logits.argmax(-1))
        cands = filter_candidates(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        proposal = Proposal(model_logits, raw_logits, cands=cands)
        if state.distiller is not None and state.step > 0:
            t_d = time.perf_counter()
            groups, d = state.groups, self.loaded.hidden_size
            pred, novelty, proposal.loss = state.distiller.predict_and_loss(
                state.hidden[1].float().view(groups, -1, d),
                h_final.float().view(groups, -1, d),
                state.live.view(groups, -1),
            )
            proposal.error = h_final.float() - pred.detach().view(state.rows, d)
            state.record.novelty.append(novelty.view(state.rows))
            state.distiller_seconds += time.perf_counter() - t_d
        return proposal

    def _projects_densely(self, ids: torch.Tensor | None) -> bool:
        """Whether :meth:`_project` projects the whole vocabulary for candidates ``ids``."""
        return ids is None or ids.numel() > DENSE_PROJECTION_SHARE * self._head_weight.shape[0]

    def _dense_bonus(self, proposal: Proposal) -> bool:
        """Whether this proposal's bonus needs the whole vocabulary projected."""
        return proposal.error is not None and proposal.cands is not None and self._projects_densely(proposal.cands.ids)

    def _draw(
        self, state: DecodeState, sampling: SamplingParams, esamp: ESampParams, proposal: Proposal
    ) -> torch.Tensor:
        """ESamp's bonus on the filter survivors (when there is an error), then one token per row."""
        if proposal.greedy is not None:
            return proposal.greedy
        cands = proposal.cands
        assert cands is not None
        scores = cands.scores
        if proposal.error is not None:
            t_d = time.perf_counter()
            scores = self._fuse(proposal.raw_logits, cands, proposal.error, esamp.beta, sampling.temperature,
                                bonus=proposal.bonus)  # fmt: skip
            state.distiller_seconds += time.perf_counter() - t_d
        return cands.vocab_ids(sample_positions(scores, state.generator))

    def _record(
        self,
        state: DecodeState,
        tokens: torch.Tensor,
        logits: torch.Tensor,
        loss: torch.Tensor | None,
        sampling: SamplingParams,
        observers: Sequence[DecodeObserver],
    ) -> None:
        """Keep the step's outputs (on the device), tell the observers, train the Distiller one step."""
        record = state.record
        log_z = log_normaliser(logits, state.workspace.get("exp", tuple(logits.shape), logits.dtype, logits.device))
        record.logprobs.append((logits.gather(-1, tokens.unsqueeze(-1)) - log_z).squeeze(-1))
        if sampling.top_logprobs:
            top_values, top_ids = logits.topk(sampling.top_logprobs, dim=-1)
            record.top.append((top_ids, top_values - log_z))
        record.tokens.append(tokens)
        n_states = self.loaded.num_layers + 1
        for obs in observers:
            obs.on_step(state.step, {layer: state.hidden[layer % n_states] for layer in obs.layers}, tokens, state.live)
        if loss is not None and state.distiller is not None:
            t_d = time.perf_counter()
            state.distiller.step()
            record.loss.append(loss)
            state.distiller_seconds += time.perf_counter() - t_d

    def _retire(
        self,
        state: DecodeState,
        tokens: torch.Tensor,
        on_text: TextCallback | None,
        n: int,
        on_token: TokenCallback | None = None,
    ) -> None:
        """Rows that just emitted an end token, completed a stop string or satisfied a constraint finish."""
        state.lengths += state.live
        finished = state.live & torch.isin(tokens, state.eos)
        for constraint in state.constraints:
            done = constraint.advance(tokens, state.live)
            if done is not None:
                state.completed |= state.live & done & ~finished
                finished |= state.live & done
        if state.host_live is not None:
            host_done = finished.tolist() if state.constraints else None
            stopped = host_text_step(state, tokens, host_done, on_text, n, on_token)
            if stopped is not None:
                finished |= stopped
        state.live = state.live & ~finished

    def _all_finished(self, state: DecodeState, every: int) -> bool:
        """Whether no row is live. From the host copy when there is one; otherwise the device
        is asked only every ``every`` steps (each ask waits for the queued work to finish)."""
        if state.host_live is not None:
            return not any(state.host_live)
        if (state.step + 1) % every:
            return False
        return not bool(state.live.any())

    # ------------------------------------------------------------------ finish
    def _finish(
        self, state: DecodeState, sampling: SamplingParams, on_text: TextCallback | None, decode_seconds: float
    ) -> GenerationResult:
        if state.distiller is not None:
            state.distiller.wait()  # an overlapped last update's error surfaces here, not later
        lengths = state.lengths.tolist()
        results = state.results(sampling, on_text, lengths)
        stats = GenerationStats(
            prompts=len(state.requests),
            samples_per_prompt=sampling.n,
            # every step ran with at least one live row, so the longest row counts the steps
            decode_steps=max(lengths),
            generated_tokens=sum(lengths),
            prefill_seconds=state.prefill_seconds,
            decode_seconds=decode_seconds,
            distiller_seconds=state.distiller_seconds,
        )
        return GenerationResult(results=results, stats=stats)

    # ------------------------------------------------------------------ streaming
    def stream(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        esamp: ESampParams | None = None,
        *,
        observers: Sequence[DecodeObserver] = (),
        add_special_tokens: bool = True,
        grammar: Grammar | None = None,
    ) -> Iterator[StreamEvent]:
        """Stream one candidate's text (``sampling.n`` must be 1). Validation errors are
        raised here, before the first event; closing the iterator cancels decoding."""
        sampling = sampling or SamplingParams()
        if sampling.n != 1:
            raise ValueError(f"n={sampling.n} cannot be streamed; allowed: n=1 (use generate() for n > 1)")
        esamp = esamp or ESampParams()
        encoded = self._prepare([prompt], sampling, add_special_tokens)
        self._check_observers(observers)
        if grammar is not None:
            self._constraints(grammar, 1, sampling)  # a bad grammar fails here, before the first event
        return stream_events(self, encoded[0], sampling, esamp, observers, grammar)
