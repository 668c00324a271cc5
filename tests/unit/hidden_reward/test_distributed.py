"""Collection on Ray Data (a local Ray cluster on this machine) equals the single-process path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from esamp_agents.hidden_reward.collect_ray import (
    RAY_MISSING,
    RayOptions,
    ray_options_from_args,
    require_ray,
)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_workers": 0}, r"num_workers=0 is out of range; allowed: 1 <= num_workers <= 4096"),
        ({"cpus_per_worker": 0}, r"cpus_per_worker=0 is out of range"),
        ({"gpus_per_worker": -1.0}, r"gpus_per_worker=-1.0 is out of range; allowed: 0 <= gpus_per_worker <= 64"),
        ({"address": ""}, r"address='' must be a non-empty string or None"),
    ],
)
def test_ray_options_name_the_bad_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RayOptions(**kwargs)


def test_ray_flags_without_ray_are_an_error() -> None:
    from argparse import Namespace

    args = Namespace(ray=False, num_workers=2, cpus_per_worker=None, gpus_per_worker=None, ray_address=None)
    with pytest.raises(ValueError, match="--num-workers only apply with --ray"):
        ray_options_from_args(args)
    assert ray_options_from_args(Namespace(ray=False, num_workers=None)) is None
    opts = ray_options_from_args(
        Namespace(ray=True, num_workers=2, cpus_per_worker=None, gpus_per_worker=None, ray_address="auto")
    )
    assert opts == RayOptions(num_workers=2, address="auto")


def test_missing_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'esamp-agents\[ray\]'"):
        require_ray()
    assert "esamp-agents[ray]" in RAY_MISSING


def test_cli_rejects_ray_flags_before_loading(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from esamp_agents.cli.app import main

    code = main(["collect", "--task", "single_digit:2", "--out", str(tmp_path / "c"), "--num-workers", "2"])
    assert code == 2
    assert "--num-workers only apply with --ray" in capsys.readouterr().err
    code = main(["collect", "--task", "single_digit:2", "--out", str(tmp_path / "c"), "--ray", "--num-workers", "0"])
    assert code == 2
    assert "num_workers=0 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
