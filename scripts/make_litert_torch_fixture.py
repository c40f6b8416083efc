#!/usr/bin/env python3
"""Write tests/data/litert_torch_tiny_llama.tflite: a graph exported by litert-torch.

A tiny random model of litert-torch's TinyLlama architecture (2 layers, hidden 64, 4 heads of
16, 2 kv heads, vocabulary 320) converted by litert-torch's generative API
(`converter.convert_to_tflite`: signatures prefill_8, prefill_16 and decode, KV cache 64 in the
transposed layout LiteRT-LM needs, no quantization, the mask built inside the graph from
input_pos). Its conventions differ from llmtool's export: the prefill signatures return no
logits and there is no mask input. tests/test_litert_torch.py bundles and runs it.

litert-torch 0.10 imports TensorFlow's copy of the TFLite schema in one module (its LoRA
helper) and nothing else from TensorFlow; ai-edge-litert ships the same generated module, so it
stands in for that one import instead of installing TensorFlow.

    python scripts/make_litert_torch_fixture.py [OUTPUT.tflite]
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

OUTPUT = (
    Path(__file__).resolve().parent.parent / "tests" / "data" / "litert_torch_tiny_llama.tflite"
)


def _import_litert_torch_generative() -> None:
    import ai_edge_litert.schema_py_generated as schema
    import litert_torch  # noqa: F401  (loads torch's tracer before the stand-in exists)

    fake = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    for name in fake:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["tensorflow.lite.python.schema_py_generated"] = schema
    try:
        from litert_torch.generative.layers import lora  # noqa: F401
    finally:
        for name in ("tensorflow.lite.python.schema_py_generated", *reversed(fake)):
            sys.modules.pop(name, None)  # torch's tracer must not think TensorFlow is here


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    _import_litert_torch_generative()
    import torch
    from litert_torch.generative.examples.tiny_llama import tiny_llama
    from litert_torch.generative.layers import kv_cache
    from litert_torch.generative.utilities import converter, export_config

    config = tiny_llama.get_fake_model_config()
    attn = config.block_config(0).attn_config
    attn.num_heads, attn.head_dim, attn.num_query_groups = 4, 16, 2
    config.embedding_dim, config.vocab_size, config.max_seq_len = 64, 320, 64
    torch.manual_seed(0)
    model = tiny_llama.TinyLlama(config).eval()
    model.build_mask_cache(64)  # the graph masks from input_pos: no mask input
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    options = export_config.ExportConfig()
    options.kvcache_layout = kv_cache.KV_LAYOUT_TRANSPOSED
    with tempfile.TemporaryDirectory() as tmp:
        converter.convert_to_tflite(
            model,
            output_path=tmp,
            output_name_prefix="tiny_llama",
            prefill_seq_len=[8, 16],
            kv_cache_max_len=64,
            quantize="none",
            config=config,
            export_config=options,
        )
        (written,) = Path(tmp).glob("*.tflite")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(written.read_bytes())
    print(f"wrote {output} ({output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
