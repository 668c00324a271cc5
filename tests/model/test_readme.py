"""Every example of README.md (and ARCHITECTURE.md, when there is one) runs, in order, as a reader would.

How: ``tests/readme_blocks.py`` extracts the fenced blocks (CommonMark fences, so an example
whose strings contain fences is read whole; such a block uses a longer outer fence, ````).
One test per block, in document order:

- ``python`` blocks run in ONE shared namespace (a block may use what an earlier one defined),
  in a temporary working directory, on the embedded model; their stdout is captured.
- ``bash`` blocks: only the lines that call ``esamp-agents`` run (in-process through
  ``esamp_agents.cli.main``, which is what ``python -m esamp_agents`` calls, so the loaded
  model is shared; ``ESAMP_README_SUBPROCESS=1`` runs them as ``python -m esamp_agents``
  subprocesses instead), in the same working directory, each must exit 0. Set-up lines
  (``pip install``, ``bash scripts/...``) never run here: they are what CI itself runs.
  Any other line fails the test: the README should not show shell commands nothing checks.

The README says, in an HTML comment right before a block (invisible when rendered), what the
test must do differently; the directives are documented in ``tests/readme_blocks.py``:

- ``skip: REASON``: pytest skips the block with REASON (needs a network, an API key, another
  model, a GPU, or a Ray cluster). A skipped python block is still compiled and its import
  statements run; a skipped bash block's ``esamp-agents`` lines are still parsed by the CLI's
  argument parser, so renamed modules and flags fail even there.
- ``sub: OLD => NEW``: smaller sizes for the test (``n=8 => n=3``, ``max_tokens=64 =>
  max_tokens=24``) while the README keeps realistic ones; OLD must occur, so a marker cannot
  silently stop applying.
- ``expect: REGEX``: the block's output must match (where the README shows an output).
- ``check: EXPR``: an expression over the block's namespace that must be true afterwards.
- ``background: URL``: a bash block that starts a server (``esamp-agents serve``): it runs as
  a subprocess on a free loopback port (``{port}`` in the URL and in ``sub`` values) until
  the URL answers, and is stopped when this module's tests end.

Also checked without the model: every task spec the README shows (``--task X``,
``load_problems("X")``) exists, every module path it names imports, and every flag of every
``esamp-agents`` line (the command-line synopsis and the ``generate`` options table too)
exists on that command.

Runtime: about 75 s on 2 CPU cores (the first model load ~20 s, the server subprocess ~20 s,
the rest decodes); run it alone with ``python -m pytest -q tests/model/test_readme.py``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.readme_blocks import Block, parse_blocks, shell_commands

ROOT = Path(__file__).resolve().parents[2]
DOCS = [p for p in (ROOT / "README.md", ROOT / "ARCHITECTURE.md") if p.exists()]
PYTHON = ("python", "py", "python3")
SHELL = ("bash", "sh", "shell")
SETUP = ("pip ", "python -m pip ", "bash scripts/")
SUBPROCESS = os.environ.get("ESAMP_README_SUBPROCESS") == "1"
SERVER_START_S = 240.0

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])


def _blocks() -> list[Block]:
    return [b for doc in DOCS for b in parse_blocks(doc.read_text(encoding="utf-8"), doc.name)]


BLOCKS = [b for b in _blocks() if b.lang in PYTHON + SHELL]


# --------------------------------------------------------------------------- the shared state


@dataclass
class Readme:
    """What the blocks share: one namespace, one working directory, one port, the servers started."""

    workdir: Path
    port: int
    namespace: dict = field(default_factory=lambda: {"__name__": "__readme__"})
    servers: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Readme]:
    state = Readme(tmp_path_factory.mktemp("readme"), _free_port())
    yield state
    for proc, _ in state.servers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # serve_forever stops cleanly on Ctrl-C
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    return env


# --------------------------------------------------------------------------- running one block


def _check_output(block: Block, output: str) -> None:
    for pattern in block.expects:
        assert re.search(pattern, output, re.MULTILINE), f"{block.id}: output does not match {pattern!r}:\n{output}"


def _run_imports(block: Block, code: str) -> list[str]:
    """Run only the block's top-level imports; returns the third-party modules that are missing."""
    tree = ast.parse(code, block.id)
    missing = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            try:
                exec(compile(ast.Module([node], []), block.id, "exec"), {})
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] == "esamp_agents":
                    raise
                missing.append(exc.name or "?")
    return missing


def run_python(block: Block, state: Readme, monkeypatch: pytest.MonkeyPatch) -> None:
    code = block.substituted(state.port)
    compiled = compile(code, block.id, "exec")
    if block.skip:
        missing = _run_imports(block, code)
        note = f"; not installed: {', '.join(missing)}" if missing else "; it compiles and its imports run"
        pytest.skip(f"{block.id}: {block.skip}{note}")
    monkeypatch.chdir(state.workdir)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compiled, state.namespace)
    output = buffer.getvalue()
    print(output)
    _check_output(block, output)
    for expr in block.checks:
        assert eval(expr, state.namespace), f"{block.id}: check failed: {expr}"


