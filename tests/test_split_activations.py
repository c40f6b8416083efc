"""Split activations (decoder.py): quantized layers fed [x; x - q(x)], q being XNNPACK's
per-row int8 quantization of a layer's input, so the two int8 rows carry ~16 bits."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmtool.cli import app
from llmtool.config import BundleConfig
from llmtool.errors import LlmToolError
from llmtool.formats.tflite_model import read_model
from llmtool.pipelines.bundle import bundle
from llmtool.pipelines.evaluate import evaluate
from llmtool.pipelines.export import ExportOptions, export_graph
from llmtool.pipelines.quantize import QuantizeOptions, quantize_model
from llmtool.pipelines.resolve import default_model_path
from tests.litert_lm_runs import litert_lm_greedy
from tests.test_bundle import NEW_TOKENS, PROMPT, ours
from tests.test_quantize import EXCERPT, _float_copy


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "cache"))


def _split_layers(graph: Path) -> tuple[int, int]:
    """(FULLY_CONNECTED ops fed a CONCATENATION, all FULLY_CONNECTED ops) of `decode`."""
    with read_model(graph) as model:
        sg = model.subgraphs[model.signature("decode").subgraph_index]
        ops = list(sg.operators)
    made_by = {out: op.op for op in ops for out in op.outputs}
    fcs = [op for op in ops if op.op == "FULLY_CONNECTED"]
    return sum(made_by.get(op.inputs[0]) == "CONCATENATION" for op in fcs), len(fcs)


def test_split_activations_remove_the_int8_input_error(tmp_path):
    """The trained default model, dequantized, is the reference: its weights already lie on
    the int8 grid, so dynamic-int8's whole error is XNNPACK's int8 rounding of layer inputs,
    and split activations must remove it."""
    ref = _float_copy(default_model_path(), tmp_path / "f32.bin")
    int8 = tmp_path / "int8.bin"
    quantize_model(ref, int8, QuantizeOptions())
    kl, top1 = {}, {}
    for mode in ("single", "auto"):
        graph = tmp_path / f"{mode}.tflite"
        export_graph(int8, graph, ExportOptions(max_seq_len=256, activations=mode))
        split, total = _split_layers(graph)
        assert split == (total if mode == "auto" else 0), (mode, split, total)
        r = evaluate(str(graph), EXCERPT, window=256, reference=str(ref))["reference"]
        kl[mode], top1[mode] = r["mean_kl"], r["top1_agreement"]
    assert kl["single"] > 1e-5, kl  # measured 6.9e-5 -> 1.1e-9
    assert kl["auto"] < 1e-7, kl
    assert top1["auto"] >= top1["single"]


def test_auto_splits_int8_layers_only(converted, tmp_path):
    """int4 layers keep one pass under auto (XNNPACK's blockwise kernels slow down with two
    rows); the 8-bit tied output layer is split. "split" splits every quantized layer."""
    src = converted("LLAMA")
    int4 = tmp_path / "int4.bin"
    quantize_model(src, int4, QuantizeOptions(mode="int4"))
    counts = {}
    for mode in ("auto", "split"):
        graph = tmp_path / f"int4-{mode}.tflite"
        export_graph(int4, graph, ExportOptions(max_seq_len=64, activations=mode))
        counts[mode] = _split_layers(graph)
    assert counts["auto"][0] == 1 < counts["split"][0] == counts["split"][1], counts
    text = tmp_path / "t.txt"
    text.write_text(EXCERPT.read_text()[:400])
    r = evaluate(str(graph), text, window=32, max_windows=1, reference=str(src))["reference"]
    assert r["mean_kl"] < 0.2 and r["same_tokenization"]


def test_float_graphs_are_not_split(converted, tmp_path):
    graph = tmp_path / "f32.tflite"
    export_graph(converted("LLAMA"), graph, ExportOptions(max_seq_len=32, activations="split"))
    assert _split_layers(graph)[0] == 0


def test_unknown_activations_mode(converted, tmp_path):
    out = tmp_path / "g.tflite"
    with pytest.raises(LlmToolError, match="unknown activations 'half'"):
        export_graph(converted("LLAMA"), out, ExportOptions(activations="half"))
    result = CliRunner().invoke(
        app, ["export", "--model", str(converted("LLAMA")), "-o", str(out), "--activations", "x"]
    )
    assert result.exit_code != 0
    assert "unknown activations 'x'" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_litert_lm_runs_split_graphs(converted, tiny_model, tmp_path):
    """Google's LiteRT-LM runs a split int8 graph and answers as llmtool does."""
    graph = tmp_path / "int8.tflite"
    export_graph(converted("LLAMA", "int8"), graph, ExportOptions(max_seq_len=64, prefill_len=8))
    assert _split_layers(graph)[0] > 0
    litertlm = tmp_path / "int8.litertlm"
    bundle(
        BundleConfig(
            tflite_model=str(graph),
            tokenizer_model=str(tiny_model("LLAMA")),
            output_filename=str(litertlm),
        )
    )
    reference = ours(litertlm)
    assert len(reference["token_ids"]) >= 8
    text = reference["text"].split("\x00")[0].rstrip("\ufffd")
    assert litert_lm_greedy(litertlm, PROMPT, NEW_TOKENS) == text
