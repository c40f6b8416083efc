"""The LoRA file written by `llmtool lora-convert`, and the LoRA inputs of exported graphs.

Both follow the convention of Google's AI Edge exporter and the LiteRT-LM runtime, so the same
file runs in `llmtool run --lora-path` and in LiteRT-LM (`Engine(lora_rank_config=...)`, then
`LoraConfig(lora_path=...)` per session) for attention adapters:

- A graph that takes adapters has, in its `prefill_<T>` and `decode` signatures, one float32
  input per adapted projection and layer: `lora_atten_q_a_prime_weight_<i>` [in, R] and
  `lora_atten_q_b_prime_weight_<i>` [R, out] (q, k, v, o; and, beyond LiteRT-LM, `lora_mlp_gate`,
  `lora_mlp_up`, `lora_mlp_down`). The projection computes x W^T + (x A') B', with
  A' = scale * lora_A^T and B' = lora_B^T. Zeros are "no adapter"; an adapter of smaller rank
  is padded with zero columns/rows, which changes nothing.
- The LoRA file is a TFLite flatbuffer with one subgraph (`lora_params`), no operators, one
  float32 tensor per input above (same name, data outside the flatbuffer at `Buffer.offset`),
  the metadata entry `lora_rank` whose *buffer index field* holds the stored rank (LiteRT-LM
  reads it that way), `llmtool.lora` (JSON: rank, alpha, scale, targets, the base model's
  identity) and the file padded to a multiple of 4096 bytes (LiteRT-LM memory-maps it whole).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.tflite_model import ModelWriter, Subgraph, Tensor, read_model

# Graph input / file tensor prefix per projection role of the generic decoder.
LORA_PREFIX = {
    "q": "lora_atten_q",
    "k": "lora_atten_k",
    "v": "lora_atten_v",
    "o": "lora_atten_o",
    "gate": "lora_mlp_gate",
    "up": "lora_mlp_up",
    "down": "lora_mlp_down",
}
LORA_ROLES = tuple(LORA_PREFIX)
ATTENTION_ROLES = ("q", "k", "v", "o")  # the only ones LiteRT-LM fills
_PREFIX_ROLE = {v: k for k, v in LORA_PREFIX.items()}
_NAME = re.compile(r"(lora_(?:atten|mlp)_[a-z]+)_(a|b)_prime_weight_(\d+)")

LORA_RANK = "lora_rank"  # metadata: the stored rank, in the entry's buffer index field
LORA_INFO = "llmtool.lora"  # metadata: JSON description (see LoraInfo)
SUBGRAPH_NAME = "lora_params"
FILE_ALIGNMENT = 4096


def lora_input_name(role: str, which: str, layer: int) -> str:
    """`lora_atten_q_a_prime_weight_3` for role q, which "a", layer 3."""
    return f"{LORA_PREFIX[role]}_{which}_prime_weight_{layer}"


def parse_lora_name(name: str) -> tuple[str, str, int] | None:
    """(role, "a" | "b", layer) of a LoRA input / tensor name, None for other names."""
    m = _NAME.fullmatch(name)
    if m is None or m.group(1) not in _PREFIX_ROLE:
        return None
    return _PREFIX_ROLE[m.group(1)], m.group(2), int(m.group(3))


def graph_lora_rank(shapes: dict[str, tuple[int, ...]]) -> int:
    """The rank R of a graph's LoRA inputs (name -> shape), 0 when it has none."""
    ranks = {
        (s[1] if p[1] == "a" else s[0])
        for n, s in shapes.items()
        if (p := parse_lora_name(n)) is not None
    }
    if len(ranks) > 1:
        raise LlmToolError(f"the graph's LoRA inputs disagree on the rank ({sorted(ranks)})")
    return ranks.pop() if ranks else 0


def base_identity(container: Any) -> str:
    """A digest naming a base model independently of how its weights were quantized.

    It covers the ModelSpec (architecture and sizes) and every norm and bias tensor (rounded to
    float16): those stay float (unquantized) in every container, and differ between checkpoints
    of the same architecture, so an adapter for another base, or another size, is refused.
    """
    h = hashlib.sha256(container.metadata.get(keys.MODEL_SPEC, b""))
    for info in sorted(container, key=lambda t: t.name):
        if info.name.endswith(".w"):
            continue  # weight matrices, embeddings: their stored form depends on quantization
        h.update(info.name.encode())
        h.update(np.ascontiguousarray(container.float(info.name), np.float16).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class LoraInfo:
    """What `llmtool.lora` says about an adapter file."""

    model_type: str
    rank: int  # the adapter's rank (largest, with rank_pattern)
    stored_rank: int  # rank of the stored tensors (rank padded with zeros)
    alpha: float | None
    use_rslora: bool
    scale: float | dict[str, float]  # applied scale, folded into the A' tensors
    targets: tuple[str, ...]  # roles of the generic decoder that get an adapter
    modules: tuple[str, ...]  # the PEFT module names adapted (e.g. q_proj, c_attn)
    base_identity: str
    base_file: str
    backend: str
    source: str

    def to_json(self) -> bytes:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["targets"], data["modules"] = list(self.targets), list(self.modules)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, path: Path) -> LoraInfo:
        try:
            data = json.loads(raw)
            data["targets"] = tuple(data["targets"])
            data["modules"] = tuple(data["modules"])
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            raise LlmToolError(f"unreadable {LORA_INFO} metadata", path) from None


