"""The evaluation harness on the real embedded model, kept tiny: 2 problems x n=2 x 2 samplers."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from esamp_agents.cli.app import _add_model_args
from esamp_agents.cli.eval import add_eval_command, run_eval_command
from esamp_agents.evaluation.harness import (
    GENERATIONS,
    default_selectors,
    reward_scores,
    run_eval,
)
from esamp_agents.evaluation.plots import PLOT_FILES, write_plots
from esamp_agents.evaluation.report import RESULTS
from esamp_agents.evaluation.tasks import load_problems
from esamp_agents.hidden_reward.collect import CollectFormatError, read_records
from esamp_agents.hidden_reward.features import hidden_spec, posthoc_rewards
from esamp_agents.hidden_reward.head import GatedLinearHead, load_head, save_head

TASK = "single_digit:2:0:test"


SAMPLERS = ["vanilla", "esamp:0.25"]


KS = [1, 2]


SETTINGS = {"n": 2, "ks": KS, "max_tokens": 12, "progress": False}


FOLDERS = ("vanilla", "esamp_0.25")


@pytest.fixture(scope="module")
def head_path(tmp_path_factory, embedded) -> Path:
    """A tiny random reward head over two layers (the shipped head is not needed)."""
    torch.manual_seed(0)
    head = GatedLinearHead(hidden_spec(embedded, (15, -1)))
    return save_head(head, tmp_path_factory.mktemp("head") / "tiny.safetensors")


def _stamps(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted((out / GENERATIONS).rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, engine, head_path) -> dict:
    """Interrupted-then-resumed evaluation: ESamp on one problem, then both samplers on both problems, then
    the same again (all cached)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    problems = load_problems(TASK)
    first = run_eval(
        problems[:1], SAMPLERS[1:], out_dir=out, engine=engine, reward_head=head_path, plots=False, **SETTINGS
    )
    full = run_eval(problems, SAMPLERS, out_dir=out, engine=engine, reward_head=head_path, **SETTINGS)
    stamps = _stamps(out)
    again = run_eval(problems, SAMPLERS, out_dir=out, engine=engine, reward_head=head_path, **SETTINGS)
    return {"out": out, "first": first, "full": full, "again": again, "stamps": stamps, "problems": problems}


def _in_unit(interval: dict) -> None:
    assert interval["mean"] is not None
    assert 0.0 <= interval["low"] <= interval["mean"] <= interval["high"] <= 1.0 + 1e-9


def test_results_hold_every_metric_in_range(runs) -> None:
    results = runs["again"]
    assert json.loads((runs["out"] / RESULTS).read_text()) == results
    assert results["settings"]["ks"] == KS and results["settings"]["n"] == 2
    assert results["settings"]["selectors"] == default_selectors(True)
    assert results["reward_head"]["spec"]["layers"] == [15, 30]
    assert set(results["samplers"]) == set(SAMPLERS)
    for name, folder in zip(SAMPLERS, FOLDERS, strict=True):
        r = results["samplers"][name]
        assert r["folder"] == f"{GENERATIONS}/{folder}" and r["problems"] == 2 and r["candidates"] == 4
        assert r["esamp"]["beta"] == (0.0 if name == "vanilla" else 0.25)
        _in_unit(r["accuracy"])
        for k in map(str, KS):
            _in_unit(r["pass_at_k"][k])
            assert r["majority_at_k"][k] == r["best_of_n"]["majority"][k]
            for sel in results["settings"]["selectors"]:
                _in_unit(r["best_of_n"][sel][k])
            for sel in ("random", "majority", "argmax:mean_logprob", "argmax:reward", "vote:reward"):
                assert r["best_of_n"]["oracle"][k]["mean"] >= r["best_of_n"][sel][k]["mean"] - 1e-12
        assert r["pass_at_k"]["1"]["mean"] <= r["pass_at_k"]["2"]["mean"]
        assert r["pass_at_k"]["1"]["mean"] == pytest.approx(r["accuracy"]["mean"])
        assert r["best_of_n"]["oracle"]["2"]["mean"] == pytest.approx(r["pass_at_k"]["2"]["mean"])  # k = n: exact
        assert r["best_of_n"]["random"]["2"]["mean"] == pytest.approx(r["accuracy"]["mean"])
        d = r["diversity"]
        assert 0 <= d["distinct_answers"]["mean"] <= 2
        for key in ("distinct_1", "distinct_2"):
            _in_unit(d[key])
        assert -1.0 <= d["embedding_similarity"]["mean"] <= 1.0 + 1e-6
        assert 1.0 - 1e-6 <= d["vendi"]["mean"] <= 2.0 + 1e-6
        assert r["perplexity"]["mean"] >= 1.0
        assert 0 < r["mean_tokens"] <= 12 and 0.0 <= r["stop_rate"] <= 1.0
        g = r["generation"]
        assert g["tokens"] == sum(len(x["token_ids"]) for x in read_records(runs["out"] / r["folder"]))
        assert g["seconds"] > 0 and g["tokens_per_second"] > 0
        assert r["reward"]["source"] == "shards"


