"""Decode time of a sliding-window model against the same model without a window, by position.

A random Mistral-shaped checkpoint (transformers, float32) with and without `sliding_window`,
converted to int8 and exported with one cache; decode steps are timed at several positions.
With the window read as gathered rows, the windowed model's decode cost stays flat while the
full-attention model's grows with the KV bucket it runs in.

    python scripts/bench_sliding_window.py --work /tmp/bench-window [--window 256] [--cache 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def build(folder: Path, window: int | None, cache: int) -> Path:
    import torch
    import transformers as tf

    from tests.conftest import add_tokenizer

    if (folder / "model.safetensors").is_file():
        return folder
    config = tf.MistralConfig(
        vocab_size=320, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=cache,
        sliding_window=window, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.MistralForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    add_tokenizer("LLAMA", folder)
    return folder


def graph(folder: Path, cache: int) -> Path:
    from llmtool.config import ConversionConfig
    from llmtool.pipelines.convert import convert
    from llmtool.pipelines.export import ExportOptions, export_graph

    out = folder / "int8.tflite"
    if not out.is_file():
        convert(
            ConversionConfig(
                input_ckpt=str(folder), model_type="LLAMA",
                output_tflite_file=str(folder / "int8.bin"), quantization="int8",
            )
        )  # fmt: skip
        export_graph(folder / "int8.bin", out, ExportOptions(max_seq_len=cache))
    return out


def decode_ms(path: Path, positions: list[int], steps: int) -> dict[int, float]:
    from llmtool.runtime.compiled_engine import CompiledEngine

    out = {}
    with CompiledEngine(path, num_threads=2, cache_dir=path.parent / "xnnpack") as engine:
        for pos in positions:
            engine.reset()
            engine.prefill([5] * pos)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.decode(7)
                times.append(time.perf_counter() - t0)
            out[pos] = 1000 * float(np.median(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--cache", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--positions", default="100,1000,4000,8000")
    args = ap.parse_args()
    positions = [int(p) for p in args.positions.split(",") if int(p) + args.steps < args.cache]
    os.environ.setdefault("LLMTOOL_CACHE_DIR", str(args.work / "cache"))
    rows = {}
    for name, window in (("sliding", args.window), ("full", None)):
        folder = build(args.work / name, window, args.cache)
        rows[name] = decode_ms(graph(folder, args.cache), positions, args.steps)
    print(json.dumps({"load": os.getloadavg()[0], "window": args.window, "ms_per_token": rows}))
    for pos in positions:
        s, f = rows["sliding"][pos], rows["full"][pos]
        print(f"position {pos:5d}: sliding {s:6.2f} ms  full {f:6.2f} ms  ratio {f / s:4.2f}x")


if __name__ == "__main__":
    main()
