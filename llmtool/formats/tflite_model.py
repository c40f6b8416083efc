"""A generic TFLite model writer and reader (flatbuffers + the LiteRT schema, no TensorFlow).

File layout written by `ModelWriter.write`:

    [ flatbuffer (identifier TFL3, schema version 3) | zero padding ]
    [ buffer data block, aligned ] [ padding ] [ next block, aligned ] ...

Every buffer's bytes (weights and metadata) live outside the flatbuffer and are referenced by
`Buffer.offset` / `Buffer.size` (64-bit, from the start of the file), so files may exceed the
2 GiB flatbuffer limit and readers can mmap the weights. The first block starts at `alignment`
bytes or later. Writing is streaming: lazy buffers are produced one at a time in buffer order.
Because every scalar field is written (`ForceDefaults`), the flatbuffer's size does not depend
on field values, so it is built once with placeholder offsets to reserve its space and once
more, after all data is written, with the final values.
"""

from __future__ import annotations

import importlib
import io
import mmap
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.files import atomic_output

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
DEFAULT_ALIGNMENT = 65536
_WRITE_CHUNK = 64 << 20

BufferData = np.ndarray | bytes | bytearray | memoryview

# --------------------------------------------------------------------------------------------
# dtypes


class _LazyModule:
    """A module imported on its first attribute use. The LiteRT schema and flatbuffers take
    ~15 ms to import (a tenth of a warm `llmtool run`), and reading a file's metadata, all a
    run does here, needs neither."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


schema: Any = _LazyModule("ai_edge_litert.schema_py_generated")
flatbuffers: Any = _LazyModule("flatbuffers")


def _public(cls: type) -> dict[str, Any]:
    return {k: v for k, v in vars(cls).items() if not k.startswith("_")}


@cache
def _type_codes() -> dict[str, int]:
    return {k.lower(): v for k, v in _public(schema.TensorType).items()}


@cache
def _type_names() -> dict[int, str]:
    return {v: k for k, v in _type_codes().items()}


# numpy dtype of the stored bytes (sub-byte types are stored packed as uint8)
_NUMPY: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
    "complex64": np.dtype("<c8"),
    "complex128": np.dtype("<c16"),
    "bfloat16": np.dtype("<u2"),
    "int4": np.dtype("u1"),
    "uint4": np.dtype("u1"),
    "int2": np.dtype("u1"),
    "string": np.dtype("u1"),
    "float8_e4m3fn": np.dtype("u1"),
    "float8_e5m2": np.dtype("u1"),
}
_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "int2": 2}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a TFLite dtype's stored bytes (uint8 for packed sub-byte types)."""
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise ValueError(f"no numpy dtype for TFLite type {dtype!r}") from None


def _type_code(dtype: str) -> int:
    try:
        return _type_codes()[dtype]
    except KeyError:
        raise ValueError(
            f"unknown tensor dtype {dtype!r} (known: {', '.join(sorted(_type_codes()))})"
        ) from None


