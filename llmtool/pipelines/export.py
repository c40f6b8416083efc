"""`llmtool export`: converted container (.bin) -> TFLite graph with prefill/decode signatures.

The graph itself is built by the generic decoder (decoder.py); this module chooses the
signatures, carries the container's metadata over, and writes the file.

One graph serves every length up to its KV cache: besides `prefill_<T>` and `decode` over the
whole cache, it carries KV-bucket signatures `kv<L>_prefill_<T>` / `kv<L>_decode` that attend
over cache positions [0, L) only (see decoder.py), so attention costs what the conversation
holds, not what the cache could hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool.config import check_types
from llmtool.decoder import ACTIVATION_MODES, build_graph
from llmtool.errors import LlmToolError
from llmtool.files import refuse_overlap
from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.lora_file import LORA_ROLES, base_identity
from llmtool.formats.tflite_model import ModelWriter
from llmtool.pipelines.resolve import DEFAULT_MAX_SEQ_LEN
from llmtool.spec import ModelSpec

FIRST_BUCKET = 256  # the smallest KV bucket; each next one doubles, below the cache length
DEFAULT_PREFILL_LEN = 64


@dataclass(frozen=True)
class ExportOptions:
    # KV cache length S (clamped to the model's max positions); None: DEFAULT_MAX_SEQ_LEN
    max_seq_len: int | None = None
    prefill_len: int | None = None  # tokens per prefill call; None: 64, at most S
    kv_buckets: tuple[int, ...] | None = None  # attended lengths L < S; None: default_buckets
    lora_rank: int = 0  # > 0: LoRA inputs of this rank on the lora_targets projections
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o")  # roles (formats/lora_file.LORA_ROLES)
    # Short prefills in the first bucket only, of this length and 4x, 16x... it below the
    # prefill length (8 and 32 for 64): a short prompt costs one pass over the weights with
    # at most 4x padding, instead of a padded long chunk or one decode step per token. 0: none.
    short_prefill_len: int = 8
    # Layers fed [x; x - q(x)] so that XNNPACK's per-row int8 input quantization loses ~8
    # bits less (decoder.py): "auto" (int8-weight layers), "split" (all quantized), "single".
    activations: str = "auto"

    def validate(self) -> None:
        """Types (from the annotations) and the ranges that do not depend on the model; the
        rest (lengths against the model's context) are checked by export_graph."""
        check_types(self)
        if self.lora_rank < 0:
            raise LlmToolError(f"LoRA rank must be positive (got {self.lora_rank})")
        unknown = sorted(set(self.lora_targets) - set(LORA_ROLES))
        if unknown or not self.lora_targets:
            raise LlmToolError(
                f"unknown LoRA targets {unknown} (use some of {', '.join(LORA_ROLES)})"
            )
        if self.activations not in ACTIVATION_MODES:
            raise LlmToolError(
                f"unknown activations {self.activations!r} (use {', '.join(ACTIVATION_MODES)})"
            )
        if self.short_prefill_len < 0:
            raise LlmToolError(
                f"short prefill length must be at least 0 (got {self.short_prefill_len})"
            )


def default_buckets(seq_len: int) -> tuple[int, ...]:
    """FIRST_BUCKET, twice that, ... below seq_len: attention then reads at most twice the
    positions in use (or FIRST_BUCKET)."""
    out, length = [], FIRST_BUCKET
    while length < seq_len:
        out.append(length)
        length *= 2
    return tuple(out)


def plan_signatures(
    S: int, T: int, buckets: tuple[int, ...], short: int = 0
) -> list[tuple[str, int, int]]:
    """(name, tokens per call, attended cache length) of every signature of a graph."""
    signatures = [(f"prefill_{T}", T, S), ("decode", 1, S)]
    for i, L in enumerate(sorted(set(buckets))):
        if not 1 <= L < S:
            raise LlmToolError(f"KV bucket {L} must be between 1 and the cache length {S} - 1")
        length = short if i == 0 else 0
        while 1 < length < min(T, L):
            signatures.append((f"kv{L}_prefill_{length}", length, L))
            length *= 4
        if L >= T:
            signatures.append((f"kv{L}_prefill_{T}", T, L))
        signatures.append((f"kv{L}_decode", 1, L))
    return signatures


def export_graph(
    container_path: str | Path,
    output_path: str | Path,
    options: ExportOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Write the prefill/decode graph of a converted container; returns a summary."""
    options = options or ExportOptions()
    if not isinstance(options, ExportOptions):
        raise LlmToolError(f"options must be ExportOptions (got {type(options).__name__})")
    options.validate()
    report = progress or (lambda done, total, what: None)
    output = Path(output_path)
    refuse_overlap(output, [container_path])
    with Container.open(container_path) as c:
        if keys.MODEL_SPEC not in c.metadata:
            raise LlmToolError("not a converted model (no llmtool.model_spec)", container_path)
        spec = ModelSpec.from_json(c.metadata[keys.MODEL_SPEC], container_path)
        if options.max_seq_len is None:
            S = min(DEFAULT_MAX_SEQ_LEN, spec.default_context)
        else:
            S = min(options.max_seq_len, spec.max_positions)
        if S < 2:
            raise LlmToolError(f"max sequence length must be at least 2 (got {S})")
        T = min(DEFAULT_PREFILL_LEN, S) if options.prefill_len is None else options.prefill_len
        if not 1 <= T <= S:
            raise LlmToolError(
                f"prefill length must be between 1 and the KV cache length {S} (got {T})"
            )
        buckets = default_buckets(S) if options.kv_buckets is None else options.kv_buckets
        signatures = plan_signatures(S, T, buckets, options.short_prefill_len)
        rank, targets = options.lora_rank, _lora_targets(spec, options)
        writer = ModelWriter(description=f"llmtool {spec.model_type} prefill/decode")
        build_graph(c, spec, writer, signatures, S, report, rank, targets, options.activations)
        for name, data in sorted(c.metadata.items()):
            writer.add_metadata(name, data)
        writer.add_metadata(keys.BASE_IDENTITY, base_identity(c).encode())
        graph_info = {
            "prefill_len": T,
            "max_seq_len": S,
            "kv_buckets": sorted({L for _, _, L in signatures if L < S}),
            "signatures": [k for k, _, _ in signatures],
            "activations": options.activations,
        }
        if rank:
            graph_info |= {"lora_rank": rank, "lora_targets": list(targets)}
        writer.add_metadata(keys.GRAPH, json.dumps(graph_info, sort_keys=True).encode())
        report(len(signatures), len(signatures) + 1, "writing")
        writer.write(output, inputs=[container_path])
        report(len(signatures) + 1, len(signatures) + 1, "done")
    return {
        "output": str(output),
        "output_bytes": output.stat().st_size,
        "model_type": spec.model_type,
        **graph_info,
    }


def _lora_targets(spec: ModelSpec, options: ExportOptions) -> tuple[str, ...]:
    """The LoRA roles in decoder order; `gate` only exists in gated MLPs."""
    if not options.lora_rank:
        return ()
    return tuple(
        r for r in LORA_ROLES if r in options.lora_targets and (r != "gate" or spec.gated_mlp)
    )
