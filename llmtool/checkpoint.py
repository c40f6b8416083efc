"""Lazy readers for Hugging Face checkpoints: safetensors (single, sharded) and pytorch_model.bin.

Nothing is read until a tensor is asked for, so converting streams tensor by tensor and peak
memory is about one tensor. pytorch files are opened with `weights_only=True` (no arbitrary
unpickling) and memory-mapped where the file format allows it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.errors import LlmToolError

FORMATS = ("safetensors", "pytorch")
_PATTERNS = {
    "safetensors": ("model.safetensors", "model-*-of-*.safetensors", "*.safetensors"),
    "pytorch": ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "*.bin"),
}


def _format_of(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".bin", ".pt", ".pth"):
        return "pytorch"
    return None


def resolve_files(input_ckpt: str | Path, ckpt_format: str | None = None) -> tuple[list[Path], str]:
    """Checkpoint files named by a file, a directory, or a glob; and their format."""
    if ckpt_format is not None and ckpt_format not in FORMATS:
        raise LlmToolError(
            f"unknown checkpoint format {ckpt_format!r} (use safetensors or pytorch)"
        )
    text = str(input_ckpt)
    path = Path(text)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
        if not files:
            raise LlmToolError("no checkpoint file matches this pattern", text)
    elif path.is_dir():
        files = []
        formats = [ckpt_format] if ckpt_format else list(FORMATS)
        for fmt in formats:
            for pattern in _PATTERNS[fmt]:
                files = sorted(path.glob(pattern))
                if files:
                    break
            if files:
                break
        if not files:
            raise LlmToolError(
                "no model.safetensors or pytorch_model.bin file in this folder", path
            )
    elif path.is_file():
        files = [path]
    else:
        raise LlmToolError("checkpoint not found", path)
    formats_found = {_format_of(f) for f in files}
    if None in formats_found or len(formats_found) != 1:
        raise LlmToolError("not a .safetensors or .bin checkpoint file", files[0])
    found = formats_found.pop()
    if ckpt_format is not None and found != ckpt_format:
        raise LlmToolError(f"--ckpt-format is {ckpt_format} but the file is {found}", files[0])
    return files, found  # type: ignore[return-value]


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "float16", "bfloat16", ...
    file: Path


class Checkpoint:
    """A lazy view over the tensors of one checkpoint (possibly several shards)."""

    def __init__(self, files: list[Path], ckpt_format: str):
        self.files = files
        self.format = ckpt_format
        self.directory = files[0].parent
        self._meta: dict[str, TensorMeta] = {}
        for f in files:
            self._index(f)

    @classmethod
    def open(cls, input_ckpt: str | Path, ckpt_format: str | None = None) -> Checkpoint:
        files, fmt = resolve_files(input_ckpt, ckpt_format)
        return cls(files, fmt)

    # -- indexing ---------------------------------------------------------------------------

    def _index(self, path: Path) -> None:
        for name, shape, dtype in self._read_index(path):
            self._add(name, shape, dtype, path)

    def _read_index(self, path: Path) -> list[tuple[str, tuple[int, ...], str]]:
        if self.format == "safetensors":
            self._check_safetensors_size(path)
            try:
                with _open_safetensors(path) as handle:
                    return [
                        (
                            n,
                            tuple(handle.get_slice(n).get_shape()),
                            _st_dtype(handle.get_slice(n).get_dtype()),
                        )
                        for n in handle.keys()
                    ]
            except Exception as exc:  # safetensors raises its own error types
                raise LlmToolError(f"cannot read safetensors file ({_short(exc)})", path) from None
        state = _torch_load(path)
        return [
            (n, tuple(t.shape), str(t.dtype).replace("torch.", ""))
            for n, t in state.items()
            if hasattr(t, "shape")
        ]

    def _check_safetensors_size(self, path: Path) -> None:
        """safetensors maps lazily: catch a truncated file now rather than mid-conversion."""
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError
                header = json.loads(f.read(header_len))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise LlmToolError("not a safetensors file, or its header is truncated", path) from None
        if size < 8 + header_len + end:
            raise LlmToolError(
                f"safetensors file is truncated ({size} bytes, {8 + header_len + end} expected)",
                path,
            )

    def _add(self, name: str, shape: tuple[int, ...], dtype: str, path: Path) -> None:
        if name in self._meta:
            raise LlmToolError(f"tensor {name!r} appears in two checkpoint files", path)
        self._meta[name] = TensorMeta(name, shape, dtype, path)

    # -- access -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 numpy array (bf16/f16 widened).

        The file is opened for each tensor: both readers memory-map it, and a mapping kept
        open would keep every page already read counted in this process's memory.
        """
        import torch

        meta = self._meta[name]
        try:
            if self.format == "safetensors":
                with _open_safetensors(meta.file) as handle:
                    tensor = handle.get_tensor(name)
            else:
                tensor = _torch_load(meta.file)[name]
            return tensor.to(torch.float32).numpy()
        except LlmToolError:
            raise
        except Exception as exc:
            raise LlmToolError(f"cannot read tensor {name!r} ({_short(exc)})", meta.file) from None

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def config(self) -> tuple[dict[str, Any], Path]:
        """The config.json beside the checkpoint files."""
        return read_config(self.directory)


def read_config(directory: Path) -> tuple[dict[str, Any], Path]:
    """The config.json of a checkpoint folder, and its path."""
    path = directory / "config.json"
    if not path.is_file():
        raise LlmToolError("config.json not found beside the checkpoint", directory)
    return read_json(path), path


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmToolError(f"invalid JSON ({_short(exc)})", path) from None
    if not isinstance(data, dict):
        raise LlmToolError("expected a JSON object", path)
    return data


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    try:
        yield handle
    finally:
        del handle


def _st_dtype(name: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(
        name, name.lower()
    )


def _torch_load(path: Path) -> dict[str, Any]:
    import torch

    try:
        mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be mmapped
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        if "weights_only" in str(exc):  # torch refused a pickled object that is not a tensor
            # Never pass on torch's advice to retry with weights_only=False: that runs the code.
            raise LlmToolError(
                "the file holds Python objects (code), not just tensors; llmtool will not load "
                "it. Convert it to safetensors in an environment you trust, then convert that",
                path,
            ) from None
        raise LlmToolError(f"cannot read pytorch checkpoint ({_short(exc)})", path) from None
    if not isinstance(state, dict):
        raise LlmToolError("pytorch checkpoint is not a state dict", path)
    return state


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