def expected_nbytes(shape: tuple[int, ...], dtype: str) -> int | None:
    """Bytes a constant of this shape and dtype occupies (None when not fixed, e.g. strings).

    Sub-byte types are counted packed along the last axis (an odd row padded to a whole byte),
    the container layout. TFLite kernels read them packed over the flattened tensor; the two
    agree whenever the last dimension is even (the writer enforces flat packing in graphs).
    """
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype in _SUB_BYTE_BITS:
        per = 8 // _SUB_BYTE_BITS[dtype]
        if not shape:
            return 1
        rows = count // shape[-1] if shape[-1] else 0
        return rows * -(-shape[-1] // per)
    if dtype == "string" or dtype not in _NUMPY:
        return None
    return count * _NUMPY[dtype].itemsize


# --------------------------------------------------------------------------------------------
# model description


@dataclass
class Quantization:
    """Per-tensor (one value) or per-channel (along `axis`) affine quantization, or blockwise.

    Blockwise (`block_size` > 0; LiteRT's BlockwiseQuantization details): `scale` and
    `zero_point` are empty and `scales` is the index of a FLOAT16 constant tensor
    [rows, columns // block_size] in the same subgraph; zero points are 0.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int = 0
    block_size: int = 0
    scales: int = -1  # blockwise: index of the scales tensor

    @classmethod
    def blockwise(cls, scales: int, block_size: int) -> Quantization:
        return cls(np.zeros(0, np.float32), np.zeros(0, np.int64), 0, block_size, scales)

    def __post_init__(self) -> None:
        self.scale = np.array(self.scale, dtype=np.float32, copy=True).reshape(-1)
        self.zero_point = np.array(self.zero_point, dtype=np.int64, copy=True).reshape(-1)
        self.axis = int(self.axis)
        self.block_size = int(self.block_size)
        self.scales = int(self.scales)


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "float16", "int8", "int4", "int32", "int64", "bool", "uint8", ...
    buffer: int = 0  # 0 = no data (activations, inputs)
    quantization: Quantization | None = None
    shape_signature: tuple[int, ...] | None = None  # -1 for dynamic dimensions
    is_variable: bool = False


@dataclass
class Operator:
    op: str  # builtin operator name, e.g. "FULLY_CONNECTED", or "CUSTOM"
    inputs: list[int]  # -1 = omitted optional input
    outputs: list[int]
    # builtin options by field name (snake_case or the schema's camelCase); enums by name
    options: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    custom_code: str | None = None  # op == "CUSTOM" only
    custom_options: bytes | None = None


@dataclass
class Subgraph:
    name: str
    tensors: list[Tensor]
    inputs: list[int]
    outputs: list[int]
    operators: list[Operator]


@dataclass
class Signature:
    key: str
    subgraph_index: int
    inputs: dict[str, int]  # signature name -> tensor index in the subgraph
    outputs: dict[str, int]


# --------------------------------------------------------------------------------------------
# builtin options: op name -> options class, generically from the schema module

# Ops whose options table is not named after the op (the rest match case-insensitively).
_OPTIONS_OVERRIDES = {
    "AVERAGE_POOL_2D": "Pool2DOptions",
    "MAX_POOL_2D": "Pool2DOptions",
    "L2_POOL_2D": "Pool2DOptions",
    "L2_NORMALIZATION": "L2NormOptions",
    "UNIDIRECTIONAL_SEQUENCE_RNN": "SequenceRNNOptions",
    "MEAN": "ReducerOptions",
    "SUM": "ReducerOptions",
    "REDUCE_PROD": "ReducerOptions",
    "REDUCE_MAX": "ReducerOptions",
    "REDUCE_MIN": "ReducerOptions",
    "REDUCE_ANY": "ReducerOptions",
    "REDUCE_ALL": "ReducerOptions",
    "MAXIMUM": "MaximumMinimumOptions",
    "MINIMUM": "MaximumMinimumOptions",
    "CONV_3D_TRANSPOSE": "Conv3DOptions",
    "RANDOM_STANDARD_NORMAL": "RandomOptions",
    "RANDOM_UNIFORM": "RandomOptions",
    "MULTINOMIAL": "RandomOptions",
}

# Option fields whose value is an enum of the schema (values may be given by member name).
_ENUM_FIELDS = {
    "fusedActivationFunction": "ActivationFunctionType",
    "padding": "Padding",
    "weightsFormat": "FullyConnectedOptionsWeightsFormat",
    "kernelType": "LSTMKernelType",
    "combiner": "CombinerType",
    "mode": "MirrorPadMode",
    "quantizedBiasType": "TensorType",
    "inDataType": "TensorType",
    "outDataType": "TensorType",
    "outputType": "TensorType",
    "outType": "TensorType",
    "idxOutType": "TensorType",
    "keyDtype": "TensorType",
    "valueDtype": "TensorType",
    "comparisonDirection": "StablehloComparisonDirection",
    "compareType": "StablehloComparisonType",
    "precisionConfig": "StablehloPrecisionConfig",
    "algorithm": "RngAlgorithm",
    "reduceFunction": "ReduceWindowFunction",
}


@cache
def _builtin_codes() -> dict[str, int]:
    return _public(schema.BuiltinOperator)


@cache
def _builtin_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, code in _builtin_codes().items():
        names.setdefault(code, name)
    return names


@cache
def _options_class(op: str) -> tuple[int, int, type | None]:
    """(union 1 or 2, union type code, options T class) for a builtin op; (1, 0, None) if none."""
    wanted = _OPTIONS_OVERRIDES.get(op, op.replace("_", "") + "Options").lower()
    for union, enum in ((1, schema.BuiltinOptions), (2, schema.BuiltinOptions2)):
        for name, code in _public(enum).items():
            if name.lower() == wanted and code != 0:
                return union, code, getattr(schema, name + "T")
    return 1, 0, None


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _enum_value(op: str, key: str, attr: str, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_enum_value(op, key, attr, v) for v in value]
    if not isinstance(value, str):
        return value
    enum = _ENUM_FIELDS.get(attr)
    if enum is None:
        return value  # a genuine string field (e.g. a composite's name)
    members = _public(getattr(schema, enum))
    for name, code in members.items():
        if name.lower() == value.lower():
            return code
    raise ValueError(f"{op}: option {key}={value!r} is not one of {', '.join(members)}")


def _make_options(op: str, options: dict[str, Any]) -> tuple[int, int, Any]:
    union, code, cls = _options_class(op)
    if cls is None:
        if options:
            raise ValueError(f"{op} takes no builtin options (got {sorted(options)})")
        return 1, 0, None
    obj = cls()
    for key, value in options.items():
        attr = key if hasattr(obj, key) else _camel(key)
        if not hasattr(obj, attr):
            known = ", ".join(_snake(k) for k in vars(obj))
            raise ValueError(f"{op} has no option {key!r} (known: {known})")
        value = _enum_value(op, key, attr, value)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        setattr(obj, attr, value)
    return union, code, obj


def _options_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    out = {}
    for key, value in vars(obj).items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        out[_snake(key)] = value
    return out


# --------------------------------------------------------------------------------------------
# writer


@dataclass
class _Buffer:
    nbytes: int
    data: BufferData | None = None
    fill: Callable[[], BufferData] | None = None
    alignment: int | None = None  # None: the file's alignment


def _as_bytes_view(data: BufferData) -> memoryview:
    """A flat byte view of `data` (little-endian, C order), copying only when needed."""
    if isinstance(data, np.ndarray):
        arr = data
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        return memoryview(arr.reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


class ModelWriter:
    """Collects buffers, subgraphs, signatures and metadata, then writes one .tflite file."""

    def __init__(self, description: str = "llmtool"):
        self.description = description
        self._buffers: list[_Buffer] = [_Buffer(0)]  # buffer 0: the empty sentinel
        self.subgraphs: list[Subgraph] = []
        self.signatures: list[Signature] = []
        self.metadata: list[tuple[str, int]] = []

    # -- building --------------------------------------------------------------------------

    def add_buffer(self, data: BufferData) -> int:
        """A buffer with these bytes (an array is kept by reference and written as stored)."""
        if isinstance(data, np.ndarray):
            nbytes = int(data.nbytes)
        else:
            nbytes = memoryview(data).nbytes
        self._buffers.append(_Buffer(nbytes, data=data))
        return len(self._buffers) - 1

    def add_lazy_buffer(
        self, nbytes: int, fill: Callable[[], BufferData], alignment: int | None = None
    ) -> int:
        """A buffer of `nbytes` whose bytes `fill()` returns while the file is written.

        Fills run in buffer order; a fill may update tensors' quantization values (their
        lengths must already be final, since the flatbuffer's space is reserved beforehand).
        `alignment` (a power of two) overrides the file's alignment for small side data such
        as blockwise scales, which would otherwise cost a whole aligned block each.
        """
        self._buffers.append(_Buffer(int(nbytes), fill=fill, alignment=alignment))
        return len(self._buffers) - 1

    def add_subgraph(self, subgraph: Subgraph) -> int:
        self.subgraphs.append(subgraph)
        return len(self.subgraphs) - 1

    def add_signature(self, signature: Signature) -> int:
        self.signatures.append(signature)
        return len(self.signatures) - 1

    def add_metadata(self, name: str, data: bytes) -> int:
        """A metadata entry (its bytes are stored as a buffer); returns the buffer index."""
        index = self.add_buffer(bytes(data))
        self.metadata.append((name, index))
        return index

    @property
    def num_buffers(self) -> int:
        return len(self._buffers)

    def buffer_nbytes(self, index: int) -> int:
        return self._buffers[index].nbytes

    # -- validation ------------------------------------------------------------------------

    def validate(self) -> None:
        """Check indices and sizes; raises ValueError describing the first problem."""
        nbuf = len(self._buffers)
        if not self.subgraphs:
            raise ValueError("a model needs at least one subgraph")
        for si, sg in enumerate(self.subgraphs):
            nt = len(sg.tensors)
            where = f"subgraph {si} ({sg.name})"
            for ti, t in enumerate(sg.tensors):
                _type_code(t.dtype)
                if any(int(d) < 0 for d in t.shape):
                    raise ValueError(f"{where}: tensor {t.name!r} has a negative dimension")
                if not 0 <= t.buffer < nbuf:
                    raise ValueError(f"{where}: tensor {t.name!r} uses missing buffer {t.buffer}")
                if t.buffer:
                    want = expected_nbytes(tuple(t.shape), t.dtype)
                    have = self._buffers[t.buffer].nbytes
                    if t.dtype in _SUB_BYTE_BITS:
                        # TFLite kernels read sub-byte tensors packed over the flattened
                        # tensor; packing per row (odd last dim) is only fine for storage.
                        flat = -(
                            -int(np.prod(t.shape, dtype=np.int64)) * _SUB_BYTE_BITS[t.dtype] // 8
                        )
                        if have == flat or (have == want and not sg.operators):
                            want = have
                        else:
                            want = flat
                    if want is not None and have != want:
                        raise ValueError(
                            f"{where}: tensor {ti} {t.name!r} {t.dtype}{list(t.shape)} needs "
                            f"{want} bytes but buffer {t.buffer} holds {have}"
                        )
                q = t.quantization
                if q is not None and q.block_size:
                    self._check_blockwise(where, sg, t, q)
                elif q is not None:
                    if len(q.scale) != len(q.zero_point):
                        raise ValueError(f"{where}: tensor {t.name!r}: scale/zero point lengths")
                    if len(q.scale) > 1 and (
                        not 0 <= q.axis < len(t.shape) or len(q.scale) != t.shape[q.axis]
                    ):
                        raise ValueError(
                            f"{where}: tensor {t.name!r}: {len(q.scale)} scales do not match "
                            f"dimension {q.axis} of {list(t.shape)}"
                        )
            for idx in [*sg.inputs, *sg.outputs]:
                if not 0 <= idx < nt:
                    raise ValueError(f"{where}: input/output tensor {idx} does not exist")
            for oi, op in enumerate(sg.operators):
                if op.op != "CUSTOM" and op.op not in _builtin_codes():
                    raise ValueError(f"{where}: operator {oi}: unknown builtin op {op.op!r}")
                if op.op == "CUSTOM" and not op.custom_code:
                    raise ValueError(f"{where}: operator {oi}: CUSTOM needs a custom_code")
                for idx in op.inputs:
                    if not -1 <= idx < nt:
                        raise ValueError(f"{where}: operator {oi} ({op.op}): no tensor {idx}")
                for idx in op.outputs:
                    if not 0 <= idx < nt:
                        raise ValueError(f"{where}: operator {oi} ({op.op}): no tensor {idx}")
        keys = [s.key for s in self.signatures]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate signature keys in {keys}")
        for s in self.signatures:
            if not 0 <= s.subgraph_index < len(self.subgraphs):
                raise ValueError(f"signature {s.key!r}: no subgraph {s.subgraph_index}")
            nt = len(self.subgraphs[s.subgraph_index].tensors)
            for idx in [*s.inputs.values(), *s.outputs.values()]:
                if not 0 <= idx < nt:
                    raise ValueError(f"signature {s.key!r}: no tensor {idx}")
        names = [n for n, _ in self.metadata]
        if len(set(names)) != len(names):
            raise ValueError("duplicate metadata names")

    @staticmethod
    def _check_blockwise(where: str, sg: Subgraph, t: Tensor, q: Quantization) -> None:
        if len(t.shape) != 2 or t.shape[1] % q.block_size:
            raise ValueError(
                f"{where}: tensor {t.name!r}: block size {q.block_size} does not fit "
                f"shape {list(t.shape)}"
            )
        if not 0 <= q.scales < len(sg.tensors):
            raise ValueError(f"{where}: tensor {t.name!r}: no scales tensor {q.scales}")
        st = sg.tensors[q.scales]
        want = (t.shape[0], t.shape[1] // q.block_size)
        if st.dtype != "float16" or tuple(st.shape) != want:
            raise ValueError(
                f"{where}: tensor {t.name!r}: scales must be float16{list(want)}, "
                f"got {st.dtype}{list(st.shape)}"
            )

    # -- flatbuffer ------------------------------------------------------------------------

    def _flatbuffer(self, offsets: list[int]) -> bytes:
        opcodes: dict[tuple[int, int, str | None], int] = {}
        opcode_list: list[Any] = []
        subgraphs = []
        for sg in self.subgraphs:
            sgt = schema.SubGraphT()
            sgt.name = sg.name
            sgt.inputs = np.asarray(sg.inputs, dtype=np.int32).reshape(-1)
            sgt.outputs = np.asarray(sg.outputs, dtype=np.int32).reshape(-1)
            sgt.tensors = [_tensor_t(t) for t in sg.tensors]
            ops = []
            for op in sg.operators:
                code = (
                    _builtin_codes()[op.op] if op.op != "CUSTOM" else schema.BuiltinOperator.CUSTOM
                )
                key = (code, int(op.version), op.custom_code if op.op == "CUSTOM" else None)
                if key not in opcodes:
                    oc = schema.OperatorCodeT()
                    oc.builtinCode = code
                    oc.deprecatedBuiltinCode = min(code, 127)
                    oc.version = key[1]
                    oc.customCode = key[2]
                    opcodes[key] = len(opcode_list)
                    opcode_list.append(oc)
                ot = schema.OperatorT()
                ot.opcodeIndex = opcodes[key]
                ot.inputs = np.asarray(op.inputs, dtype=np.int32).reshape(-1)
                ot.outputs = np.asarray(op.outputs, dtype=np.int32).reshape(-1)
                if op.op == "CUSTOM":
                    if op.options:
                        raise ValueError("CUSTOM ops take custom_options bytes, not options")
                    if op.custom_options is not None:
                        ot.customOptions = np.frombuffer(bytes(op.custom_options), np.uint8)
                else:
                    union, utype, obj = _make_options(op.op, op.options)
                    if union == 1:
                        ot.builtinOptionsType, ot.builtinOptions = utype, obj
                    else:
                        ot.builtinOptions2Type, ot.builtinOptions2 = utype, obj
                ops.append(ot)
            sgt.operators = ops
            subgraphs.append(sgt)

        model = schema.ModelT()
        model.version = SCHEMA_VERSION
        model.description = self.description
        model.operatorCodes = opcode_list
        model.subgraphs = subgraphs
        buffers = []
        for off, buf in zip(offsets, self._buffers, strict=True):
            b = schema.BufferT()
            if buf.nbytes:
                b.offset, b.size = off, buf.nbytes
            buffers.append(b)
        model.buffers = buffers
        meta = []
        for name, index in self.metadata:
            m = schema.MetadataT()
            m.name, m.buffer = name, index
            meta.append(m)
        model.metadata = meta
        sigs = []
        for s in self.signatures:
            st = schema.SignatureDefT()
            st.signatureKey = s.key
            st.subgraphIndex = s.subgraph_index
            st.inputs = [_tensor_map(k, v) for k, v in s.inputs.items()]
            st.outputs = [_tensor_map(k, v) for k, v in s.outputs.items()]
            sigs.append(st)
        model.signatureDefs = sigs

        builder = flatbuffers.Builder(1 << 16)
        builder.ForceDefaults(True)  # fixed field layout: size independent of values
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())

    # -- output ----------------------------------------------------------------------------

    def _layout(self, alignment: int) -> tuple[int, list[int]]:
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two (got {alignment})")
        self.validate()
        placeholder = self._flatbuffer([0] * len(self._buffers))
        start = max(alignment, _round_up(len(placeholder), alignment))
        offsets, pos = [], start
        for buf in self._buffers:
            if buf.nbytes:
                off = _round_up(pos, min(buf.alignment or alignment, alignment))
                offsets.append(off)
                pos = off + buf.nbytes
            else:
                offsets.append(0)
        return start, offsets

    def _emit(self, f: BinaryIO, alignment: int) -> int:
        start, offsets = self._layout(alignment)
        f.write(bytes(start))
        pos = start
        for i, (off, buf) in enumerate(zip(offsets, self._buffers, strict=True)):
            if not buf.nbytes:
                continue
            f.write(bytes(off - pos))
            data = buf.data if buf.fill is None else buf.fill()
            view = _as_bytes_view(data)
            if view.nbytes != buf.nbytes:
                raise ValueError(f"buffer {i}: expected {buf.nbytes} bytes, got {view.nbytes}")
            for k in range(0, view.nbytes, _WRITE_CHUNK):
                f.write(view[k : k + _WRITE_CHUNK])
            del data, view
            pos = off + buf.nbytes
        fb = self._flatbuffer(offsets)
        if len(fb) > start:
            raise ValueError(
                f"flatbuffer grew from its reserved {start} to {len(fb)} bytes "
                "(did a fill change the length of a quantization vector?)"
            )
        f.seek(0)
        f.write(fb)
        return pos

    def to_bytes(self, alignment: int = DEFAULT_ALIGNMENT) -> bytes:
        """The whole file in memory (same layout as `write`)."""
        f = io.BytesIO()
        self._emit(f, alignment)
        return f.getvalue()

    def write(
        self,
        path: str | Path,
        alignment: int = DEFAULT_ALIGNMENT,
        inputs: Iterable[str | Path | None] = (),
    ) -> int:
        """Write the model atomically (llmtool.files.atomic_output); returns its size.

        `inputs` are the files it is made from: an output that is one of them is refused.
        """
        with atomic_output(path, inputs) as tmp, open(tmp, "wb") as f:
            size = self._emit(f, alignment)
        return size


def _tensor_map(name: str, index: int) -> Any:
    m = schema.TensorMapT()
    m.name, m.tensorIndex = name, int(index)
    return m


def _tensor_t(t: Tensor) -> Any:
    tt = schema.TensorT()
    tt.name = t.name
    tt.shape = np.asarray(t.shape, dtype=np.int32).reshape(-1)
    tt.type = _type_code(t.dtype)
    tt.buffer = int(t.buffer)
    tt.isVariable = bool(t.is_variable)
    tt.hasRank = True
    if t.shape_signature is not None:
        tt.shapeSignature = np.asarray(t.shape_signature, dtype=np.int32).reshape(-1)
    q = t.quantization
    if q is not None and q.block_size:
        qt = schema.QuantizationParametersT()
        details = schema.BlockwiseQuantizationT()
        details.scales, details.zeroPoints, details.blockSize = q.scales, -1, q.block_size
        qt.detailsType = schema.QuantizationDetails.BlockwiseQuantization
        qt.details = details
        tt.quantization = qt
    elif q is not None:
        qt = schema.QuantizationParametersT()
        qt.scale = np.ascontiguousarray(q.scale, dtype=np.float32).reshape(-1)
        qt.zeroPoint = np.ascontiguousarray(q.zero_point, dtype=np.int64).reshape(-1)
        qt.quantizedDimension = int(q.axis)
        tt.quantization = qt
    return tt


# --------------------------------------------------------------------------------------------
# reader


@dataclass(frozen=True)
class BufferInfo:
    """Where a buffer's bytes are in the file (external or inline in the flatbuffer)."""

    offset: int
    size: int
    external: bool


@dataclass
class ModelFile:
    """A parsed .tflite file; tensor data is served as read-only views of the mapped file."""

    path: Path | None
    version: int
    description: str
    subgraphs: list[Subgraph]
    signatures: list[Signature]
    metadata: dict[str, bytes]
    buffers: list[BufferInfo]
    _data: np.ndarray | None = field(default=None, repr=False)
    # Every metadata entry's raw buffer index: some writers store a number there instead of a
    # buffer (LiteRT-LM's `lora_rank`); entries whose index is no buffer are left out of
    # `metadata`.
    metadata_index: dict[str, int] = field(default_factory=dict)

    @property
    def is_graph(self) -> bool:
        """True for an exported graph, False for a weights container (no operators)."""
        return any(sg.operators for sg in self.subgraphs)

    def signature(self, key: str) -> Signature:
        for s in self.signatures:
            if s.key == key:
                return s
        raise LlmToolError(f"no signature {key!r}", self.path)

    def buffer_data(self, index: int) -> np.ndarray:
        """The raw bytes of buffer `index` (uint8, read-only)."""
        if self._data is None:
            raise ValueError("model file is closed")
        b = self.buffers[index]
        return self._data[b.offset : b.offset + b.size]

    def tensor_data(self, subgraph: int, tensor: int) -> np.ndarray:
        """A tensor's stored data as a read-only view, in its stored dtype and shape.

        Packed sub-byte tensors (int4) come back as uint8 bytes shaped (*shape[:-1], ceil(n/2))
        when the sizes agree, else flat.
        """
        t = self.subgraphs[subgraph].tensors[tensor]
        if t.buffer == 0 or self.buffers[t.buffer].size == 0:
            raise LlmToolError(f"tensor {t.name!r} has no data", self.path)
        raw = self.buffer_data(t.buffer)
        dtype = _NUMPY.get(t.dtype)
        if dtype is None or raw.size % dtype.itemsize:
            return raw
        arr = raw.view(dtype)
        shape = tuple(t.shape)
        if t.dtype in _SUB_BYTE_BITS and shape:
            per = 8 // _SUB_BYTE_BITS[t.dtype]
            packed = (*shape[:-1], -(-shape[-1] // per))
            if arr.size == int(np.prod(packed)):
                return arr.reshape(packed)
            return arr
        if arr.size == int(np.prod(shape, dtype=np.int64)):
            return arr.reshape(shape)
        return arr

    def release_pages(self) -> None:
        """Unmap the pages of the file read so far from this process (they stay in the page
        cache and come back on the next read): after copying a large model's buffers they
        would otherwise count in its resident memory."""
        mapping = getattr(self._data, "_mmap", None)  # np.memmap's mmap.mmap
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._data = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map(path: Path) -> np.ndarray:
    """The file's bytes, memory-mapped; a missing, short or unmappable file is refused."""
    if not path.is_file():
        raise LlmToolError("file not found", path)
    if path.stat().st_size < 8:
        raise LlmToolError("not a TFLite model (file too short)", path)
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LlmToolError(f"cannot map file: {e}", path) from None


def read_model(path: str | Path) -> ModelFile:
    """Open a .tflite file (memory-mapped): its tables are checked now, and its tensors and
    operators unpacked when first used; malformed files raise LlmToolError naming it."""
    path = Path(path)
    return _parse(_map(path), path)


def read_metadata(path: str | Path) -> tuple[dict[str, bytes], bool]:
    """(metadata, is_graph) of a .tflite file: what a run needs to find its tokenizer and graph."""
    with read_model(path) as model:
        return model.metadata, model.is_graph


def read_model_at(path: str | Path, offset: int, size: int) -> ModelFile:
    """Open a model stored inside another file (a bundle entry), memory-mapped in place."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(size,))
    except (OSError, ValueError) as e:
        raise LlmToolError(f"cannot map file: {e}", path) from None
    return _parse(data, path)


def read_model_bytes(content: bytes) -> ModelFile:
    """Open a model held in memory (e.g. from `ModelWriter.to_bytes`)."""
    return _parse(np.frombuffer(content, dtype=np.uint8), None)


# The flatbuffer is read directly, not through the schema's object API (which unpacks every
# field of every table into Python objects: a fifth of a second for a tiny graph, seconds for a
# big one). Each table field is read at its vtable slot (4 + 2 * field id in schema.fbs, the
# numbers the generated accessors use); every position is checked against the file's size, so a
# damaged offset raises ValueError here instead of reading elsewhere. Slots used:
#   Model: version 4, operator_codes 6, subgraphs 8, description 10, buffers 12, metadata 16,
#          signature_defs 18
#   SubGraph: tensors 4, inputs 6, outputs 8, operators 10, name 12
#   Tensor: shape 4, type 6, buffer 8, name 10, quantization 12, is_variable 14,
#           shape_signature 18
#   QuantizationParameters: scale 8, zero_point 10, details_type 12, details 14,
#           quantized_dimension 16;  BlockwiseQuantization: scales 4, block_size 8
#   Operator: opcode_index 4, inputs 6, outputs 8, builtin_options_type 10, builtin_options 12,
#           custom_options 14, builtin_options_2_type 26, builtin_options_2 28
#   OperatorCode: deprecated_builtin_code 4, custom_code 6, version 8, builtin_code 10
#   Buffer: data 4, offset 6, size 8;  Metadata: name 4, buffer 6
#   SignatureDef: inputs 4, outputs 6, signature_key 8, subgraph_index 12;
#   TensorMap: name 4, tensor_index 6

_U8 = struct.Struct("<B").unpack_from
_I8 = struct.Struct("<b").unpack_from
_U16 = struct.Struct("<H").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from


class _Table:
    """One table of the flatbuffer in `buf`: field reads by vtable slot, bounds-checked."""

    __slots__ = ("buf", "pos", "_vt", "_vtlen")

    def __init__(self, buf: memoryview, pos: int):
        vt = pos - _I32(buf, pos)[0]
        if vt < 0:
            raise ValueError(f"table at {pos} has its vtable before the file")
        self.buf, self.pos, self._vt = buf, pos, vt
        self._vtlen = _U16(buf, vt)[0]

    def _at(self, slot: int) -> int:
        """The field's position, 0 when absent (its default applies)."""
        if slot >= self._vtlen:
            return 0
        o = _U16(self.buf, self._vt + slot)[0]
        return self.pos + o if o else 0

    def scalar(self, slot: int, read: Callable[..., tuple[int]], default: int = 0) -> int:
        at = self._at(slot)
        return read(self.buf, at)[0] if at else default

    def table(self, slot: int) -> _Table | None:
        at = self._at(slot)
        return _Table(self.buf, at + _U32(self.buf, at)[0]) if at else None

    def vector(self, slot: int, item_size: int) -> tuple[int, int] | None:
        """(position of the first element, count); None when absent."""
        at = self._at(slot)
        if not at:
            return None
        start = at + _U32(self.buf, at)[0]
        count = _U32(self.buf, start)[0]
        if start + 4 + count * item_size > len(self.buf):
            raise ValueError(f"a vector of {count} items at {start} runs past the end")
        return start + 4, count

    def tables(self, slot: int) -> list[int]:
        """Positions of the tables of a vector of tables (each checked only when opened)."""
        vec = self.vector(slot, 4)
        if vec is None:
            return []
        start, count = vec
        offsets = struct.unpack_from(f"<{count}I", self.buf, start)
        return [start + 4 * i + o for i, o in enumerate(offsets)]

    def ints(self, slot: int, code: str = "i") -> tuple[int, ...] | None:
        vec = self.vector(slot, struct.calcsize("<" + code))
        return None if vec is None else struct.unpack_from(f"<{vec[1]}{code}", self.buf, vec[0])

    def array(self, slot: int, dtype: str) -> np.ndarray | None:
        vec = self.vector(slot, np.dtype(dtype).itemsize)
        if vec is None:
            return None
        return np.frombuffer(self.buf, dtype=dtype, count=vec[1], offset=vec[0])

    def bytes(self, slot: int) -> bytes | None:
        vec = self.vector(slot, 1)
        return None if vec is None else bytes(self.buf[vec[0] : vec[0] + vec[1]])

    def string(self, slot: int) -> str:
        raw = self.bytes(slot)
        return "" if raw is None else raw.decode("utf-8")  # UnicodeDecodeError: a damaged file


class _Corrupt:
    """Turns what a damaged flatbuffer makes Python raise into one LlmToolError naming the file."""

    def __init__(self, what: object):
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if kind is None or issubclass(kind, LlmToolError) or not issubclass(kind, Exception):
            return
        raise LlmToolError(f"truncated or corrupt TFLite file ({kind.__name__}: {exc})", self.what)


class _Lazy(Sequence):
    """A read-only list whose items are unpacked from the file when first used."""

    __slots__ = ("_make", "_items", "_corrupt")

    def __init__(self, count: int, make: Callable[[int], Any], corrupt: _Corrupt):
        self._make, self._items, self._corrupt = make, [None] * count, corrupt

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._items)))]
        item = self._items[index]  # IndexError as a list's, negative indices count from the end
        if item is None:
            with self._corrupt:
                item = self._make(index % len(self._items))
            self._items[index] = item
        return item

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (list, tuple, _Lazy)) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


