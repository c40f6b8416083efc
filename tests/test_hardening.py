"""Nothing a user types destroys a file, crashes the process or prints a traceback (issue 8).

Every bad input is tried through the command line (a real subprocess: non-zero exit, exactly
one line on stderr, no traceback, no partial or temporary file, inputs byte-identical after)
and, where there is one, through the Python API (LlmToolError with the same text).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmtool as llmtool_package
from llmtool import LlmInference, LlmInferenceOptions
from llmtool.errors import LlmToolError
from llmtool.files import atomic_output, refuse_overlap, write_bytes
from llmtool.pipelines.export import ExportOptions, export_graph

# Subprocesses import the llmtool under test, whatever their working folder.
ENV = {**os.environ, "PYTHONPATH": str(Path(llmtool_package.__file__).resolve().parent.parent)}


def llmtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "llmtool", *args],
        capture_output=True,
        timeout=300,
        input=stdin,
        cwd=cwd,
        env=ENV,
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
    dead = subprocess.Popen([sys.executable, "-c", "pass"], env=ENV)
    dead.wait()
    stale = tmp_path / f".other.bin.llmtool-{dead.pid}.tmp"
    stale.write_bytes(b"junk")
    alive = tmp_path / f".other.bin.llmtool-{os.getpid()}.tmp"  # ours, still running: kept
    alive.write_bytes(b"mine")
    llmtool_write = [sys.executable, "-c", "from llmtool.files import write_bytes as w; "
                     f"w({str(tmp_path / 'new.bin')!r}, b'new')"]  # fmt: skip
    subprocess.run(llmtool_write, check=True, env=ENV)
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
            env=ENV,
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


# ------------------------------------------------------------------------------------------
# Tracebacks where a one-line error belongs


@pytest.mark.parametrize("where", ["stdin", "argv"])
def test_non_utf8_prompt_is_decoded_with_replacement(where, small_graph):
    args = ["run", "--model", str(small_graph), "--max-tokens", "32", "--top-k", "1"]
    if where == "stdin":
        p = llmtool(*args, "--prompt", "-", stdin=b"hi \xff\xfe there")
    else:
        p = llmtool(*args, "--prompt", os.fsdecode(b"hi \xff there"))
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert b"Traceback" not in p.stderr
    options = LlmInferenceOptions(model_path=str(small_graph), max_tokens=32, top_k=1)
    with LlmInference.create_from_options(options) as llm:
        assert llm.generate_response("hi \udcff there") == llm.generate_response("hi \ufffd there")


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DROP = object()


@pytest.mark.parametrize(
    "model_type, changes, needle",
    [
        ("LLAMA", {"hidden_size": "abc"}, "hidden_size must be a positive integer"),
        ("LLAMA", {"rms_norm_eps": "x"}, "rms_norm_eps must be a positive number"),
        ("LLAMA", {"eos_token_id": "x"}, "eos_token_id must be a token id"),
        ("LLAMA", {"max_position_embeddings": 0}, "max_position_embeddings must be a positive"),
        ("PHI_2", {"partial_rotary_factor": "half"}, "partial_rotary_factor must be a positive"),
        ("PHI_2", {"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ("GPT2", {"n_head": 0}, "n_head must be a positive integer"),
        ("GPT2", {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ],
)
def test_bad_config_json_is_one_line(model_type, changes, needle, tiny_model, tmp_path):
    from llmtool.config import ConversionConfig
    from llmtool.pipelines.convert import convert

    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_model(model_type), ckpt)
    _edit_json(ckpt / "config.json", **changes)
    before = digests(ckpt)
    out = tmp_path / "out.bin"
    p = llmtool(
        "convert", "--model-type", model_type, "--input-ckpt", str(ckpt),
        "--output-tflite-file", str(out),
    )  # fmt: skip
    line = one_line_error(p, needle)
    assert "config.json" in line
    with pytest.raises(LlmToolError) as info:
        convert(ConversionConfig(str(ckpt), model_type, output_tflite_file=str(out)))
    assert str(info.value) == line
    assert not out.exists() and digests(ckpt) == before
    no_temporaries(tmp_path)


def test_zero_context_length_is_refused_at_convert_not_run():
    from llmtool.architectures import get_architecture

    config = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "vocab_size": 320, "n_positions": 0}  # fmt: skip
    with pytest.raises(LlmToolError, match="n_positions must be a positive integer"):
        get_architecture("GPT2").spec(config, "config.json")


@pytest.mark.parametrize(
    "line, needle",
    [
        ("attention_quant_bits: eight", "attention_quant_bits must be a whole number"),
        ("model_type: [GPT2]", "model_type must be a string"),
        ("output_tflite_file: {a: 1}", "output_tflite_file must be a string"),
        ('is_symmetric: "no"', "is_symmetric must be true or false (got str 'no')"),
        ('combine_file_only: "false"', "combine_file_only must be true or false"),
        ("bogus_key: 1", "unknown key 'bogus_key' in config file"),
    ],
)
def test_bad_yaml_is_one_line(line, needle, tmp_path):
    from llmtool.config import ConversionConfig, merge_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input_ckpt: ck\nmodel_type: LLAMA\noutput_tflite_file: o.bin\n{line}\n")
    got = one_line_error(llmtool("convert", "--config", str(cfg)), needle)
    with pytest.raises(LlmToolError) as info:
        merge_config(ConversionConfig, cfg, {})
    assert str(info.value) == got
    assert not (tmp_path / "o.bin").exists()


@pytest.mark.parametrize("line", ["lora_ckpt: adapter.safetensors", "lora_rank: 4"])
def test_lora_keys_are_never_silently_ignored(line, tiny_model, tmp_path):
    from llmtool.config import ConversionConfig, merge_config
    from llmtool.pipelines.convert import convert

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input_ckpt: {tiny_model('LLAMA')}\nmodel_type: LLAMA\noutput_tflite_file: o.bin\n{line}\n"
    )
    config = merge_config(ConversionConfig, cfg, {})
    try:
        convert(config)  # once LoRA conversion exists this works, and writes the LoRA file
    except LlmToolError as exc:
        assert "lora" in str(exc).lower()
        one_line_error(llmtool("convert", "--config", str(cfg)), "lora")
    else:
        assert config.lora_output_tflite_file or config.lora_ckpt is None


def test_pickled_code_is_refused_without_weights_only_advice(tiny_model, tmp_path):
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    shutil.copyfile(tiny_model("FALCON_RW_1B") / "config.json", ckpt / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_model("FALCON_RW_1B") / name, ckpt / name)
    torch.save({"w": Payload()}, ckpt / "pytorch_model.bin")
    p = llmtool(
        "convert", "--model-type", "FALCON_RW_1B", "--input-ckpt", str(ckpt),
        "--output-tflite-file", str(tmp_path / "o.bin"), cwd=tmp_path,
    )  # fmt: skip
    line = one_line_error(p, "holds Python objects (code), not just tensors")
    assert "weights_only" not in line and "safetensors" in line
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "o.bin").exists()


def test_python_api_types(small_graph):
    bad_options = [
        ({"top_k": "3"}, "top-k must be a whole number"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"max_tokens": 2.5}, "max tokens must be a whole number"),
        ({"model_path": 3}, "model_path must be a path"),
        ({"random_seed": None}, "random seed must be a whole number"),
        ({"result_listener": 3}, "result_listener must be a function"),
        ({"safety_filter": "word"}, "safety_filter must be a list"),
    ]
    for kwargs, needle in bad_options:
        with pytest.raises(LlmToolError, match=re.escape(needle)):
            LlmInference.create_from_options(
                LlmInferenceOptions(**{"model_path": str(small_graph), **kwargs})
            )
    options = LlmInferenceOptions(model_path=str(small_graph), max_tokens=16, num_threads=1)
    with LlmInference.create_from_options(options) as llm:
        for prompt in (None, b"hi", 3):
            with pytest.raises(LlmToolError, match="the prompt must be a str"):
                llm.generate_response(prompt)
            with pytest.raises(LlmToolError, match="the prompt must be a str"):
                llm.generate_response_async(prompt)


def test_python_api_option_types(converted, small_graph, tiny_model, tmp_path):
    """Every options object and pipeline function a Python user calls checks its values before
    any work: one line naming the field, nothing written, inputs untouched."""
    from llmtool.config import BundleConfig, ReleaseConfig
    from llmtool.pipelines.bundle import bundle
    from llmtool.pipelines.evaluate import evaluate
    from llmtool.pipelines.lora_convert import lora_convert
    from llmtool.pipelines.quantize import QuantizeOptions, quantize_model
    from llmtool.pipelines.release import plan_release

    model, ckpt = converted("LLAMA"), tiny_model("LLAMA")
    text = tmp_path / "text.txt"
    text.write_text("some text " * 50)
    out = tmp_path / "out"
    out.mkdir()
    before = digests(model, small_graph, ckpt, text)

    def export(**kw):
        return export_graph(model, out / "g.tflite", ExportOptions(**kw))

    def quantize(**kw):
        return quantize_model(model, out / "q.bin", QuantizeOptions(**kw))

    def bundle_(**kw):
        args = {"tflite_model": str(small_graph), "tokenizer_model": str(ckpt)}
        return bundle(BundleConfig(**{**args, "output_filename": str(out / "b.task"), **kw}))

    def release_(**kw):
        args = {"name": "r", "model_type": "LLAMA", "input_ckpt": str(ckpt)}
        return plan_release(ReleaseConfig(**{**args, "output_dir": str(out / "rel"), **kw}))

    def evaluate_(**kw):
        return evaluate(**{"model": str(model), "text_file": str(text), **kw})

    def lora(**kw):
        return lora_convert(**{"lora_ckpt": ckpt, "base_model": model, "output": out, **kw})

    cases = [
        (export, {"max_seq_len": "64"}, "max_seq_len must be a whole number (or absent)"),
        (export, {"prefill_len": True}, "prefill_len must be a whole number"),
        (export, {"prefill_len": 0}, "prefill length must be between 1 and the KV cache length"),
        (export, {"kv_buckets": [16, "x"]}, "kv_buckets must be a list of whole numbers"),
        (export, {"kv_buckets": (0,)}, "KV bucket 0 must be between 1"),
        (export, {"lora_rank": -1}, "LoRA rank must be positive (got -1)"),
        (export, {"lora_targets": "qv"}, "lora_targets must be a list of strings (got str"),
        (export, {"lora_targets": ("q", "x")}, "unknown LoRA targets ['x']"),
        (export, {"short_prefill_len": -1}, "short prefill length must be at least 0"),
        (export, {"short_prefill_len": 2.0}, "short_prefill_len must be a whole number"),
        (quantize, {"mode": 8}, "mode must be a string (got int 8)"),
        (quantize, {"mode": "int3"}, "unknown mode 'int3'"),
        (quantize, {"mode": "int4", "block_size": "32"}, "block_size must be a whole number"),
        (quantize, {"mode": "int4", "block_size": -32}, "block size must be 32, 64, 128 or 0"),
        (quantize, {"attention_bits": 8.0}, "attention_bits must be a whole number"),
        (quantize, {"embedding_bits": 3}, "--embedding-bits must be 32, 16, 8 or 4 (got 3)"),
        (quantize, {"calibration_data": [str(text)]}, "calibration_data must be a path"),
        (quantize, {"float_source": 3}, "float_source must be a path (or absent)"),
        (quantize, {"calibration_samples": "32"}, "calibration_samples must be a whole number"),
        (quantize, {"calibration_samples": 0}, "calibration samples must be at least 1"),
        (bundle_, {"tflite_model": [str(small_graph)]}, "tflite_model must be a string"),
        (bundle_, {"stop_tokens": [1]}, "stop_tokens must be a list of strings"),
        (bundle_, {"enable_bytes_to_unicode_mapping": "no"}, "must be true or false"),
        (release_, {"prefill_len": "64"}, "prefill_len must be a whole number"),
        (release_, {"backends": "cpu"}, "backends must be a list of strings"),
        (release_, {"eval_kl": "yes"}, "eval_kl must be true or false"),
        (release_, {"smoke_max_tokens": -1}, "smoke.max_tokens must be between 0"),
        (evaluate_, {"window": "8"}, "window must be a whole number (got str '8')"),
        (evaluate_, {"max_windows": 0}, "max windows must be at least 1 (got 0)"),
        (evaluate_, {"text_file": None}, "text_file must be a path (got NoneType None)"),
        (evaluate_, {"num_threads": True}, "num_threads must be a whole number"),
        (lora, {"lora_rank": "4"}, "lora_rank must be a whole number"),
        (lora, {"lora_rank": 0}, "--lora-rank must be at least 1 (got 0)"),
        (lora, {"backend": "tpu"}, "backend must be cpu or gpu (got 'tpu')"),
        (lora, {"lora_ckpt": [str(ckpt)]}, "lora_ckpt must be a path"),
    ]
    for call, kwargs, needle in cases:
        with pytest.raises(LlmToolError) as info:
            call(**kwargs)
        message = str(info.value)
        assert needle in message and "\n" not in message, (kwargs, message)
        assert not list(out.iterdir()), (kwargs, list(out.iterdir()))
    with pytest.raises(LlmToolError, match="options must be ExportOptions"):
        export_graph(model, out / "g.tflite", {"max_seq_len": 64})  # type: ignore[arg-type]
    with pytest.raises(LlmToolError, match="options must be QuantizeOptions"):
        quantize_model(model, out / "q.bin", "int8")  # type: ignore[arg-type]
    assert digests(model, small_graph, ckpt, text) == before
    # the same text as the command line's (a range the CLI can reach)
    p = llmtool("quantize", str(model), str(out / "q.bin"), "--embedding-bits", "3")
    assert one_line_error(p) == str(_raised(quantize, embedding_bits=3))


def _raised(call, **kwargs) -> LlmToolError:
    with pytest.raises(LlmToolError) as info:
        call(**kwargs)
    return info.value


# ------------------------------------------------------------------------------------------
# Silently wrong


def test_missing_bos_token_falls_back_to_config_ids_or_is_refused(tiny_model, tmp_path):
    from llmtool.formats import metadata as keys
    from llmtool.formats.container import Container
    from llmtool.tokenizer import Tokenizer

    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_model("GEMMA_2B"), ckpt)
    _edit_json(ckpt / "tokenizer_config.json", bos_token="<nope>", eos_token="<none>")
    bos, eos = 2, 1  # the ids config.json names
    out = tmp_path / "o.bin"
    args = ["convert", "--model-type", "GEMMA_2B", "--input-ckpt", str(ckpt)]
    p = llmtool(*args, "--output-tflite-file", str(out), "--json")
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    with Container.open(out) as c:
        tok = Tokenizer.from_files(keys.unpack_tokenizer(c.metadata))  # what run uses
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (bos, eos, True)
    assert tok.encode("hi")[0] == bos and eos in tok.stop_ids

    for name in ("config.json", "generation_config.json"):
        _edit_json(ckpt / name, bos_token_id=_DROP)
    out.unlink()
    line = one_line_error(llmtool(*args, "--output-tflite-file", str(out)), "'<nope>'")
    assert "not in the vocabulary" in line and "bos_token_id" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--temperature", "inf"], "temperature must be a finite number >= 0 (got inf)"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0 (got nan)"),
        (["--top-k", "0"], "top-k must be at least 1"),
    ],
)
def test_run_sampling_options(args, needle, small_graph):
    one_line_error(llmtool("run", "--model", str(small_graph), "--prompt", "hi", *args), needle)


def test_tiny_temperature_samples_without_nan_or_warnings(small_graph):
    p = llmtool("run", "--model", str(small_graph), "--prompt", "hi", "--max-tokens", "12",
                "--temperature", "1e-320", "--json")  # fmt: skip
    assert p.returncode == 0 and p.stderr.strip() == b"", p.stderr
    greedy = llmtool("run", "--model", str(small_graph), "--prompt", "hi", "--max-tokens", "12",
                     "--top-k", "1", "--json")  # fmt: skip
    assert json.loads(p.stdout)["token_ids"] == json.loads(greedy.stdout)["token_ids"]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_evaluate_max_windows_must_be_positive(value, small_graph, tmp_path):
    from llmtool.pipelines.evaluate import evaluate

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 20)
    args = ["evaluate", "--model", str(small_graph), "--text", str(text), "--window", "16"]
    line = one_line_error(llmtool(*args, "--max-windows", value), "max windows must be at least 1")
    with pytest.raises(LlmToolError) as info:
        evaluate(str(small_graph), text, 16, int(value))
    assert str(info.value) == line


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prefill-len", "0"], "prefill length must be between 1 and the KV cache length 32"),
        (["--prefill-len", "33"], "(got 33)"),
    ],
)
def test_export_prefill_length_is_validated(args, needle, converted, tmp_path):
    out = tmp_path / "g.tflite"
    model = converted("LLAMA")
    one_line_error(llmtool("export", str(model), "-o", str(out), "--max-seq-len", "32", *args),
                   needle)  # fmt: skip
    assert not out.exists()
    with pytest.raises(LlmToolError, match=re.escape(needle)):
        export_graph(model, out, ExportOptions(max_seq_len=32, prefill_len=int(args[1])))


SLOW_CONVERT = """
import sys, time
import llmtool.formats.container as container
real = container.ContainerWriter._check
def slow(self, entry, value):
    print("writing", flush=True)
    time.sleep(60)
