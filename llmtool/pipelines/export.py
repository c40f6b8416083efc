"""`llmtool export`: converted container (.bin) -> TFLite graph with prefill/decode signatures.

The graph itself is built by the generic decoder (decoder.py); this module chooses the
signatures, carries the container's metadata over, and writes the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool.decoder import build_graph
from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.tflite_model import ModelWriter
from llmtool.spec import ModelSpec


@dataclass(frozen=True)
class ExportOptions:
    max_seq_len: int = 1024  # KV cache length S (clamped to the model's max positions)
    prefill_len: int = 64  # tokens per prefill call


def export_graph(
    container_path: str | Path,
    output_path: str | Path,
    options: ExportOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Write the prefill/decode graph of a converted container; returns a summary."""
    options = options or ExportOptions()
    report = progress or (lambda done, total, what: None)
    with Container.open(container_path) as c:
        if keys.MODEL_SPEC not in c.metadata:
            raise LlmToolError("not a converted model (no llmtool.model_spec)", container_path)
        spec = ModelSpec.from_json(c.metadata[keys.MODEL_SPEC])
        S = min(options.max_seq_len, spec.max_positions)
        if S < 2:
            raise LlmToolError(f"max sequence length must be at least 2 (got {S})")
        T = max(1, min(options.prefill_len, S))
        writer = ModelWriter(description=f"llmtool {spec.model_type} prefill/decode")
        signatures = [(f"prefill_{T}", T), ("decode", 1)]
        build_graph(c, spec, writer, signatures, S, report)
        for name, data in sorted(c.metadata.items()):
            writer.add_metadata(name, data)
        graph_info = {"prefill_len": T, "max_seq_len": S, "signatures": [k for k, _ in signatures]}
        writer.add_metadata(keys.GRAPH, json.dumps(graph_info, sort_keys=True).encode())
        report(len(signatures), len(signatures) + 1, "writing")
        output = Path(output_path)
        output.parent.mkdir(parents=True, exist_ok=True)
        writer.write(output)
        report(len(signatures) + 1, len(signatures) + 1, "done")
    return {
        "output": str(output),
        "output_bytes": output.stat().st_size,
        "model_type": spec.model_type,
        **graph_info,
    }
