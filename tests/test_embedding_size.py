"""Graphs as small as their container: the embedding stays in its stored dtype, stored once."""

from __future__ import annotations

import numpy as np
import pytest

from llmtool.config import ConversionConfig
from llmtool.decoder import _Decoder
from llmtool.formats.tflite_model import read_model
from llmtool.pipelines.convert import convert
from llmtool.pipelines.export import ExportOptions, export_graph
from llmtool.runtime.engine import Engine
from llmtool.spec import role_name

VARIANTS = {  # name: conversion settings of the embedding (and the tied output layer)
    "float32": dict(quantization="float32"),
    "float16": dict(quantization="float16"),
    "int8": dict(quantization="int8"),
    "int4": dict(quantization="int4", embedding_quant_bits=4, block_size=0),
    "int4-block32": dict(quantization="int4", embedding_quant_bits=4, block_size=32),
    "int8-asymmetric": dict(quantization="int8", is_symmetric=False),
}
IDS = [2, 17, 301, 5, 64, 64, 0, 319, 40, 41, 42]


def _float_copy_embed(self, g, ids, input_pos):
    """The previous export: rows gathered from a float32 copy of the table."""
    name = role_name("embed")
    T = g.shape(ids)[0]
    copy = g.const("ef:" + name, lambda: g.w.c.float(name))
    x = g.op(
        "GATHER", [copy, ids], (T, self.spec.hidden_size), options={"axis": 0, "batch_dims": 0}
    )
    return g.mul(x, g.scalar(np.float32(self.spec.embedding_scale)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_embedding_rows_in_stored_dtype(variant, tiny_model, tmp_path, monkeypatch):
    """Logits equal those of a graph gathering from a float32 copy, and the table is one
    buffer shared by the lookup and the tied output layer (tiny Gemma: tied, scaled)."""
    container = tmp_path / "m.bin"
    convert(
        ConversionConfig(
            input_ckpt=str(tiny_model("GEMMA_2B")),
            model_type="GEMMA_2B",
            output_tflite_file=str(container),
            **VARIANTS[variant],
        )
    )
    options = ExportOptions(max_seq_len=32, prefill_len=8)
    small, reference = tmp_path / "small.tflite", tmp_path / "reference.tflite"
    export_graph(container, small, options)
    monkeypatch.setattr(_Decoder, "embed", _float_copy_embed)
    export_graph(container, reference, options)

    def logits(graph):
        engine = Engine(graph, num_threads=1)
        return engine.prefill(IDS, all_logits=True)

    got, want = logits(small), logits(reference)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    name = role_name("embed")
    with read_model(small) as m:
        names = {t.name for sg in m.subgraphs for t in sg.tensors}
        assert "ef:" + name not in names or variant == "int8-asymmetric"
    if variant != "int8-asymmetric":  # asymmetric weights are widened for the FC anyway
        # no float32 copy of the table (320 x 64) beside the one the output layer reads
        assert small.stat().st_size <= reference.stat().st_size - 320 * 64 * 4
