"""The weights container: streaming writer, memory-mapped reader, checks, LiteRT compatibility."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from llmtool.errors import LlmToolError
from llmtool.formats.container import Container, ContainerWriter, TensorPlan
from llmtool.formats.tflite_model import read_model
from llmtool.quantization import QuantizedTensor, dequantize, quantize

PLAN = [
    TensorPlan("params.lm.token_embedding.w", (11, 8), "int8"),
    TensorPlan("params.lm.transformer.x_layers_0.self_attention.q.w", (6, 8), "int4"),
    TensorPlan("params.lm.transformer.x_layers_0.self_attention.k.w", (5, 7), "int4"),  # odd
    TensorPlan("params.lm.transformer.x_layers_0.ff_layer.ffn_layer1.w", (9, 3), "int8"),
    TensorPlan("params.lm.transformer.x_layers_0.pre_layer_norm.scale", (8,), "float32"),
    TensorPlan("params.lm.softmax.logits_ffn.w", (11, 8), "float16"),
    TensorPlan("params.lm.final_ln.scale", (1,), "float32"),
    TensorPlan("odd3d", (3, 2, 5), "int8", axis=2),
]
METADATA = {
    "odml.infra.proto.LlmParameters": b"\x0a\x02\x08\x01",
    "spm_vocab_model": bytes(range(256)) * 3,
    "backend": b"cpu",
}


def _weights(seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for e in PLAN:
        w = rng.standard_normal(e.shape).astype(np.float32)
        if len(e.shape) == 2:
            w[0] *= 10  # uneven channels
        out[e.name] = w
    return out


def _encode(w: np.ndarray, e: TensorPlan, symmetric: bool) -> np.ndarray | QuantizedTensor:
    if e.dtype == "float32":
        return w
    if e.dtype == "float16":
        return w.astype(np.float16)
    return quantize(w, 8 if e.dtype == "int8" else 4, symmetric=symmetric, axis=e.axis)


def _write(path: Path, symmetric: bool = True, alignment: int = 64, seed: int = 3) -> None:
    weights = _weights(seed)
    with ContainerWriter(path, "GEMMA_2B", PLAN, METADATA, alignment=alignment) as writer:
        writer.write(lambda e: _encode(weights[e.name], e, symmetric))


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_every_dtype(tmp_path: Path, symmetric: bool) -> None:
    path = tmp_path / "model.bin"
    _write(path, symmetric)
    weights = _weights()
    with Container.open(path) as c:
        assert c.model_type == "GEMMA_2B"
        assert c.metadata == METADATA
        assert c.names == [e.name for e in PLAN]
        assert len(c) == len(PLAN)
        assert PLAN[0].name in c and "nope" not in c
        for e, info in zip(PLAN, c, strict=True):
            assert (info.name, info.shape, info.dtype) == (e.name, e.shape, e.dtype)
            w = weights[e.name]
            raw = c.raw(e.name)
            assert not raw.flags.writeable
            assert raw.nbytes == info.nbytes
            if e.dtype == "float32":
                np.testing.assert_array_equal(c.float(e.name), w)
                assert c.quantized(e.name) is None and info.scale is None
            elif e.dtype == "float16":
                np.testing.assert_array_equal(raw, w.astype(np.float16))
                np.testing.assert_array_equal(c.float(e.name), w.astype(np.float16)
                                              .astype(np.float32))
            else:
                expected = _encode(w, e, symmetric)
                q = c.quantized(e.name)
                assert q is not None and q.bits == expected.bits and q.axis == e.axis
                assert q.shape == e.shape
                np.testing.assert_array_equal(q.data, expected.data)
                np.testing.assert_array_equal(q.scale, expected.scale)
                np.testing.assert_array_equal(q.zero_point, expected.zero_point)
                np.testing.assert_array_equal(info.zero_point, expected.zero_point)
                assert info.axis == e.axis
                assert symmetric == (not np.any(info.zero_point))
                f = c.float(e.name)
                assert f.dtype == np.float32 and f.shape == e.shape
                np.testing.assert_array_equal(f, dequantize(expected))
                if e.dtype == "int4":
                    assert raw.dtype == np.uint8
                    assert raw.shape == (*e.shape[:-1], (e.shape[-1] + 1) // 2)
                else:
                    assert raw.dtype == np.int8 and raw.shape == e.shape


def test_every_block_is_aligned(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    _write(path, alignment=65536)
    model = read_model(path)
    blocks = [b for b in model.buffers if b.size]
    assert len(blocks) == len(PLAN) + len(METADATA)
    assert min(b.offset for b in blocks) == 65536
    assert all(b.external and b.offset % 65536 == 0 for b in blocks)
    assert path.stat().st_size == max(b.offset + b.size for b in blocks)


def test_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    _write(a)
    _write(b)
    assert a.read_bytes() == b.read_bytes()
    _write(b, seed=4)
    assert a.read_bytes() != b.read_bytes()


def test_streams_in_order_without_keeping_tensors(tmp_path: Path) -> None:
    weights = _weights()
    order: list[str] = []
    previous: list[weakref.ref] = []

    def fill(e: TensorPlan) -> np.ndarray | QuantizedTensor:
        gc.collect()
        assert all(r() is None for r in previous), "an earlier tensor is still alive"
        order.append(e.name)
        value = _encode(weights[e.name].copy(), e, True)
        previous.append(weakref.ref(value.data if isinstance(value, QuantizedTensor) else value))
        return value

    with ContainerWriter(tmp_path / "m.bin", "GEMMA_2B", PLAN, METADATA, alignment=64) as w:
        w.write(fill)
    assert order == [e.name for e in PLAN]


def test_loads_in_litert(tmp_path: Path) -> None:
    """The container is a valid TFLite file: LiteRT maps it and sees our tensors."""
    path = tmp_path / "model.bin"
    _write(path, symmetric=False)
    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    details = {d["name"]: d for d in it.get_tensor_details()}
    weights = _weights()
    norm = PLAN[4].name
    np.testing.assert_array_equal(it.get_tensor(details[norm]["index"]), weights[norm])
    emb = PLAN[0].name
    q = quantize(weights[emb], 8, symmetric=False)
    qp = details[emb]["quantization_parameters"]
    np.testing.assert_array_equal(qp["scales"], q.scale)
    np.testing.assert_array_equal(qp["zero_points"], q.zero_point)
    assert qp["quantized_dimension"] == 0
    np.testing.assert_array_equal(it.get_tensor(details[emb]["index"]), q.data)
    assert details["odd3d"]["quantization_parameters"]["quantized_dimension"] == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((9,), np.float32), "got shape"),
        (np.zeros((8,), np.float64), "got dtype"),
        ("quantized-for-float", "expected a float32 array"),
        ("float-for-int8", "expected a QuantizedTensor"),
        ("wrong-bits", "4-bit values"),
        ("wrong-axis", "axis 1"),
        ("short-scales", "scales"),
    ],
)
def test_mismatches_are_refused_and_leave_no_file(tmp_path: Path, bad: object,
                                                  message: str) -> None:
    plan = [TensorPlan("emb", (11, 8), "int8"), TensorPlan("norm", (8,), "float32")]
    w = np.ones((11, 8), np.float32)

    def fill(e: TensorPlan) -> np.ndarray | QuantizedTensor:
        if isinstance(bad, np.ndarray):
            return bad if e.name == "norm" else quantize(w, 8)
        if bad == "quantized-for-float":
            return quantize(w, 8)
        if e.name == "norm":
            return np.ones(8, np.float32)
        if bad == "float-for-int8":
            return w
        if bad == "wrong-bits":
            return quantize(w, 4)
        if bad == "wrong-axis":
            return quantize(w, 8, axis=1)
        q = quantize(w, 8)
        q.scale = q.scale[:5]
        return q

    out = tmp_path / "out" / "m.bin"
    with pytest.raises(LlmToolError, match=message) as err:
        with ContainerWriter(out, "LLAMA", plan, {}, alignment=64) as writer:
            writer.write(fill)
    assert "m.bin" in str(err.value)
    assert not out.exists()
    assert os.listdir(out.parent) == []


def test_bad_plans_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LlmToolError, match="unsupported container dtype"):
        ContainerWriter(tmp_path / "m.bin", "X", [TensorPlan("a", (2,), "int32")], {})
    with pytest.raises(LlmToolError, match="planned twice"):
        ContainerWriter(tmp_path / "m.bin", "X", [TensorPlan("a", (2,), "float32")] * 2, {})


def test_reader_errors(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    _write(path)
    with Container.open(path) as c, pytest.raises(LlmToolError, match="no tensor named"):
        c.info("missing")
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(LlmToolError, match="trunc.bin"):
        Container.open(truncated)
    with pytest.raises(LlmToolError, match="not found"):
        Container.open(tmp_path / "absent.bin")


def test_a_graph_is_not_a_container(tmp_path: Path) -> None:
    from llmtool.formats.tflite_model import ModelWriter, Operator, Subgraph, Tensor

    writer = ModelWriter()
    writer.add_subgraph(Subgraph("g", [Tensor("a", (2,), "float32"), Tensor("b", (2,), "float32")],
                                 [0], [1], [Operator("RSQRT", [0], [1])]))
    path = tmp_path / "graph.tflite"
    writer.write(path, alignment=64)
    with pytest.raises(LlmToolError, match="not a weights container"):
        Container.open(path)


def test_blockwise_int4_round_trip(tmp_path: Path) -> None:
    """Blockwise int4 is stored as LiteRT graphs store it: a float16 `.scales` tensor beside
    the weight, named by BlockwiseQuantization details; the reader lists only the weight."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    plan = [
        TensorPlan("a", (8, 64), "int4", block_size=32),
        TensorPlan("b", (8, 64), "int4"),
        TensorPlan("n", (8,), "float32"),
    ]
    path = tmp_path / "b.bin"
    values = {"a": quantize(w, 4, block_size=32), "b": quantize(w, 4), "n": w[0, :8].copy()}
    ContainerWriter(path, "X", plan, {}).write(lambda e: values[e.name])
    with Container.open(path) as c:
        assert c.names == ["a", "b", "n"]
        assert c.info("a").block_size == 32 and c.info("b").block_size == 0
        np.testing.assert_array_equal(c.float("a"), dequantize(values["a"]))
        np.testing.assert_array_equal(c.block_scales("a"), values["a"].scale.astype(np.float16))
        assert c.quantized("a").block_size == 32
        assert np.abs(c.float("a") - w).mean() < np.abs(c.float("b") - w).mean()
    tensors = read_model(path).subgraphs[0].tensors
    assert [t.name for t in tensors] == ["a", "a.scales", "b", "n"]
    assert tensors[0].quantization.scales == 1

    bad = [TensorPlan("a", (8, 48), "int4", block_size=32)]
    with pytest.raises(LlmToolError, match="does not divide the row length 48"):
        ContainerWriter(tmp_path / "bad.bin", "X", bad, {})
    wrong = [TensorPlan("a", (8, 64), "int4", block_size=64)]
    with pytest.raises(LlmToolError, match="got block size 32, planned 64"):
        ContainerWriter(tmp_path / "bad.bin", "X", wrong, {}).write(lambda e: values["a"])
    assert not (tmp_path / "bad.bin").exists()


def test_overflowing_scales_are_refused(tmp_path: Path) -> None:
    """A finite but huge scale (a damaged file) is an error, not inf values and a warning."""
    path = tmp_path / "m.bin"
    q = quantize(np.ones((4, 8), np.float32), 8)
    q.scale = np.full(4, 3e38, np.float32)
    ContainerWriter(path, "X", [TensorPlan("w", (4, 8), "int8")], {}).write(lambda e: q)
    with Container.open(path) as c, pytest.raises(LlmToolError, match="overflow float32"):
        c.float("w")
