"""The generic TFLite writer/reader: layout, round trips, and graphs that run in LiteRT."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from llmtool.errors import LlmToolError
from llmtool.formats.tflite_model import (
    ModelWriter,
    Operator,
    Quantization,
    Signature,
    Subgraph,
    Tensor,
    read_metadata,
    read_model,
    read_model_bytes,
)
from llmtool.quantization import dequantize, quantize

FC_OPTIONS = {
    "fused_activation_function": "NONE",
    "keep_num_dims": True,
    "asymmetric_quantize_inputs": True,
}
RESOLVERS = [OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES]


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _interpreter(model: bytes | Path, resolver: OpResolverType = OpResolverType.AUTO):
    if isinstance(model, Path):
        it = Interpreter(
            model_path=str(model), num_threads=1, experimental_op_resolver_type=resolver
        )
    else:
        it = Interpreter(model_content=model, num_threads=1, experimental_op_resolver_type=resolver)
    return it


def _fc_writer(
    w_dtype: str,
    w_data: np.ndarray,
    shape: tuple[int, int],
    batch: int = 3,
    quant: Quantization | None = None,
    bias: np.ndarray | None = None,
) -> ModelWriter:
    out_dim, in_dim = shape
    writer = ModelWriter(description="fc test")
    wb = writer.add_buffer(w_data)
    tensors = [
        Tensor("x", (batch, in_dim), "float32"),
        Tensor("w", shape, w_dtype, wb, quant),
        Tensor("y", (batch, out_dim), "float32"),
    ]
    inputs = [0, 1, -1]
    if bias is not None:
        tensors.append(Tensor("b", (out_dim,), "float32", writer.add_buffer(bias)))
        inputs[2] = 3
    writer.add_subgraph(
        Subgraph(
            "main", tensors, [0], [2], [Operator("FULLY_CONNECTED", inputs, [2], dict(FC_OPTIONS))]
        )
    )
    writer.add_signature(Signature("serving_default", 0, {"x": 0}, {"y": 2}))
    return writer


def _run_fc(model: bytes | Path, x: np.ndarray, resolver=OpResolverType.AUTO) -> np.ndarray:
    runner = _interpreter(model, resolver).get_signature_runner("serving_default")
    return runner(x=x)["y"]


# --------------------------------------------------------------------------------------------
# graphs that run


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_fully_connected_float32(tmp_path: Path, resolver: OpResolverType) -> None:
    rng = _rng()
    w = rng.standard_normal((6, 10)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    writer = _fc_writer("float32", w, (6, 10), bias=b)
    path = tmp_path / "fc.tflite"
    writer.write(path)
    ref = x @ w.T + b
    np.testing.assert_allclose(_run_fc(path, x, resolver), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run_fc(writer.to_bytes(), x, resolver), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("bits", [8, 4])
def test_fully_connected_dynamic_range_per_channel(
    tmp_path: Path, bits: int, resolver: OpResolverType
) -> None:
    rng = _rng()
    w = rng.standard_normal((12, 32)).astype(np.float32)
    w[5] *= 20  # per-channel scales must be honoured
    x = rng.standard_normal((3, 32)).astype(np.float32)
    q = quantize(w, bits, symmetric=True, axis=0)
    quant = Quantization(q.scale, q.zero_point, axis=0)
    writer = _fc_writer("int8" if bits == 8 else "int4", q.data, (12, 32), quant=quant)
    path = tmp_path / f"fc{bits}.tflite"
    writer.write(path, alignment=64)
    y = _run_fc(path, x, resolver)
    ref = x @ dequantize(q).T
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert rel < 2e-2, rel
    # and not trivially: the float weights differ from the dequantized ones (int4 especially)
    assert np.abs(y).max() > 0.1


def _mini_lm(
    writer: ModelWriter, name: str, T: int, bufs: dict[str, int], V: int, D: int, N: int, S: int
) -> Subgraph:
    """tokens -> GATHER(table) -> FULLY_CONNECTED(int8 w) -> logits; cache <- DUS at input_pos."""
    wq: Quantization = bufs["wq"]  # type: ignore[assignment]
    tensors = [
        Tensor("tokens", (1, T), "int32"),  # 0
        Tensor("input_pos", (T,), "int32"),  # 1
        Tensor("kv_cache", (1, S, N), "float32"),  # 2
        Tensor("table", (V, D), "float32", bufs["table"]),  # 3
        Tensor("w", (N, D), "int8", bufs["w"], wq),  # 4
        Tensor("emb", (1, T, D), "float32"),  # 5
        Tensor("logits", (1, T, N), "float32"),  # 6
        Tensor("zero1", (1,), "int32", bufs["zero1"]),  # 7
        Tensor("begin0", (1,), "int32", bufs["zero1"]),  # 8 (same buffer, another tensor)
        Tensor("size1", (1,), "int32", bufs["one1"]),  # 9
        Tensor("pos0", (1,), "int32"),  # 10
        Tensor("start", (3,), "int32"),  # 11
        Tensor("kv_cache_out", (1, S, N), "float32"),  # 12
    ]
    ops = [
        Operator("GATHER", [3, 0], [5], {"axis": 0, "batch_dims": 0}),
        Operator("FULLY_CONNECTED", [5, 4, -1], [6], dict(FC_OPTIONS)),
        Operator("SLICE", [1, 8, 9], [10]),
        Operator(
            "CONCATENATION", [7, 10, 7], [11], {"axis": 0, "fused_activation_function": "NONE"}
        ),
        Operator("DYNAMIC_UPDATE_SLICE", [2, 6, 11], [12]),
    ]
    sg = Subgraph(name, tensors, [0, 1, 2], [6, 12], ops)
    index = writer.add_subgraph(sg)
    writer.add_signature(
        Signature(
            name, index, {"tokens": 0, "input_pos": 1, "kv_cache": 2}, {"logits": 6, "kv_cache": 12}
        )
    )
    return sg


def test_two_signatures_share_weights_and_update_a_cache(tmp_path: Path) -> None:
    rng = _rng()
    V, D, N, S = 11, 16, 8, 10
    table = rng.standard_normal((V, D)).astype(np.float32)
    w = rng.standard_normal((N, D)).astype(np.float32)
    q = quantize(w, 8)
    writer = ModelWriter()
    bufs = {
        "table": writer.add_buffer(table),
        "w": writer.add_buffer(q.data),
        "zero1": writer.add_buffer(np.zeros(1, np.int32)),
        "one1": writer.add_buffer(np.ones(1, np.int32)),
        "wq": Quantization(q.scale, q.zero_point, 0),
    }
    _mini_lm(writer, "prefill_4", 4, bufs, V, D, N, S)
    _mini_lm(writer, "decode", 1, bufs, V, D, N, S)
    writer.add_metadata("note", b"two signatures")
    path = tmp_path / "lm.tflite"
    writer.write(path)

    model = read_model(path)
    assert [s.key for s in model.signatures] == ["prefill_4", "decode"]
    assert read_metadata(path) == (model.metadata, True) == ({"note": b"two signatures"}, True)
    # one copy of each weight: both subgraphs point at the same buffers
    assert model.subgraphs[0].tensors[3].buffer == model.subgraphs[1].tensors[3].buffer
    assert model.subgraphs[0].tensors[4].buffer == model.subgraphs[1].tensors[4].buffer
    assert len(model.buffers) == 6  # sentinel + 4 data buffers + metadata
    assert path.stat().st_size < 7 * 65536 + table.nbytes + q.data.nbytes

    it = _interpreter(path)
    assert set(it.get_signature_list()) == {"prefill_4", "decode"}
    prefill = it.get_signature_runner("prefill_4")
    decode = it.get_signature_runner("decode")
    wd = dequantize(q)
    cache = np.zeros((1, S, N), np.float32)
    tokens = np.array([[3, 1, 4, 1]], np.int32)
    out = prefill(tokens=tokens, input_pos=np.arange(4, dtype=np.int32), kv_cache=cache)
    ref = table[tokens[0]] @ wd.T
    np.testing.assert_allclose(out["logits"][0], ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    cache = out["kv_cache"]
    np.testing.assert_array_equal(cache[0, :4], out["logits"][0])
    assert not cache[0, 4:].any()
    out2 = decode(
        tokens=np.array([[9]], np.int32), input_pos=np.array([4], np.int32), kv_cache=cache
    )
    ref2 = table[9] @ wd.T
    np.testing.assert_allclose(
        out2["logits"][0, 0], ref2, rtol=2e-2, atol=2e-2 * np.abs(ref2).max()
    )
    np.testing.assert_array_equal(out2["kv_cache"][0, :4], cache[0, :4])
    np.testing.assert_array_equal(out2["kv_cache"][0, 4], out2["logits"][0, 0])
    assert not out2["kv_cache"][0, 5:].any()


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_embedding_lookup_int8_per_row(resolver: OpResolverType) -> None:
    rng = _rng()
    V, D = 9, 12
    table = rng.standard_normal((V, D)).astype(np.float32)
    table[2] *= 50
    q = quantize(table, 8)
    writer = ModelWriter()
    tb = writer.add_buffer(q.data)
    writer.add_subgraph(
        Subgraph(
            "main",
            [
                Tensor("ids", (4,), "int32"),
                Tensor("table", (V, D), "int8", tb, Quantization(q.scale, q.zero_point, 0)),
                Tensor("out", (4, D), "float32"),
            ],
            [0],
            [2],
            [Operator("EMBEDDING_LOOKUP", [0, 1], [2])],
        )
    )
    writer.add_signature(Signature("lookup", 0, {"ids": 0}, {"out": 2}))
    ids = np.array([2, 0, 8, 2], np.int32)
    out = _interpreter(writer.to_bytes(alignment=64), resolver).get_signature_runner("lookup")(
        ids=ids
    )["out"]
    np.testing.assert_allclose(out, dequantize(q)[ids], rtol=1e-6, atol=1e-6)


def test_gather_float_and_dequantize_float16() -> None:
    rng = _rng()
    table = rng.standard_normal((7, 5)).astype(np.float16)
    writer = ModelWriter()
    tb = writer.add_buffer(table)
    writer.add_subgraph(
        Subgraph(
            "main",
            [
                Tensor("table16", (7, 5), "float16", tb),
                Tensor("table", (7, 5), "float32"),
                Tensor("ids", (1, 3), "int32"),
                Tensor("out", (1, 3, 5), "float32"),
            ],
            [2],
            [3],
            [
                Operator("DEQUANTIZE", [0], [1]),
                Operator("GATHER", [1, 2], [3], {"axis": 0, "batch_dims": 0}),
            ],
        )
    )
    writer.add_signature(Signature("g", 0, {"ids": 2}, {"out": 3}))
    ids = np.array([[6, 0, 3]], np.int32)
    out = _interpreter(writer.to_bytes()).get_signature_runner("g")(ids=ids)["out"]
    np.testing.assert_array_equal(out[0], table.astype(np.float32)[ids[0]])


def test_dynamic_shape_signature_and_mean_options() -> None:
    writer = ModelWriter()
    axis = writer.add_buffer(np.array([1], np.int32))
    writer.add_subgraph(
        Subgraph(
            "main",
            [
                Tensor("x", (1, 4), "float32", shape_signature=(-1, 4)),
                Tensor("axis", (1,), "int32", axis),
                Tensor("m", (1, 1), "float32", shape_signature=(-1, 1)),
            ],
            [0],
            [2],
            [Operator("MEAN", [0, 1], [2], {"keep_dims": True})],
        )
    )
    writer.add_signature(Signature("mean", 0, {"x": 0}, {"m": 2}))
    content = writer.to_bytes(alignment=64)
    model = read_model_bytes(content)
    assert model.subgraphs[0].tensors[0].shape_signature == (-1, 4)
    assert model.subgraphs[0].operators[0].options["keep_dims"] is True
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = _interpreter(content).get_signature_runner("mean")(x=x)["m"]
    np.testing.assert_allclose(out[:, 0], x.mean(axis=1))


# --------------------------------------------------------------------------------------------
# file layout, round trip, determinism


def _sample_writer(alignment_probe: list | None = None) -> ModelWriter:
    rng = _rng()
    writer = ModelWriter(description="sample")
    w = rng.standard_normal((5, 3)).astype(np.float32)
    q = quantize(rng.standard_normal((4, 7)).astype(np.float32), 4, symmetric=False)
    b_w = writer.add_buffer(w)
    b_odd = writer.add_buffer(b"\x01\x02\x03")  # 3 bytes: the next block must realign
    placeholder = Quantization(np.zeros(4), np.zeros(4), 0)
    tensors = [
        Tensor("w", (5, 3), "float32", b_w),
        Tensor("bytes", (3,), "uint8", b_odd),
        Tensor("q4", (4, 7), "int4", 0, placeholder),
        Tensor("flag", (2,), "bool", writer.add_buffer(np.array([True, False]))),
        Tensor("i64", (2,), "int64", writer.add_buffer(np.array([-1, 1 << 40], np.int64))),
        Tensor("state", (2, 2), "float32", is_variable=True),
    ]

    def fill() -> np.ndarray:
        if alignment_probe is not None:
            alignment_probe.append("filled")
        tensors[2].quantization = Quantization(q.scale, q.zero_point, 0)
        return q.data

    tensors[2].buffer = writer.add_lazy_buffer(q.data.nbytes, fill)
    writer.add_subgraph(Subgraph("weights", tensors, [], [], []))
    writer.add_metadata("alpha", b"A" * 100)
    writer.add_metadata("empty", b"")
    writer.add_metadata("beta", bytes(range(256)))
    return writer


def test_round_trip_and_alignment(tmp_path: Path) -> None:
    calls: list[str] = []
    writer = _sample_writer(calls)
    path = tmp_path / "s.tflite"
    size = writer.write(path, alignment=4096)
    assert calls == ["filled"]
    assert size == path.stat().st_size
    data = path.read_bytes()
    assert data[4:8] == b"TFL3"

    model = read_model(path)
    assert model.version == 3 and model.description == "sample"
    assert model.metadata == {"alpha": b"A" * 100, "empty": b"", "beta": bytes(range(256))}
    external = [b for b in model.buffers if b.size]
    assert external and all(b.external for b in external)
    assert all(b.offset % 4096 == 0 and b.offset >= 4096 for b in external)
    assert model.buffers[0].size == 0

    t = model.subgraphs[0].tensors
    assert [x.name for x in t] == ["w", "bytes", "q4", "flag", "i64", "state"]
    assert [x.dtype for x in t] == ["float32", "uint8", "int4", "bool", "int64", "float32"]
    assert t[5].is_variable and t[5].buffer == 0
    w = model.tensor_data(0, 0)
    assert isinstance(w, np.memmap) and not w.flags.writeable
    np.testing.assert_array_equal(w, _rng().standard_normal((5, 3)).astype(np.float32))
    assert model.tensor_data(0, 1).tobytes() == b"\x01\x02\x03"
    qt = t[2].quantization
    assert qt is not None and qt.scale.dtype == np.float32 and qt.zero_point.dtype == np.int64
    assert model.tensor_data(0, 2).shape == (4, 4) and model.tensor_data(0, 2).dtype == np.uint8
    assert model.tensor_data(0, 3).tolist() == [True, False]
    assert model.tensor_data(0, 4).tolist() == [-1, 1 << 40]
    with pytest.raises(LlmToolError, match="no data"):
        model.tensor_data(0, 5)


def test_lazy_fill_sets_quantization() -> None:
    writer = _sample_writer()
    model = read_model_bytes(writer.to_bytes(alignment=64))
    rng = _rng()
    rng.standard_normal((5, 3))
    q = quantize(rng.standard_normal((4, 7)).astype(np.float32), 4, symmetric=False)
    qt = model.subgraphs[0].tensors[2].quantization
    np.testing.assert_array_equal(qt.scale, q.scale)
    np.testing.assert_array_equal(qt.zero_point, q.zero_point)
    np.testing.assert_array_equal(model.tensor_data(0, 2), q.data)


def test_default_alignment_is_64k(tmp_path: Path) -> None:
    path = tmp_path / "a.tflite"
    _sample_writer().write(path)
    model = read_model(path)
    offsets = [b.offset for b in model.buffers if b.size]
    assert offsets[0] == 65536
    assert all(o % 65536 == 0 for o in offsets)
    assert len(set(offsets)) == len(offsets)


def test_deterministic_and_to_bytes_matches_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    _sample_writer().write(a, alignment=256)
    _sample_writer().write(b, alignment=256)
    assert a.read_bytes() == b.read_bytes()
    assert _sample_writer().to_bytes(alignment=256) == a.read_bytes()


def test_offsets_are_64_bit() -> None:
    writer = _sample_writer()
    big = [0] + [(5 << 32) + i * 65536 for i in range(1, writer.num_buffers)]
    fb = writer._flatbuffer(big)
    model = schema.Model.GetRootAs(fb, 0)
    assert model.Buffers(1).Offset() == (5 << 32) + 65536
    assert model.Buffers(1).Size() == 60
    # and the reader refuses offsets beyond the end of the file
    with pytest.raises(LlmToolError, match="beyond the end"):
        read_model_bytes(fb)


def test_reads_inline_buffers() -> None:
    """Models written by other tools keep small buffers inside the flatbuffer."""
    model = schema.ModelT()
    model.version = 3
    b0, b1 = schema.BufferT(), schema.BufferT()
    b1.data = np.arange(6, dtype=np.float32).view(np.uint8)
    model.buffers = [b0, b1]
    sg = schema.SubGraphT()
    t = schema.TensorT()
    t.name, t.shape, t.buffer, t.type = "c", np.array([2, 3], np.int32), 1, 0
    sg.tensors = [t]
    model.subgraphs = [sg]
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    parsed = read_model_bytes(bytes(builder.Output()))
    assert not parsed.buffers[1].external
    np.testing.assert_array_equal(
        parsed.tensor_data(0, 0), np.arange(6, dtype=np.float32).reshape(2, 3)
    )


def test_operator_and_custom_op_round_trip() -> None:
    writer = ModelWriter()
    writer.add_subgraph(
        Subgraph(
            "g",
            [Tensor("a", (2,), "float32"), Tensor("b", (2,), "float32")],
            [0],
            [1],
            [
                Operator("GELU", [0], [1], {"approximate": True}),
                Operator(
                    "FULLY_CONNECTED",
                    [0, 0, -1],
                    [1],
                    {"fusedActivationFunction": "relu"},
                    version=2,
                ),
                Operator("CUSTOM", [0], [1], custom_code="MyOp", custom_options=b"\x01\x02"),
                Operator("STABLEHLO_COMPOSITE", [0], [1], {"name": "odml.rms_norm", "version": 1}),
                Operator("RSQRT", [0], [1]),
            ],
        )
    )
    model = read_model_bytes(writer.to_bytes(alignment=64))
    ops = model.subgraphs[0].operators
    assert [o.op for o in ops] == [
        "GELU",
        "FULLY_CONNECTED",
        "CUSTOM",
        "STABLEHLO_COMPOSITE",
        "RSQRT",
    ]
    assert ops[0].options["approximate"] is True
    assert ops[1].options["fused_activation_function"] == schema.ActivationFunctionType.RELU
    assert ops[1].version == 2 and ops[0].version == 1
    assert ops[2].custom_code == "MyOp" and ops[2].custom_options == b"\x01\x02"
    assert ops[3].options["name"] in ("odml.rms_norm", b"odml.rms_norm")
    assert ops[4].options == {}
    # opcode table: one entry per distinct (code, version)
    fb = schema.Model.GetRootAs(writer.to_bytes(alignment=64), 0)
    codes = [fb.OperatorCodes(i) for i in range(fb.OperatorCodesLength())]
    assert len(codes) == 5
    composite = [c for c in codes if c.BuiltinCode() == schema.BuiltinOperator.STABLEHLO_COMPOSITE]
    assert composite[0].DeprecatedBuiltinCode() == 127


@pytest.mark.parametrize(
    "op, message",
    [
        (Operator("NOT_AN_OP", [0], [1]), "unknown builtin op"),
        (Operator("RSQRT", [0], [1], {"beta": 1.0}), "takes no builtin options"),
        (Operator("SOFTMAX", [0], [1], {"betta": 1.0}), "has no option 'betta'"),
        (
            Operator("FULLY_CONNECTED", [0, 0, -1], [1], {"fused_activation_function": "RELU7"}),
            "not one of",
        ),
        (Operator("ADD", [0, 5], [1]), "no tensor 5"),
    ],
)
def test_invalid_operators_are_refused(op: Operator, message: str) -> None:
    writer = ModelWriter()
    writer.add_subgraph(
        Subgraph("g", [Tensor("a", (2,), "float32"), Tensor("b", (2,), "float32")], [0], [1], [op])
    )
    with pytest.raises(ValueError, match=message):
        writer.to_bytes(alignment=64)


def test_buffer_size_must_match_tensor() -> None:
    writer = ModelWriter()
    b = writer.add_buffer(np.zeros(5, np.float32))
    writer.add_subgraph(Subgraph("g", [Tensor("a", (2, 3), "float32", b)], [], [], []))
    with pytest.raises(ValueError, match="needs 24 bytes"):
        writer.to_bytes()


def test_int4_odd_rows_are_refused_in_graphs() -> None:
    """LiteRT reads INT4 packed over the flattened tensor: row padding would shift values."""
    q = quantize(_rng().standard_normal((3, 5)).astype(np.float32), 4)  # 3 x 3 bytes, flat 8
    writer = _fc_writer("int4", q.data, (3, 5), quant=Quantization(q.scale, q.zero_point))
    with pytest.raises(ValueError, match="needs 8 bytes"):
        writer.to_bytes()


# --------------------------------------------------------------------------------------------
# failures


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.tflite"
    path.write_bytes(b"old")
    writer = ModelWriter()

    def boom() -> np.ndarray:
        raise RuntimeError("checkpoint went away")

    b = writer.add_lazy_buffer(16, boom)
    writer.add_subgraph(Subgraph("g", [Tensor("a", (4,), "float32", b)], [], [], []))
    with pytest.raises(RuntimeError, match="went away"):
        writer.write(path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.tflite"]

    writer2 = ModelWriter()
    b = writer2.add_lazy_buffer(16, lambda: np.zeros(3, np.float32))  # wrong size
    writer2.add_subgraph(Subgraph("g", [Tensor("a", (4,), "float32", b)], [], [], []))
    with pytest.raises(ValueError, match="expected 16 bytes"):
        writer2.write(tmp_path / "y.tflite")
    assert os.listdir(tmp_path) == ["x.tflite"]


def test_corrupt_files_raise_llmtool_error(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    _sample_writer().write(path, alignment=64)
    data = path.read_bytes()
    cases = {
        "missing.tflite": None,
        "empty.tflite": b"",
        "text.tflite": b"this is not a model at all, just text",
        "truncated_data.tflite": data[: len(data) - 10],
        "truncated_header.tflite": data[:200],
        "zeros.tflite": bytes(4) + b"TFL3" + bytes(64),
        "garbage.tflite": data[:8] + _rng().integers(0, 256, 400, dtype=np.uint8).tobytes(),
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(LlmToolError) as err:
            read_model(p)
        assert name in str(err.value), name


def _values_int4(q) -> np.ndarray:
    from llmtool.quantization import unpack_int4

    return unpack_int4(q.data, q.shape).astype(np.float32)


def test_fully_connected_blockwise_int4(tmp_path: Path) -> None:
    """LiteRT's blockwise int4 encoding: BlockwiseQuantization details + float16 scales."""
    rng = _rng()
    w = rng.standard_normal((16, 128)).astype(np.float32)
    w[2, 64:96] *= 30  # one block's scale must not leak into its neighbours
    x = rng.standard_normal((3, 128)).astype(np.float32)
    q = quantize(w, 4, block_size=32)
    writer = ModelWriter(description="blockwise fc")
    tensors = [
        Tensor("x", (3, 128), "float32"),
        Tensor("w", (16, 128), "int4", writer.add_buffer(q.data), Quantization.blockwise(3, 32)),
        Tensor("y", (3, 16), "float32"),
        Tensor("w.scales", (16, 4), "float16", writer.add_buffer(q.scale.astype(np.float16))),
    ]
    writer.add_subgraph(
        Subgraph(
            "main",
            tensors,
            [0],
            [2],
            [Operator("FULLY_CONNECTED", [0, 1, -1], [2], dict(FC_OPTIONS))],
        )
    )
    writer.add_signature(Signature("serving_default", 0, {"x": 0}, {"y": 2}))
    path = tmp_path / "fcb.tflite"
    writer.write(path, alignment=64)
    back = read_model(path).subgraphs[0].tensors[1].quantization
    assert back is not None and (back.block_size, back.scales) == (32, 3)
    ref = x @ dequantize(q).T
    y = _run_fc(path, x)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-2
    # the runtime honours every block's scale: reading one scale per row would be far off
    wrong = x @ (_values_int4(q) * q.scale[:, :1]).T
    assert np.abs(wrong - ref).max() > 10 * np.abs(y - ref).max()
    with pytest.raises(ValueError, match="scales must be float16"):
        tensors[3] = Tensor("w.scales", (16, 2), "float16", tensors[3].buffer)
        writer.to_bytes()