def _commands(block: Block, code: str) -> tuple[list[list[str]], list[str]]:
    runs, setup = [], []
    for command in shell_commands(code):
        argv = shlex.split(command, comments=True)
        if argv and argv[0] == "esamp-agents":
            runs.append(argv[1:])
        elif command.startswith(SETUP):
            setup.append(command)
        else:
            pytest.fail(f"{block.id}: does not know how to check {command!r}; only esamp-agents lines run here")
    return runs, setup


def _cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    if SUBPROCESS:
        proc = subprocess.run(
            [sys.executable, "-m", "esamp_agents", *argv],
            cwd=cwd, env=_child_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return proc.returncode, proc.stdout, proc.stderr
    from esamp_agents.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd_before = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv, out=out)
    finally:
        os.chdir(cwd_before)
    return code, out.getvalue(), err.getvalue()


def _start_server(block: Block, argv: list[str], state: Readme) -> None:
    url = block.background.replace("{port}", str(state.port))  # type: ignore[union-attr]
    log = state.workdir / f"server-{block.line}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "esamp_agents", *argv],
            cwd=state.workdir, env=_child_env(), stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    state.servers.append((proc, log))
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{block.id}: esamp-agents {shlex.join(argv)} exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{block.id}: {url} did not answer within {SERVER_START_S:.0f} s:\n{log.read_text()[-4000:]}")


