"""Fenced code blocks of a Markdown file, with the ``readme-test`` markers written before them.

Used by ``tests/model/test_readme.py``; no model, no torch. Fences follow CommonMark: a fence is 3 or
more backticks (or tildes) indented at most 3 spaces, and it closes only on a line of the same
character, at least as long, with nothing after it but spaces. So a block opened with ````
may contain ``` lines, and a ``` inside a string in the code never closes anything.

A marker is an HTML comment (invisible when the Markdown is rendered) right before a block,
blank lines between allowed, one directive per line or several comments in a row::

    <!-- readme-test: skip: needs an OpenAI API key -->

    <!-- readme-test
    sub: n=8 => n=2
    expect: ^\\d+ (True|False)
    -->

Directives (all may repeat except ``skip`` and ``background``):

- ``skip: REASON``: the test skips the block with this reason (still checking what it can);
- ``sub: OLD => NEW``: replace the literal text OLD by NEW before running (OLD must occur);
  ``{port}`` in NEW is the loopback port the test picked for a server;
- ``expect: REGEX``: the block's output must match (``re.search``, multi-line);
- ``check: EXPR``: a Python expression, true in the block's namespace after it ran (python);
- ``background: URL``: a bash block that starts a server: run it in the background and wait
  until URL answers; it is stopped when the module's tests end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MARKER = "readme-test"
KEYS = ("skip", "sub", "expect", "check", "background")

_FENCE_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER_START = re.compile(r"^\s*<!--\s*" + re.escape(MARKER) + r"\b:?(?P<rest>.*)$")


@dataclass
class Block:
    """One fenced block: where it is, its language, its code, and its markers' directives."""

    path: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    subs: list[tuple[str, str]] = field(default_factory=list)
    expects: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    background: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}:{self.lang or 'text'}"

    def substituted(self, port: int | str = "{port}") -> str:
        """The code with every ``sub`` applied (``{port}`` in NEW becomes ``port``); an OLD that
        no longer occurs is an error, so a marker cannot silently outlive its example."""
        code = self.code
        for old, new in self.subs:
            if old not in code:
                raise ValueError(f"{self.id}: 'sub: {old} => {new}' does not apply: {old!r} is not in the block")
            code = code.replace(old, new.replace("{port}", str(port)))
        return code


def _add_directive(pending: dict[str, list[str]], text: str, where: str) -> None:
    text = text.strip()
    if not text:
        return
    key, sep, value = text.partition(":")
    key, value = key.strip(), value.strip()
    if not sep or key not in KEYS or not value:
        raise ValueError(f"{where}: bad {MARKER} directive {text!r}; allowed: 'KEY: VALUE' with KEY in {KEYS}")
    if key == "sub" and " => " not in value:
        raise ValueError(f"{where}: 'sub' needs 'OLD => NEW', got {value!r}")
    pending.setdefault(key, []).append(value)


def _apply(block: Block, pending: dict[str, list[str]]) -> None:
    for key, values in pending.items():
        if key in ("skip", "background") and len(values) > 1:
            raise ValueError(f"{block.id}: more than one '{key}' directive")
        if key == "skip":
            block.skip = values[0]
        elif key == "background":
            block.background = values[0]
        elif key == "sub":
            block.subs.extend(tuple(v.split(" => ", 1)) for v in values)  # type: ignore[misc]
        elif key == "expect":
            block.expects.extend(values)
        else:
            block.checks.extend(values)


def parse_blocks(text: str, path: str = "README.md") -> list[Block]:
    """Every fenced block of ``text`` in order, markers attached; a stray marker is an error."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: dict[str, list[str]] = {}
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        opened = _FENCE_OPEN.match(line)
        if opened and not (opened["fence"][0] == "`" and "`" in opened["info"]):
            indent, fence = len(opened["indent"]), opened["fence"]
            closing = re.compile(r"^ {0,3}" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
            body: list[str] = []
            start = i + 1
            i += 1
            while i < len(lines) and not closing.match(lines[i]):
                content = lines[i]
                strip = len(content) - len(content.lstrip(" "))
                body.append(content[min(indent, strip) :])
                i += 1
            words = opened["info"].split()
            block = Block(path, start, words[0].lower() if words else "", "\n".join(body) + ("\n" if body else ""))
            _apply(block, pending)
            pending, pending_line = {}, 0
            blocks.append(block)
            i += 1  # the closing fence (or the end of the file: an unclosed fence runs to the end)
            continue
        marker = _MARKER_START.match(line)
        if marker:
            where = f"{path}:{i + 1}"
            pending_line = pending_line if pending else i + 1
            rest = marker["rest"]
            while "-->" not in rest:
                _add_directive(pending, rest, where)
                i += 1
                if i >= len(lines):
                    raise ValueError(f"{where}: {MARKER} comment is never closed")
                rest = lines[i]
            _add_directive(pending, rest.split("-->", 1)[0], where)
        elif line.strip() and pending:
            raise ValueError(f"{path}:{pending_line}: {MARKER} marker is not followed by a code block")
        i += 1
    if pending:
        raise ValueError(f"{path}:{pending_line}: {MARKER} marker is not followed by a code block")
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: comments kept, ``\\`` continuations joined, blank lines dropped."""
    commands: list[str] = []
    current = ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    if current.strip():
        commands.append(current.strip())
    return commands