# ------------------------------------------------------------------------------------------
# The reader reads what the schema's generated object API reads, lazily, and refuses damage


def _reference(content: bytes) -> dict:
    """Everything the schema's generated object API (eager, slow) reads from a model, in the
    reader's terms: the reference the direct flatbuffer reader must agree with."""
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAs(content, 0))
    text = lambda s: s.decode() if isinstance(s, bytes) else (s or "")  # noqa: E731
    ints = lambda v: [] if v is None else [int(i) for i in v]  # noqa: E731

    def where(b) -> tuple[int, int]:
        if b.offset > 1:
            return int(b.offset), int(b.size)
        data = b"" if b.data is None else bytes(np.asarray(b.data, np.uint8))
        return -1, len(data)  # inline: only its size is compared

    def quant(q):
        if q is None:
            return None
        if q.detailsType == schema.QuantizationDetails.BlockwiseQuantization and q.details:
            return ("blockwise", int(q.details.scales), int(q.details.blockSize))
        if q.scale is None or not len(q.scale):
            return None
        zp = ints(q.zeroPoint) or [0] * len(q.scale)
        return ([float(s) for s in q.scale], zp, int(q.quantizedDimension))

    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in m.operatorCodes or []]
    subgraphs = []
    for sg in m.subgraphs or []:
        tensors = [
            (text(t.name), tuple(ints(t.shape)), int(t.type), int(t.buffer), quant(t.quantization),
             None if t.shapeSignature is None else tuple(ints(t.shapeSignature)),
             bool(t.isVariable))
            for t in sg.tensors or []
        ]  # fmt: skip
        ops = []
        for o in sg.operators or []:
            opts = o.builtinOptions if o.builtinOptions is not None else o.builtinOptions2
            opts_ = {} if opts is None else vars(opts)
            custom = o.customOptions
            custom = None if custom is None else bytes(np.asarray(custom, np.uint8))
            ops.append((codes[o.opcodeIndex], ints(o.inputs), ints(o.outputs), len(opts_), custom))
        subgraphs.append((text(sg.name), tensors, ints(sg.inputs), ints(sg.outputs), ops))
    signatures = [
        (text(s.signatureKey), int(s.subgraphIndex),
         {text(t.name): int(t.tensorIndex) for t in s.inputs or []},
         {text(t.name): int(t.tensorIndex) for t in s.outputs or []})
        for s in m.signatureDefs or []
    ]  # fmt: skip
    metadata = {text(e.name): int(e.buffer) for e in m.metadata or []}
    buffers = [where(b) for b in m.buffers or []]
    return {"subgraphs": subgraphs, "signatures": signatures, "metadata": metadata,
            "buffers": buffers, "description": text(m.description)}  # fmt: skip


