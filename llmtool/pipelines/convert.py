"""`llmtool convert`: Hugging Face checkpoint -> weights container (.bin).

Flow: config.json -> ModelSpec (architectures.py) -> plan of container tensors (weights.py) ->
stream each tensor: load, quantize, write (formats/container.py). Optionally also one file per
tensor in `output_dir` with `layer_info.txt`, like the reference converter, from which
`combine_file_only` rebuilds the container.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import __version__
from llmtool.architectures import ModelSpec, check_config_matches, get_architecture
from llmtool.checkpoint import Checkpoint
from llmtool.config import ConversionConfig
from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.container import ContainerWriter, TensorPlan
from llmtool.formats.llm_params import encode_llm_parameters
from llmtool.quantization import QuantizedTensor, quantize
from llmtool.tokenizer import Tokenizer, read_tokenizer_files
from llmtool.weights import WeightLoader, plan_weights

Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, what: str) -> None:
    pass


def storage_dtype(kind: str, bits: dict[str, int]) -> str:
    """Container dtype of a tensor of this kind (norms, biases, positions stay float32)."""
    if kind == "float":
        return "float32"
    return {32: "float32", 16: "float16", 8: "int8", 4: "int4"}[bits[kind]]


def llm_parameters(spec: ModelSpec, tokenizer: Tokenizer) -> dict[str, Any]:
    """The reference LlmParameters record, filled from the real checkpoint."""
    norm = {"rms": "RMS_NORM", "layer": "LAYER_NORM"}[spec.norm]
    act = {"gelu": "GELU", "gelu_tanh": "GELU", "silu": "SILU", "relu": "RELU"}[spec.activation]
    info = tokenizer.info()
    params: dict[str, Any] = {
        "transformer_parameters": {
            "batch_size": 1,
            "max_seq_length": spec.max_positions,
            "embedding_dim": spec.hidden_size,
            "hidden_dimension": spec.intermediate_size,
            "head_dimension": spec.head_dim,
            "num_heads": spec.num_heads,
            "num_stacks": spec.num_layers,
            "num_kv_heads": spec.num_kv_heads,
            "pre_norm": norm,
            "post_norm": "NO_NORM",
            "final_norm": norm,
            "feed_forward_parameters": {
                "no_bias": not spec.mlp_bias,
                "activation": act,
                "pre_norm": "NO_NORM" if spec.parallel_residual else norm,
                "post_norm": "NO_NORM",
            },
            "final_project_parameters": {"no_bias": not spec.lm_head_bias},
            "self_attention_parameters": {
                "qkv_no_bias": not spec.qkv_bias,
                "post_proj_no_bias": not spec.attn_out_bias,
                "attention_mask_type": "CAUSAL",
                "attention_scale_type": "SCALE_TYPE_INV_SQRT_HEAD_DIM",
            },
            "skip_absolute_positional_embeddings": not spec.learned_positions,
        },
        "vocab_size": spec.vocab_size,
        "stop_tokens": [t for t in info.get("stop_tokens", []) if t],
    }
    # start_token and start_token_id are a oneof in the reference proto: prefer the string.
    if info.get("bos_token"):
        params["start_token"] = info["bos_token"]
    elif info.get("bos_id") is not None:
        params["start_token_id"] = int(info["bos_id"])
    return params


def convert(config: ConversionConfig, progress: Progress = _no_progress) -> dict[str, Any]:
    """Run one conversion; returns a JSON-able summary."""
    config.validate()
    start = time.perf_counter()
    if config.combine_file_only:
        summary = combine_output_dir(
            Path(config.output_dir),
            Path(config.output_tflite_file),
            progress,  # type: ignore[arg-type]
        )
        summary["seconds"] = round(time.perf_counter() - start, 3)
        return summary

    arch = get_architecture(config.model_type)  # type: ignore[arg-type]
    ckpt = Checkpoint.open(config.input_ckpt, config.ckpt_format)  # type: ignore[arg-type]
    cfg, cfg_path = ckpt.config()
    check_config_matches(arch, cfg, str(cfg_path))
    spec = arch.spec(cfg, str(cfg_path))
    planned, ignored = plan_weights(arch, spec, ckpt)

    vocab_path = Path(config.vocab_model_file) if config.vocab_model_file else ckpt.directory
    tok_files = read_tokenizer_files(vocab_path)
    generation_config = ckpt.directory / "generation_config.json"
    if "generation_config.json" not in tok_files and generation_config.is_file():
        tok_files["generation_config.json"] = generation_config.read_bytes()
    tokenizer = Tokenizer.from_files(tok_files)
    if tokenizer.vocab_size > spec.vocab_size:
        raise LlmToolError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{spec.vocab_size}",
            vocab_path,
        )

    bits = config.bits()
    conversion = {
        "llmtool_version": __version__,
        "source_format": ckpt.format,
        "source_files": [f.name for f in ckpt.files],
        "quant_bits": bits,
        "is_symmetric": config.is_symmetric,
        "ignored_tensors": ignored,
    }
    metadata = {
        keys.LLM_PARAMETERS: encode_llm_parameters(llm_parameters(spec, tokenizer)),
        keys.BACKEND: config.backend.encode(),
        keys.MODEL_TYPE: spec.model_type.encode(),
        keys.MODEL_SPEC: spec.to_json(),
        keys.CONVERSION: json.dumps(conversion, sort_keys=True).encode(),
        **keys.pack_tokenizer(tok_files),
    }
    plan = [TensorPlan(t.name, t.shape, storage_dtype(t.kind, bits)) for t in planned]
    by_name = {t.name: t for t in planned}
    loader = WeightLoader(ckpt, spec)
    tensor_dir = TensorDir(Path(config.output_dir)) if config.output_dir else None
    done = 0

    def fill(entry: TensorPlan) -> np.ndarray | QuantizedTensor:
        nonlocal done
        progress(done, len(plan), entry.name)
        value = encode_tensor(loader.load(by_name[entry.name]), entry.dtype, config.is_symmetric)
        if tensor_dir is not None:
            tensor_dir.write(entry, value)
        done += 1
        progress(done, len(plan), entry.name)
        return value

    output = Path(config.output_tflite_file)  # type: ignore[arg-type]
    output.parent.mkdir(parents=True, exist_ok=True)
    with ContainerWriter(output, spec.model_type, plan, metadata) as writer:
        writer.write(fill)
    if tensor_dir is not None:
        tensor_dir.finish(plan, metadata)

    return {
        "output": str(output),
        "output_bytes": output.stat().st_size,
        "output_dir": config.output_dir,
        "model_type": spec.model_type,
        "backend": config.backend,
        "parameters": sum(int(np.prod(t.shape)) for t in plan),
        "tensors": len(plan),
        "quant_bits": bits,
        "is_symmetric": config.is_symmetric,
        "source_bytes": ckpt.total_bytes(),
        "ignored_tensors": ignored,
        "tokenizer": tokenizer.info(),
        "seconds": round(time.perf_counter() - start, 3),
    }


def encode_tensor(w: np.ndarray, dtype: str, symmetric: bool) -> np.ndarray | QuantizedTensor:
    """A float32 tensor in its storage dtype."""
    if dtype == "float32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if dtype == "float16":
        return w.astype(np.float16)
    return quantize(w, bits=8 if dtype == "int8" else 4, symmetric=symmetric, axis=0)


# -------------------------------------------------------------------------------------------
# The reference-style output folder: one raw file per tensor + layer_info.txt

LAYER_INFO = "layer_info.txt"
METADATA_DIR = "metadata"


class TensorDir:
    """Writes and reads the per-tensor folder (raw little-endian bytes, names as in the container).

    Quantized tensors get `<name>_quantized_scale` (float32) and `<name>_quantized_zp` (int32)
    files beside them, as the reference converter writes.
    """

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / LAYER_INFO).unlink(missing_ok=True)  # written last: marks a complete folder

    def write(self, entry: TensorPlan, value: np.ndarray | QuantizedTensor) -> None:
        if isinstance(value, QuantizedTensor):
            (self.path / entry.name).write_bytes(value.data.tobytes())
            (self.path / f"{entry.name}_quantized_scale").write_bytes(
                value.scale.astype("<f4").tobytes()
            )
            (self.path / f"{entry.name}_quantized_zp").write_bytes(
                value.zero_point.astype("<i4").tobytes()
            )
        else:
            (self.path / entry.name).write_bytes(value.tobytes())

    def finish(self, plan: list[TensorPlan], metadata: dict[str, bytes]) -> None:
        meta_dir = self.path / METADATA_DIR
        meta_dir.mkdir(exist_ok=True)
        for key, data in metadata.items():
            (meta_dir / key).parent.mkdir(parents=True, exist_ok=True)
            (meta_dir / key).write_bytes(data)
        lines = []
        for e in plan:
            dims = "_".join(str(d) for d in e.shape)
            lines.append(f"mdl_vars.{e.name}.{e.dtype}.{dims}\n\n")
        tmp = self.path / (LAYER_INFO + ".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.path / LAYER_INFO)


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
        plan.append(TensorPlan(name, shape, dtype))
    return plan


def combine_output_dir(folder: Path, output: Path, progress: Progress) -> dict[str, Any]:
    """Build the container from an existing per-tensor folder (`--combine-file-only`)."""
    plan = read_layer_info(folder)
    meta_dir = folder / METADATA_DIR
    if not meta_dir.is_dir():
        raise LlmToolError(f"no {METADATA_DIR}/ folder: not written by llmtool convert", folder)
    metadata = {}
    for p in sorted(meta_dir.rglob("*")):
        if p.is_file():
            metadata[p.relative_to(meta_dir).as_posix()] = p.read_bytes()
    if keys.MODEL_SPEC not in metadata:
        raise LlmToolError(f"{METADATA_DIR}/{keys.MODEL_SPEC} is missing", folder)
    spec = ModelSpec.from_json(metadata[keys.MODEL_SPEC])

    def fill(entry: TensorPlan) -> np.ndarray | QuantizedTensor:
        progress(plan.index(entry), len(plan), entry.name)
        return _read_tensor_file(folder, entry)

    output.parent.mkdir(parents=True, exist_ok=True)
    with ContainerWriter(output, spec.model_type, plan, metadata) as writer:
        writer.write(fill)
    progress(len(plan), len(plan), "done")
    return {
        "output": str(output),
        "output_bytes": output.stat().st_size,
        "model_type": spec.model_type,
        "tensors": len(plan),
        "combined_from": str(folder),
    }


def _read_tensor_file(folder: Path, entry: TensorPlan) -> np.ndarray | QuantizedTensor:
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
    if scale.size != entry.shape[0] or zero_point.size != entry.shape[0]:
        raise LlmToolError(f"quantization parameters of {entry.name!r} do not match", folder)
    return QuantizedTensor(
        data=data, scale=scale, zero_point=zero_point, bits=bits, shape=entry.shape, axis=0
    )