class _ReadOperator(Operator):
    """An operator of a read file: its builtin options are unpacked when first asked for."""

    _table: _Table
    _corrupt: _Corrupt

    def __getattr__(self, name: str) -> Any:  # only called while `options` is still unset
        if name != "options":
            raise AttributeError(name)
        with self._corrupt:
            self.options = _read_options(self._table)
        return self.options


def _read_options(op: _Table) -> dict[str, Any]:
    for type_slot, slot, creator in (
        (10, 12, schema.BuiltinOptionsCreator),
        (26, 28, schema.BuiltinOptions2Creator),
    ):
        kind, at = op.scalar(type_slot, _U8), op._at(slot)
        if kind and at:
            table = flatbuffers.table.Table(op.buf, at + _U32(op.buf, at)[0])
            return _options_dict(creator(kind, table))
    return {}


def _parse(data: np.ndarray, path: Path | None) -> ModelFile:
    what = path if path is not None else "<bytes>"
    if data.size < 8 or bytes(data[4:8]) != FILE_IDENTIFIER:
        raise LlmToolError("not a TFLite model (no TFL3 file identifier)", what)
    buf = memoryview(data).cast("B")
    corrupt = _Corrupt(what)
    with corrupt:
        root = _U32(buf, 0)[0]
        if not 8 <= root <= len(buf) - 4:
            raise LlmToolError("truncated or corrupt TFLite file", what)
        model = _Table(buf, root)
        version = model.scalar(4, _U32)
        if version != SCHEMA_VERSION:
            raise LlmToolError(f"unsupported TFLite schema version {version} (expected 3)", what)
        buffers = _buffer_infos(_Columns(buf), model)
        for i, b in enumerate(buffers):
            if b.offset < 0 or b.size < 0 or b.offset + b.size > len(buf):
                raise LlmToolError(
                    f"buffer {i} ({b.size} bytes at {b.offset}) lies beyond the end of the "
                    f"file ({len(buf)} bytes): truncated?",
                    what,
                )
        opcodes = []
        for at in model.tables(6):
            oc = _Table(buf, at)
            code = max(oc.scalar(10, _I32), oc.scalar(4, _I8))
            custom = oc.bytes(6)
            opcodes.append((code, oc.scalar(8, _I32, 1), custom.decode() if custom else None))
        subgraphs = [
            _subgraph(_Table(buf, at), opcodes, len(buffers), corrupt) for at in model.tables(8)
        ]
        signatures = [_signature(_Table(buf, at), subgraphs, what) for at in model.tables(18)]
        metadata, metadata_index = {}, {}
        for at in model.tables(16):
            m = _Table(buf, at)
            name, index = m.string(4), m.scalar(6, _U32)
            metadata_index[name] = index
            if index < len(buffers):
                b = buffers[index]
                metadata[name] = bytes(buf[b.offset : b.offset + b.size])
        description = model.string(10)
    return ModelFile(
        path=path,
        version=version,
        description=description,
        subgraphs=subgraphs,
        signatures=signatures,
        metadata=metadata,
        metadata_index=metadata_index,
        buffers=buffers,
        _data=data,
    )


