"""The weights container written by `llmtool convert`: a TFLite model used as a tensor store.

One subgraph named after the model type (e.g. "GEMMA_2B"), no operators, inputs or outputs;
one tensor per weight with its real shape and dtype: FLOAT32, FLOAT16, INT8 with per-channel
quantization parameters (scale, zero point, quantized_dimension = axis), or INT4 (signed
nibbles packed two per byte along the last axis, same parameters). An INT4 tensor may instead
be blockwise, encoded as LiteRT graphs encode it: BlockwiseQuantization details naming a
FLOAT16 tensor `<name>.scales` [rows, columns / block_size] stored right after it (the reader
lists only the weight; the exporter copies both buffers as they are). Data lives outside the
flatbuffer in aligned blocks (see tflite_model.py); metadata entries are named byte strings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.formats.tflite_model import (
    DEFAULT_ALIGNMENT,
    ModelFile,
    ModelWriter,
    Quantization,
    Subgraph,
    Tensor,
    expected_nbytes,
    read_model,
)
from llmtool.quantization import QuantizedTensor, check_block_size, dequantize, packed_shape

DTYPES = ("float32", "float16", "int8", "int4")
_FLOAT_NUMPY = {"float32": np.float32, "float16": np.float16}
_BITS = {"int8": 8, "int4": 4}


@dataclass
class TensorPlan:
    """One container tensor: its name, logical shape and storage dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "float16" | "int8" | "int4"
    axis: int = 0  # quantized dimension (int8 / int4)
    block_size: int = 0  # int4 only: > 0 for blockwise scales along the rows

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    scale: np.ndarray | None  # float32 per channel (per-channel quantized tensors)
    zero_point: np.ndarray | None  # int64 per channel (quantized tensors; 0 when blockwise)
    axis: int = 0
    block_size: int = 0  # blockwise int4: the scales are read with `Container.block_scales`


SCALES_SUFFIX = ".scales"
SCALES_ALIGNMENT = 64  # scales are small: not worth a whole aligned block each


def _nbytes(entry: TensorPlan) -> int:
    n = expected_nbytes(entry.shape, entry.dtype)
    assert n is not None
    return n