def write_lora_file(path: str | Path, info: LoraInfo, tensors: dict[str, np.ndarray]) -> Path:
    """Write the tensors (name -> float32 array) and metadata; atomic (temp name + rename)."""
    path = Path(path)
    writer = ModelWriter(description="llmtool LoRA weights")
    entries = []
    for name in sorted(tensors, key=_tensor_order):
        parsed = parse_lora_name(name)
        arr = np.ascontiguousarray(tensors[name], np.float32)
        if parsed is None or arr.ndim != 2:
            raise LlmToolError(f"not a LoRA tensor: {name!r} {list(arr.shape)}", path)
        rank = arr.shape[1] if parsed[1] == "a" else arr.shape[0]
        if rank != info.stored_rank:
            raise LlmToolError(f"{name}: rank {rank}, expected {info.stored_rank}", path)
        entries.append(Tensor(name, tuple(arr.shape), "float32", writer.add_buffer(arr)))
    writer.add_subgraph(Subgraph(SUBGRAPH_NAME, entries, [], [], []))
    writer.add_metadata(LORA_INFO, info.to_json())
    writer.metadata.append((LORA_RANK, info.stored_rank))  # the value is the index itself
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer.write(tmp, alignment=64)
        size = tmp.stat().st_size
        with open(tmp, "ab") as f:
            f.write(b"\0" * (-size % FILE_ALIGNMENT))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _tensor_order(name: str) -> tuple:
    parsed = parse_lora_name(name)
    if parsed is None:
        return (1, name)
    role, which, layer = parsed
    return (0, layer, LORA_ROLES.index(role), which)


class LoraFile:
    """A LoRA file, read and checked; tensors are memory-mapped float32 arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LlmToolError("LoRA file not found", self.path)
        model = read_model(self.path)
        try:
            if LORA_INFO not in model.metadata:
                raise LlmToolError(
                    "not an llmtool LoRA file (no llmtool.lora metadata; convert the adapter "
                    "with llmtool lora-convert)",
                    self.path,
                )
            self.info = LoraInfo.from_json(model.metadata[LORA_INFO], self.path)
            if len(model.subgraphs) != 1 or model.subgraphs[0].operators:
                raise LlmToolError("not a LoRA file (a graph with operators)", self.path)
            self.tensors: dict[str, np.ndarray] = {}
            for i, t in enumerate(model.subgraphs[0].tensors):
                parsed = parse_lora_name(t.name)
                if parsed is None or t.dtype != "float32" or len(t.shape) != 2:
                    raise LlmToolError(
                        f"unexpected tensor {t.name!r} ({t.dtype}{list(t.shape)})", self.path
                    )
                rank = t.shape[1] if parsed[1] == "a" else t.shape[0]
                if rank != self.info.stored_rank:
                    raise LlmToolError(
                        f"tensor {t.name!r} has rank {rank} but the file says "
                        f"{self.info.stored_rank}",
                        self.path,
                    )
                self.tensors[t.name] = np.asarray(model.tensor_data(0, i), np.float32)
        except BaseException:
            model.close()
            raise
        self._model = model

    @property
    def targets(self) -> tuple[str, ...]:
        return self.info.targets

    def check_base(self, identity: str | None, model_type: str | None, where: Path) -> None:
        """Refuse an adapter converted for another base model, naming both."""
        if identity is None:
            raise LlmToolError(
                "the model does not record its base identity (export it again with this llmtool)",
                where,
            )
        if identity != self.info.base_identity:
            raise LlmToolError(
                f"LoRA {self.path.name} was converted for {self.info.model_type} base "
                f"{self.info.base_file} ({self.info.base_identity[:12]}), not for this "
                f"{model_type or 'model'} ({identity[:12]})",
                where,
            )

    def padded(self, rank: int) -> dict[str, np.ndarray]:
        """The tensors with their rank padded to `rank` (zero columns of A', rows of B')."""
        out = {}
        for name, arr in self.tensors.items():
            parsed = parse_lora_name(name)
            assert parsed is not None
            extra = rank - self.info.stored_rank
            if extra < 0:
                raise LlmToolError(
                    f"LoRA rank {self.info.stored_rank} exceeds the graph's LoRA rank {rank}",
                    self.path,
                )
            pad = ((0, 0), (0, extra)) if parsed[1] == "a" else ((0, extra), (0, 0))
            out[name] = np.pad(arr, pad) if extra else np.array(arr)
        return out

    def close(self) -> None:
        self._model.close()

    def __enter__(self) -> LoraFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
