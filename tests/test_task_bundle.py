"""The `.task` bundle: round trip, stored 4-byte-aligned entries, determinism, LiteRT-LM."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.llm_params import decode_llm_parameters, encode_llm_parameters
from llmtool.formats.task_bundle import (
    ENTRY_NAMES,
    read_task_bundle,
    task_bundle_entries,
    write_task_bundle,
    write_task_bundle_from_graph,
)
from llmtool.pipelines.export import ExportOptions, export_graph
from tests.tiny_models import NEW_FIXTURES

PARAMS = encode_llm_parameters({"start_token": "<bos>", "stop_tokens": ["<eos>"]})


@pytest.fixture(scope="module")
def gemma(converted, tmp_path_factory) -> tuple[Path, bytes, bytes]:
    """(exported graph, SentencePiece bytes, LlmParameters bytes) of the tiny Gemma."""
    container = converted("GEMMA_2B", "float32")
    graph = tmp_path_factory.mktemp("bundle") / "gemma.tflite"
    # KV buckets as `run` exports them: LiteRT-LM must ignore those signatures.
    export_graph(
        container, graph, ExportOptions(max_seq_len=64, prefill_len=8, kv_buckets=(16, 32))
    )
    with Container.open(container) as c:
        files = keys.unpack_tokenizer(dict(c.metadata))
        ref = decode_llm_parameters(c.metadata[keys.LLM_PARAMETERS])
    params = encode_llm_parameters(
        {"start_token": ref["start_token"], "stop_tokens": ref["stop_tokens"]}
    )
    return graph, files["tokenizer.model"], params


def test_bundle_from_graph_equals_the_hand_assembled_one(gemma, tmp_path):
    graph, tokenizer, params = gemma
    by_hand = write_task_bundle(tmp_path / "a.task", graph, tokenizer, params)
    from_graph = write_task_bundle_from_graph(tmp_path / "b.task", graph)
    assert from_graph.read_bytes() == by_hand.read_bytes()


def fake_tflite(path: Path, size: int) -> Path:
    data = bytearray(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    data[4:8] = b"TFL3"
    path.write_bytes(bytes(data))
    return path


def local_headers(path: Path) -> dict[str, tuple[int, int, int]]:
    """Parse the local file headers with struct alone: name -> (data offset, size, method)."""
    raw = path.read_bytes()
    out, pos = {}, 0
    while raw[pos : pos + 4] == b"PK\x03\x04":
        fields = struct.unpack_from("<4s5H3L2H", raw, pos)
        flags, method, csize, size, n, m = fields[2], fields[3], *fields[7:]
        assert not flags & 0x08, "no data descriptors: sizes are in the local header"
        name = raw[pos + 30 : pos + 30 + n].decode()
        start = pos + 30 + n + m
        out[name] = (start, size, method)
        pos = start + csize
    return out


@pytest.mark.parametrize("tflite_size", [1, 7, 4096, 100_003])
def test_round_trip_and_alignment(tmp_path, tflite_size):
    tflite = fake_tflite(tmp_path / "m.tflite", max(tflite_size, 8))
    tokenizer = b"spm-model-bytes" * 3 + b"x"  # odd length: the next entry needs padding
    bundle = write_task_bundle(tmp_path / "m.task", tflite, tokenizer, PARAMS)
    got = read_task_bundle(bundle)
    assert list(got) == list(ENTRY_NAMES)
    assert got["TF_LITE_PREFILL_DECODE"] == tflite.read_bytes()
    assert got["TOKENIZER_MODEL"] == tokenizer
    assert decode_llm_parameters(got["METADATA"]) == {
        "start_token": "<bos>",
        "stop_tokens": ["<eos>"],
    }
    headers = local_headers(bundle)
    entries = task_bundle_entries(bundle)
    raw = bundle.read_bytes()
    for name in ENTRY_NAMES:
        start, size, method = headers[name]
        assert method == 0, f"{name} is compressed"
        assert start % 4 == 0, f"{name} data at {start}"
        assert (entries[name].offset, entries[name].size) == (start, size)
        assert raw[start : start + size] == got[name]
    with zipfile.ZipFile(bundle) as zf:  # a plain zip reader agrees (CRCs checked)
        assert zf.testzip() is None
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
        assert zf.read("TOKENIZER_MODEL") == tokenizer


def test_deterministic_and_atomic(tmp_path):
    tflite = fake_tflite(tmp_path / "m.tflite", 5001)
    a = write_task_bundle(tmp_path / "a.task", tflite, b"tok", PARAMS)
    b = write_task_bundle(tmp_path / "sub" / "b.task", tflite, b"tok", PARAMS)
    assert a.read_bytes() == b.read_bytes()
    write_task_bundle(a, tflite, b"tok", PARAMS)  # overwriting gives the same bytes again
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.task", "m.tflite", "sub"]


def test_bad_inputs(tmp_path):
    tflite = fake_tflite(tmp_path / "m.tflite", 64)
    out = tmp_path / "m.task"
    with pytest.raises(LlmToolError, match="not found"):
        write_task_bundle(out, tmp_path / "missing.tflite", b"tok", PARAMS)
    (tmp_path / "text.tflite").write_text("hello, not a model")
    with pytest.raises(LlmToolError, match="not a TFLite model"):
        write_task_bundle(out, tmp_path / "text.tflite", b"tok", PARAMS)
    with pytest.raises(LlmToolError, match="tokenizer"):
        write_task_bundle(out, tflite, b"", PARAMS)
    with pytest.raises(LlmToolError, match="LlmParameters"):
        write_task_bundle(out, tflite, b"tok", b"\xff\xff\xff")
    assert not out.exists()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ENTRY_NAMES:
            zf.writestr(name, b"x" * 100)
    with pytest.raises(LlmToolError, match="compressed"):
        read_task_bundle(out)
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("TF_LITE_PREFILL_DECODE", b"x")
    with pytest.raises(LlmToolError, match="lacks TOKENIZER_MODEL, METADATA"):
        read_task_bundle(out)
    out.write_bytes(b"not a zip")
    with pytest.raises(LlmToolError, match="not a .task bundle"):
        read_task_bundle(out)


def test_real_graph_bundle(gemma, tmp_path):
    graph, tokenizer, params = gemma
    bundle = write_task_bundle(tmp_path / "gemma.task", graph, tokenizer, params)
    got = read_task_bundle(bundle, ("TF_LITE_PREFILL_DECODE",))
    assert got["TF_LITE_PREFILL_DECODE"] == graph.read_bytes()


def test_litert_lm_runs_the_bundle(gemma, tmp_path):
    """Google's LiteRT-LM engine loads our bundle and decodes greedily as our engine does."""
    litert_lm = pytest.importorskip("litert_lm")  # optional dependency (litert-lm-api)
    import sentencepiece as spm

    from llmtool.runtime.engine import Engine

    graph, tokenizer, _ = gemma
    bundle = write_task_bundle_from_graph(tmp_path / "gemma.task", graph)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    theirs = litert_lm.Engine(
        str(bundle),
        backend=litert_lm.Backend.CPU(thread_count=1),
        cache_dir=":nocache",
        max_num_tokens=64,
    )
    ours = Engine(graph, num_threads=1)
    compared = 0
    for prompt in ["w7", "w10 w11", "w5 w9 w13 w2", "w3 w3"]:
        session = theirs.create_session(
            apply_prompt_template=False,
            sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0, seed=0),
            max_output_tokens=12,
        )
        session.run_prefill([prompt])
        text = session.run_decode().texts[0]
        ids = [sp.bos_id(), *sp.encode(prompt)]  # LiteRT-LM prepends BOS itself
        assert list(theirs.tokenize(prompt)) == ids[1:]
        ours.reset()
        logits = ours.prefill(ids)
        out = []
        for _ in range(12):
            out.append(int(np.argmax(logits)))
            logits = ours.decode(out[-1])
        expected = sp.decode(out).split("\x00")[0]  # its C API returns NUL-terminated text
        assert text == expected, prompt
        compared += len(expected)
    assert compared > 10, "the prompts should produce comparable (NUL-free) text"