def test_resume_generates_only_what_is_missing(runs) -> None:
    assert list(runs["first"]["samplers"]) == ["esamp:0.25"]
    assert runs["first"]["samplers"]["esamp:0.25"]["generation"]["problems_generated"] == 1
    for name, done in (("vanilla", 2), ("esamp:0.25", 1)):
        full = runs["full"]["samplers"][name]["generation"]
        assert (full["problems_generated"], full["problems_cached"]) == (done, 2 - done)
    for name in SAMPLERS:
        again = runs["again"]["samplers"][name]["generation"]
        assert (again["problems_generated"], again["problems_cached"]) == (0, 2)
    assert _stamps(runs["out"]) == runs["stamps"]  # records, shards, manifest, timing untouched
    timing = {f: json.loads((runs["out"] / GENERATIONS / f / "timing.json").read_text()) for f in FOLDERS}
    assert timing["vanilla"]["runs"] == 1 and timing["esamp_0.25"]["runs"] == 2
    strip = ("seconds_this_run", "problems_generated", "problems_cached")
    for name in SAMPLERS:
        a, b = runs["full"]["samplers"][name], runs["again"]["samplers"][name]
        assert {k: v for k, v in a["generation"].items() if k not in strip} == {
            k: v for k, v in b["generation"].items() if k not in strip
        }
        assert {k: v for k, v in a.items() if k != "generation"} == {k: v for k, v in b.items() if k != "generation"}


def test_changed_settings_fail_before_generating(runs, engine, head_path) -> None:
    """Every sampler folder is checked before the first one generates: nothing is touched."""
    settings = SETTINGS | {"max_tokens": 13}
    with pytest.raises(CollectFormatError, match="max_new_tokens"):
        run_eval(
            runs["problems"],
            ["minp:0.1", *SAMPLERS],
            out_dir=runs["out"],
            engine=engine,
            reward_head=head_path,
            **settings,
        )
    assert not (runs["out"] / GENERATIONS / "minp_0.1").exists()
    assert _stamps(runs["out"]) == runs["stamps"]


def test_rewards_come_from_the_decode_time_shards(runs, embedded, head_path) -> None:
    folder = runs["out"] / GENERATIONS / "esamp_0.25"
    records = read_records(folder)
    head = load_head(head_path)
    scores, source = reward_scores(folder, records, head, embedded)
    assert source == "shards"
    posthoc = posthoc_rewards(
        head, embedded, [r["prompt_token_ids"] for r in records], [r["token_ids"] for r in records]
    )
    assert scores == pytest.approx(posthoc, abs=2e-3)  # float16 storage
    other = GatedLinearHead(hidden_spec(embedded, (-1,)))  # a subset of the stored layers: still the shards
    assert reward_scores(folder, records[:1], other, embedded)[1] == "shards"


