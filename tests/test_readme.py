"""Every command in README.md runs as written, from a fresh folder, after the one setup command.

The rules (README.md states them under "Trying every command in this README"):
- ```bash blocks run line by line, in document order, in one scratch folder that
  `python scripts/make_examples.py` (README's setup command, run first) filled. A trailing
  backslash continues a line, `&&` chains commands, `#` starts a comment, `< file` feeds stdin.
- In untagged ``` blocks the lines starting with `$ ` run; the lines after one, up to the next,
  are its output. Output is not compared, except: a command shown answering `error: ...` must
  fail (exit 2) with exactly that line, and `$ cat FILE` writes FILE with the lines shown.
- ```python blocks are executed in the same folder, in order, as one program (one namespace).
- Any other block (```text, ```yaml, ```json, an untagged block without `$ ` lines) is not run:
  tag output, diagrams and file contents that way.
- Commands that install or test the project itself (`pip install ...`, `python -m pytest`,
  SKIPPED below) are not run. Every other command must succeed (exit status 0).
- `llmtool ...` runs in this process (Typer's CliRunner: the code path of the console script,
  without paying the start-up per command); `python scripts/...` runs in this process too.
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


def readme_steps(text: str) -> list[tuple[str, str, int, list[str]]]:
    """(kind, code, line, shown output) in document order: kind "sh" (one command line) or
    "python" (a whole block); shown output only for transcript commands."""
    steps: list[tuple[str, str, int, list[str]]] = []
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
            steps.append(("python", "\n".join(body), start + 1, []))
        elif tag in ("bash", "sh", "shell"):
            steps.extend(("sh", cmd, start + 1 + n, []) for n, cmd in _commands(body))
        elif tag == "":
            for n, line in enumerate(body):
                if line.startswith("$ "):
                    shown = []
                    for rest in body[n + 1 :]:
                        if rest.startswith("$ "):
                            break
                        shown.append(rest)
                    while shown and not shown[-1].strip():
                        shown.pop()
                    steps.append(("sh", line[2:], start + 1 + n, shown))
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


def run_command(argv: list[str], shown: list[str] | None = None) -> None:
    from typer.testing import CliRunner

    from llmtool.cli import app

    shown = shown or []
    if argv[0] == "cat" and len(argv) == 2:  # a transcript showing a file: write it
        Path(argv[1]).write_text("\n".join(shown) + "\n", encoding="utf-8")
        return
    expected_error = next((line for line in shown if line.strip()), "").startswith("error: ")
    stdin = None
    if "<" in argv:
        k = argv.index("<")
        stdin = Path(argv[k + 1]).read_text(encoding="utf-8")
        argv = argv[:k] + argv[k + 2 :]
    if argv[0] == "llmtool":
        result = CliRunner().invoke(app, argv[1:], input=stdin)
        if expected_error:
            said = [line for line in result.output.splitlines() if line.startswith("error: ")]
            assert result.exit_code == 2 and said == [shown[0].strip()], (
                f"expected {shown[0]!r}, got exit {result.exit_code}: {result.output[-2000:]}"
            )
            return
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
            "",
            "$ cat f.yaml",
            "a: 1",
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
    assert [(k, c, out) for k, c, _, out in steps] == [
        ("sh", "llmtool a    --b c   # note", []),
        ("sh", "pip install x && llmtool d", []),
        ("sh", "llmtool e", ["output line"]),
        ("sh", "cat f.yaml", ["a: 1"]),
        ("python", "x = 1", []),
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
    namespace: dict = {"__name__": "__readme__"}  # the python blocks are one program
    for kind, code, line, shown in readme_steps(text):
        where = f"README.md line {line}"
        if kind == "python":
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as exc:  # pragma: no cover - the failure message
                pytest.fail(f"{where}: python block failed: {type(exc).__name__}: {exc}")
            ran += 1
            continue
        for argv in _split_chain(code):
            command = " ".join(argv)
            if command == SETUP or command.startswith(SKIPPED):
                continue
            try:
                run_command(argv, shown)
            except AssertionError as exc:
                pytest.fail(f"{where}: `{command}` failed: {exc}")
            ran += 1
    assert ran >= 10, f"only {ran} README commands ran: did the block rules change?"
