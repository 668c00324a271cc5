"""Code-generation recipe: sandboxed test runs (limits, isolation, counting) and candidate selection."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from esamp_agents.recipes import code_generation
from esamp_agents.recipes.code_generation import (
    CodeResult,
    TestRun,
    code_generation_chain,
    extract_code,
    run_tests,
)
from esamp_agents.selection.rewards import CallableReward

HUMANEVAL = Path(__file__).resolve().parents[4] / "shared" / "data" / "HumanEval.jsonl.gz"

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(0, 0) == 0\n"


def docstring_example(obj: Any) -> str:
    """The ``.. code-block:: python`` example of a docstring, dedented."""
    doc = obj.__doc__ or ""
    start = doc.index(".. code-block:: python")
    lines = doc[start:].splitlines()[1:]
    body = []
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) <= 8:
            break
        body.append(line)
    return textwrap.dedent("\n".join(body))


# --------------------------------------------------------------------------- run_tests


def test_good_program_passes_every_assert():
    run = run_tests(ADD, ADD_TESTS)
    assert isinstance(run, TestRun)
    assert (run.passed, run.total, run.status) == (3, 3, "passed")
    assert run.all_passed and run.completed and run.error is None
    assert [r.line for r in run.results] == [1, 2, 3]
    assert run.results[0].source == "assert add(2, 3) == 5"


def test_wrong_program_fails_per_assert_and_keeps_going():
    run = run_tests("def add(a, b):\n    return a * b\n", ADD_TESTS)
    assert (run.passed, run.total, run.status) == (1, 3, "failed")  # only 0 * 0 == 0 holds
    assert [r.passed for r in run.results] == [False, False, True]
    assert run.results[0].error == "assertion failed"


def test_humaneval_style_check_counts_every_assert_statement():
    tests = textwrap.dedent(
        """
        METADATA = {}

        def check(candidate):
            assert candidate(1) == 2
            for i in range(5):
                assert candidate(i) == i + 1
            assert candidate(-1) == 99
        """
    )
    run = run_tests("def helper(x):\n    return x\n\ndef inc(x):\n    return helper(x) + 1\n", tests, entry_point="inc")
    assert (run.passed, run.total, run.completed) == (2, 3, True)
    # one top-level function: the entry point is inferred
    assert run_tests("def inc(x):\n    return x + 1\n", tests).passed == 2
    # two functions and no entry_point: no test can run
    ambiguous = run_tests("def a(x):\n    return x\n\ndef b(x):\n    return x\n", tests)
    assert ambiguous.passed == 0 and ambiguous.status == "error" and "entry_point" in ambiguous.error


def test_exceptions_in_the_candidate_are_contained_per_assert():
    program = textwrap.dedent(
        """
        import sys

        def f(x):
            if x == 1:
                raise ValueError("bad one")
            if x == 2:
                sys.exit(3)
            return x
        """
    )
    run = run_tests(program, "assert f(1) == 1\nassert f(2) == 2\nassert f(3) == 3\n")
    assert (run.passed, run.total, run.completed) == (1, 3, True)
    assert run.results[0].error == "ValueError: bad one"
    assert run.results[1].error.startswith("SystemExit")


def test_program_that_raises_or_does_not_compile_fails_every_test():
    raised = run_tests("raise RuntimeError('at import')\n", ADD_TESTS)
    assert raised.passed == 0 and raised.status == "error" and "RuntimeError: at import" in raised.error
    assert all(r.error == "not reached" for r in raised.results)
    broken = run_tests("def add(a, b)\n    return a + b\n", ADD_TESTS)
    assert broken.passed == 0 and "SyntaxError" in broken.error


def test_os_exit_is_contained_and_unreached_tests_fail():
    program = "import os\ndef f(x):\n    os._exit(0)\n"
    run = run_tests(program, "assert 1 + 1 == 2\nassert f(1) == 1\nassert 2 + 2 == 4\n")
    assert (run.passed, run.total, run.status) == (1, 3, "crashed")
    assert not run.completed and "before the tests finished" in run.error
    assert [r.error for r in run.results[1:]] == ["not reached", "not reached"]


def test_infinite_loop_hits_the_timeout():
    start = time.monotonic()
    run = run_tests("def f():\n    while True:\n        pass\n", "assert 1 == 1\nassert f() is None\n", timeout=1.0)
    assert time.monotonic() - start < 8
    assert run.timed_out and run.status == "timeout" and not run.completed
    assert (run.passed, run.total) == (1, 2)  # the assert before the loop still counts


def test_huge_allocation_hits_the_memory_limit():
    program = "def grab():\n    return len(bytearray(8 * 1024 ** 3))\n"
    run = run_tests(program, "assert grab() > 0\nassert 1 == 1\n", memory_mb=256)
    assert run.memory_exceeded and run.status == "memory"
    assert run.results[0].error == "MemoryError" and run.results[1].passed


def test_no_assert_counts_as_one_test_that_must_run_to_the_end():
    assert run_tests(ADD, "x = add(1, 2)\n").passed == 1
    failing = run_tests(ADD, "x = add(1)\n")
    assert (failing.passed, failing.total) == (0, 1) and "TypeError" in failing.error


def test_output_is_captured_and_stdin_is_empty():
    run = run_tests(
        "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\ndata = sys.stdin.read()\n", "assert data == ''"
    )
    assert run.all_passed and run.stdout == "hello\n" and run.stderr == "oops\n"


def test_the_program_cannot_escape_the_sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("ESAMP_TEST_SECRET", "hunter2")
    outside = tmp_path / "escaped.txt"
    program = textwrap.dedent(
        f"""
        import os

        def attempt(fn):
            try:
                return fn()
            except PermissionError as exc:
                return "blocked: " + str(exc)

        def write_outside():
            with open({str(outside)!r}, "w") as f:
                f.write("pwned")
            return "written"

        def parent_environ():
            with open("/proc/%d/environ" % os.getppid(), "rb") as f:
                return f.read()

        def read_home():
            with open(os.path.expanduser("~" + {os.environ.get("USER", "root")!r}) + "/.bashrc") as f:
                return f.read()

        def spawn():
            import subprocess
            return subprocess.run(["true"]).returncode

        def signal_parent():
            os.kill(os.getppid(), 0)
            return "signalled"

        def open_socket():
            import socket
            return socket.socket()

        def call_libc():
            import ctypes
            return ctypes.CDLL(None).getpid()

        def local_file():
            with open("mine.txt", "w") as f:
                f.write("ok")
            with open("mine.txt") as f:
                return f.read()
        """
    )
    tests = textwrap.dedent(
        """
        assert os.environ.get("ESAMP_TEST_SECRET") is None
        assert "ESAMP_TEST_SECRET" not in str(dict(os.environ))
        assert attempt(write_outside).startswith("blocked")
        assert attempt(parent_environ).startswith("blocked")
        assert attempt(read_home).startswith("blocked")
        assert attempt(spawn).startswith("blocked")
        assert attempt(signal_parent).startswith("blocked")
        assert attempt(open_socket).startswith("blocked")
        assert attempt(call_libc).startswith("blocked")
        assert local_file() == "ok"
        """
    )
    run = run_tests(program, tests)
    failed = [(r.source, r.error) for r in run.results if not r.passed]
    assert run.all_passed, failed
    assert not outside.exists()


def test_numpy_works_inside_the_limits():
    pytest.importorskip("numpy")
    run = run_tests("import numpy as np\ndef total(n):\n    return int(np.arange(n).sum())\n", "assert total(5) == 10")
    assert run.all_passed, (run.error, run.stderr[-500:])


def test_bad_arguments_fail_before_anything_runs(monkeypatch):
    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a subprocess started before validation")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with pytest.raises(ValueError, match=r"timeout=0 is out of range; allowed: 0 < timeout <= 3600"):
        run_tests(ADD, ADD_TESTS, timeout=0)
    with pytest.raises(ValueError, match=r"memory_mb=10 is out of range; allowed: an int >= 64"):
        run_tests(ADD, ADD_TESTS, memory_mb=10)
    with pytest.raises(ValueError, match=r"file_size_mb=0 is out of range"):
        run_tests(ADD, ADD_TESTS, file_size_mb=0)
    with pytest.raises(ValueError, match=r"tests do not parse"):
        run_tests(ADD, "assert (")
    with pytest.raises(ValueError, match=r"entry_point='1x' is not a Python identifier"):
        run_tests(ADD, ADD_TESTS, entry_point="1x")
    with pytest.raises(ValueError, match=r"program is a bytes"):
        run_tests(b"x = 1", ADD_TESTS)


def test_humaneval_canonical_solutions_pass():
    if not HUMANEVAL.is_file():
        pytest.skip(f"HumanEval data not found at {HUMANEVAL} (only the project's CI and dev machines have it)")
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(3), f, strict=False)]
    for row in rows:
        run = run_tests(row["prompt"] + row["canonical_solution"], row["test"], entry_point=row["entry_point"])
        assert run.all_passed and run.total > 1, (row["task_id"], run.error, run.results)
        wrong = run_tests(row["prompt"] + "    return None\n", row["test"], entry_point=row["entry_point"])
        assert not wrong.all_passed


# --------------------------------------------------------------------------- extract_code


def test_extract_code_prefers_python_fences_and_the_entry_point():
    text = (
        "Sure.\n```bash\npip install nothing\n```\n"
        "```python\ndef helper():\n    return 1\n```\n"
        "Usage:\n```py\ndef solve(x):\n    return helper() + x\n\nprint(solve(1))\n```\n"
    )
    assert extract_code(text, "solve").startswith("def solve(x):")
    assert extract_code(text).startswith("def solve(x):")  # no entry point: the longest block
    assert extract_code("```python\n    def f():\n        return 1\n```") == "def f():\n    return 1\n"
    assert extract_code("```python\ndef cut(x):\n    return x +") == "def cut(x):\n    return x +\n"  # unclosed
    assert extract_code("def bare():\n    return 2\n") == "def bare():\n    return 2\n"
    assert extract_code("") == ""


# --------------------------------------------------------------------------- the chain

WRONG = "Here:\n```python\ndef add(a, b):\n    return a - b\n```"
LONG = "```python\ndef add(a, b):\n    # add the two numbers\n    total = a + b\n    return total\n```"
SHORT = "```python\ndef add(a, b):\n    return a + b\n```"
BROKEN = "```python\ndef add(a, b)\n    return a + b\n```"


def _chain(replies: list[str], **kwargs: Any) -> Any:
    return code_generation_chain(
        FakeListChatModel(responses=replies), n=len(replies), tests_for=lambda task: (ADD_TESTS, "add"), **kwargs
    )


def test_chain_chooses_by_tests_then_shortest():
    result = _chain([WRONG, LONG, BROKEN, SHORT]).invoke("Write add(a, b).", {"max_concurrency": 1})
    assert isinstance(result, CodeResult)
    assert result.code == "def add(a, b):\n    return a + b\n"
    assert (result.passed, result.total) == (3, 3)
    assert [c.index for c in result.candidates][:2] == [3, 1]  # both pass; the shorter first
    assert [c.test_run.passed for c in result.candidates] == [3, 3, 1, 0]
    assert result.candidates[-1].test_run.status == "error"  # the one that does not compile
    assert result.metadata["chosen_index"] == 3 and result.metadata["reward"] is None
    assert len(result.best_of_n.candidates) == 4


def test_chain_reward_breaks_ties_among_equal_test_results():
    longest = CallableReward(lambda _, text: float(len(text)), name="longest")
    result = _chain([SHORT, WRONG, LONG], reward=longest).invoke("Write add(a, b).", {"max_concurrency": 1})
    assert result.code.startswith("def add(a, b):\n    # add")
    assert result.candidates[0].reward == float(len(LONG))
    assert result.metadata["reward"] == "longest"


def test_chain_takes_dict_inputs_and_validates_before_sampling():
    chain = code_generation_chain(
        FakeListChatModel(responses=[SHORT]),
        n=1,
        tests_for=lambda task: task["tests"],
    )
    assert chain.invoke({"prompt": "Write add.", "tests": ADD_TESTS}).passed == 3
    with pytest.raises(ValueError, match="tests do not parse"):
        chain.invoke({"prompt": "Write add.", "tests": "assert ("})
    with pytest.raises(ValueError, match="tests_for=1 is not callable"):
        code_generation_chain(FakeListChatModel(responses=[SHORT]), tests_for=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n=0 is out of range"):
        code_generation_chain(FakeListChatModel(responses=[SHORT]), n=0, tests_for=lambda t: ADD_TESTS)


async def test_chain_async():
    result = await _chain([WRONG, SHORT]).ainvoke("Write add(a, b).")
    assert result.code == "def add(a, b):\n    return a + b\n"


def test_chain_docstring_example_runs():
    namespace: dict[str, Any] = {}
    exec(docstring_example(code_generation_chain), namespace)  # trusted: our own docstring
    result = namespace["result"]
    assert (result.passed, result.total) == (2, 2)
    assert "return a + b" in result.code


def test_module_never_executes_candidate_code_in_process():
    source = Path(code_generation.__file__).read_text()
    assert "exec(" not in source and "eval(" not in source  # only the harness, in the child, runs code
    harness = Path(code_generation.__file__).with_name(code_generation.HARNESS_FILE)
    assert code_generation._harness_source() == harness.read_text(encoding="utf-8")
    assert "exec(program_code, namespace)" in harness.read_text(encoding="utf-8")
    assert os.name == "posix"


def test_importing_the_harness_runs_nothing():
    # Run as `python -I -c SOURCE` its __name__ is "__main__"; imported, it must not run main() (which os._exit()s).
    code = "import esamp_agents.recipes.sandbox_harness as h; print('imported', callable(h.main))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "imported True"