def _read_view(model) -> dict:
    from llmtool.formats.tflite_model import _builtin_codes, _type_codes

    def quant(q):
        if q is None:
            return None
        if q.block_size:
            return ("blockwise", q.scales, q.block_size)
        return (q.scale.tolist(), q.zero_point.tolist(), q.axis)

    subgraphs = []
    for sg in model.subgraphs:
        tensors = [
            (t.name, tuple(t.shape), _type_codes()[t.dtype], t.buffer, quant(t.quantization),
             t.shape_signature, t.is_variable)
            for t in sg.tensors
        ]  # fmt: skip
        ops = [
            (_builtin_codes()[o.op], o.inputs, o.outputs, len(o.options), o.custom_options)
            for o in sg.operators
        ]
        subgraphs.append((sg.name, tensors, sg.inputs, sg.outputs, ops))
    signatures = [(s.key, s.subgraph_index, s.inputs, s.outputs) for s in model.signatures]
    buffers = [(b.offset if b.external else -1, b.size) for b in model.buffers]
    return {"subgraphs": subgraphs, "signatures": signatures, "metadata": model.metadata_index,
            "buffers": buffers, "description": model.description}  # fmt: skip


def _ops_writer(weights: bool = True) -> ModelWriter:
    writer = ModelWriter()
    t = [Tensor("a", (2,), "float32"), Tensor("b", (2,), "float32", shape_signature=(-1,))]
    if weights:  # a blockwise int4 tensor and its scales
        w = writer.add_buffer(np.arange(64, dtype=np.uint8))
        scales = writer.add_buffer(np.ones((2, 2), np.float16))
        t += [
            Tensor("w", (2, 64), "int4", w, Quantization.blockwise(3, 32)),
            Tensor("w.scales", (2, 2), "float16", scales),
        ]
    ops = [
        Operator("GELU", [0], [1], {"approximate": True}),
        Operator("FULLY_CONNECTED", [0, 0, -1], [1], {"fusedActivationFunction": "relu"}, 2),
        Operator("CUSTOM", [0], [1], custom_code="MyOp", custom_options=b"\x01\x02"),
        Operator("STABLEHLO_COMPOSITE", [0], [1], {"name": "odml.rms_norm", "version": 1}),
    ]
    writer.add_subgraph(Subgraph("g", t, [0], [1], ops))
    writer.add_signature(Signature("run", 0, {"a": 0}, {"b": 1}))
    return writer


