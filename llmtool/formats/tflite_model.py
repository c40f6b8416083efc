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

import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from llmtool.errors import LlmToolError
from llmtool.files import atomic_output

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
DEFAULT_ALIGNMENT = 65536
_WRITE_CHUNK = 64 << 20

BufferData = np.ndarray | bytes | bytearray | memoryview

# --------------------------------------------------------------------------------------------
# dtypes


def _public(cls: type) -> dict[str, Any]:
    return {k: v for k, v in vars(cls).items() if not k.startswith("_")}


_TYPE_CODES: dict[str, int] = {k.lower(): v for k, v in _public(schema.TensorType).items()}
_TYPE_NAMES: dict[int, str] = {v: k for k, v in _TYPE_CODES.items()}
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
        return _TYPE_CODES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown tensor dtype {dtype!r} (known: {', '.join(sorted(_TYPE_CODES))})"
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

_BUILTIN_CODES: dict[str, int] = _public(schema.BuiltinOperator)
_BUILTIN_NAMES: dict[int, str] = {}
for _name, _code in _BUILTIN_CODES.items():
    _BUILTIN_NAMES.setdefault(_code, _name)


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
                if op.op != "CUSTOM" and op.op not in _BUILTIN_CODES:
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
                code = _BUILTIN_CODES[op.op] if op.op != "CUSTOM" else schema.BuiltinOperator.CUSTOM
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
    """Parse a .tflite file (memory-mapped); malformed files raise LlmToolError naming it."""
    path = Path(path)
    return _parse(_map(path), path)


def read_metadata(path: str | Path) -> tuple[dict[str, bytes], bool]:
    """(metadata, is_graph) of a .tflite file without parsing its subgraphs: what a run needs
    to find its tokenizer and graph, at a fraction of read_model's cost on big models."""
    path = Path(path)
    data = _map(path)
    if bytes(data[4:8]) != FILE_IDENTIFIER or not 8 <= int(data[:4].view("<u4")[0]) < data.size:
        raise LlmToolError("not a TFLite model (no TFL3 file identifier)", path)
    try:
        model = schema.Model.GetRootAs(data, 0)
        if model.Version() != SCHEMA_VERSION:
            raise LlmToolError(
                f"unsupported TFLite schema version {model.Version()} (expected 3)", path
            )
        metadata = {}
        for i in range(model.MetadataLength()):
            m = model.Metadata(i)
            b = _buffer_info(model.Buffers(m.Buffer()))
            if b.offset + b.size > data.size:
                raise LlmToolError(
                    f"metadata {_str(m.Name())!r} lies beyond the end of the file", path
                )
            metadata[_str(m.Name())] = bytes(data[b.offset : b.offset + b.size])
        graph = any(model.Subgraphs(i).OperatorsLength() for i in range(model.SubgraphsLength()))
    except LlmToolError:
        raise
    except Exception as e:  # flatbuffers raises whatever struct/numpy raise on bad offsets
        raise LlmToolError(
            f"truncated or corrupt TFLite file ({type(e).__name__}: {e})", path
        ) from None
    finally:
        del data
    return metadata, graph


