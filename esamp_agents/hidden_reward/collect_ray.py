"""Dataset-scale collection on Ray Data: one loaded model per actor, results written as they come.

The work is the single-process :func:`esamp_agents.hidden_reward.collect.collect`, cut the same way: the same
plan (:func:`~esamp_agents.hidden_reward.collect.plan_collect`) numbers the engine calls and chunks the
pending problems, each call keeps its seed (a hash of its problem ids), and actors run the
same :func:`~esamp_agents.hidden_reward.collect.generate_call`. So for the same seed a Ray run writes the
same candidates as a local one, only possibly in another order in ``records.jsonl``.

Why the driver writes: Ray Data streams each call's output back as soon as an actor finishes
it, and the driver appends it to the collect folder with the crash-safe writer
(:func:`~esamp_agents.hidden_reward.collect.write_call`: shard first, then one fsync'd append of the call's
records). A killed job therefore loses at most the calls in flight, and rerunning the same
command skips every problem already written. The folder is an ordinary collect folder, read by
``esamp-agents eval``, ``train-reward`` and :func:`~esamp_agents.hidden_reward.collect.load_examples`.

Needs the ``ray`` extra: ``pip install 'esamp-agents[ray]'``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from esamp_agents.decoding.params import ESampParams, SamplingParams
from esamp_agents.evaluation.tasks import DEFAULT_SUFFIX, Problem
from esamp_agents.validation import check_int, check_range

RAY_MISSING = "Ray is not installed; install the extra: pip install 'esamp-agents[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """How the work is spread: ``num_workers`` actors, each with one loaded model.

    ``cpus_per_worker`` is also each actor's torch thread count. On a GPU cluster give each
    actor one GPU (``gpus_per_worker=1``): Ray then places one model per GPU. ``address``
    joins a running cluster (``"auto"`` or ``"ray://host:10001"``); None starts a local one.
    """

    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    address: str | None = None

    def __post_init__(self) -> None:
        check_int("num_workers", self.num_workers, 1, 4096)
        check_int("cpus_per_worker", self.cpus_per_worker, 1, 1024)
        check_range("gpus_per_worker", self.gpus_per_worker, 0.0, 64.0, allowed="0 <= gpus_per_worker <= 64")
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ValueError(f"address={self.address!r} must be a non-empty string or None")


def add_ray_args(parser: Any) -> None:
    """``--ray``, ``--num-workers``, ``--cpus-per-worker``, ``--gpus-per-worker``, ``--ray-address``."""
    group = parser.add_argument_group("Ray (pip install 'esamp-agents[ray]')")
    group.add_argument("--ray", action="store_true", help="generate on Ray Data actors, one loaded model each")
    group.add_argument("--num-workers", type=int, default=None, help="actors (default 1; needs --ray)")
    group.add_argument("--cpus-per-worker", type=int, default=None, help="CPUs (and torch threads) per actor")
    group.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per actor (1 = one model per GPU)")
    group.add_argument("--ray-address", default=None, help="join a running cluster ('auto', 'ray://host:10001')")


def ray_options_from_args(args: Any) -> RayOptions | None:
    """The :class:`RayOptions` the flags ask for, None without ``--ray`` (Ray flags alone are an error)."""
    names = ("num_workers", "cpus_per_worker", "gpus_per_worker", "ray_address")
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if not getattr(args, "ray", False):
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} only apply with --ray")
        return None
    if "ray_address" in given:
        given["address"] = given.pop("ray_address")
    return RayOptions(**given)


def require_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # Ray without its data extra has no Ray Data
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    return ray


def _identity(loaded: Any) -> str:
    """What must match between the driver (which writes the manifest) and every actor."""
    return f"{loaded.name} ({loaded.dtype_name})"


class CallWorker:
    """A Ray Data actor: loads the model once, then runs one engine call per input row."""

    def __init__(
        self,
        model: str,
        dtype: str,
        device: str | None,
        threads: int,
        sampling: dict[str, Any],
        esamp: dict[str, Any],
        spec: dict[str, Any] | None,
        suffix: str,
    ) -> None:
        import torch

        from esamp_agents.decoding.engine import ESampEngine
        from esamp_agents.decoding.loading import load_model
        from esamp_agents.hidden_reward.head import FeatureSpec

        torch.set_num_threads(threads)
        self.engine = ESampEngine(load_model(model, device=device, dtype=dtype))
        self.sampling = SamplingParams(**{**sampling, "stop": tuple(sampling["stop"])})
        self.esamp = ESampParams(**esamp)
        self.spec = FeatureSpec.from_dict(spec) if spec is not None else None
        self.suffix = suffix

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from esamp_agents.hidden_reward.collect import generate_call

        out: dict[str, list[Any]] = {"call": [], "records": [], "shard": [], "model": []}
        identity = _identity(self.engine.loaded)
        for call, problems in zip(batch["call"], batch["problems"], strict=True):
            chunk = [Problem(**p) for p in json.loads(problems)]
            result = generate_call(self.engine, chunk, int(call), self.sampling, self.esamp, self.spec, self.suffix)
            out["call"].append(result.call)
            out["records"].append(json.dumps(result.records, allow_nan=False, ensure_ascii=False))
            out["shard"].append(result.shard if result.shard is not None else b"")
            out["model"].append(identity)
        return out


def collect_ray(
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    model: str = "embedded",
    dtype: str = "auto",
    device: str | None = None,
    sampling: SamplingParams,
    esamp: ESampParams,
    spec: Any = None,
    prompts_per_call: int = 4,
    ray_options: RayOptions | None = None,
    progress: bool = True,
    suffix: str = DEFAULT_SUFFIX,
) -> Any:
    """:func:`esamp_agents.hidden_reward.collect.collect` on a Ray cluster; returns its :class:`CollectSummary`.

    ``model``/``dtype``/``device`` name the model each actor loads (the driver loads it too,
    once, for the manifest and the checks; the registry shares it with later local use).
    Everything is validated, and the folder's manifest checked, before Ray starts.
    """
    from esamp_agents.decoding.engine import ESampEngine
    from esamp_agents.decoding.loading import load_model
    from esamp_agents.hidden_reward.collect import CallOutput, check_collect_args, plan_collect, write_call

    options = ray_options or RayOptions()
    if not isinstance(options, RayOptions):
        raise ValueError(f"ray_options must be RayOptions, got {type(options).__name__}")
    ray = require_ray()
    engine = ESampEngine(load_model(model, device=device, dtype=dtype))
    check_collect_args(engine, problems, sampling, esamp, spec, prompts_per_call, suffix)
    start = time.perf_counter()
    plan = plan_collect(
        engine.loaded, problems, out_dir, sampling=sampling, esamp=esamp, spec=spec,
        prompts_per_call=prompts_per_call, suffix=suffix,
    )  # fmt: skip
    summary = plan.summary
    if not plan.chunks:
        summary.seconds = time.perf_counter() - start
        return summary

    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = [
        {"call": plan.first_call + i, "problems": json.dumps([asdict(p) for p in chunk])}
        for i, chunk in enumerate(plan.chunks)
    ]
    # One row per block, so the actors take calls one by one and results stream back per call.
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    outputs = dataset.map_batches(
        CallWorker,
        fn_constructor_kwargs={
            "model": model,
            "dtype": dtype,
            "device": device,
            "threads": options.cpus_per_worker,
            "sampling": asdict(sampling),
            "esamp": asdict(esamp),
            "spec": spec.to_dict() if spec is not None else None,
            "suffix": suffix,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=options.num_workers),
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker or None,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(options.cpus_per_worker), "HF_HUB_OFFLINE": "1"}},
    )
    sizes = {plan.first_call + i: len(chunk) for i, chunk in enumerate(plan.chunks)}
    bar = tqdm(total=sum(sizes.values()), disable=not progress, unit="problem", desc=f"collect x{options.num_workers}")
    try:
        for row in outputs.iter_rows():
            if row["model"] != _identity(engine.loaded):
                raise RuntimeError(
                    f"a Ray actor loaded {row['model']!r} but the driver {_identity(engine.loaded)!r}; "
                    "give the dtype (and device) explicitly when driver and actors have different hardware"
                )
            shard = bytes(row["shard"]) or None
            write_call(plan.out, CallOutput(int(row["call"]), json.loads(row["records"]), shard), summary)
            bar.update(sizes[int(row["call"])])
            bar.set_postfix(correct=f"{summary.positive_rate:.1%}")
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


__all__ = [
    "RAY_MISSING",
    "CallWorker",
    "RayOptions",
    "add_ray_args",
    "collect_ray",
    "ray_options_from_args",
    "require_ray",
]
