"""`llmtool inspect`: what a converted file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.architectures import ModelSpec
from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.llm_params import decode_llm_parameters
from llmtool.tokenizer import Tokenizer

DEFAULT_CARD = Path(__file__).resolve().parent.parent / "data" / "default_model.json"


def describe_default() -> dict[str, Any]:
    """The embedded default model: where it is, what it is, and its model card facts."""
    from llmtool.runtime.graphs import default_model_path, file_digest

    path = default_model_path()
    info = describe(path)
    info["sha256"] = file_digest(path)
    info["card"] = json.loads(DEFAULT_CARD.read_text()) if DEFAULT_CARD.is_file() else None
    return info


def describe(path: Path) -> dict[str, Any]:
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
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
                for t in c
            ],
        }
    return info
