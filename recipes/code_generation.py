"""Code generation: N candidate programs, each tested in a sandboxed subprocess, the best one kept.

The recipe (:func:`code_generation_chain`): sample N candidate answers with
:class:`~esamp_agents.selection.best_of_n.BestOfN` -> extract each one's program from its markdown fence
(:func:`extract_code`) -> run the given tests against every program in its own subprocess
(:func:`run_tests`) -> choose by tests passed, then the reward, then the shortest program,
then the earliest candidate.

Untrusted code never runs in the caller's process: the caller only writes files and reads
a report. Each run is ``sys.executable -I`` (no user site, no ``PYTHON*`` variables) in a fresh
temporary directory, with stdin on ``/dev/null``, a minimal environment (no inherited
variables, so no secrets), a wall-clock timeout that kills the whole process group, and
limits that the trusted harness sets with ``resource.setrlimit`` before it reads the program:
CPU seconds, address space (``memory_mb``), file size and no core dumps. The harness then
installs an audit hook (PEP 578) that refuses, inside the candidate: starting processes,
sending signals, sockets, ``ctypes`` calls, writing or deleting anything outside the
temporary directory, and reading files outside it, the Python installation and the import
path (so ``/proc/<parent>/environ`` and home-directory files are out of reach).

Limits of this isolation: it protects the caller from programs that are wrong, slow,
greedy or careless, and from casual misbehaviour. It is not a security boundary against a
deliberately hostile program (an audit hook runs in the same interpreter as the code it
watches, and a program can also forge its own test results, as with HumanEval's harness).
For adversarial code run this inside an OS sandbox (a container, a VM or nsjail).
POSIX only (it needs ``resource`` and process groups).

Counting tests: every ``assert`` statement in the test source is one test, wherever it is
(top level, inside a HumanEval-style ``check(candidate)`` function, inside a loop). A test
passes when it ran at least once and every run of it held; a test that raised, failed, or
was never reached (the program crashed, timed out or exited first) fails. Tests continue
after a failed assert. If the test source defines a top-level ``check`` function it is
called with the program's ``entry_point`` function (inferred when the program defines
exactly one top-level function). A test source with no assert at all counts as one test:
"it ran to the end without error".
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.resources
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from esamp_agents.selection.best_of_n import BestOfN, BestOfNResult
from esamp_agents.selection.rewards import CallableReward

DEFAULT_TIMEOUT = 10.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_FILE_SIZE_MB = 16
MAX_TIMEOUT = 3600.0
MIN_MEMORY_MB = 64
OUTPUT_LIMIT = 8192
"""Characters of the program's stdout / stderr kept in a :class:`TestRun`."""
_REPORT_LIMIT = 1 << 20
NO_ASSERT = "<no assert statements: the test source must run to the end without error>"
NOT_REACHED = "not reached"

HARNESS_FILE = "sandbox_harness.py"
"""The trusted harness (:mod:`esamp_agents.recipes.sandbox_harness`), run as ``python -I -c SOURCE ...``."""


@dataclass(frozen=True)
class AssertResult:
    """One test (an ``assert`` statement) of a run."""

    line: int
    source: str
    passed: bool
    error: str | None = None
    """Why it failed: ``"assertion failed"``, the exception, or ``"not reached"``; None when it passed."""


@dataclass(frozen=True)
class TestRun:
    """The outcome of running a test source against one program in a sandboxed subprocess."""

    __test__ = False  # not a pytest test class

    passed: int
    total: int
    results: tuple[AssertResult, ...]
    completed: bool
    """The harness ran the program and every test statement to the end."""
    timed_out: bool
    """Killed by the wall-clock timeout or the CPU-time limit."""
    memory_exceeded: bool
    """A MemoryError was seen (the address-space limit was hit)."""
    crashed: bool
    """The process ended without the harness reporting why (os._exit, a signal, a crash)."""
    returncode: int | None
    error: str | None
    """Why the run stopped before the end (program error, crash, timeout...), else None."""
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def all_passed(self) -> bool:
        return self.completed and self.passed == self.total

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def status(self) -> str:
        """One word: ``passed``, ``failed``, ``timeout``, ``memory``, ``crashed`` or ``error``."""
        if self.all_passed:
            return "passed"
        if self.timed_out:
            return "timeout"
        if self.memory_exceeded:
            return "memory"
        if self.completed:
            return "failed"
        return "crashed" if self.crashed else "error"