def run_shell(block: Block, state: Readme) -> None:
    runs, setup = _commands(block, block.substituted(state.port))
    if block.skip:
        from esamp_agents.cli.app import build_parser

        for argv in runs:  # the flags still exist, even where the command cannot run here
            with contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    build_parser().parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{block.id}: esamp-agents {shlex.join(argv)} no longer parses: {err.getvalue()}")
        pytest.skip(f"{block.id}: {block.skip}" + (f"; its {len(runs)} esamp-agents line(s) parse" if runs else ""))
    if not runs:
        pytest.skip(f"{block.id}: set-up lines only ({'; '.join(setup)}): CI runs them, not this test")
    if block.background:
        assert len(runs) == 1, f"{block.id}: a background block starts one server"
        _start_server(block, runs[0], state)
        return
    outputs = []
    for argv in runs:
        code, out, err = _cli(argv, state.workdir)
        print(f"$ esamp-agents {shlex.join(argv)}\n{out}")
        assert code == 0, f"{block.id}: esamp-agents {shlex.join(argv)} exited {code}:\n{err[-4000:]}"
        outputs.append(out)
    _check_output(block, "\n".join(outputs))


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_example_runs(block: Block, readme: Readme, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.lang in PYTHON:
        run_python(block, readme, monkeypatch)
    else:
        run_shell(block, readme)


# --------------------------------------------------------------------------- checks without the model


def test_the_readme_has_examples_and_every_marker_applies() -> None:
    assert DOCS and DOCS[0].name == "README.md"
    langs = [b.lang for b in BLOCKS]
    assert langs.count("python") >= 8 and langs.count("bash") >= 4, langs
    for block in BLOCKS:
        block.substituted(1234)  # every 'sub' applies
        if block.lang in PYTHON:
            compile(block.substituted(1234), block.id, "exec")
        assert not (block.skip and (block.expects or block.checks or block.subs)), f"{block.id}: skip says all"
        if block.background:
            assert block.lang in SHELL and "{port}" in block.background, block.id


_SPEC = re.compile(r"""(?:--task\s+|load_problems\(\s*["'])([a-z_0-9]+:\d+[^\s"'`)]*)""")


def _task_specs() -> list[str]:
    specs = {m for doc in DOCS for m in _SPEC.findall(doc.read_text(encoding="utf-8"))}
    return sorted(specs)


def test_readme_shows_task_specs() -> None:
    assert "single_digit:240:0:train" in _task_specs()


@pytest.mark.parametrize("spec", _task_specs())
def test_every_task_spec_in_the_readme_exists(spec: str) -> None:
    from esamp_agents.evaluation.tasks import load_problems

    problems = load_problems(spec)  # raises naming the allowed range when a count is too large
    assert len(problems) == int(spec.split(":")[1])


_FULL = re.compile(r"`(esamp_agents(?:\.\w+)+)`")
_SHORT = re.compile(r"`(\.\w+)`")


def _module_references() -> list[str]:
    refs: list[str] = []
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            last = None
            for m in re.finditer(r"`(esamp_agents(?:\.\w+)+|\.\w+)`", line):
                name = m.group(1)
                if name.startswith("esamp_agents"):
                    refs.append(name)
                    last = name
                elif last and line.lstrip().startswith("|"):  # table shorthand: `.head` next to a full path
                    refs.append(f"{last}|{name}")
    return sorted(set(refs))


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("ref", _module_references())
def test_every_module_path_in_the_readme_imports(ref: str) -> None:
    if "|" in ref:  # `.x` after `a.b.c`: a sibling (a.b.x) or a child (a.b.c.x)
        full, short = ref.split("|")
        candidates = [full.rsplit(".", 1)[0] + short, full + short]
    else:
        candidates = [ref]
    assert any(_resolves(c) for c in candidates), f"none of {candidates} imports"


def _options(command: str) -> set[str]:
    import argparse

    from esamp_agents.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert command in sub.choices, f"esamp-agents has no command {command!r}; it has {sorted(sub.choices)}"
    return {o for action in sub.choices[command]._actions for o in action.option_strings}


def _flag_uses() -> list[tuple[str, str, str]]:
    """(where, command, flags) for every ``esamp-agents CMD ...`` line of any block (the synopsis
    block included, whose [optional] parts cannot run) and for the ``generate`` options table."""
    uses = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in parse_blocks(text, doc.name):
            for command in shell_commands(block.code):
                words = command.split()
                if len(words) > 1 and words[0] == "esamp-agents" and not words[1].startswith("-"):
                    uses.append((block.id, words[1], command))
        table = text.split("`generate` options:", 1)
        if len(table) == 2:
            rows = [r for r in table[1].strip().split("\n\n", 1)[0].splitlines() if r.startswith("| `")]
            uses.append((f"{doc.name}: generate options table", "generate", " ".join(r.split("|")[1] for r in rows)))
    return uses


FLAG_USES = _flag_uses()


@pytest.mark.parametrize(("where", "command", "text"), FLAG_USES, ids=[f"{w}:{c}" for w, c, _ in FLAG_USES])
def test_every_flag_the_readme_shows_exists(where: str, command: str, text: str) -> None:
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b", text))
    unknown = flags - _options(command)
    assert not unknown, f"{where}: esamp-agents {command} has no {sorted(unknown)}"


def test_the_flag_check_sees_the_synopsis_and_the_table() -> None:
    uses = FLAG_USES
    assert {c for _, c, _ in uses} >= {"generate", "demo", "collect", "train-reward", "score", "serve", "eval"}
    table = next(t for w, _, t in uses if "options table" in w)
    assert "--warm-start-steps" in table and "--prompts-file" in table


# --------------------------------------------------------------------------- the parser itself

FENCED = """\
Intro.

<!-- readme-test: skip: needs a network -->
```bash
pip install x
esamp-agents generate "hi" \\
  -n 2   # two
```

<!-- readme-test
sub: n=8 => n=2
sub: 8000 => {port}
expect: ^2 2$
check: ok
-->

````python
replies = [
    '''```python
def add(a, b):
    return a + b
```''',
]
url = "http://127.0.0.1:8000"
n=8
````

~~~
```not a fence closer inside tildes
~~~

``inline`` text, and ```a`b``` is not a fence.

   ```py
   indented = 1
   ```
"""


def test_parser_reads_nested_fences_markers_and_indentation() -> None:
    blocks = parse_blocks(FENCED, "X.md")
    assert [(b.line, b.lang) for b in blocks] == [(4, "bash"), (17, "python"), (28, ""), (34, "py")]
    bash, code, tilde, indented = blocks
    assert bash.skip == "needs a network" and bash.id == "X.md:4:bash"
    assert shell_commands(bash.code) == ["pip install x", 'esamp-agents generate "hi"    -n 2   # two']
    assert shlex.split(shell_commands(bash.code)[1], comments=True) == ["esamp-agents", "generate", "hi", "-n", "2"]
    assert "```python\ndef add" in code.code and code.code.endswith("n=8\n")
    assert code.subs == [("n=8", "n=2"), ("8000", "{port}")] and code.expects == ["^2 2$"] and code.checks == ["ok"]
    assert "n=2" in code.substituted(99) and "n=8" not in code.substituted(99) and ":99" in code.substituted(99)
    compile(code.code, code.id, "exec")  # read whole: the inner ``` did not close the block
    assert tilde.code == "```not a fence closer inside tildes\n"
    assert indented.code == "indented = 1\n"


def test_parser_runs_an_unclosed_fence_to_the_end() -> None:
    (block,) = parse_blocks("```python\nx = 1\n", "X.md")
    assert block.code == "x = 1\n"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<!-- readme-test: skip: why -->\nSome prose.\n```python\n```\n", "not followed by a code block"),
        ("<!-- readme-test: skip: why -->\n", "not followed by a code block"),
        ("<!-- readme-test: frobnicate: x -->\n```python\n```\n", "bad readme-test directive"),
        ("<!-- readme-test: sub: a -> b -->\n```python\n```\n", "needs 'OLD => NEW'"),
        ("<!-- readme-test\nskip: a\nskip: b\n-->\n```python\n```\n", "more than one 'skip'"),
        ("<!-- readme-test\nskip: a\n", "never closed"),
    ],
    ids=["prose-between", "at-the-end", "unknown-key", "sub-without-arrow", "two-skips", "unclosed-comment"],
)
def test_parser_rejects_bad_markers(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_blocks(text, "X.md")


def test_a_sub_that_no_longer_applies_is_an_error() -> None:
    (block,) = parse_blocks("<!-- readme-test: sub: n=8 => n=2 -->\n```python\nn = 8\n```\n", "X.md")
    with pytest.raises(ValueError, match="does not apply"):
        block.substituted()
