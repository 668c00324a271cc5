"""The command line, run in-process on the shared embedded model (the registry hands it the session's copy)."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest

from esamp_agents.cli import demo
from esamp_agents.cli.app import DEMO_FLAGS, GENERATE_FLAGS, _unescape, build_parser, main, read_prompts_file
from esamp_agents.cli.flags import add_param_flag, flag_name, param_flag_values
from esamp_agents.decoding.params import ESampParams, build_params, esamp_preset, lookup_param
from esamp_agents.decoding.results import Candidate


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = main(argv, out=out)
    return code, out.getvalue()


def test_prompts_file_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": 7}\n', encoding="utf-8")
    assert [p.text for p in read_prompts_file(path)] == ["a", "b"]
    assert read_prompts_file(path)[1].source == f"{path}:3"


def test_stop_escapes():
    assert _unescape("\\n\\n") == "\n\n"
    assert _unescape("a\\tb") == "a\tb"
    assert _unescape("plain") == "plain"


BAD = [
    (["-n", "0"], "n=0 is out of range; allowed: 1 <= n"),
    (["--beta", "-1"], "beta=-1.0 is out of range; allowed: 0 <= beta <= 100"),
    (["--temperature", "-0.5"], "temperature=-0.5 is out of range"),
    (["--top-p", "1.5"], "top_p=1.5 is out of range; allowed: 0 < top_p <= 1"),
    (["--top-k", "-2"], "top_k=-2 is out of range"),
    (["--min-p", "1"], "min_p=1.0 is out of range; allowed: 0 <= min_p < 1"),
    (["--max-tokens", "0"], "max_new_tokens=0 is out of range"),
    (["--seed", "-1"], "seed=-1 is out of range"),
    (["--warm-start-steps", "-1"], "warm_start_steps=-1 is out of range"),
    (["--batch-size", "0"], "--batch-size=0 is out of range; allowed: --batch-size >= 1"),
    (["--stop", ""], "every stop sequence must be a non-empty string"),
    (["-n", "abc"], "invalid int value: 'abc'"),
    (["--dtype", "int4"], "invalid choice: 'int4'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_generate_arguments_exit_2(extra, message, capsys):
    code, out = run(["generate", "hello", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert out == ""


SERVE_BAD = [
    (["--temperature", "-1"], "temperature=-1.0 is out of range; allowed: temperature >= 0 (0 = greedy)"),
    (["--top-k", "-1"], "top_k=-1 is out of range; allowed: 0 <= top_k"),
    (["--beta", "200"], "beta=200.0 is out of range; allowed: 0 <= beta <= 100"),
]


@pytest.mark.parametrize(("extra", "message"), SERVE_BAD, ids=[" ".join(b[0]) for b in SERVE_BAD])
def test_bad_serve_defaults_exit_2_before_loading(extra, message, capsys):
    """serve's request defaults come from the parameter table's flags and are checked before any load."""
    code, _ = run(["serve", "--port", "0", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate"], "no prompt given"),
        (["generate", "   "], "prompt='   ' is empty"),
        (["generate", "hi", "--prompts-file", "x.txt"], "not both"),
        (["generate", "--prompts-file", "/nonexistent/prompts.txt"], "'/nonexistent/prompts.txt' does not exist"),
        (["demo", "--questions", "0"], "questions=0 is out of range; allowed: 1 <= questions <= 50"),
        (["demo", "-n", "0"], "n=0 is out of range"),
        (
            ["demo", "--chooser", "oracle"],
            "--chooser='oracle' is unknown; allowed: logprob, majority, reward, reward-vote",
        ),
        ([], "required"),
    ],
)
def test_bad_usage_exit_2(argv, message, capsys):
    code, _ = run(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\nnot json\n', ":2: not valid JSON"),
        ('{"text": "no prompt field"}\n', ":1: each line must be an object with a non-empty string 'prompt' field"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompts_file_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    code, _ = run(["generate", "--prompts-file", str(path)])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_exits_2_naming_it(capsys):
    code, _ = run(["generate", "hi", "--model", "no-such-org/no-such-model-xyz", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "could not load model 'no-such-org/no-such-model-xyz'" in err
    assert "Traceback" not in err


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "esamp_agents", "generate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--prompts-file" in proc.stdout and "--beta" in proc.stdout


def _subcommand_actions(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize(("command", "flags"), [("generate", GENERATE_FLAGS), ("demo", DEMO_FLAGS)])
def test_param_flags_take_name_type_and_doc_from_the_table(command, flags):
    actions = _subcommand_actions(command)
    for name, options in flags.items():
        spec = lookup_param(name)
        action = actions[spec.name]
        assert action.option_strings == [flag_name(name)]
        assert spec.doc.rstrip(".") in action.help
        assert action.default == options.get("default", [] if name == "stop" else spec.default)
    assert actions["temperature"].type is float and actions["seed"].type is int  # int | None -> int


def test_generate_flag_spellings_and_kinds():
    actions = _subcommand_actions("generate")
    assert actions["top_k"].option_strings == ["--top-k"] and actions["top_k"].type is int
    assert isinstance(actions["stop"], argparse._AppendAction) and actions["stop"].metavar == "STR"
    assert flag_name("n") == "-n" and flag_name("max_new_tokens") == "--max-tokens"


def test_generate_flags_build_the_engine_params():
    args = build_parser().parse_args(["generate", "hi", "--preset", "paper", "--top-k", "5", "--stop", "x", "-n", "2"])
    values = param_flag_values(args, GENERATE_FLAGS)
    assert "beta" not in values and "seed" not in values  # left unset: the preset's / unseeded
    sampling, esamp = build_params(values, esamp=esamp_preset(args.preset))
    assert (sampling.n, sampling.top_k, sampling.stop, sampling.max_new_tokens) == (2, 5, ("x",), 128)
    assert esamp == ESampParams.paper()


def test_add_param_flag_handles_bools_repeats_and_unknown_names():
    parser = argparse.ArgumentParser()
    for name in ("ignore_eos", "shared_distiller", "distiller_lr", "stop"):
        add_param_flag(parser, name)
    args = parser.parse_args(["--ignore-eos", "--distiller-lr", "0.001", "--stop", "a", "--stop", "b"])
    assert (args.ignore_eos, args.shared_distiller, args.distiller_lr, args.stop) == (True, False, 0.001, ["a", "b"])
    sampling, esamp = build_params(param_flag_values(args, ["ignore_eos", "shared_distiller", "distiller_lr", "stop"]))
    assert sampling.ignore_eos and sampling.stop == ("a", "b") and esamp.lr == 0.001
    with pytest.raises(ValueError, match=r"unknown parameter 'temp'; allowed: .*temperature"):
        add_param_flag(parser, "temp")


def _cand(index: int, text: str, lps: list[float]) -> Candidate:
    return Candidate(
        index=index, text=text, token_ids=[1] * len(lps), logprobs=lps, finish_reason="stop", prompt_tokens=5
    )


def test_make_questions_is_seeded_held_out_single_digit_arithmetic():
    from esamp_agents.evaluation.tasks import generate_problems, key_split

    qs = demo.make_questions(20, seed=3)
    assert qs == demo.make_questions(20, seed=3)
    assert qs != demo.make_questions(20, seed=4)
    problems = generate_problems("single_digit", 20, seed=3, split="test")
    for q, p in zip(qs, problems, strict=True):
        assert (q.text, q.answer) == (p.question, int(p.answer))
        assert key_split(p.key) == "test"  # never used to train the shipped reward head
        a, op, b = p.key[0], p.key[1], p.key[2]
        assert q.answer == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert q.prompt.endswith(demo.SUFFIX)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("7 + 5 = 12. Answer: 12", 12),
        ("Answer: 3 ... wait, Answer: **14**", 14),
        ("answer = 6", 6),
        ("First 3, then 4, so 7", 7),
        ("The result is 12.0", 12),
        ("about 2.5", None),
        ("no digits here", None),
        ("Answer: -3", -3),
        ("4 + 9 is 13. So the final answer must be 13. I would have 14", 13),
        ("The answer is 8, then 9 more", 8),
        ("write the answer as 'Answer: <number>'. 5 + 3 = 8", 8),
    ],
)
def test_extract_answer(text, answer):
    assert demo.extract_answer(text) == answer


def test_majority_vote_and_tie_break():
    cands = [_cand(0, "", [-1.0]), _cand(1, "", [-0.2]), _cand(2, "", [-0.5]), _cand(3, "", [-3.0])]
    assert demo.majority_vote(cands, [5, 6, 5, None]) == 5
    # 5 and 6 tie 1:1; 6's best candidate has the higher mean logprob.
    assert demo.majority_vote(cands, [5, 6, None, None]) == 6
    assert demo.majority_vote(cands, [None] * 4) is None
    assert demo.max_logprob(cands, [5, 6, 7, 8]) == 6
    assert demo.max_logprob(cands, [5, None, 7, 8]) == 7