def read_model_at(path: str | Path, offset: int, size: int) -> ModelFile:
    """Parse a model stored inside another file (a bundle entry), memory-mapped in place."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(size,))
    except (OSError, ValueError) as e:
        raise LlmToolError(f"cannot map file: {e}", path) from None
    return _parse(data, path)


def read_model_bytes(content: bytes) -> ModelFile:
    """Parse a model held in memory (e.g. from `ModelWriter.to_bytes`)."""
    return _parse(np.frombuffer(content, dtype=np.uint8), None)


def _parse(data: np.ndarray, path: Path | None) -> ModelFile:
    what = path if path is not None else "<bytes>"
    if data.size < 8 or bytes(data[4:8]) != FILE_IDENTIFIER:
        raise LlmToolError("not a TFLite model (no TFL3 file identifier)", what)
    root_offset = int(data[:4].view("<u4")[0])
    if not 8 <= root_offset <= data.size - 4:
        raise LlmToolError("truncated or corrupt TFLite file", what)
    try:
        model = schema.Model.GetRootAs(data, 0)
        if model.Version() != SCHEMA_VERSION:
            raise LlmToolError(
                f"unsupported TFLite schema version {model.Version()} (expected 3)", what
            )
        buffers = [_buffer_info(model.Buffers(i)) for i in range(model.BuffersLength())]
        for i, b in enumerate(buffers):
            if b.offset + b.size > data.size:
                raise LlmToolError(
                    f"buffer {i} ({b.size} bytes at {b.offset}) lies beyond the end of the "
                    f"file ({data.size} bytes): truncated?",
                    what,
                )
        opcodes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            custom = oc.CustomCode()
            opcodes.append((code, oc.Version(), custom.decode() if custom else None))
        subgraphs = [
            _subgraph_from(schema.SubGraphT.InitFromObj(model.Subgraphs(i)), opcodes)
            for i in range(model.SubgraphsLength())
        ]
        signatures = []
        for i in range(model.SignatureDefsLength()):
            s = schema.SignatureDefT.InitFromObj(model.SignatureDefs(i))
            signatures.append(
                Signature(
                    key=_str(s.signatureKey),
                    subgraph_index=int(s.subgraphIndex),
                    inputs={_str(m.name): int(m.tensorIndex) for m in s.inputs or []},
                    outputs={_str(m.name): int(m.tensorIndex) for m in s.outputs or []},
                )
            )
        metadata, metadata_index = {}, {}
        for i in range(model.MetadataLength()):
            m = model.Metadata(i)
            metadata_index[_str(m.Name())] = int(m.Buffer())
            if m.Buffer() < len(buffers):
                b = buffers[m.Buffer()]
                metadata[_str(m.Name())] = bytes(data[b.offset : b.offset + b.size])
        description = _str(model.Description())
        version = int(model.Version())
        _check_indices(subgraphs, signatures, len(buffers), what)
    except LlmToolError:
        raise
    except Exception as e:  # flatbuffers raises whatever struct/numpy raise on bad offsets
        raise LlmToolError(
            f"truncated or corrupt TFLite file ({type(e).__name__}: {e})", what
        ) from None
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


def _check_indices(
    subgraphs: list[Subgraph], signatures: list[Signature], n_buffers: int, what: object
) -> None:
    """Every index the file holds points inside its table (a damaged file says so here, not
    with an IndexError, or a crash in a runtime, later)."""
    for sg in subgraphs:
        n = len(sg.tensors)
        for t in sg.tensors:
            if not 0 <= t.buffer < n_buffers:
                raise LlmToolError(f"tensor {t.name!r} names buffer {t.buffer}: corrupt file", what)
        for op in sg.operators:
            if any(not -1 <= i < n for i in (*op.inputs, *op.outputs)):
                raise LlmToolError(f"an operator of {sg.name!r} names a missing tensor", what)
        if any(not 0 <= i < n for i in (*sg.inputs, *sg.outputs)):
            raise LlmToolError(f"subgraph {sg.name!r} names a missing tensor", what)
    for s in signatures:
        if not 0 <= s.subgraph_index < len(subgraphs):
            raise LlmToolError(f"signature {s.key!r} names a missing subgraph", what)
        n = len(subgraphs[s.subgraph_index].tensors)
        if any(not 0 <= i < n for i in (*s.inputs.values(), *s.outputs.values())):
            raise LlmToolError(f"signature {s.key!r} names a missing tensor", what)


def _str(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _buffer_info(b: Any) -> BufferInfo:
    offset, size = int(b.Offset()), int(b.Size())
    if offset > 1:
        return BufferInfo(offset, size, True)
    o = b._tab.Offset(4)  # the inline `data` vector
    if o:
        return BufferInfo(b._tab.Vector(o), b._tab.VectorLen(o), False)
    return BufferInfo(0, 0, False)


def _subgraph_from(sg: Any, opcodes: list[tuple[int, int, str | None]]) -> Subgraph:
    tensors = []
    for t in sg.tensors or []:
        q = None
        qp = t.quantization
        if (
            qp is not None
            and qp.detailsType == schema.QuantizationDetails.BlockwiseQuantization
            and qp.details is not None
        ):
            q = Quantization.blockwise(int(qp.details.scales), int(qp.details.blockSize))
        elif qp is not None and qp.scale is not None and len(qp.scale):
            zp = qp.zeroPoint if qp.zeroPoint is not None else np.zeros(len(qp.scale), np.int64)
            q = Quantization(scale=qp.scale, zero_point=zp, axis=int(qp.quantizedDimension))
        sig = t.shapeSignature
        tensors.append(
            Tensor(
                name=_str(t.name),
                shape=tuple(int(d) for d in (t.shape if t.shape is not None else ())),
                dtype=_TYPE_NAMES.get(t.type, f"type{t.type}"),
                buffer=int(t.buffer),
                quantization=q,
                shape_signature=tuple(int(d) for d in sig) if sig is not None else None,
                is_variable=bool(t.isVariable),
            )
        )
    operators = []
    for o in sg.operators or []:
        code, version, custom = opcodes[o.opcodeIndex]
        name = _BUILTIN_NAMES.get(code, f"BUILTIN_{code}")
        opts = o.builtinOptions if o.builtinOptions is not None else o.builtinOptions2
        custom_options = o.customOptions
        operators.append(
            Operator(
                op=name,
                inputs=[int(i) for i in (o.inputs if o.inputs is not None else [])],
                outputs=[int(i) for i in (o.outputs if o.outputs is not None else [])],
                options=_options_dict(opts),
                version=int(version),
                custom_code=custom,
                custom_options=bytes(np.asarray(custom_options, np.uint8))
                if custom_options is not None
                else None,
            )
        )
    return Subgraph(
        name=_str(sg.name),
        tensors=tensors,
        inputs=[int(i) for i in (sg.inputs if sg.inputs is not None else [])],
        outputs=[int(i) for i in (sg.outputs if sg.outputs is not None else [])],
        operators=operators,
    )
