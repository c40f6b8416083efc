"""`llmtool inspect`: what a converted file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.llm_params import decode_llm_parameters
from llmtool.formats.lora_file import LORA_INFO
from llmtool.formats.tflite_model import ModelFile, read_model, read_model_at
from llmtool.spec import ModelSpec
from llmtool.tokenizer import Tokenizer

DEFAULT_CARD = Path(__file__).resolve().parent.parent / "data" / "default_model.json"


def describe_default() -> dict[str, Any]:
    """The embedded default model: where it is, what it is, and its model card facts."""
    from llmtool.pipelines.resolve import default_model_path, file_digest

    path = default_model_path()
    info = describe(path)
    info["sha256"] = file_digest(path)
    info["card"] = json.loads(DEFAULT_CARD.read_text()) if DEFAULT_CARD.is_file() else None
    return info


def describe_graph(path: Path, m: ModelFile) -> dict[str, Any]:
    """An exported graph (opened as `m`): its signatures with their inputs and outputs."""
    info: dict[str, Any] = {"file": str(path), "file_bytes": Path(path).stat().st_size}
    info.update(_graph_info(m))
    files = keys.unpack_tokenizer(m.metadata)
    info["tokenizer"] = Tokenizer.from_files(files).info() if files else None
    info["tensors"] = []
    return info


def _meta_text(meta: dict[str, bytes], key: str, path: Path | None) -> str | None:
    """A UTF-8 metadata entry (LlmToolError naming the file when it is not)."""
    if key not in meta:
        return None
    try:
        return meta[key].decode("utf-8")
    except UnicodeDecodeError:
        raise LlmToolError(f"metadata entry {key} is not UTF-8 text: corrupt file", path) from None


def _meta_json(meta: dict[str, bytes], key: str, path: Path | None) -> Any:
    """A JSON object metadata entry (LlmToolError naming the file when it is not)."""
    text = _meta_text(meta, key, path)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise LlmToolError(f"metadata entry {key} is not valid JSON: corrupt file", path) from None
    if not isinstance(value, dict):
        raise LlmToolError(f"metadata entry {key} is not a JSON object: corrupt file", path)
    return value


def _graph_info(m: ModelFile) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if keys.MODEL_SPEC in m.metadata:
        info["model_type"] = ModelSpec.from_json(m.metadata[keys.MODEL_SPEC], m.path).model_type
    if keys.GRAPH in m.metadata:
        info["graph"] = _meta_json(m.metadata, keys.GRAPH, m.path)
    info["signatures"] = {}
    for sig in m.signatures:
        tensors = m.subgraphs[sig.subgraph_index].tensors
        info["signatures"][sig.key] = {
            side: {n: [list(tensors[i].shape), tensors[i].dtype] for n, i in names.items()}
            for side, names in (("inputs", sig.inputs), ("outputs", sig.outputs))
        }
        info["signatures"][sig.key]["operators"] = len(m.subgraphs[sig.subgraph_index].operators)
    return info


def describe_bundle(path: Path, kind: str) -> dict[str, Any]:
    """A .task or .litertlm: its entries (sections), metadata, tokenizer and graph signatures.
    Entries that escape the archive or overlap are refused by the readers."""
    from google.protobuf import text_format

    from llmtool.pipelines.resolve import bundle_tokenizer

    info: dict[str, Any] = {"file": str(path), "file_bytes": path.stat().st_size, "kind": kind}
    if kind == "task":
        from llmtool.formats.task_bundle import (
            METADATA_ENTRY,
            read_task_bundle,
            task_bundle_entries,
        )

        entries = task_bundle_entries(path)
        info["entries"] = [
            {"name": e.name, "offset": e.offset, "bytes": e.size} for e in entries.values()
        ]
        raw = read_task_bundle(path, (METADATA_ENTRY,))[METADATA_ENTRY]
        info["metadata"] = decode_llm_parameters(raw)
        graph = entries["TF_LITE_PREFILL_DECODE"]
        at, size = graph.offset, graph.size
    else:
        from llmtool.formats.litertlm import read_litertlm

        content = read_litertlm(path)
        info["entries"] = [
            {"name": s.kind, "offset": s.begin, "bytes": s.size, **s.items}
            for s in content["sections"]
        ]
        info["metadata"] = text_format.MessageToString(content["metadata"], as_one_line=True)
        at, size = content["graph"].begin, content["graph"].size
    with read_model_at(path, at, size) as m:
        info.update(_graph_info(m))
    tokenizer = bundle_tokenizer(path)[0]
    info["tokenizer"] = tokenizer.info() | {"bytes_to_unicode": tokenizer.bytes_to_unicode}
    info["tensors"] = []
    return info


def describe(path: Path) -> dict[str, Any]:
    from llmtool.pipelines.resolve import bundle_kind

    path = Path(path)
    if path.is_file() and (kind := bundle_kind(path)):
        return describe_bundle(path, kind)
    model = read_model(path)  # parsed once, whatever the file is
    if model.is_graph:
        with model:
            return describe_graph(path, model)
    with Container(model, path) as c:
        meta = c.metadata
        spec = ModelSpec.from_json(meta[keys.MODEL_SPEC], path) if keys.MODEL_SPEC in meta else None
        conversion = _meta_json(meta, keys.CONVERSION, path) or {}
        files = keys.unpack_tokenizer(meta)
        info: dict[str, Any] = {
            "file": str(path),
            "file_bytes": Path(path).stat().st_size,
            "model_type": c.model_type,
            "backend": _meta_text(meta, keys.BACKEND, path) or None,
            "parameters": sum(int(np.prod(t.shape)) for t in c),
            "spec": json.loads(spec.to_json()) if spec else None,
            "quant_bits": conversion.get("quant_bits"),
            "is_symmetric": conversion.get("is_symmetric"),
            "llm_parameters": (
                decode_llm_parameters(meta[keys.LLM_PARAMETERS])
                if keys.LLM_PARAMETERS in meta
                else None
            ),
            "tokenizer": Tokenizer.from_files(files).info() if files else None,
            "metadata_keys": sorted(meta),
            "int4_block_sizes": conversion.get("int4_block_sizes"),
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": f"{t.dtype}/b{t.block_size}" if t.block_size else t.dtype,
                    "bytes": t.nbytes,
                }
                for t in c
            ],
        }
        if LORA_INFO in meta:  # a LoRA file (llmtool lora-convert)
            lora = json.loads(meta[LORA_INFO])
            info["model_type"], info["backend"] = lora["model_type"], lora["backend"]
            info["lora"] = {
                k: lora[k] for k in ("rank", "stored_rank", "alpha", "scale", "modules")
            } | {"base": f"{lora['base_file']} ({lora['base_identity'][:12]})"}
    return info