container.ContainerWriter._check = slow
from llmtool.cli import main
sys.argv = ["llmtool", *sys.argv[1:]]
main()
"""


def test_sigterm_during_convert_cleans_up(tiny_model, tmp_path):
    out = tmp_path / "out.bin"
    args = ["convert", "--model-type", "LLAMA", "--input-ckpt", str(tiny_model("LLAMA")),
            "--output-tflite-file", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout.readline() == b"writing\n"
    assert any(".llmtool-" in p.name for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert b"Traceback" not in proc.stderr.read()
    assert not out.exists()
    no_temporaries(tmp_path)


# ------------------------------------------------------------------------------------------
# Resources: the graph cache is bounded, and can be listed and cleared


def _fake_entry(folder: Path, name: str, size: int, age: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"\0" * size)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_cache_evicts_least_recently_used(tmp_path, monkeypatch):
    from llmtool import cache

    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMTOOL_CACHE_MAX_BYTES", "3K")
    graphs, xnn = tmp_path / "graphs", tmp_path / "xnnpack"
    old = _fake_entry(graphs, "old-1.tflite", 1000, age=300)
    mid = _fake_entry(graphs, "mid-2.tflite", 1000, age=200)
    tag = cache.graph_path_key(mid)
    mid_x = _fake_entry(xnn, f"mid-2-{tag}-k.xnnpack", 500, age=250)  # belongs to mid
    lone = _fake_entry(xnn, "user-abcdef012345-k.xnnpack", 400, age=100)
    new = _fake_entry(graphs, "new-3.tflite", 1000, age=0)
    names = [e.name for e in cache.entries()]
    assert names == ["old-1.tflite", "mid-2.tflite", "user-abcdef012345-k.xnnpack", "new-3.tflite"]
    cache.use(old)  # used again: now the most recent; total 3900 > 3072
    assert old.exists() and new.exists() and lone.exists()
    assert not mid.exists() and not mid_x.exists()  # the least recently used, with its xnnpack
    monkeypatch.setenv("LLMTOOL_CACHE_MAX_BYTES", "0")
    cache.use(new)  # everything but what is in use goes
    assert [p.name for p in graphs.iterdir()] == ["new-3.tflite"] and not any(xnn.iterdir())
    monkeypatch.setenv("LLMTOOL_CACHE_MAX_BYTES", "lots")
    with pytest.raises(LlmToolError, match="LLMTOOL_CACHE_MAX_BYTES must be a size"):
        cache.max_bytes()


def test_cache_cli_list_clear_and_cap(converted, tmp_path):
    env = {**ENV, "LLMTOOL_CACHE_DIR": str(tmp_path), "LLMTOOL_CACHE_MAX_BYTES": "1"}
    models = [converted("LLAMA"), converted("GEMMA_2B", "int8")]
    for model in models:  # two graphs; the cap keeps only the one in use
        p = subprocess.run(
            [sys.executable, "-m", "llmtool", "run", "--model", str(model), "--prompt", "hi",
             "--max-tokens", "20", "--top-k", "1"], capture_output=True, env=env, timeout=300,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
    assert [g.name.split("-")[0] for g in (tmp_path / "graphs").iterdir()] == ["GEMMA_2B"]
    listed = subprocess.run(
        [sys.executable, "-m", "llmtool", "cache", "list", "--json"], capture_output=True, env=env
    )
    entries = json.loads(listed.stdout)["entries"]
    assert [e["kind"] for e in entries if e["kind"] == "graph"] == ["graph"]
    cleared = subprocess.run(
        [sys.executable, "-m", "llmtool", "cache", "clear"], capture_output=True, env=env
    )
    assert cleared.returncode == 0 and b"removed" in cleared.stdout
    assert not any((tmp_path / "graphs").iterdir())


# ------------------------------------------------------------------------------------------
# Interface consistency


def test_help_has_no_type_tags_and_usage_no_braces():
    verbs = ["convert", "inspect", "export", "run", "evaluate", "bundle", "models", "cache"]
    from typer.testing import CliRunner

    from llmtool.cli import app

    for verb in ["", *verbs]:  # in this process: the help text is all that is checked
        p = CliRunner().invoke(app, [*([verb] if verb else []), "--help"])
        text = p.output
        assert p.exit_code == 0, (verb, p.output)
        assert not re.search(r"<(bool|str|int|float|path|text)>", text), (verb, text)
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert "{" not in usage, usage
    version = llmtool("--version")
    assert version.returncode == 0 and version.stdout.decode().strip() == (
        f"llmtool {llmtool_package.__version__}"
    )


def test_model_and_output_spellings(converted, tmp_path):
    model = str(converted("LLAMA"))
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    common = ["--max-seq-len", "16", "--json"]
    assert llmtool("export", "--model", model, "-o", str(a), *common).returncode == 0
    assert llmtool("export", model, "--output", str(b), *common).returncode == 0  # the alias
    assert a.read_bytes() == b.read_bytes()
    one = json.loads(llmtool("inspect", "--model", str(a), "--json").stdout)
    two = json.loads(llmtool("inspect", str(a), "--json").stdout)
    assert one == two and one["model_type"] == "LLAMA"
    one_line_error(llmtool("export", model, "--model", str(a), "-o", "x"), "two models given")
    one_line_error(llmtool("export", "-o", "x"), "give the model with --model FILE")


# ------------------------------------------------------------------------------------------
# Fuzz: damaged containers, graphs and bundles give LlmToolError, never a crash or a hang


def test_fuzz_readers(converted, tiny_model, tmp_path):
    from llmtool.config import BundleConfig
    from llmtool.pipelines.bundle import bundle

    container = converted("GEMMA_2B", "int8")
    graph = tmp_path / "g.tflite"
    export_graph(container, graph, ExportOptions(max_seq_len=32, prefill_len=8))
    files = [container, graph]
    for suffix in (".task", ".litertlm"):
        out = tmp_path / f"g{suffix}"
        tokenizer = str(tiny_model("GEMMA_2B"))
        bundle(
            BundleConfig(
                tflite_model=str(graph), tokenizer_model=tokenizer, output_filename=str(out)
            )
        )
        files.append(out)
    before = digests(*files)
    p = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_readers", "--seconds", "12", *map(str, files)],
        capture_output=True,
        timeout=300,  # a hang fails here; a crash (SIGSEGV, abort) is a negative exit status
        env=ENV,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert p.returncode in (0, 1), (p.returncode, p.stderr.decode(errors="replace")[-3000:])
    report = json.loads(p.stdout.decode().strip().splitlines()[-1])
    assert report["failures"] == [], report["failures"][:5]
    assert set(report["by_kind"]) == {"container", "graph", "task", "litertlm"}
    # 3 s per file: 650-900 cases of each kind at load 7-8 on 2 cores (docs/BENCHMARKS.md);
    # floors with room for a machine several times busier. The object-API reader this replaced
    # reached 25-45 graph or bundle cases in 3 s at that load.
    assert report["cases"] >= 800 and min(report["by_kind"].values()) >= 120, report
    assert digests(*files) == before  # the fuzzer damaged copies only


def test_cache_use_keeps_the_xnnpack_key(tmp_path, monkeypatch):
    """Marking a graph used must not change what keys its packed weights (its stat), or every
    warm run would pack them again."""
    from llmtool import cache
    from llmtool.runtime.compiled_engine import weight_cache_file

    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path))
    graph = _fake_entry(tmp_path / "graphs", "g-1.tflite", 100, age=300)
    other = _fake_entry(tmp_path / "graphs", "g-2.tflite", 100, age=200)
    before = weight_cache_file(graph, tmp_path / "xnnpack")
    cache.use(graph)
    assert weight_cache_file(graph, tmp_path / "xnnpack") == before
    assert [e.name for e in cache.entries()] == ["g-2.tflite", "g-1.tflite"]  # used last
    assert other.exists()


def test_cli_plain_coercion_agrees_with_typer(tmp_path):
    """cli.py converts plain option values without pydantic: same values, and whatever it
    does not take (errors included) is left to Typer."""
    import typer._coercion
    import typer.main

    from llmtool import cli

    command = typer.main.get_command(cli.app)
    params = [p for sub in command.commands.values() for p in getattr(sub, "params", [])]
    kinds = {p.type_descriptor.annotation: p for p in params if p.nargs == 1 and not p.multiple}
    assert {str, int, float, Path} <= set(kinds)
    values = ["3", " -7 ", "+2", "3.0", "3.5", "1e-3", ".5", "1_000", "0x10", "inf", "", "abc",
              str(tmp_path), 5, 0.25, None, Path("x")]  # fmt: skip
    taken = 0
    for annotation, param in kinds.items():
        full = typer._coercion.build_runtime_param(param.type_descriptor)
        for value in values:
            plain = cli._plain_value(param, value, None)
            if plain is cli._NOT_PLAIN:
                continue
            taken += 1
            expected = full.coerce(value, param=param, ctx=None)
            assert plain == expected and type(plain) is type(expected), (annotation, value)
    assert taken >= 20