@dataclass(frozen=True)
class _Spec:
    line: int
    source: str


def _assert_specs(tests: str) -> list[_Spec]:
    """The tests of a test source, in the harness's numbering (``ast.walk`` order)."""
    try:
        tree = ast.parse(tests, "tests.py")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes
        raise ValueError(f"tests do not parse: {exc}; allowed: Python source with assert statements") from exc
    specs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            text = ast.get_source_segment(tests, node) or ast.unparse(node)
            specs.append(_Spec(node.lineno, " ".join(text.split())[:200]))
    return specs


def _check_limits(timeout: float, memory_mb: int | None, file_size_mb: int) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout={timeout!r} is out of range; allowed: 0 < timeout <= {MAX_TIMEOUT:g} seconds")
    if memory_mb is not None and (
        isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < MIN_MEMORY_MB
    ):
        raise ValueError(f"memory_mb={memory_mb!r} is out of range; allowed: an int >= {MIN_MEMORY_MB}, or None")
    if isinstance(file_size_mb, bool) or not isinstance(file_size_mb, int) or file_size_mb < 1:
        raise ValueError(f"file_size_mb={file_size_mb!r} is out of range; allowed: an int >= 1")


def _check_entry_point(entry_point: str | None) -> None:
    if entry_point is not None and (not isinstance(entry_point, str) or not entry_point.isidentifier()):
        raise ValueError(f"entry_point={entry_point!r} is not a Python identifier; allowed: a function name or None")


def _read_head(f: Any) -> str:
    f.seek(0)
    data = f.read(OUTPUT_LIMIT * 4)
    return data.decode("utf-8", "replace")[:OUTPUT_LIMIT]