def _buffer_infos(columns: _Columns, model: _Table) -> list[BufferInfo]:
    """Every buffer's place: external (`offset` > 1, `size`) or the inline `data` vector."""
    tables = columns.tables(model.vector(12, 4))
    offsets = columns.scalars(tables, 6, "<u8")  # above 2**63: negative, refused by the caller
    sizes = columns.scalars(tables, 8, "<u8")
    data = columns.fields(tables, 4)
    inline = (offsets <= 1) & (data > 0)
    starts = np.zeros(tables.size, np.int64)
    starts[inline] = data[inline] + columns.read(data[inline], "<u4")
    lengths = np.zeros(tables.size, np.int64)
    lengths[inline] = columns.read(starts[inline], "<u4")
    infos = []
    for offset, size, has_data, start, length in zip(
        offsets.tolist(), sizes.tolist(), inline.tolist(), starts.tolist(), lengths.tolist(),
        strict=True,
    ):  # fmt: skip
        if offset > 1:
            infos.append(BufferInfo(offset, size, True))
        else:
            infos.append(
                BufferInfo(start + 4, length, False) if has_data else BufferInfo(0, 0, False)
            )
    return infos


class _Columns:
    """The same field of many tables at once (numpy gathers): how every tensor's buffer and
    every operator's tensors are checked without a Python loop over a big graph."""

    def __init__(self, buf: memoryview):
        self.bytes = np.frombuffer(buf, dtype=np.uint8)
        self._views: dict[str, np.ndarray] = {}  # the whole file as one dtype, for aligned reads

    def read(self, at: np.ndarray, dtype: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        if at.size and (at.min() < 0 or at.max() + size > self.bytes.size):
            raise ValueError("a table field lies outside the file")
        if not (at & (size - 1)).any():  # flatbuffers align scalars to their size
            view = self._views.get(dtype)
            if view is None:
                view = self._views[dtype] = self.bytes[: self.bytes.size // size * size].view(dtype)
            return view[at // size]
        return self.bytes[at[:, None] + np.arange(size)].view(dtype).reshape(-1)

    def tables(self, vector: tuple[int, int] | None) -> np.ndarray:
        """Positions of the tables of a vector of tables (from _Table.vector(slot, 4))."""
        if vector is None:
            return np.zeros(0, np.int64)
        start, count = vector
        offsets = np.frombuffer(self.bytes, "<u4", count, start).astype(np.int64)
        return start + 4 * np.arange(count, dtype=np.int64) + offsets

    def fields(self, tables: np.ndarray, slot: int) -> np.ndarray:
        """Each table's field position, 0 where the field is absent."""
        vtables = tables - self.read(tables, "<i4")
        has = self.read(vtables, "<u2") > slot
        offsets = np.zeros(tables.size, np.int64)
        offsets[has] = self.read(vtables[has] + slot, "<u2")
        return np.where(offsets > 0, tables + offsets, 0)

    def scalars(self, tables: np.ndarray, slot: int, dtype: str) -> np.ndarray:
        at = self.fields(tables, slot)
        out = np.zeros(tables.size, np.int64)
        out[at > 0] = self.read(at[at > 0], dtype)
        return out

    def int_vectors(self, tables: np.ndarray, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(all int32 values of each table's vector field, concatenated; counts per table)."""
        at = self.fields(tables, slot)
        present = at > 0
        starts = np.zeros(tables.size, np.int64)
        starts[present] = at[present] + self.read(at[present], "<u4")
        counts = np.zeros(tables.size, np.int64)
        counts[present] = self.read(starts[present], "<u4")
        if counts.sum() * 4 > self.bytes.size:  # more values than the file can hold
            raise ValueError("operator tensor lists overlap or run past the end")
        ends = np.cumsum(counts)
        element = np.arange(int(ends[-1]) if ends.size else 0) - np.repeat(ends - counts, counts)
        return self.read(np.repeat(starts + 4, counts) + 4 * element, "<i4"), counts


def _subgraph(
    sg: _Table, opcodes: list[tuple[int, int, str | None]], n_buffers: int, corrupt: _Corrupt
) -> Subgraph:
    """A subgraph whose tensors and operators are unpacked when first used. Every index they
    hold is checked now (buffers, tensors, operator codes), so that a damaged file fails here,
    not with an IndexError, or a crash in a runtime, later."""
    name, what = sg.string(12), corrupt.what
    columns = _Columns(sg.buf)
    tensors = columns.tables(sg.vector(4, 4))
    operators = columns.tables(sg.vector(10, 4))
    n = len(tensors)
    buffer_ids = columns.scalars(tensors, 8, "<u4")
    bad = np.flatnonzero(buffer_ids >= n_buffers)
    if bad.size:
        tensor = _Table(sg.buf, int(tensors[bad[0]])).string(10)
        raise LlmToolError(
            f"tensor {tensor!r} names buffer {buffer_ids[bad[0]]}: corrupt file", what
        )
    codes = columns.scalars(operators, 4, "<u4")
    if (codes >= len(opcodes)).any():
        raise LlmToolError(f"an operator of {name!r} names a missing operator code", what)
    lists = [columns.int_vectors(operators, slot) for slot in (6, 8)]  # inputs, outputs
    for values, _ in lists:  # -1: an omitted optional input
        if values.size and (values.min() < -1 or values.max() >= n):
            raise LlmToolError(f"an operator of {name!r} names a missing tensor", what)
    inputs, outputs = list(sg.ints(6) or ()), list(sg.ints(8) or ())
    if any(not 0 <= i < n for i in (*inputs, *outputs)):
        raise LlmToolError(f"subgraph {name!r} names a missing tensor", what)
    (ins, in_counts), (outs, out_counts) = lists
    in_ends, out_ends = np.cumsum(in_counts), np.cumsum(out_counts)

    def operator(i: int) -> Operator:
        op_inputs = ins[in_ends[i] - in_counts[i] : in_ends[i]].tolist()
        op_outputs = outs[out_ends[i] - out_counts[i] : out_ends[i]].tolist()
        table = _Table(sg.buf, int(operators[i]))
        return _operator(table, opcodes[codes[i]], op_inputs, op_outputs, corrupt)

    return Subgraph(
        name=name,
        tensors=_Lazy(n, lambda i: _tensor(_Table(sg.buf, int(tensors[i])), n), corrupt),  # type: ignore[arg-type]
        inputs=inputs,
        outputs=outputs,
        operators=_Lazy(len(operators), operator, corrupt),  # type: ignore[arg-type]
    )


def _tensor(t: _Table, n_tensors: int) -> Tensor:
    name = t.string(10)
    shape = t.ints(4) or ()
    signature = t.ints(18)
    return Tensor(
        name=name,
        shape=shape,
        dtype=_type_names().get(t.scalar(6, _I8), f"type{t.scalar(6, _I8)}"),
        buffer=t.scalar(8, _U32),
        quantization=_quantization(t.table(12), name, shape, n_tensors),
        shape_signature=signature,
        is_variable=bool(t.scalar(14, _U8)),
    )


def _quantization(
    q: _Table | None, name: str, shape: tuple[int, ...], n_tensors: int
) -> Quantization | None:
    """A tensor's quantization; parameters that cannot describe it (LiteRT would refuse or
    misread them) are refused as a damaged file."""
    if q is None:
        return None
    if q.scalar(12, _U8) == schema.QuantizationDetails.BlockwiseQuantization:
        details = q.table(14)
        if details is not None:
            scales, block = details.scalar(4, _I32), details.scalar(8, _I32)
            if not 0 <= scales < n_tensors or block <= 0:
                raise ValueError(f"tensor {name!r}: blockwise scales {scales}, block {block}")
            return Quantization.blockwise(scales, block)
    scale = q.array(8, "<f4")
    if scale is None or not len(scale):
        return None
    zero_point = q.array(10, "<i8")
    if zero_point is None:
        zero_point = np.zeros(len(scale), np.int64)
    axis = q.scalar(16, _I32)
    if len(zero_point) != len(scale) or (
        len(scale) > 1 and not (0 <= axis < len(shape) and shape[axis] == len(scale))
    ):
        raise ValueError(
            f"tensor {name!r} {list(shape)}: {len(scale)} scales, {len(zero_point)} zero "
            f"points along axis {axis}"
        )
    return Quantization(scale=scale, zero_point=zero_point, axis=axis)


def _operator(
    o: _Table,
    opcode: tuple[int, int, str | None],
    inputs: list[int],
    outputs: list[int],
    corrupt: _Corrupt,
) -> Operator:
    code, version, custom = opcode
    op = _ReadOperator.__new__(_ReadOperator)  # `options` stays unset until asked for
    op.op = _builtin_names().get(code, f"BUILTIN_{code}")
    op.inputs, op.outputs = inputs, outputs
    op.version, op.custom_code, op.custom_options = version, custom, o.bytes(14)
    op._table, op._corrupt = o, corrupt
    return op


def _signature(s: _Table, subgraphs: list[Subgraph], what: object) -> Signature:
    key, index = s.string(8), s.scalar(12, _U32)
    sides = []
    for slot in (4, 6):
        maps = [_Table(s.buf, at) for at in s.tables(slot)]
        sides.append({m.string(4): m.scalar(6, _U32) for m in maps})
    if index >= len(subgraphs):
        raise LlmToolError(f"signature {key!r} names a missing subgraph", what)
    n = len(subgraphs[index].tensors)
    if any(i >= n for side in sides for i in side.values()):
        raise LlmToolError(f"signature {key!r} names a missing tensor", what)
    return Signature(key=key, subgraph_index=index, inputs=sides[0], outputs=sides[1])
