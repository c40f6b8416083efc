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

from llmtool._version import __version__
from llmtool.architectures import check_config_matches, get_architecture
from llmtool.checkpoint import Checkpoint, read_config, resolve_files
from llmtool.config import DEFAULT_BLOCK_SIZE, ConversionConfig
from llmtool.errors import LlmToolError
from llmtool.files import refuse_overlap
from llmtool.formats import metadata as keys
from llmtool.formats.container import ContainerWriter, TensorPlan
from llmtool.formats.llm_params import encode_llm_parameters, llm_parameters
from llmtool.formats.tensor_dir import TensorDir, read_layer_info, read_metadata, read_tensor
from llmtool.quantization import QuantizedTensor, quantize
from llmtool.spec import ModelSpec
from llmtool.tokenizer import MODEL_CONFIG_FILE, Tokenizer, read_tokenizer_files
from llmtool.weights import WeightLoader, plan_weights

Progress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, what: str) -> None:
    pass


def storage_dtype(kind: str, bits: dict[str, int]) -> str:
    """Container dtype of a tensor of this kind (norms, biases, positions stay float32)."""
    if kind == "float":
        return "float32"
    return {32: "float32", 16: "float16", 8: "int8", 4: "int4"}[bits[kind]]


def storage_plan(
    name: str,
    shape: tuple[int, ...],
    kind: str,
    bits: dict[str, int],
    block_size: int | None,
    symmetric: bool = True,
) -> TensorPlan:
    """How one tensor is stored. int4 matrices are blockwise: `block_size` if given (it must
    divide the row), else DEFAULT_BLOCK_SIZE where it divides the row; where it does not
    (XNNPACK's blockwise kernels need whole blocks of a multiple of 32) the tensor keeps
    int8 per channel, as llama.cpp falls back to a wider type for such rows."""
    dtype = storage_dtype(kind, bits)
    if dtype != "int4" or not symmetric or len(shape) != 2 or block_size == 0:
        return TensorPlan(name, shape, dtype)
    if block_size is None:
        if shape[1] % DEFAULT_BLOCK_SIZE:
            return TensorPlan(name, shape, "int8")
        return TensorPlan(name, shape, dtype, block_size=DEFAULT_BLOCK_SIZE)
    if shape[1] % block_size:
        raise LlmToolError(
            f"block size {block_size} does not divide the row length {shape[1]} of {name} "
            "(choose another --block-size, or 0 for one scale per row)"
        )
    return TensorPlan(name, shape, dtype, block_size=block_size)


def convert(config: ConversionConfig, progress: Progress = _no_progress) -> dict[str, Any]:
    """Run one conversion; returns a JSON-able summary. With `lora_ckpt`, the LoRA adapter is
    converted too, for the model just written (as the reference writes both files)."""
    config.validate()
    summary = _convert_base(config, progress)
    if config.lora_ckpt:
        from llmtool.pipelines.lora_convert import lora_convert

        summary["lora"] = lora_convert(
            config.lora_ckpt,
            summary["output"],
            config.lora_output_tflite_file,  # type: ignore[arg-type]
            config.lora_rank,
            config.backend,
        )
    return summary