def test_plots_are_written(runs) -> None:
    pytest.importorskip("matplotlib")
    assert runs["again"]["plots"] == list(PLOT_FILES) and runs["again"]["plots_skipped"] is None
    assert runs["first"]["plots"] == [] and "disabled" in runs["first"]["plots_skipped"]
    for name in PLOT_FILES:
        data = (runs["out"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_missing_matplotlib_skips_plots_with_a_message(runs, engine, head_path, tmp_path, monkeypatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(runs["out"] / GENERATIONS, out / GENERATIONS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError):
        write_plots(runs["again"], tmp_path)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        results = run_eval(
            runs["problems"], SAMPLERS, out_dir=out, engine=engine, reward_head=head_path, diversity=False, **SETTINGS
        )
    assert results["plots"] == [] and "matplotlib" in results["plots_skipped"]
    assert not any((out / name).exists() for name in PLOT_FILES)
    r = results["samplers"]["vanilla"]
    assert r["diversity"]["embedding_similarity"] is None and r["diversity"]["vendi"] is None
    assert r["generation"]["problems_generated"] == 0


def test_bad_arguments_fail_before_any_work(engine, tmp_path) -> None:
    problems = load_problems(TASK)
    out = tmp_path / "never"
    bad = [
        ({"ks": [1, 4]}, "k=4"),
        ({"samplers": ["esamp:0"]}, "BETA"),
        ({"selectors": ["vote:reward"]}, "needs a reward head"),
        ({"temperature": -1.0}, "temperature"),
        ({"prompts_per_call": 0}, "prompts_per_call"),
    ]
    for change, message in bad:
        args = {"samplers": SAMPLERS, "n": 2, "ks": KS, "out_dir": out, "engine": engine, "progress": False} | change
        with pytest.raises(ValueError, match=message):
            run_eval(problems, **args)
    assert not out.exists()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esamp-agents")
    add_eval_command(parser.add_subparsers(dest="command"), _add_model_args)
    return parser


def test_cli_validates_before_loading_and_runs_from_the_cache(runs, head_path, tmp_path) -> None:
    parser = _parser()
    bad_model = ["--model", str(tmp_path / "no-such-model")]
    for extra, message in (
        (["--ks", "1", "3"], "k=3"),
        (["--samplers", "vanilla", "nucleus"], "nucleus"),
        (["--reward", str(tmp_path / "missing.safetensors")], "--reward"),
        (["--selectors", "argmax:reward", "--reward", "none"], "needs a reward head"),
        (["--max-tokens", "0"], "max_new_tokens"),
    ):
        args = parser.parse_args(["eval", "--task", TASK, "-n", "2", "--out", str(tmp_path / "x"), *bad_model, *extra])
        with pytest.raises(ValueError, match=message):
            run_eval_command(args, io.StringIO())
    out = tmp_path / "cli"
    shutil.copytree(runs["out"] / GENERATIONS, out / GENERATIONS)
    argv = [
        "eval",
        "--task",
        TASK,
        "--samplers",
        *SAMPLERS,
        "-n",
        "2",
        "--ks",
        "1",
        "2",
        "--max-tokens",
        "12",
        "--out",
        str(out),
        "--reward",
        str(head_path),
        "--no-diversity",
        "--no-plots",
        "--device",
        "cpu",
    ]
    buffer = io.StringIO()
    assert run_eval_command(parser.parse_args(argv), buffer) == 0
    text = buffer.getvalue()
    assert "| vanilla |" in text and "| esamp:0.25 |" in text and "results.json" in text
    results = json.loads((out / RESULTS).read_text())
    assert results["run"]["arguments"]["reward"] == str(head_path)
    for name in SAMPLERS:
        assert results["samplers"][name]["generation"]["problems_generated"] == 0
        assert results["samplers"][name]["best_of_n"] == runs["again"]["samplers"][name]["best_of_n"]
