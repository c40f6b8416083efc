"""Every command in README.md runs as written, from a fresh folder, after the one setup command.

The rules (README.md says the same under "Trying the commands"; follow them when you add a
section):
- ```bash blocks are run, in document order, in one scratch folder that
  `python scripts/make_examples.py` (README's setup command, run first) filled. A trailing
  backslash continues a line, `&&` chains commands, `#` starts a comment, `< file` feeds stdin.
- Untagged ``` blocks whose lines start with `$ ` are transcripts: the text after `$ ` runs; the
  other lines are output and are not compared (keep them real anyway).
- ```python blocks are executed in the same folder.
- Any other block (```text, ```yaml, ```json, an untagged block without `$ ` lines) is not run:
  tag output, diagrams and file contents that way.
- Commands that install or test the project itself (`pip install ...`, `python -m pytest`,
  SKIPPED below) are not run.
- Every command must succeed (exit status 0). `llmtool ...` runs in this process (Typer's
  CliRunner, the same code path as the console script, without paying the start-up per
  command); `python scripts/...` runs in this process too (runpy).
A command that needs a file nobody wrote fails here: make the README write it first, or add it
to scripts/make_examples.py.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SETUP = "python scripts/make_examples.py"
SKIPPED = ("pip install", "python -m pytest", ".ci/run")

_FENCE = re.compile(r"^```(\S*)\s*$")


def readme_steps(text: str) -> list[tuple[str, str, int]]:
    """(kind, code, line) in document order: kind "sh" (one command) or "python" (a block)."""
    steps: list[tuple[str, str, int]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        tag, start = m.group(1), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if tag == "python":
            steps.append(("python", "\n".join(body), start + 1))
        elif tag in ("bash", "sh", "shell"):
            steps.extend(("sh", cmd, start + 1 + n) for n, cmd in _commands(body))
        elif tag == "":
            transcript = [(n, line[2:]) for n, line in enumerate(body) if line.startswith("$ ")]
            steps.extend(("sh", cmd, start + 1 + n) for n, cmd in transcript)
    return steps


def _commands(body: list[str]) -> list[tuple[int, str]]:
    out, pending, first = [], "", 0
    for n, line in enumerate(body):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append((first, text))
    return out


def _split_chain(command: str) -> list[list[str]]:
    words = shlex.split(command, comments=True)
    parts, current = [], []
    for w in words:
        if w == "&&":
            parts.append(current)
            current = []
        else:
            current.append(w)
    parts.append(current)
    return [p for p in parts if p]


def run_command(argv: list[str]) -> None:
    from typer.testing import CliRunner

    from llmtool.cli import app

    stdin = None
    if "<" in argv:
        k = argv.index("<")
        stdin = Path(argv[k + 1]).read_text(encoding="utf-8")
        argv = argv[:k] + argv[k + 2 :]
    if argv[0] == "llmtool":
        result = CliRunner().invoke(app, argv[1:], input=stdin)
        assert result.exit_code == 0, (
            f"exit {result.exit_code}: {result.output[-2000:]}{result.exception or ''}"
        )
    elif argv[0] == "python" and argv[1].startswith("scripts/"):
        saved = sys.argv
        sys.argv = [str(REPO / argv[1]), *argv[2:]]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                runpy.run_path(str(REPO / argv[1]), run_name="__main__")
        except SystemExit as exc:
            assert not exc.code, f"{argv[1]} exited with {exc.code}"
        finally:
            sys.argv = saved
    else:
        raise AssertionError(
            f"README command {' '.join(argv)!r} is neither llmtool nor a script: "
            "see the rules at the top of tests/test_readme.py"
        )


def test_readme_parser_follows_the_rules():
    text = "\n".join(
        [
            "```bash",
            "llmtool a \\",
            "  --b c   # note",
            "pip install x && llmtool d",
            "```",
            "```",
            "$ llmtool e",
            "output line",
            "```",
            "```text",
            "$ llmtool never",
            "```",
            "```python",
            "x = 1",
            "```",
        ]
    )
    steps = readme_steps(text)
    assert [(k, c) for k, c, _ in steps] == [
        ("sh", "llmtool a    --b c   # note"),
        ("sh", "pip install x && llmtool d"),
        ("sh", "llmtool e"),
        ("python", "x = 1"),
    ]
    assert _split_chain("pip install x && llmtool d # c") == [
        ["pip", "install", "x"],
        ["llmtool", "d"],
    ]


def test_readme_commands_run_as_written(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    assert SETUP in text, f"README must document the setup command {SETUP!r}"
    monkeypatch.chdir(tmp_path)
    run_command(shlex.split(SETUP))
    ran = 0
    for kind, code, line in readme_steps(text):
        where = f"README.md line {line}"
        if kind == "python":
            try:
                exec(compile(code, where, "exec"), {"__name__": "__readme__"})
            except Exception as exc:  # pragma: no cover - the failure message
                pytest.fail(f"{where}: python block failed: {type(exc).__name__}: {exc}")
            ran += 1
            continue
        for argv in _split_chain(code):
            command = " ".join(argv)
            if command == SETUP or command.startswith(SKIPPED):
                continue
            try:
                run_command(argv)
            except AssertionError as exc:
                pytest.fail(f"{where}: `{command}` failed: {exc}")
            ran += 1
    assert ran >= 10, f"only {ran} README commands ran: did the block rules change?"