def _convert_base(config: ConversionConfig, progress: Progress) -> dict[str, Any]:
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
    # Everything cheap is checked before the checkpoint is opened (which loads torch).
    files, ckpt_format = resolve_files(config.input_ckpt, config.ckpt_format)  # type: ignore
    directory = files[0].parent
    cfg, cfg_path = read_config(directory)
    check_config_matches(arch, cfg, str(cfg_path))
    try:
        spec = arch.spec(cfg, str(cfg_path))
    except (TypeError, ValueError, ArithmeticError, KeyError, AttributeError) as exc:
        # A family rule met a value the generic checks did not foresee: still one line.
        message = f"config.json has a value llmtool cannot use ({exc})"
        raise LlmToolError(message, cfg_path) from None

    vocab_path = Path(config.vocab_model_file) if config.vocab_model_file else directory
    tok_files = read_tokenizer_files(vocab_path)
    generation_config = directory / "generation_config.json"
    if "generation_config.json" not in tok_files and generation_config.is_file():
        tok_files["generation_config.json"] = generation_config.read_bytes()
    tokenizer = Tokenizer.from_files(tok_files)
    if tokenizer.missing_specials:
        # tokenizer_config.json names a BOS/EOS the vocabulary lacks: use config.json's ids.
        ids = {"bos_token_id": spec.bos_token_id, "eos_token_id": list(spec.eos_token_ids)}
        tok_files[MODEL_CONFIG_FILE] = json.dumps(ids, sort_keys=True).encode()
        tokenizer = Tokenizer.from_files(tok_files)
    for name, content in tokenizer.missing_specials.items():
        raise LlmToolError(
            f"tokenizer_config.json names {name} {content!r}, which is not in the vocabulary, "
            f"and config.json has no {name}_id to use instead",
            vocab_path,
        )
    if tokenizer.vocab_size > spec.vocab_size:
        raise LlmToolError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{spec.vocab_size}",
            vocab_path,
        )
    output = Path(config.output_tflite_file)  # type: ignore[arg-type]
    tokenizer_inputs = [vocab_path] if vocab_path.is_file() else []
    tokenizer_inputs += [vocab_path / name for name in tok_files] if vocab_path.is_dir() else []
    inputs = [*files, cfg_path, generation_config, *tokenizer_inputs]
    refuse_overlap(output, inputs)
    ckpt = Checkpoint(files, ckpt_format)
    planned, ignored = plan_weights(arch, spec, ckpt)

    bits = config.bits()
    conversion = {
        "llmtool_version": __version__,
        "source_format": ckpt.format,
        "source_files": [f.name for f in ckpt.files],
        "quant_bits": bits,
        "is_symmetric": config.is_symmetric,
        "ignored_tensors": ignored,
    }
    plan = [
        storage_plan(t.name, t.shape, t.kind, bits, config.block_size, config.is_symmetric)
        for t in planned
    ]
    blocks = sorted({e.block_size for e in plan if e.dtype == "int4"})
    if blocks:
        conversion["int4_block_sizes"] = blocks
    metadata = {
        keys.LLM_PARAMETERS: encode_llm_parameters(llm_parameters(spec, tokenizer.info())),
        keys.BACKEND: config.backend.encode(),
        keys.MODEL_TYPE: spec.model_type.encode(),
        keys.MODEL_SPEC: spec.to_json(),
        keys.CONVERSION: json.dumps(conversion, sort_keys=True).encode(),
        **keys.pack_tokenizer(tok_files),
    }
    by_name = {t.name: t for t in planned}
    loader = WeightLoader(ckpt, spec)
    tensor_dir = TensorDir(Path(config.output_dir)) if config.output_dir else None
    done = 0

    def fill(entry: TensorPlan) -> np.ndarray | QuantizedTensor:
        nonlocal done
        progress(done, len(plan), entry.name)
        value = encode_tensor(loader.load(by_name[entry.name]), entry, config.is_symmetric)
        if tensor_dir is not None:
            tensor_dir.write(entry, value)
        done += 1
        progress(done, len(plan), entry.name)
        return value

    with ContainerWriter(output, spec.model_type, plan, metadata) as writer:
        writer.write(fill, inputs=inputs)
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


def encode_tensor(
    w: np.ndarray, entry: TensorPlan, symmetric: bool = True, importance: np.ndarray | None = None
) -> np.ndarray | QuantizedTensor:
    """A float32 tensor in its planned storage dtype (and block size); `importance` (int4
    blocks): per-column weights of the scale search (quantization.quantize_blockwise)."""
    if entry.dtype == "float32":
        return np.ascontiguousarray(w, dtype=np.float32)
    if entry.dtype == "float16":
        return w.astype(np.float16)
    bits = 8 if entry.dtype == "int8" else 4
    if entry.block_size:
        return quantize(w, bits=bits, block_size=entry.block_size, importance=importance)
    return quantize(w, bits=bits, symmetric=symmetric, axis=0)


def combine_output_dir(folder: Path, output: Path, progress: Progress) -> dict[str, Any]:
    """Build the container from an existing per-tensor folder (`--combine-file-only`)."""
    plan = read_layer_info(folder)
    metadata = read_metadata(folder)
    if keys.MODEL_SPEC not in metadata:
        raise LlmToolError(f"metadata/{keys.MODEL_SPEC} is missing", folder)
    spec = ModelSpec.from_json(metadata[keys.MODEL_SPEC], folder)

    def fill(entry: TensorPlan) -> np.ndarray | QuantizedTensor:
        progress(plan.index(entry), len(plan), entry.name)
        return read_tensor(folder, entry)

    inputs = [p for p in folder.rglob("*") if p.is_file()]
    refuse_overlap(output, inputs)
    with ContainerWriter(output, spec.model_type, plan, metadata) as writer:
        writer.write(fill, inputs=inputs)
    progress(len(plan), len(plan), "done")
    return {
        "output": str(output),
        "output_bytes": output.stat().st_size,
        "model_type": spec.model_type,
        "tensors": len(plan),
        "combined_from": str(folder),
    }