class ContainerWriter:
    """Streams tensors into a container file: `with ContainerWriter(...) as w: w.write(fill)`."""

    def __init__(
        self,
        path: str | Path,
        subgraph_name: str,
        plan: list[TensorPlan],
        metadata: dict[str, bytes],
        alignment: int = DEFAULT_ALIGNMENT,
    ):
        self.path = Path(path)
        self.subgraph_name = subgraph_name
        self.plan = list(plan)
        self.metadata = dict(metadata)
        self.alignment = alignment
        seen: set[str] = set()
        for e in self.plan:
            if e.dtype not in DTYPES:
                raise LlmToolError(
                    f"tensor {e.name!r}: unsupported container dtype {e.dtype!r}", self.path
                )
            if e.name in seen:
                raise LlmToolError(f"tensor {e.name!r} is planned twice", self.path)
            seen.add(e.name)
            if e.dtype in _BITS and (not e.shape or not 0 <= e.axis < len(e.shape)):
                raise LlmToolError(
                    f"tensor {e.name!r}: cannot quantize shape {list(e.shape)} along axis {e.axis}",
                    self.path,
                )
            if e.block_size:
                problem = check_block_size(e.shape, e.block_size)
                if e.dtype != "int4" or e.axis != 0:
                    problem = "blockwise scales are for int4 tensors quantized along rows"
                if problem:
                    raise LlmToolError(f"tensor {e.name!r}: {problem}", self.path)

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(
        self,
        fill: Callable[[TensorPlan], np.ndarray | QuantizedTensor],
        inputs: Iterable[str | Path | None] = (),
    ) -> None:
        """Call `fill(entry)` for each planned tensor in order, check and write it, then
        finish the file atomically (llmtool.files.atomic_output; an output that is one of
        `inputs` is refused). Only one tensor is held in memory at a time."""
        writer = ModelWriter(description=f"llmtool weights container: {self.subgraph_name}")
        tensors: list[Tensor] = []
        pending_scales: dict[str, np.ndarray] = {}
        for entry in self.plan:
            quant = None
            if entry.block_size:
                quant = Quantization.blockwise(len(tensors) + 1, entry.block_size)
            elif entry.dtype in _BITS:
                n = entry.shape[entry.axis]
                quant = Quantization(np.ones(n, np.float32), np.zeros(n, np.int64), entry.axis)
            tensor = Tensor(entry.name, entry.shape, entry.dtype, 0, quant)
            produce = self._filler(fill, entry, tensor, pending_scales)
            tensor.buffer = writer.add_lazy_buffer(_nbytes(entry), produce)
            tensors.append(tensor)
            if entry.block_size:
                shape = (entry.shape[0], entry.shape[1] // entry.block_size)
                scales = Tensor(entry.name + SCALES_SUFFIX, shape, "float16")
                scales.buffer = writer.add_lazy_buffer(
                    2 * shape[0] * shape[1],
                    lambda n=entry.name: pending_scales.pop(n),
                    alignment=SCALES_ALIGNMENT,
                )
                tensors.append(scales)
        writer.add_subgraph(Subgraph(self.subgraph_name, tensors, [], [], []))
        for name in sorted(self.metadata):
            writer.add_metadata(name, self.metadata[name])
        writer.write(self.path, alignment=self.alignment, inputs=inputs)

    def _filler(
        self,
        fill: Callable[[TensorPlan], np.ndarray | QuantizedTensor],
        entry: TensorPlan,
        tensor: Tensor,
        pending_scales: dict[str, np.ndarray],
    ) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            value = fill(entry)
            data, quant = self._check(entry, value)
            if entry.block_size:
                assert isinstance(value, QuantizedTensor)
                pending_scales[entry.name] = np.asarray(value.scale, np.float32).astype(np.float16)
            elif quant is not None:
                tensor.quantization = quant
            return data

        return produce

    def _check(
        self, entry: TensorPlan, value: np.ndarray | QuantizedTensor
    ) -> tuple[np.ndarray, Quantization | None]:
        where = f"tensor {entry.name!r} (planned {entry.dtype}{list(entry.shape)})"
        if entry.dtype in _FLOAT_NUMPY:
            if isinstance(value, QuantizedTensor) or not isinstance(value, np.ndarray):
                raise LlmToolError(
                    f"{where}: expected a {entry.dtype} array, got {type(value).__name__}",
                    self.path,
                )
            if value.dtype != _FLOAT_NUMPY[entry.dtype]:
                raise LlmToolError(f"{where}: got dtype {value.dtype}", self.path)
            if tuple(value.shape) != entry.shape:
                raise LlmToolError(f"{where}: got shape {list(value.shape)}", self.path)
            return value, None
        if not isinstance(value, QuantizedTensor):
            raise LlmToolError(
                f"{where}: expected a QuantizedTensor, got {type(value).__name__}", self.path
            )
        bits = _BITS[entry.dtype]
        if value.bits != bits:
            raise LlmToolError(f"{where}: got {value.bits}-bit values", self.path)
        if tuple(value.shape) != entry.shape:
            raise LlmToolError(f"{where}: got shape {list(value.shape)}", self.path)
        if value.axis % len(entry.shape) != entry.axis:
            raise LlmToolError(
                f"{where}: quantized along axis {value.axis}, planned {entry.axis}", self.path
            )
        if value.block_size != entry.block_size:
            raise LlmToolError(
                f"{where}: got block size {value.block_size}, planned {entry.block_size}",
                self.path,
            )
        want_shape = entry.shape if bits == 8 else packed_shape(entry.shape)
        want_dtype = np.int8 if bits == 8 else np.uint8
        data = np.asarray(value.data)
        if data.dtype != want_dtype or data.size != int(np.prod(want_shape)):
            raise LlmToolError(
                f"{where}: data is {data.dtype}{list(data.shape)}, expected "
                f"{np.dtype(want_dtype)}{list(want_shape)}",
                self.path,
            )
        if entry.block_size:
            scale = np.asarray(value.scale, np.float32)
            want = (entry.shape[0], entry.shape[1] // entry.block_size)
            if scale.shape != want or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                raise LlmToolError(
                    f"{where}: needs finite positive scales of shape {list(want)}", self.path
                )
            if np.any(value.zero_point):
                raise LlmToolError(f"{where}: blockwise tensors are symmetric", self.path)
            return data, None
        n = entry.shape[entry.axis]
        scale = np.asarray(value.scale, np.float32).reshape(-1)
        zero_point = np.asarray(value.zero_point).reshape(-1)
        if scale.size != n or zero_point.size != n:
            raise LlmToolError(
                f"{where}: {scale.size} scales / {zero_point.size} zero points for {n} channels",
                self.path,
            )
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise LlmToolError(f"{where}: scales must be finite and positive", self.path)
        return data, Quantization(scale, zero_point.astype(np.int64), entry.axis)


class Container:
    """Reader of a weights container; tensor data is memory-mapped, never loaded eagerly."""

    def __init__(self, model: ModelFile, path: Path):
        self.path = path
        self._model = model
        if len(model.subgraphs) != 1 or any(sg.operators for sg in model.subgraphs):
            raise LlmToolError(
                "not a weights container (a TFLite graph with operators or several subgraphs)",
                path,
            )
        sg = model.subgraphs[0]
        self.model_type: str = sg.name
        self.metadata: dict[str, bytes] = model.metadata
        self._index: dict[str, int] = {}  # name -> position in _infos
        self._tensor: dict[str, int] = {}  # name -> tensor index in the subgraph
        self._infos: list[TensorInfo] = []
        self._scales: dict[str, int] = {}  # blockwise weight -> index of its scales tensor
        scale_tensors = {
            t.quantization.scales
            for t in sg.tensors
            if t.quantization is not None and t.quantization.block_size
        }
        for i, t in enumerate(sg.tensors):
            if i in scale_tensors:
                continue
            if t.name in self._index:
                raise LlmToolError(f"tensor {t.name!r} appears twice", path)
            if t.dtype not in DTYPES:
                raise LlmToolError(f"tensor {t.name!r} has unsupported dtype {t.dtype}", path)
            q = t.quantization
            if q is not None and q.block_size:
                problem = check_block_size(tuple(t.shape), q.block_size)
                st = sg.tensors[q.scales] if 0 <= q.scales < len(sg.tensors) else None
                want = (t.shape[0], t.shape[-1] // q.block_size) if not problem else None
                if (
                    problem
                    or t.dtype != "int4"
                    or st is None
                    or st.dtype != "float16"
                    or tuple(st.shape) != want
                    or model.buffers[st.buffer].size != 2 * int(np.prod(st.shape))
                ):
                    raise LlmToolError(f"tensor {t.name!r}: malformed blockwise scales", path)
                self._scales[t.name] = q.scales
            elif t.dtype in _BITS:
                if q is None or not t.shape or len(q.scale) != t.shape[q.axis]:
                    raise LlmToolError(
                        f"tensor {t.name!r} lacks per-channel quantization parameters", path
                    )
            if t.buffer == 0 or model.buffers[t.buffer].size != _nbytes(
                TensorPlan(t.name, t.shape, t.dtype)
            ):
                raise LlmToolError(f"tensor {t.name!r}: stored data has the wrong size", path)
            self._index[t.name] = len(self._infos)
            self._tensor[t.name] = i
            blockwise = q is not None and q.block_size > 0
            per_channel = q is not None and t.dtype in _BITS and not blockwise
            self._infos.append(
                TensorInfo(
                    name=t.name,
                    shape=tuple(t.shape),
                    dtype=t.dtype,
                    nbytes=model.buffers[t.buffer].size,
                    scale=q.scale if per_channel else None,
                    zero_point=(q.zero_point if per_channel else np.zeros(t.shape[0], np.int64))
                    if per_channel or blockwise
                    else None,
                    axis=q.axis if per_channel else 0,
                    block_size=q.block_size if blockwise else 0,
                )
            )

    @classmethod
    def open(cls, path: str | Path) -> Container:
        path = Path(path)
        return cls(read_model(path), path)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._infos]

    def info(self, name: str) -> TensorInfo:
        return self._infos[self._lookup(name)]

    def raw(self, name: str) -> np.ndarray:
        """The stored data as a read-only view: float32/float16/int8 in the tensor's shape,
        int4 as uint8 packed bytes shaped (*shape[:-1], ceil(n/2))."""
        return self._model.tensor_data(0, self._tensor[self._infos[self._lookup(name)].name])

    def block_scales(self, name: str) -> np.ndarray:
        """The float16 scales [rows, columns / block_size] of a blockwise tensor (a view)."""
        if name not in self._scales:
            raise LlmToolError(f"tensor {name!r} is not blockwise", self.path)
        return self._model.tensor_data(0, self._scales[name])

    def quantized(self, name: str) -> QuantizedTensor | None:
        """The stored values and parameters of an int8/int4 tensor (None for float tensors)."""
        info = self.info(name)
        if info.dtype not in _BITS:
            return None
        if info.block_size:
            return QuantizedTensor(
                data=self.raw(name),
                scale=self.block_scales(name).astype(np.float32),
                zero_point=np.zeros(info.shape[0], np.int64),
                bits=4,
                shape=info.shape,
                axis=0,
                block_size=info.block_size,
            )
        assert info.scale is not None and info.zero_point is not None
        data = self.raw(name)
        if info.dtype == "int8":
            data = data.view(np.int8)
        return QuantizedTensor(
            data=data,
            scale=info.scale,
            zero_point=info.zero_point,
            bits=_BITS[info.dtype],
            shape=info.shape,
            axis=info.axis,
        )

    def float(self, name: str) -> np.ndarray:
        """float32 values (dequantized if needed); float32 tensors come back as read-only views."""
        info = self.info(name)
        if info.dtype == "float32":
            return self.raw(name)
        if info.dtype == "float16":
            return self.raw(name).astype(np.float32)
        q = self.quantized(name)
        assert q is not None
        try:
            with np.errstate(over="raise", invalid="raise"):
                return dequantize(q)
        except ValueError:  # stored parameters that do not fit the shape: a damaged file
            raise LlmToolError(
                f"tensor {name!r}: quantization parameters do not fit its shape", self.path
            ) from None
        except FloatingPointError:  # e.g. a scale near float32's maximum: a damaged file
            raise LlmToolError(
                f"tensor {name!r}: its quantization scales overflow float32", self.path
            ) from None

    def _lookup(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise LlmToolError(f"no tensor named {name!r}", self.path) from None

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def close(self) -> None:
        self._model.close()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
