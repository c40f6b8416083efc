"""A graph exported by litert-torch (the AI Edge Torch generative API) bundles and runs.

tests/data/litert_torch_tiny_llama.tflite is written by scripts/make_litert_torch_fixture.py
with litert-torch 0.10: signatures prefill_8, prefill_16 and decode, transposed KV caches, no
mask input (the graph masks from input_pos) and prefill signatures that return no logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmtool.config import BundleConfig
from llmtool.errors import LlmToolError
from llmtool.pipelines.bundle import bundle, check_graph
from llmtool.pipelines.run import LlmInference
from llmtool.runtime.compiled_engine import CompiledEngine
from llmtool.runtime.engine import Engine
from llmtool.runtime.inference import LlmInferenceOptions
from tests.litert_lm_runs import litert_lm_greedy

GRAPH = Path(__file__).parent / "data" / "litert_torch_tiny_llama.tflite"
PROMPT = "the quick brown fox"


def test_litert_torch_graph_bundles_and_runs(tiny_model, tmp_path):
    facts = check_graph(GRAPH)
    assert (facts.vocab_size, facts.kv_len, facts.prefill_lengths) == (320, 64, (8, 16))
    assert not facts.prefill_logits
    ids = [2, 17, 301, 5, 64, 64, 0, 319, 40, 41, 42]
    every = Engine(GRAPH, num_threads=1).prefill(ids, all_logits=True)  # decode, token by token
    for engine in (Engine(GRAPH, num_threads=1), CompiledEngine(GRAPH, num_threads=1)):
        np.testing.assert_allclose(engine.prefill(ids), every[-1], atol=1e-5)  # prefill + decode

    tokenizer = tiny_model("GEMMA_2B")  # any 320-token tokenizer: the weights are random
    pytest.importorskip("litert_lm")
    for kind in ("task", "litertlm"):
        out = tmp_path / f"tiny_llama.{kind}"
        bundle(
            BundleConfig(
                tflite_model=str(GRAPH), tokenizer_model=str(tokenizer), output_filename=str(out)
            )
        )
        options = LlmInferenceOptions(model_path=str(out), max_tokens=60, top_k=1)
        with LlmInference.create_from_options(options) as llm:
            llm.max_tokens = len(llm.prompt_ids(PROMPT)[0]) + 32
            ours = llm.generate(PROMPT)
        assert len(ours.token_ids) == 32
        theirs = litert_lm_greedy(out, PROMPT, 32)
        assert ours.text.split("\x00")[0].rstrip("\ufffd") == theirs, kind


def test_untransposed_kv_layout_is_refused(tmp_path):
    """litert-torch's default layout (K and V both [1, length, heads, dim]) loads in LiteRT-LM
    but runs one token at most; the bundler says so instead."""
    from llmtool.formats.tflite_model import ModelWriter, Signature, Subgraph, Tensor

    writer = ModelWriter()
    for key, t in (("prefill_8", 8), ("decode", 1)):
        tensors = [
            Tensor("tokens", (1, t), "int32"),
            Tensor("input_pos", (t,), "int32"),
            Tensor("kv_cache_k_0", (1, 64, 2, 16), "float32"),
            Tensor("kv_cache_v_0", (1, 64, 2, 16), "float32"),
            Tensor("logits", (1, t, 320), "float32"),
        ]
        index = writer.add_subgraph(Subgraph(key, tensors, [0, 1, 2, 3], [2, 3, 4], []))
        names = {x.name: i for i, x in enumerate(tensors)}
        writer.add_signature(
            Signature(
                key,
                index,
                {n: names[n] for n in ("tokens", "input_pos", "kv_cache_k_0", "kv_cache_v_0")},
                {n: names[n] for n in ("kv_cache_k_0", "kv_cache_v_0", "logits")},
            )
        )
    graph = tmp_path / "default_layout.tflite"
    writer.write(graph)
    with pytest.raises(LlmToolError, match="transposed KV cache layout"):
        check_graph(graph)