def test_reader_agrees_with_the_schema_object_api(converted, tmp_path: Path) -> None:
    from llmtool.pipelines.export import ExportOptions, export_graph
    from llmtool.pipelines.resolve import default_model_path

    graph = tmp_path / "g.tflite"
    export_graph(converted("GEMMA_2B", "int8"), graph, ExportOptions(max_seq_len=32, prefill_len=8))
    files = {
        "sample": _sample_writer().to_bytes(alignment=64),
        "ops": _ops_writer().to_bytes(alignment=64),
        "litert-torch graph": (
            Path(__file__).parent / "data/litert_torch_tiny_llama.tflite"
        ).read_bytes(),
        "default model": default_model_path().read_bytes(),
        "exported graph": graph.read_bytes(),
    }
    for name, content in files.items():
        model = read_model_bytes(content)
        assert _read_view(model) == _reference(content), name
    ops = read_model_bytes(files["ops"]).subgraphs[0].operators
    assert ops[0].options == {"approximate": True}
    assert ops[1].options["fused_activation_function"] == schema.ActivationFunctionType.RELU


def test_reader_unpacks_only_what_is_used(converted, tmp_path: Path) -> None:
    from llmtool.pipelines.inspect import describe

    model = read_model(converted("GEMMA_2B", "int8"))
    tensors = model.subgraphs[0].tensors
    assert len(tensors) > 10 and all(t is None for t in tensors._items)  # nothing unpacked yet
    assert tensors[-1] is tensors[len(tensors) - 1] is tensors[-1]  # once, then kept
    assert sum(t is not None for t in tensors._items) == 1
    assert tensors[:2] == list(tensors)[:2] and tensors == list(tensors)
    with pytest.raises(IndexError):
        tensors[len(tensors)]
    assert describe(converted("GEMMA_2B", "int8"))["parameters"] > 0


