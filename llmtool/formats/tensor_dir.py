"""The reference converter's per-tensor folder: one raw file per tensor + layer_info.txt.

Writer (`TensorDir`) and reader (`read_layer_info`, `read_metadata`, `read_tensor`) of the folder
`llmtool convert --output-dir` writes and `--combine-file-only` combines. Each tensor is a file
of raw little-endian bytes named as in the container; quantized tensors get
`<name>_quantized_scale` (float32) and `<name>_quantized_zp` (int32) files beside them, as the
reference converter writes (a blockwise int4 tensor has rows x blocks scales: the block size is
read from that file's length); `layer_info.txt` lists `mdl_vars.<name>.<dtype>.<dims>` lines.
llmtool adds a `metadata/` folder holding the container's metadata entries as files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.files import write_bytes
from llmtool.formats.container import TensorPlan
from llmtool.quantization import QuantizedTensor

LAYER_INFO = "layer_info.txt"
METADATA_DIR = "metadata"


class TensorDir:
    """Writes the per-tensor folder: `write` each tensor, then `finish`."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / LAYER_INFO).unlink(missing_ok=True)  # written last: marks a complete folder

    def write(self, entry: TensorPlan, value: np.ndarray | QuantizedTensor) -> None:
        if isinstance(value, QuantizedTensor):
            write_bytes(self.path / entry.name, value.data.tobytes(), fsync=False)
            write_bytes(
                self.path / f"{entry.name}_quantized_scale",
                value.scale.astype("<f4").tobytes(),
                fsync=False,
            )
            write_bytes(
                self.path / f"{entry.name}_quantized_zp",
                value.zero_point.astype("<i4").tobytes(),
                fsync=False,
            )
        else:
            write_bytes(self.path / entry.name, value.tobytes(), fsync=False)

    def finish(self, plan: list[TensorPlan], metadata: dict[str, bytes]) -> None:
        """Write the metadata files, then layer_info.txt (last: it marks a complete folder)."""
        meta_dir = self.path / METADATA_DIR
        meta_dir.mkdir(exist_ok=True)
        for key, data in metadata.items():
            write_bytes(meta_dir / key, data, fsync=False)
        lines = []
        for e in plan:
            dims = "_".join(str(d) for d in e.shape)
            lines.append(f"mdl_vars.{e.name}.{e.dtype}.{dims}\n\n")
        write_bytes(self.path / LAYER_INFO, "".join(lines).encode())


def read_layer_info(folder: Path) -> list[TensorPlan]:
    path = folder / LAYER_INFO
    if not path.is_file():
        raise LlmToolError(f"no {LAYER_INFO}: not a complete converter output folder", folder)
    plan = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if not line.startswith("mdl_vars."):
            raise LlmToolError(f"unexpected line {line[:60]!r}", path)
        try:
            name, dtype, dims = line[len("mdl_vars.") :].rsplit(".", 2)
            shape = tuple(int(d) for d in dims.split("_"))
        except ValueError:
            raise LlmToolError(f"unexpected line {line[:60]!r}", path) from None
        plan.append(TensorPlan(name, shape, dtype, block_size=_block_size(folder, name, shape)))
    return plan


def _block_size(folder: Path, name: str, shape: tuple[int, ...]) -> int:
    """The block size of a blockwise tensor from its scale file's length (0 if per-channel)."""
    scale = folder / f"{name}_quantized_scale"
    if len(shape) != 2 or not scale.is_file():
        return 0
    count = scale.stat().st_size // 4
    if count in (0, shape[0]) or (shape[0] * shape[1]) % count:
        return 0
    return (shape[0] * shape[1]) // count


def read_metadata(folder: Path) -> dict[str, bytes]:
    """The metadata entries `TensorDir.finish` wrote."""
    meta_dir = folder / METADATA_DIR
    if not meta_dir.is_dir():
        raise LlmToolError(f"no {METADATA_DIR}/ folder: not written by llmtool convert", folder)
    return {
        p.relative_to(meta_dir).as_posix(): p.read_bytes()
        for p in sorted(meta_dir.rglob("*"))
        if p.is_file()
    }


def read_tensor(folder: Path, entry: TensorPlan) -> np.ndarray | QuantizedTensor:
    path = folder / entry.name
    if not path.is_file():
        raise LlmToolError(f"tensor file for {entry.name!r} is missing", path)
    count = int(np.prod(entry.shape))
    if entry.dtype in ("float32", "float16"):
        data = np.fromfile(path, dtype="<f4" if entry.dtype == "float32" else "<f2")
        if data.size != count:
            raise LlmToolError(f"expected {count} values, found {data.size}", path)
        return data.reshape(entry.shape)
    if entry.dtype == "int8":
        data, bits = np.fromfile(path, dtype=np.int8), 8
        expected = count
    elif entry.dtype == "int4":
        data, bits = np.fromfile(path, dtype=np.uint8), 4
        expected = int(np.prod(entry.shape[:-1])) * ((entry.shape[-1] + 1) // 2)
    else:
        raise LlmToolError(f"unknown dtype {entry.dtype!r} in {LAYER_INFO}", folder)
    if data.size != expected:
        raise LlmToolError(f"expected {expected} bytes, found {data.size}", path)
    if bits == 8:
        data = data.reshape(entry.shape)
    else:
        data = data.reshape(*entry.shape[:-1], (entry.shape[-1] + 1) // 2)
    scale = np.fromfile(folder / f"{entry.name}_quantized_scale", dtype="<f4")
    zp_path = folder / f"{entry.name}_quantized_zp"
    zero_point = (
        np.fromfile(zp_path, dtype="<i4").astype(np.int64)
        if zp_path.is_file()
        else np.zeros(entry.shape[0], dtype=np.int64)
    )
    blocks = entry.shape[1] // entry.block_size if entry.block_size else 1
    if scale.size != entry.shape[0] * blocks or zero_point.size != entry.shape[0]:
        raise LlmToolError(f"quantization parameters of {entry.name!r} do not match", folder)
    if entry.block_size:
        scale = scale.reshape(entry.shape[0], blocks)
    return QuantizedTensor(
        data=data,
        scale=scale,
        zero_point=zero_point,
        bits=bits,
        shape=entry.shape,
        axis=0,
        block_size=entry.block_size,
    )
