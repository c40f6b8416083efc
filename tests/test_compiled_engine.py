"""CompiledEngine (LiteRT CompiledModel, in-place KV cache) against the interpreter Engine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from llmtool.errors import LlmToolError
from llmtool.pipelines.export import ExportOptions, export_graph
from llmtool.runtime.compiled_engine import CompiledEngine, weight_cache_file
from llmtool.runtime.engine import Engine

RNG = np.random.default_rng(77)


@pytest.fixture(scope="session")
def small_graph(converted, tmp_path_factory):
    """small_graph(model_type, quantization) -> exported .tflite, cache of 64, prefill of 8,
    KV buckets 16 and 32 (the interpreter Engine runs the whole-cache signatures only)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str, quantization: str) -> Path:
        key = (model_type, quantization)
        if key not in cache:
            out = tmp_path_factory.mktemp("cgraphs") / f"{model_type}-{quantization}.tflite"
            export_graph(
                converted(model_type, quantization),
                out,
                ExportOptions(max_seq_len=64, prefill_len=8, kv_buckets=(16, 32)),
            )
            cache[key] = out
        return cache[key]

    return make


def ids(n: int) -> list[int]:
    return [int(x) for x in RNG.integers(3, 300, size=n)]


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-6, np.abs(a - b).max()


@pytest.mark.parametrize(
    "model_type,quantization",
    [("LLAMA", "int8"), ("GEMMA_2B", "float32"), ("PHI_2", "int8")],
)
def test_logits_equal_the_interpreter_engine(model_type, quantization, small_graph, tmp_path):
    path = small_graph(model_type, quantization)
    ref = Engine(path, num_threads=1)
    ours = CompiledEngine(path, num_threads=1, cache_dir=tmp_path)
    assert (ours.max_seq_len, ours.vocab_size) == (ref.max_seq_len, ref.vocab_size)
    assert ours.prefill_keys == ref.prefill_keys == ["prefill_8"]
    assert ours.cache_names == ref.cache_names and ours.cache_shapes == ref.cache_shapes
    prompt = ids(21)  # chunks of 8, 8 and a padded 5
    assert_close(ours.prefill(prompt, all_logits=True), ref.prefill(prompt, all_logits=True))
    token = 5
    for _ in range(6):  # decode, then a prefill after decoding, then decode again
        a, b = ours.decode(token), ref.decode(token)
        assert_close(a, b)
        token = int(np.argmax(b))
    more = ids(11)
    assert_close(ours.prefill(more), ref.prefill(more))
    for t in ids(3):
        assert_close(ours.decode(t), ref.decode(t))
    assert ours.pos == ref.pos == 21 + 6 + 11 + 3
    ours.close()


def test_reset_reuses_the_cache_buffers(small_graph, tmp_path):
    path = small_graph("LLAMA", "int8")
    engine = CompiledEngine(path, num_threads=1, cache_dir=tmp_path)
    prompt = ids(13)
    first = engine.prefill(prompt, all_logits=True)
    first_decode = [engine.decode(t) for t in (7, 8, 9)]
    buffers = dict(engine._caches)
    for _ in range(2):
        engine.reset()
        assert engine.pos == 0
        # A different, longer conversation in between leaves stale rows everywhere.
        engine.prefill(ids(40))
        engine.decode(3)
        engine.reset()
        assert_close(engine.prefill(prompt, all_logits=True), first)
        for t, want in zip((7, 8, 9), first_decode, strict=True):
            assert_close(engine.decode(t), want)
    assert all(engine._caches[n] is buffers[n] for n in buffers)  # created once, never replaced
    # Fresh engines agree with the reused one (the cache really was cleared).
    fresh = Engine(path, num_threads=1)
    assert_close(fresh.prefill(prompt, all_logits=True), first)


def test_weight_cache_file_is_reused_and_keyed_by_the_graph(small_graph, tmp_path):
    src = small_graph("LLAMA", "int8")
    graph = tmp_path / "g.tflite"
    graph.write_bytes(src.read_bytes())
    cache = tmp_path / "xnnpack"
    prompt = ids(10)
    one = CompiledEngine(graph, num_threads=1, cache_dir=cache)
    assert one.weight_cache_path is not None and one.weight_cache_path.parent == cache
    want = one.prefill(prompt)
    one.close()
    files = sorted(cache.glob("*.xnnpack"))
    assert files == [one.weight_cache_path] and files[0].stat().st_size > 0
    two = CompiledEngine(graph, num_threads=1, cache_dir=cache)  # loads the packed weights
    assert two.weight_cache_path == one.weight_cache_path
    assert_close(two.prefill(prompt), want)
    two.close()
    # A different graph at the same path must not be served the old packed weights
    # (XNNPACK would use them without noticing), and the stale file goes away.
    other = small_graph("GEMMA_2B", "float32")
    graph.write_bytes(other.read_bytes())
    three = CompiledEngine(graph, num_threads=1, cache_dir=cache)
    assert three.weight_cache_path != one.weight_cache_path
    assert sorted(cache.glob("*.xnnpack")) == [three.weight_cache_path]
    assert_close(three.prefill(prompt), Engine(other, num_threads=1).prefill(prompt))


def test_default_cache_dir_and_unusable_cache(small_graph, tmp_path, monkeypatch):
    path = small_graph("LLAMA", "int8")
    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "home"))
    engine = CompiledEngine(path, num_threads=1)
    assert engine.weight_cache_path == weight_cache_file(path, tmp_path / "home" / "xnnpack")
    prompt = ids(9)
    want = Engine(path, num_threads=1).prefill(prompt)
    assert_close(engine.prefill(prompt), want)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    no_cache = CompiledEngine(path, num_threads=1, cache_dir=blocked / "xnnpack")
    assert no_cache.weight_cache_path is None  # still runs, just without the file cache
    assert_close(no_cache.prefill(prompt), want)
    off = CompiledEngine(path, num_threads=1, weight_cache=False)
    assert off.weight_cache_path is None
    assert_close(off.prefill(prompt), want)


def test_errors_match_the_interpreter_engine(small_graph, converted, tmp_path):
    path = small_graph("GPT2", "float32")
    engine = CompiledEngine(path, num_threads=1, cache_dir=tmp_path)
    with pytest.raises(LlmToolError, match="empty"):
        engine.prefill([])
    with pytest.raises(LlmToolError, match="exceed"):
        engine.prefill(ids(65))
    engine.prefill(ids(60))
    for t in ids(4):
        engine.decode(t)
    assert engine.pos == 64
    with pytest.raises(LlmToolError, match="full"):
        engine.decode(3)
    engine.close()
    engine.reset()
    with pytest.raises(LlmToolError, match="closed"):
        engine.decode(3)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(LlmToolError, match="cannot load"):
        CompiledEngine(junk, num_threads=1, cache_dir=tmp_path)
    with pytest.raises(LlmToolError, match="no 'decode' signature"):
        CompiledEngine(converted("GPT2", "float32"), num_threads=1, cache_dir=tmp_path)
    with pytest.raises(LlmToolError, match="not found"):
        CompiledEngine(tmp_path / "missing.tflite")
