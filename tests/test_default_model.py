"""The embedded default model: shipped, used without --model, and it has learned English."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llmtool.pipelines.evaluate import evaluate
from llmtool.pipelines.resolve import DEFAULT_MODEL

EXCERPT = Path(__file__).parent / "data" / "heldout_excerpt.txt"  # from a held-out chapter


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "cache"))


def llmtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtool", *args], capture_output=True,
                          text=True, timeout=300)


def test_shipped_and_described():
    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.stat().st_size <= 25 * 1024 * 1024
    r = llmtool("models", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model_type"] == "LLAMA"
    assert info["quant_bits"] == {"attention": 8, "feedforward": 8, "embedding": 8}
    assert info["card"]["sha256"] == info["sha256"]
    assert info["tokenizer"]["kind"] == "sentencepiece"
    r = llmtool("inspect", "--default", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["parameters"] == info["parameters"]


def test_run_without_model_is_seeded_english():
    args = ["run", "--prompt", "Once upon a time", "--max-tokens", "60", "--json"]
    first = json.loads(llmtool(*args).stdout)
    again = json.loads(llmtool(*args).stdout)
    other = json.loads(llmtool(*args, "--random-seed", "5").stdout)
    assert first["text"] == again["text"] and first["text"] != other["text"]
    words = first["text"].split()
    assert len(words) >= 10
    assert sum(w.strip(".,;:!?\"'()-").isalpha() for w in words) / len(words) > 0.8


def test_heldout_perplexity_shows_learning(tmp_path):
    text = EXCERPT.read_text()
    ppl = evaluate(None, EXCERPT, window=256)["perplexity"]
    words = text.split()
    random.Random(0).shuffle(words)
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text(" ".join(words))
    control = evaluate(None, shuffled, window=256)["perplexity"]
    assert ppl < 150, ppl  # the model card reports ~80 on the whole held-out split
    assert control > 2 * ppl, (ppl, control)
