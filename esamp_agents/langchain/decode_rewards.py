"""Per-call decode-time rewards for ``ChatESamp`` / ``ESampLLM``: ``rewards=[reward, ...]``.

A decode-time reward has a ``name`` and ``make_observer(loaded_model)`` returning a
:class:`~esamp_agents.decoding.observers.DecodeObserver` with ``rewards() -> [prompt][sample]``
(e.g. :class:`~esamp_agents.hidden_reward.reward.HiddenStateReward`). The model builds one
observer per reward for the call, feeds it during that very decode (no second forward pass)
and returns each candidate's scores in its ``generation_info`` / ``response_metadata`` as
``{"rewards": {name: score}}``. This is the public contract BestOfN builds on.

A reward that fails (``make_observer`` raises or returns no observer, ``rewards()`` raises or
has the wrong shape) raises :class:`~esamp_agents.selection.rewards.RewardError` naming it,
by default (``on_reward_error="raise"``). With ``on_reward_error="skip"`` the call goes on:
the reward is missing from ``"rewards"`` and ``"reward_errors"`` says why, ``{name: message}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esamp_agents.decoding.loading import LoadedModel

ON_REWARD_ERROR: tuple[str, ...] = ("raise", "skip")
CALL_EXTRA_KEYS: tuple[str, ...] = ("observers", "rewards", "on_reward_error")
"""Per-call keywords that are plumbing, not sampling parameters: never traced or identifying."""


@dataclass(frozen=True)
class CallExtras:
    """One call's observers and decode-time rewards, validated before any model work."""

    observers: tuple[Any, ...] = ()
    rewards: tuple[Any, ...] = ()
    on_reward_error: str = "raise"

    def __bool__(self) -> bool:
        return bool(self.observers or self.rewards)


def check_rewards(rewards: Any) -> tuple[Any, ...]:
    """Validate a per-call ``rewards`` value (None means none): named, with ``make_observer``, distinct."""
    if rewards is None:
        return ()
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        raise ValueError(
            f"rewards={rewards!r} is not a sequence; allowed: a list of decode-time rewards "
            "(objects with .name and make_observer(loaded_model))"
        )
    checked = tuple(rewards)
    names: set[str] = set()
    for i, reward in enumerate(checked):
        name = getattr(reward, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"rewards[{i}]={reward!r} has name={name!r}; allowed: a non-empty str .name")
        if not callable(getattr(reward, "make_observer", None)):
            raise ValueError(
                f"rewards[{i}] ({name!r}) has no make_observer(); allowed: a decode-time reward "
                "(score() rewards are post hoc: use BestOfN for them)"
            )
        if name in names:
            raise ValueError(f"reward name {name!r} appears twice in rewards; allowed: distinct names")
        names.add(name)
    return checked


def check_on_reward_error(value: Any) -> str:
    if value not in ON_REWARD_ERROR:
        raise ValueError(f"on_reward_error={value!r} is unknown; allowed: {', '.join(map(repr, ON_REWARD_ERROR))}")
    return str(value)


class DecodeRewards:
    """The observers of one call's decode-time rewards and, after the decode, their scores."""

    def __init__(self, rewards: Sequence[Any], loaded: LoadedModel, on_reward_error: str = "raise") -> None:
        from esamp_agents.langchain.common import check_observers

        self.on_reward_error = on_reward_error
        self._made: list[tuple[str, Any]] = []
        self._failed: dict[str, str] = {}
        for reward in rewards:
            try:
                observer = reward.make_observer(loaded)
                check_observers([observer])
            except Exception as exc:
                self._fail(reward.name, exc)
                continue
            self._made.append((reward.name, observer))

    def _fail(self, name: str, exc: BaseException) -> None:
        from esamp_agents.selection.rewards import reward_failure

        error = reward_failure(name, exc)
        if self.on_reward_error == "raise":
            raise error from exc
        self._failed[name] = str(error)

    @property
    def observers(self) -> tuple[Any, ...]:
        return tuple(observer for _, observer in self._made)

    def per_candidate(self, counts: Sequence[int]) -> list[list[dict[str, Any]]]:
        """``[prompt][candidate]`` metadata to merge into ``generation_info``; ``counts[p]`` is the
        number of candidates prompt ``p`` returned."""
        from esamp_agents.selection.rewards import check_scores

        if not self._made and not self._failed:  # no rewards asked for: nothing to add
            return [[{} for _ in range(count)] for count in counts]
        scores: dict[str, list[list[float]]] = {}
        for name, observer in self._made:
            try:
                rows = observer.rewards()
                if len(rows) != len(counts):
                    raise ValueError(f"rewards() has {len(rows)} rows for {len(counts)} prompt(s)")
                scores[name] = [check_scores(name, row, count) for row, count in zip(rows, counts, strict=True)]
            except Exception as exc:
                self._fail(name, exc)
        out: list[list[dict[str, Any]]] = []
        for p, count in enumerate(counts):
            prompt_rows = []
            for i in range(count):
                info: dict[str, Any] = {"rewards": {name: rows[p][i] for name, rows in scores.items()}}
                if self._failed:
                    info["reward_errors"] = dict(self._failed)
                prompt_rows.append(info)
            out.append(prompt_rows)
        return out


__all__ = [
    "CALL_EXTRA_KEYS",
    "ON_REWARD_ERROR",
    "CallExtras",
    "DecodeRewards",
    "check_on_reward_error",
    "check_rewards",
]
