"""Nothing a user types destroys a file, crashes the process or prints a traceback (issue 8).

Every bad input is tried through the command line (a real subprocess: non-zero exit, exactly
one line on stderr, no traceback, no partial or temporary file, inputs byte-identical after)
and, where there is one, through the Python API (LlmToolError with the same text).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmtool import LlmInference, LlmInferenceOptions
from llmtool.errors import LlmToolError
from llmtool.files import atomic_output, refuse_overlap, write_bytes
from llmtool.pipelines.export import ExportOptions, export_graph


def llmtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "llmtool", *args],
        capture_output=True,
        timeout=300,
        input=stdin,
        cwd=cwd,
        **kw,
    )


def one_line_error(p: subprocess.CompletedProcess, needle: str = "") -> str:
    """The process failed cleanly: exit 2, one line on stderr naming the problem."""
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2, (p.returncode, err[-2000:])
    assert "Traceback" not in err and "Warning" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], (needle, lines[0])
    return lines[0][len("error: ") :]


def digests(*paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def no_temporaries(*folders: Path) -> None:
    for folder in folders:
        left = [p.name for p in folder.iterdir() if ".llmtool-" in p.name or ".tmp" in p.name]
        assert not left, left


@pytest.fixture(scope="module")
def small_graph(converted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hardening") / "llama.tflite"
    export_graph(converted("LLAMA"), out, ExportOptions(max_seq_len=32, prefill_len=8))
    return out


# ------------------------------------------------------------------------------------------
# Data loss: an output that is an input, interrupted writes


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_convert_refuses_to_overwrite_its_checkpoint(how, tiny_model, tmp_path):
    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_model("LLAMA"), ckpt)
    target = ckpt / "model.safetensors"
    out = {"same": target, "symlink": tmp_path / "link.bin", "hardlink": tmp_path / "hard.bin"}[how]
    if how == "symlink":
        out.symlink_to(target)
    elif how == "hardlink":
        os.link(target, out)
    before = digests(ckpt)
    p = llmtool(
        "convert", "--model-type", "LLAMA", "--input-ckpt", str(target),
        "--output-tflite-file", str(out),
    )  # fmt: skip
    line = one_line_error(p, "the same file as the input")
    assert str(out) in line and ".llmtool-" not in line
    assert digests(ckpt) == before
    no_temporaries(ckpt, tmp_path)


def test_export_refuses_to_overwrite_its_container(converted, tmp_path):
    model = tmp_path / "m.bin"
    shutil.copyfile(converted("LLAMA"), model)
    (tmp_path / "link.tflite").symlink_to(model)
    before = digests(model)
    for out in (model, tmp_path / "link.tflite"):
        one_line_error(llmtool("export", str(model), "-o", str(out)), "same file as the input")
        with pytest.raises(LlmToolError, match="same file as the input"):
            export_graph(model, out)
    assert digests(model) == before
    no_temporaries(tmp_path)


def test_refuse_overlap_allows_distinct_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    refuse_overlap(b, [a, None])  # b does not exist yet: fine
    write_bytes(b, b"b", inputs=[a])
    assert b.read_bytes() == b"b" and a.read_bytes() == b"a"
    with pytest.raises(LlmToolError, match="same file"):
        write_bytes(a, b"x", inputs=[a])
    assert a.read_bytes() == b"a"


SLOW_WRITER = """
import sys, time
from llmtool.files import atomic_output
with atomic_output(sys.argv[1]) as tmp:
    tmp.write_bytes(b"partial")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_sigterm_leaves_no_temporary_and_stale_ones_are_removed(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline() == b"writing\n"
    assert any(".llmtool-" in p.name for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert b"Traceback" not in proc.stderr.read()
    assert out.read_bytes() == b"old"
    no_temporaries(tmp_path)

    # A temporary file of a process that no longer exists (killed with SIGKILL, say).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".other.bin.llmtool-{dead.pid}.tmp"
    stale.write_bytes(b"junk")
    alive = tmp_path / f".other.bin.llmtool-{os.getpid()}.tmp"  # ours, still running: kept
    alive.write_bytes(b"mine")
    llmtool_write = [sys.executable, "-c", "from llmtool.files import write_bytes as w; "
                     f"w({str(tmp_path / 'new.bin')!r}, b'new')"]  # fmt: skip
    subprocess.run(llmtool_write, check=True)
    assert not stale.exists() and alive.exists()
    alive.unlink()


def test_write_errors_name_the_real_output(converted, tmp_path):
    # /proc refuses new files: the error must name the output, never the temporary name.
    line = one_line_error(llmtool("export", str(converted("LLAMA")), "-o", "/proc/x.tflite"))
    assert line.startswith("/proc/x.tflite: cannot write") and ".llmtool-" not in line
    with pytest.raises(LlmToolError, match=r"out\.bin: cannot write \(no space left") as info:
        with atomic_output(tmp_path / "out.bin") as tmp:
            raise OSError(28, "No space left on device", str(tmp))
    assert ".llmtool-" not in str(info.value)
    no_temporaries(tmp_path)


# ------------------------------------------------------------------------------------------
# Crashes


@pytest.mark.parametrize("threads", ["0", "-2", "100000"])
def test_num_threads_is_validated(threads, small_graph):
    p = llmtool("run", "--model", str(small_graph), "--prompt", "hi", "--num-threads", threads)
    line = one_line_error(p, "num threads must be between 1 and")
    assert p.stdout == b""
    with pytest.raises(LlmToolError) as info:
        LlmInference.create_from_options(
            LlmInferenceOptions(model_path=str(small_graph), num_threads=int(threads))
        )
    assert str(info.value) == line


EXIT_WHILE_GENERATING = """
import atexit, sys, threading, time
from llmtool import LlmInference, LlmInferenceOptions
seen = []
atexit.register(lambda: print("workers at exit:", sum(
    t.name == "llmtool-generate" for t in threading.enumerate()), flush=True))
def slow(piece, done):
    seen.append(piece)
    time.sleep(0.01)
llm = LlmInference.create_from_options(LlmInferenceOptions(
    model_path=sys.argv[1], max_tokens=32, num_threads=1, top_k=1, result_listener=slow))
future = llm.generate_response_async("Once upon a time")
time.sleep(0.05)
print("exiting", flush=True)
"""


def test_exit_while_generate_response_async_runs_is_clean(small_graph):
    for _ in range(3):
        p = subprocess.run(
            [sys.executable, "-c", EXIT_WHILE_GENERATING, str(small_graph)],
            capture_output=True,
            timeout=120,
        )
        err = p.stderr.decode(errors="replace")
        assert p.returncode == 0, err[-2000:]
        assert "terminate called" not in err and "Traceback" not in err
        assert b"workers at exit: 0" in p.stdout


def test_close_and_context_manager(small_graph):
    options = LlmInferenceOptions(model_path=str(small_graph), max_tokens=32, num_threads=1)
    with LlmInference.create_from_options(options) as llm:
        future = llm.generate_response_async("Once upon a time")
        assert isinstance(llm.generate_response("hi"), str)
    assert isinstance(future.result(timeout=60), str)  # close() waited for (or cancelled) it
    for call in (lambda: llm.generate_response("hi"), lambda: llm.logits([1])):
        with pytest.raises(LlmToolError, match="closed"):
            call()
    llm.close()  # twice is fine


@pytest.mark.parametrize(
    "ids, needle",
    [
        ([1, 320], "token id 320 is outside the model's vocabulary (0 to 319)"),
        ([-1], "token id -1 is outside"),
        ([1, "2"], "token ids must be ints"),
        ([True], "token ids must be ints"),
        (7, "token ids must be a list of ints"),
        ([], "at least one token id"),
    ],
)
def test_logits_checks_token_ids(ids, needle, small_graph):
    options = LlmInferenceOptions(model_path=str(small_graph), max_tokens=32, num_threads=1)
    with LlmInference.create_from_options(options) as llm:
        with pytest.raises(LlmToolError, match=re.escape(needle)):
            llm.logits(ids)
        assert llm.logits([0, 319]).shape == (2, 320)