def _damaged(edit) -> bytes:
    """A small valid model (two tensors, one operator, one signature) with `edit` applied to
    its object-API form, packed again."""
    import flatbuffers

    content = _ops_writer(weights=False).to_bytes(64)
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAs(content, 0))
    edit(m, m.subgraphs[0])
    builder = flatbuffers.Builder(1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _quantize_first(scale, zero_point, axis=0, blockwise=None):
    def edit(m, sg):
        q = schema.QuantizationParametersT()
        if blockwise is not None:
            q.detailsType = schema.QuantizationDetails.BlockwiseQuantization
            q.details = schema.BlockwiseQuantizationT()
            q.details.scales, q.details.blockSize = blockwise
        else:
            q.scale, q.zeroPoint = np.array(scale, np.float32), np.array(zero_point, np.int64)
            q.quantizedDimension = axis
        sg.tensors[0].quantization = q

    return edit


def _set(path: str, value):
    def edit(m, sg):
        target, attr = path.rsplit(".", 1)
        obj = {"model": m, "sg": sg, "tensor": sg.tensors[1], "op": sg.operators[0],
               "sig": m.signatureDefs[0] if m.signatureDefs else None}[target]  # fmt: skip
        setattr(obj, attr, value)

    return edit


@pytest.mark.parametrize(
    "edit, message, at_open",
    [
        (_set("tensor.buffer", 9), "tensor 'b' names buffer 9", True),
        (_set("op.opcodeIndex", 7), "names a missing operator code", True),
        (_set("op.inputs", np.array([0, 5], np.int32)), "an operator of 'g' names a missing", True),
        (_set("op.outputs", np.array([-2], np.int32)), "names a missing tensor", True),
        (_set("sg.outputs", np.array([2], np.int32)), "subgraph 'g' names a missing tensor", True),
        (_set("sig.subgraphIndex", 1), "signature 'run' names a missing subgraph", True),
        (_quantize_first([0.1, 0.2], [0, 0, 0]), "2 scales, 3 zero points", False),
        (_quantize_first([0.1, 0.2, 0.3], [0, 0, 0]), "3 scales, 3 zero points along", False),
        (_quantize_first([0.1, 0.2], [0, 0], axis=3), "along axis 3", False),
        (_quantize_first(None, None, blockwise=(9, 32)), "blockwise scales 9", False),
        (_quantize_first(None, None, blockwise=(1, 0)), "block 0", False),
    ],
)
def test_damaged_tables_are_refused(edit, message: str, at_open: bool) -> None:
    content = _damaged(edit)
    with pytest.raises(LlmToolError, match=message) as err:
        model = read_model_bytes(content)
        assert not at_open  # checked when opened, or when the tensor is used
        model.subgraphs[0].tensors[0]
    assert "<bytes>" in str(err.value) and "\n" not in str(err.value)
