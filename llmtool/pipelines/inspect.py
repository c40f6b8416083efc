"""`llmtool inspect`: what a converted file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.llm_params import decode_llm_parameters
from llmtool.formats.tflite_model import read_model
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


def describe_graph(path: Path) -> dict[str, Any]:
    """An exported graph: its signatures with their inputs and outputs."""
    with read_model(path) as m:
        info: dict[str, Any] = {"file": str(path), "file_bytes": Path(path).stat().st_size}
        if keys.MODEL_SPEC in m.metadata:
            info["model_type"] = ModelSpec.from_json(m.metadata[keys.MODEL_SPEC]).model_type
        if keys.GRAPH in m.metadata:
            info["graph"] = json.loads(m.metadata[keys.GRAPH])
        files = keys.unpack_tokenizer(m.metadata)
        info["tokenizer"] = Tokenizer.from_files(files).info() if files else None
        info["signatures"] = {}
        for sig in m.signatures:
            tensors = m.subgraphs[sig.subgraph_index].tensors
            info["signatures"][sig.key] = {
                side: {n: [list(tensors[i].shape), tensors[i].dtype] for n, i in names.items()}
                for side, names in (("inputs", sig.inputs), ("outputs", sig.outputs))
            }
            info["signatures"][sig.key]["operators"] = len(
                m.subgraphs[sig.subgraph_index].operators
            )
        info["tensors"] = []
        return info


def describe(path: Path) -> dict[str, Any]:
    with read_model(path) as m:
        graph = m.is_graph
    if graph:
        return describe_graph(path)
    with Container.open(path) as c:
        meta = c.metadata
        spec = ModelSpec.from_json(meta[keys.MODEL_SPEC]) if keys.MODEL_SPEC in meta else None
        conversion = json.loads(meta[keys.CONVERSION]) if keys.CONVERSION in meta else {}
        files = keys.unpack_tokenizer(meta)
        info: dict[str, Any] = {
            "file": str(path),
            "file_bytes": Path(path).stat().st_size,
            "model_type": c.model_type,
            "backend": meta.get(keys.BACKEND, b"").decode() or None,
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
    return info
