"""`llmtool evaluate`: perplexity through our runtime equals transformers' on the same windows."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import torch

from llmtool.pipelines.evaluate import evaluate
from llmtool.pipelines.export import ExportOptions, export_graph
from llmtool.tokenizer import Tokenizer, read_tokenizer_files
from tests.tiny_models import reference_logits

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed."
)


def test_perplexity_matches_transformers(tiny_model, converted, tmp_path):
    folder = tiny_model("GEMMA_2B")
    graph = tmp_path / "g.tflite"
    export_graph(converted("GEMMA_2B"), graph, ExportOptions(max_seq_len=32, prefill_len=8))
    text = tmp_path / "heldout.txt"
    text.write_text(TEXT)
    result = evaluate(str(graph), text, window=32)

    tok = Tokenizer.from_files(read_tokenizer_files(folder))
    ids = tok.encode(TEXT, add_bos=False)
    nll, count = 0.0, 0
    for i in range(0, len(ids), 31):
        w = [tok.bos_id] + ids[i : i + 31]
        if len(w) < 2:
            continue
        logp = torch.log_softmax(torch.from_numpy(reference_logits(folder, w)).double(), -1)
        nll -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
        count += len(w) - 1
    assert result["tokens_scored"] == count
    assert np.isclose(result["perplexity"], math.exp(nll / count), rtol=1e-4)


def test_cli_evaluate_json(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtool",
            "evaluate",
            "--model",
            str(converted("LLAMA", "int8")),
            "--text",
            str(text),
            "--window",
            "24",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["windows"] >= 2 and data["perplexity"] > 1


def test_reference_hf_folder_and_cli(tiny_model, converted, tmp_path, monkeypatch):
    """--reference with a Hugging Face folder runs transformers: our float32 graph agrees."""
    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    folder = tiny_model("LLAMA")
    result = evaluate(str(converted("LLAMA")), text, window=32, reference=str(folder))
    ref = result["reference"]
    assert ref["mean_kl"] < 1e-6 and ref["top1_agreement"] == 1.0
    assert np.isclose(ref["perplexity"], result["perplexity"], rtol=1e-4)
    assert ref["same_tokenization"] is True
    assert ref["greedy_tokens"] > 0 and ref["greedy_agreement"] == 1.0
    r = subprocess.run(
        [
            sys.executable, "-m", "llmtool", "evaluate", "--model",
            str(converted("LLAMA", "int4")), "--text", str(text), "--window", "32",
            "--reference", str(converted("LLAMA")), "--json",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ref = json.loads(r.stdout)["reference"]
    assert 0 < ref["mean_kl"] <= ref["max_kl"] and ref["top1_agreement"] < 1.0