def _minimal_env(sandbox: str) -> dict[str, str]:
    """No inherited variables (so no secrets); one thread for numeric libraries (it keeps them under the limits)."""
    return {
        "PATH": os.defpath,
        "HOME": sandbox,
        "TMPDIR": sandbox,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@functools.cache
def _harness_source() -> str:
    """The harness's source, passed with ``-c`` so the sandboxed child never imports this package."""
    return importlib.resources.files("esamp_agents.recipes").joinpath(HARNESS_FILE).read_text(encoding="utf-8")


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def run_tests(
    program: str,
    tests: str,
    *,
    entry_point: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int | None = DEFAULT_MEMORY_MB,
    file_size_mb: int = DEFAULT_FILE_SIZE_MB,
) -> TestRun:
    """Run ``tests`` against ``program`` in a sandboxed subprocess (see the module docstring).

    ``tests`` is Python source with ``assert`` statements, at top level (they see the program's
    names) or in a HumanEval-style ``check(candidate)`` function. ``timeout`` is wall-clock
    seconds (the CPU limit is its ceiling + 1); ``memory_mb`` caps the address space (None: no
    cap); ``file_size_mb`` caps every file the program writes. Bad tests or limits raise
    ValueError before anything runs; whatever the program does is reported in the TestRun.

    >>> run_tests("def add(a, b):\\n    return a + b\\n", "assert add(2, 3) == 5\\nassert add(0, 0) == 1").passed
    1
    """
    if not isinstance(program, str):
        raise ValueError(f"program is a {type(program).__name__}; allowed: Python source as a str")
    if not isinstance(tests, str):
        raise ValueError(f"tests is a {type(tests).__name__}; allowed: Python source as a str")
    _check_limits(timeout, memory_mb, file_size_mb)
    _check_entry_point(entry_point)
    if os.name != "posix":
        raise RuntimeError(f"run_tests needs a POSIX system (resource limits, process groups); os.name={os.name!r}")
    specs = _assert_specs(tests)
    harness = _harness_source()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="esamp-code-") as root:
        sandbox = os.path.join(root, "sandbox")
        os.mkdir(sandbox, 0o700)
        for name, text in (("program.py", program), ("tests.py", tests)):
            with open(os.path.join(sandbox, name), "w", encoding="utf-8") as f:
                f.write(text)
        cpu = math.ceil(timeout) + 1
        memory = 0 if memory_mb is None else memory_mb << 20
        args = [str(cpu), str(memory), str(file_size_mb << 20), entry_point or ""]
        report = bytearray()
        read_end, write_end = os.pipe()
        with open(os.path.join(root, "stdout"), "w+b") as out, open(os.path.join(root, "stderr"), "w+b") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", harness, str(write_end), *args],
                    cwd=sandbox,
                    env=_minimal_env(sandbox),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(write_end,),
                    start_new_session=True,
                )
            finally:
                os.close(write_end)
            reader = threading.Thread(target=_drain, args=(read_end, report), daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except BaseException as exc:  # the timeout, or the caller interrupted: never leave the run behind
                timed_out = isinstance(exc, subprocess.TimeoutExpired)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: children cannot outlive the run
                proc.wait()
                if not timed_out:
                    raise
            reader.join(timeout=2.0)
            stdout, stderr = _read_head(out), _read_head(err)
    return _summarise(specs, bytes(report), proc.returncode, timed_out, stdout, stderr, time.monotonic() - start)


def _drain(fd: int, into: bytearray) -> None:
    """Read the report pipe to its end (kept to a bounded size) so the child never blocks on it."""
    try:
        while chunk := os.read(fd, 65536):
            if len(into) < _REPORT_LIMIT:
                into.extend(chunk)
    finally:
        os.close(fd)


def _summarise(
    specs: list[_Spec], report: bytes, returncode: int, timed_out: bool, stdout: str, stderr: str, seconds: float
) -> TestRun:
    started = done = False
    stop: str | None = None
    outcome: dict[int, str | None] = {}
    for raw in report.decode("utf-8", "replace").splitlines():
        kind, _, rest = raw.partition(" ")
        if kind == "S":
            started = True
        elif kind == "D":
            done = True
        elif kind == "E":
            stop = rest
        elif kind in ("P", "F"):
            index, _, why = rest.partition(" ")
            if index.isdigit() and int(index) < len(specs):
                i = int(index)
                if kind == "F":
                    outcome[i] = why or "assertion failed"
                elif i not in outcome:
                    outcome[i] = None
    cpu_killed = returncode == -signal.SIGXCPU
    timed_out = timed_out or cpu_killed
    crashed = not done and stop is None and not timed_out
    if not done and stop is None:
        if timed_out:
            stop = "CPU time limit exceeded" if cpu_killed else "wall-clock timeout"
        elif not started:
            stop = f"the sandbox failed to start (exit status {returncode}): {stderr.strip()[-300:]}"
        elif returncode is not None and returncode < 0:
            stop = f"killed by {_signal_name(-returncode)}"
        else:
            stop = f"exited (status {returncode}) before the tests finished"
    if specs:
        results = tuple(
            AssertResult(s.line, s.source, i in outcome and outcome[i] is None, outcome.get(i, NOT_REACHED))
            for i, s in enumerate(specs)
        )
    else:
        results = (AssertResult(0, NO_ASSERT, done, None if done else stop),)
    memory = "MemoryError" in (stop or "") or any("MemoryError" in (r.error or "") for r in results)
    return TestRun(
        passed=sum(r.passed for r in results),
        total=len(results),
        results=results,
        completed=done,
        timed_out=timed_out,
        memory_exceeded=memory,
        crashed=crashed,
        returncode=returncode,
        error=None if done else stop,
        stdout=stdout,
        stderr=stderr,
        seconds=seconds,
    )


# --------------------------------------------------------------------------- code extraction

_FENCE = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w.+-]*)[^\n]*\n(?P<body>.*?)(?:^[ \t]*(?P=fence)[ \t]*$|\Z)",
    re.S | re.M,
)
PYTHON_TAGS = frozenset({"", "python", "py", "python3", "py3"})


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a model's answer: a fenced Python block, else the whole text.

    Among fenced blocks tagged ``python``/``py`` (or untagged), the first that defines
    ``entry_point`` wins, else the longest. An unclosed fence (a reply cut by the token
    limit) runs to the end of the text.
    """
    if not isinstance(text, str):
        raise ValueError(f"text is a {type(text).__name__}; allowed: str")
    _check_entry_point(entry_point)
    blocks = [
        textwrap.dedent(m.group("body")).strip("\n")
        for m in _FENCE.finditer(text)
        if m.group("lang").lower() in PYTHON_TAGS
    ]
    blocks = [b for b in blocks if b.strip()]
    if not blocks:
        return text.strip("\n") + "\n" if text.strip() else ""
    if entry_point is not None:
        pattern = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
        for block in blocks:
            if pattern.search(block):
                return block + "\n"
    return max(blocks, key=len) + "\n"


# --------------------------------------------------------------------------- the chain


@dataclass
class CodeCandidate:
    """One sampled answer, its program, and how that program did."""

    index: int
    text: str
    code: str
    test_run: TestRun
    reward: float | None = None
    rank: int = -1


@dataclass
class CodeResult:
    """What :func:`code_generation_chain` returns: the chosen program and every candidate, best first."""

    code: str
    test_run: TestRun
    text: str
    candidates: list[CodeCandidate]
    best_of_n: BestOfNResult
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> int:
        return self.test_run.passed

    @property
    def total(self) -> int:
        return self.test_run.total


def _default_prompt(value: Any) -> Any:
    if isinstance(value, dict):
        if "prompt" not in value:
            raise ValueError(f"input dict has keys {sorted(value)}; allowed: a 'prompt' key (or pass prompt_for=)")
        return value["prompt"]
    return value


def _length_score(_: Any, text: str) -> float:
    return -float(len(extract_code(text)))


def code_generation_chain(
    model: Any,
    *,
    tests_for: Callable[[Any], str | tuple[str, str | None]],
    n: int = 8,
    reward: Any = None,
    prompt_for: Callable[[Any], Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int | None = DEFAULT_MEMORY_MB,
    file_size_mb: int = DEFAULT_FILE_SIZE_MB,
    max_workers: int | None = None,
) -> Runnable:
    """N candidate programs -> tests in sandboxed subprocesses -> the best program.

    ``model`` is any LangChain model or Runnable (``ChatESamp``/``ESampLLM`` sample all N in
    one call, ``ChatOpenAI`` with ``n=N``, others by N parallel calls). The chain's input goes
    to ``prompt_for(input)`` (default: the input itself, or ``input["prompt"]`` for a dict) for
    the model, and to ``tests_for(input)``, which returns the test source or
    ``(tests, entry_point)``. ``reward`` (any BestOfN reward) breaks ties among programs
    that pass as many tests; then the shortest program wins, then the earliest candidate.
    Tests run ``max_workers`` at a time (default: one per CPU, at most ``n``).

    Returns a :class:`CodeResult`.

    Example:
        .. code-block:: python

            from langchain_core.language_models.fake_chat_models import FakeListChatModel

            from esamp_agents.recipes.code_generation import code_generation_chain

            replies = [
                "```python\\ndef add(a, b):\\n    return a - b\\n```",
                "Here you go:\\n```python\\ndef add(a, b):\\n    return a + b\\n```",
            ]
            chain = code_generation_chain(
                FakeListChatModel(responses=replies),  # any chat model, e.g. ChatOpenAI
                n=2,
                tests_for=lambda task: ("assert add(2, 3) == 5\\nassert add(-1, 1) == 0", "add"),
            )
            result = chain.invoke("Write a Python function add(a, b) that returns the sum.")
            print(result.passed, result.total)  # 2 2
            print(result.code)
    """
    if not callable(tests_for):
        raise ValueError(f"tests_for={tests_for!r} is not callable; allowed: input -> tests or (tests, entry_point)")
    if prompt_for is not None and not callable(prompt_for):
        raise ValueError(f"prompt_for={prompt_for!r} is not callable; allowed: input -> model input, or None")
    _check_limits(timeout, memory_mb, file_size_mb)
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
    ):
        raise ValueError(f"max_workers={max_workers!r} is out of range; allowed: an int >= 1 or None")
    if reward is not None and not isinstance(getattr(reward, "name", None), str):
        raise ValueError(f"reward={reward!r} has no name; allowed: a Reward (score()/make_observer()) or None")
    to_prompt = prompt_for or _default_prompt
    rewards = [reward] if reward is not None else [CallableReward(_length_score, name="shortest")]
    sampler = BestOfN(model, n=n, rewards=rewards, include_candidates=True)  # validates n and the reward
    reward_name = reward.name if reward is not None else None
    workers = max_workers or max(1, min(n, os.cpu_count() or 1))

    def prepare(value: Any) -> dict[str, Any]:
        spec = tests_for(value)
        tests, entry_point = spec if isinstance(spec, tuple) else (spec, None)
        if not isinstance(tests, str):
            raise ValueError(f"tests_for returned {type(tests).__name__}; allowed: str or (str, entry_point)")
        _check_entry_point(entry_point)
        _assert_specs(tests)  # bad tests fail here, before any sampling
        return {"input": value, "prompt": to_prompt(value), "tests": tests, "entry_point": entry_point}

    def choose(state: dict[str, Any]) -> CodeResult:
        sampled: BestOfNResult = state["sampled"]
        entry_point = state["entry_point"]
        ordered = sorted(sampled.candidates, key=lambda c: c.index)
        codes = [extract_code(c.text, entry_point) for c in ordered]

        def run(code: str) -> TestRun:
            return run_tests(
                code,
                state["tests"],
                entry_point=entry_point,
                timeout=timeout,
                memory_mb=memory_mb,
                file_size_mb=file_size_mb,
            )

        with ThreadPoolExecutor(max_workers=min(workers, len(codes))) as pool:
            runs = list(pool.map(run, codes))
        candidates = []
        for c, code, test_run in zip(ordered, codes, runs, strict=True):
            score = c.scores.get(reward_name) if reward_name else None
            candidates.append(CodeCandidate(c.index, c.text, code, test_run, score))

        def key(c: CodeCandidate) -> tuple[float, float, int, int]:
            score = c.reward if c.reward is not None and math.isfinite(c.reward) else -math.inf
            return (-c.test_run.passed, -score if reward_name else 0.0, len(c.code), c.index)

        ranked = sorted(candidates, key=key)
        for rank, c in enumerate(ranked):
            c.rank = rank
        best = ranked[0]
        metadata = {
            "chosen_index": best.index,
            "passed": best.test_run.passed,
            "total": best.test_run.total,
            "reward": reward_name,
            "candidates": [
                {"index": c.index, "passed": c.test_run.passed, "status": c.test_run.status, "reward": c.reward}
                for c in ranked
            ],
        }
        return CodeResult(best.code, best.test_run, best.text, ranked, sampled, metadata)

    chain = (
        RunnableLambda(prepare, name="prepare")
        | RunnablePassthrough.assign(sampled=(lambda s: s["prompt"]) | sampler)
        | RunnableLambda(choose, name="run_tests_and_choose")
    )
    return chain.with_config(run_name="code_generation")


__all__ = [
    "DEFAULT_FILE_SIZE_MB",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT",
    "AssertResult",
    "CodeCandidate",
    "CodeResult",
    "TestRun",
    "code_generation_chain",
    "extract_code",
    "run_tests",
]
