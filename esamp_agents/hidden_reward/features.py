"""Hidden-state features for the ELHSR reward: read while decoding, or recomputed post hoc.

Alignment (the same everywhere in this package): the feature of response token ``i`` is the
hidden state at the position that PRODUCED it, i.e. the prompt's last position for ``i = 0``
and the position of response token ``i - 1`` for ``i > 0`` (the end-of-turn token included).
This is what :class:`~esamp_agents.decoding.observers.DecodeObserver` receives from the engine, so
scores computed during decoding and post hoc agree (up to float noise), and the decode-time
path needs no extra forward pass. A post hoc pass therefore runs the model on
``prompt + response[:-1]`` and reads positions ``len(prompt) - 1 ... len(prompt) + len(response) - 2``.

Per token, the feature is ``hidden_states[l]`` for ``l`` in ``spec.layers`` (0 = embeddings,
``num_layers`` = final-norm output), concatenated in that order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from esamp_agents.decoding.loading import LoadedModel
from esamp_agents.hidden_reward.head import FeatureSpec, GatedLinearHead, GatedSums, check_compatible


def hidden_spec(loaded: LoadedModel, layers: Sequence[int] | Literal["all"] = "all") -> FeatureSpec:
    """The :class:`FeatureSpec` of ``layers`` of ``loaded`` (negative indices count from the end).

    ``"all"`` is the paper's default: every entry of ``hidden_states``, embeddings included.
    """
    n_states = loaded.num_layers + 1
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r} is not allowed; allowed: 'all' or a sequence of layer indices")
        chosen = list(range(n_states))
    else:
        chosen = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"layers entry {layer!r} must be an integer")
            if not -n_states <= layer < n_states:
                raise ValueError(
                    f"layers entry {layer} is out of range; allowed: {-n_states} <= layer < {n_states} "
                    f"(0 = embeddings, {n_states - 1} = final norm)"
                )
            chosen.append(layer % n_states)
        if not chosen:
            raise ValueError("layers=[] is empty; allowed: at least one layer index, or 'all'")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers={list(layers)!r} name the same layer twice (normalised: {chosen})")
    normalised = tuple(sorted(chosen))
    return FeatureSpec(
        kind="hidden",
        dim=len(normalised) * loaded.hidden_size,
        base_model=loaded.name,
        hidden_size=loaded.hidden_size,
        num_layers=loaded.num_layers,
        layers=normalised,
    )


def _check_hidden_spec(spec: FeatureSpec) -> None:
    if not isinstance(spec, FeatureSpec):
        raise ValueError(f"spec must be a FeatureSpec, got {type(spec).__name__}")
    if spec.kind != "hidden":
        raise ValueError(f"spec.kind={spec.kind!r}; hidden-state features need kind='hidden'")


def _check_model(spec: FeatureSpec, loaded: LoadedModel) -> None:
    check_compatible(spec, base_model=loaded.name, hidden_size=loaded.hidden_size, num_layers=loaded.num_layers)


def _concat(hidden: dict[int, Tensor], layers: tuple[int, ...]) -> Tensor:
    return torch.cat([hidden[layer] for layer in layers], dim=-1)


class TokenFeatureRecorder:
    """A :class:`~esamp_agents.decoding.observers.DecodeObserver` that keeps every candidate's token features.

    Only live tokens are kept (a finished row's padding steps are dropped), so each
    candidate's features have exactly ``len(candidate.token_ids)`` rows. Features are
    stored on ``device`` (CPU by default, so long runs do not hold accelerator memory) in
    ``dtype`` (float16 halves the memory; use float32 for exact comparisons).

    Steps are staged where the states are and moved ``FLUSH_EVERY`` at a time: picking the
    live rows (a data-dependent size) and copying to the host both make the host wait for
    the device, so doing it per step would stall the decode loop every step.
    """

    FLUSH_EVERY = 16

    def __init__(
        self, spec: FeatureSpec, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu"
    ) -> None:
        _check_hidden_spec(spec)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} must be a floating-point torch dtype")
        self.spec = spec
        self.layers: tuple[int, ...] = spec.layers
        self.dtype = dtype
        self.device = torch.device(device)
        self._num_prompts = 0
        self._n = 0
        self._chunks: list[Tensor] = []  # per flush: [live tokens, dim], step-major
        self._rows: list[Tensor] = []  # per flush: the row index of each kept feature
        self._staged: list[tuple[Tensor, Tensor]] = []  # unflushed steps: ([rows, dim], live [rows])

    def on_start(self, num_prompts: int, samples_per_prompt: int, hidden_size: int) -> None:
        if hidden_size != self.spec.hidden_size:
            raise ValueError(
                f"the model's hidden size is {hidden_size} but the feature spec has {self.spec.hidden_size}"
            )
        self._num_prompts, self._n = num_prompts, samples_per_prompt
        self._chunks, self._rows, self._staged = [], [], []

    def on_step(self, step: int, hidden: dict[int, Tensor], token_ids: Tensor, live: Tensor) -> None:
        self._staged.append((_concat(hidden, self.layers), live))
        if len(self._staged) >= self.FLUSH_EVERY:
            self._flush()

    def on_finish(self) -> None:
        self._flush()

    def _flush(self) -> None:
        """Keep the live rows of the staged steps (in step order) on ``device``."""
        if not self._staged:
            return
        x = torch.stack([s[0] for s in self._staged])  # [steps, rows, dim]
        live = torch.stack([s[1] for s in self._staged])  # [steps, rows]
        self._staged = []
        where = live.nonzero()  # (step, row) pairs, step-major
        self._chunks.append(x[where[:, 0], where[:, 1]].to(device=self.device, dtype=self.dtype))
        self._rows.append(where[:, 1].to(self.device))

    def features(self) -> list[list[Tensor]]:
        """``[prompt][sample]`` -> ``[T_i, dim]``, ``T_i == len(candidate.token_ids)``."""
        self._flush()
        total_rows = self._num_prompts * self._n
        if not self._chunks:
            empty = torch.zeros((0, self.spec.dim), dtype=self.dtype, device=self.device)
            return [[empty for _ in range(self._n)] for _ in range(self._num_prompts)]
        feats = torch.cat(self._chunks)
        rows = torch.cat(self._rows)
        order = torch.sort(rows, stable=True).indices  # row-major, steps in order within a row
        counts = torch.bincount(rows, minlength=total_rows).tolist()
        per_row = feats.index_select(0, order).split(counts)
        return [list(per_row[p * self._n : (p + 1) * self._n]) for p in range(self._num_prompts)]


class RewardObserver:
    """A :class:`~esamp_agents.decoding.observers.DecodeObserver` that scores candidates while they are written.

    Keeps only the running gated sums of :class:`~esamp_agents.hidden_reward.head.GatedSums`
    (a few numbers per row), so memory does not grow with the number of steps; a row's
    sums stop changing once it has finished.
    """

    def __init__(self, head: GatedLinearHead) -> None:
        if not isinstance(head, GatedLinearHead):
            raise ValueError(f"head must be a GatedLinearHead, got {type(head).__name__}")
        _check_hidden_spec(head.spec)
        self.head = head
        self.layers: tuple[int, ...] = head.spec.layers
        self._n = 0
        self._num_prompts = 0
        self.sums: GatedSums | None = None

    def on_start(self, num_prompts: int, samples_per_prompt: int, hidden_size: int) -> None:
        if hidden_size != self.head.spec.hidden_size:
            raise ValueError(
                f"the model's hidden size is {hidden_size} but the reward head reads hidden size "
                f"{self.head.spec.hidden_size} ({self.head.spec.describe_model()})"
            )
        self._num_prompts, self._n = num_prompts, samples_per_prompt
        self.sums = GatedSums(self.head, num_prompts * samples_per_prompt)

    def on_step(self, step: int, hidden: dict[int, Tensor], token_ids: Tensor, live: Tensor) -> None:
        assert self.sums is not None, "on_start was not called"
        self.sums.update(_concat(hidden, self.layers), live)

    def on_finish(self) -> None:
        pass

    def rewards(self) -> list[list[float]]:
        """``[prompt][sample]`` rewards of the last decode (0.0 for a candidate without tokens)."""
        if self.sums is None:
            raise RuntimeError(
                "no decode has been observed yet: pass this observer to engine.generate(observers=[...])"
            )
        flat = self.sums.rewards().tolist()
        return [flat[p * self._n : (p + 1) * self._n] for p in range(self._num_prompts)]


# --------------------------------------------------------------------------- post hoc


def _check_pairs(
    loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], batch_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is out of range; allowed: an integer >= 1")
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses; they must pair up")
    vocab, window = loaded.vocab_size, loaded.context_window
    prompts, responses = [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if isinstance(p, (str, bytes)) or isinstance(r, (str, bytes)):
            raise TypeError(f"pair {i}: prompt and response must be token-id lists, not text")
        p, r = [int(t) for t in p], [int(t) for t in r]
        if not p:
            raise ValueError(f"pair {i}: the prompt has no tokens; allowed: at least one (it produces token 0)")
        bad = [t for t in p + r if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"pair {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(p) + len(r) - 1 > window:
            raise ValueError(
                f"pair {i}: {len(p)} prompt + {len(r)} response tokens need {len(p) + len(r) - 1} positions; "
                f"allowed: at most the context window of {window}"
            )
        prompts.append(p)
        responses.append(r)
    return prompts, responses


def _posthoc_batches(
    loaded: LoadedModel, prompts: list[list[int]], responses: list[list[int]], layers: tuple[int, ...], batch_size: int
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Yield ``(pair indices, features [B, T_max, dim] in the model dtype, mask [B, T_max])``.

    Right padding: a causal model's states at real positions never see the pads after
    them, and positions start at 0 as in an unpadded run, so a row's features do not
    depend on its batch-mates beyond float noise. Pairs are length-sorted to pad little;
    pairs with an empty response need no forward and are not yielded.
    """
    todo = sorted((i for i, r in enumerate(responses) if r), key=lambda i: len(prompts[i]) + len(responses[i]))
    device, pad = loaded.device, loaded.pad_token_id
    base = loaded.model.base_model
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        seqs = [prompts[i] + responses[i][:-1] for i in idx]
        width = max(len(s) for s in seqs)
        t_max = max(len(responses[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        gather = torch.zeros((len(idx), t_max), dtype=torch.long)
        mask = torch.zeros((len(idx), t_max), dtype=torch.bool)
        for b, (i, s) in enumerate(zip(idx, seqs, strict=True)):
            input_ids[b, : len(s)] = torch.tensor(s)
            attn[b, : len(s)] = 1
            t, first = len(responses[i]), len(prompts[i]) - 1
            gather[b, :t] = torch.arange(first, first + t)
            mask[b, :t] = True
        positions = torch.arange(width).unsqueeze(0).expand(len(idx), width)
        with loaded.lock, torch.no_grad():
            out = base(
                input_ids=input_ids.to(device),
                attention_mask=attn.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                output_hidden_states=True,
            )
            where = gather.to(device).unsqueeze(-1).expand(-1, -1, loaded.hidden_size)
            feats = torch.cat([out.hidden_states[layer].gather(1, where) for layer in layers], dim=-1)
            del out
        yield idx, feats, mask.to(device)


def posthoc_features(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    spec: FeatureSpec,
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float16,
) -> list[Tensor]:
    """Each (prompt, response) pair's token features ``[len(response), dim]`` (on CPU, in ``dtype``).

    No generation: one batched forward over ``prompt + response[:-1]`` per ``batch_size``
    pairs, reading the positions that produced each response token (see the module
    docstring), so the result equals what :class:`TokenFeatureRecorder` saw while decoding.
    """
    _check_hidden_spec(spec)
    _check_model(spec, loaded)
    prompts, responses = _check_pairs(loaded, prompt_ids, response_ids, batch_size)
    out: list[Tensor] = [torch.zeros((0, spec.dim), dtype=dtype) for _ in prompts]
    for idx, feats, _mask in _posthoc_batches(loaded, prompts, responses, spec.layers, batch_size):
        host = feats.to(device="cpu", dtype=dtype)
        for b, i in enumerate(idx):
            out[i] = host[b, : len(responses[i])].clone()
    return out


def posthoc_rewards(
    head: GatedLinearHead,
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
) -> list[float]:
    """The head's reward of each (prompt, response) pair, recomputed by one forward per batch.

    Features stay in the model dtype until the head, which computes in float32; the result
    matches :class:`RewardObserver` on the same tokens up to float noise. An empty response
    scores 0.0.
    """
    if not isinstance(head, GatedLinearHead):
        raise ValueError(f"head must be a GatedLinearHead, got {type(head).__name__}")
    _check_hidden_spec(head.spec)
    _check_model(head.spec, loaded)
    prompts, responses = _check_pairs(loaded, prompt_ids, response_ids, batch_size)
    rewards = [0.0] * len(prompts)
    for idx, feats, mask in _posthoc_batches(loaded, prompts, responses, head.spec.layers, batch_size):
        with torch.no_grad():
            values = head(feats, mask).tolist()
        for i, value in zip(idx, values, strict=True):
            rewards[i] = float(value)
    return rewards


__all__ = ["RewardObserver", "TokenFeatureRecorder", "hidden_spec", "posthoc_features", "posthoc_rewards"]