@pytest.mark.parametrize("fixture", list(NEW_FIXTURES))
def test_litert_lm_runs_the_newer_families(fixture, gemma, converted, tmp_path):
    """The new decoder features (sliding-window mask computed in the graph from input_pos,
    soft-capping, q/k norms, ...) run in LiteRT-LM as in our engine, past the window (6).

    Every fixture's vocabulary has 320 ids, so the tiny Gemma's SentencePiece model stands in
    for the BPE ones: only ids matter to the graph."""
    litert_lm = pytest.importorskip("litert_lm")
    import sentencepiece as spm

    from llmtool.runtime.engine import Engine

    _, tokenizer, params = gemma
    graph = tmp_path / f"{fixture}.tflite"
    export_graph(converted(fixture), graph, ExportOptions(max_seq_len=64, prefill_len=8))
    bundle = write_task_bundle(tmp_path / f"{fixture}.task", graph, tokenizer, params)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    theirs = litert_lm.Engine(
        str(bundle),
        backend=litert_lm.Backend.CPU(thread_count=1),
        cache_dir=":nocache",
        max_num_tokens=64,
    )
    prompt = "w5 w9 w13 w2 w3"
    session = theirs.create_session(
        apply_prompt_template=False,
        sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0, seed=0),
        max_output_tokens=24,
    )
    session.run_prefill([prompt])
    text = session.run_decode().texts[0]
    ours = Engine(graph, num_threads=1)
    ids = [sp.bos_id(), *sp.encode(prompt)]
    assert len(ids) > 6
    logits = ours.prefill(ids)
    out: list[int] = []
    while len(out) < 24 and (not out or out[-1] != sp.eos_id()):
        out.append(int(np.argmax(logits)))
        logits = ours.decode(out[-1])
    expected = sp.decode(out).split("\x00")[0]
    assert text == expected
    assert len(expected) > 8, "the output should be long enough to compare"


def test_damaged_zip_fields_are_one_line_errors(tmp_path: Path) -> None:
    """zipfile's own exceptions for damaged central-directory fields (found by the fuzz test)."""
    from llmtool.formats.task_bundle import task_bundle_entries

    path = tmp_path / "m.task"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("TF_LITE_PREFILL_DECODE", b"x")
    data = path.read_bytes()
    central = data.index(b"PK\x01\x02")
    version = bytearray(data)
    version[central + 6] = 0xFF  # "version needed to extract": 25.5
    utf8 = bytearray(data)
    utf8[central + 9] |= 0x08  # the UTF-8 name flag, on a name that is not UTF-8
    utf8[central + 46 : central + 48] = b"\xff\xfe"
    for damaged, needle in ((version, "NotImplementedError"), (utf8, "UnicodeDecodeError")):
        path.write_bytes(bytes(damaged))
        with pytest.raises(LlmToolError, match=needle) as err:
            task_bundle_entries(path)
        assert "m.task" in str(err.value) and "\n" not in str(err.value)
