#!/usr/bin/env python3
"""Benchmark `llmtool convert`: wall time and peak RSS on a ~1.8 GB Gemma-shaped checkpoint.

The checkpoint has Gemma-2B's widths (hidden 2048, FFN 16384, 8 heads, 1 kv head, head_dim 256)
with 4 layers and a vocabulary of 8000: float32 random weights, written once to --work.
Each conversion runs in its own process so its peak RSS can be read from wait4(). When
--llama-cpp points to a llama.cpp checkout, its convert_hf_to_gguf.py runs on the same folder
in the same session (f32 and q8_0), so the numbers are ratios measured side by side.

    python scripts/bench_convert.py --work /tmp/bench-convert [--llama-cpp ~/llama.cpp] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = dict(vocab=8000, hidden=2048, ffn=16384, layers=4, heads=8, kv_heads=1, head_dim=256)


def make_checkpoint(folder: Path) -> Path:
    """Write the random Gemma-shaped checkpoint (once) with a SentencePiece tokenizer."""
    if (folder / "model.safetensors").is_file():
        if not (folder / "tokenizer.model").is_file():
            _tokenizer(folder, SHAPE["vocab"])
        return folder
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    s = SHAPE
    rng = np.random.default_rng(0)
    h, f, d = s["hidden"], s["ffn"], s["head_dim"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(s["vocab"], h), "model.norm.weight": w(h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": w(h),
            p + "post_attention_layernorm.weight": w(h),
            p + "self_attn.q_proj.weight": w(s["heads"] * d, h),
            p + "self_attn.k_proj.weight": w(s["kv_heads"] * d, h),
            p + "self_attn.v_proj.weight": w(s["kv_heads"] * d, h),
            p + "self_attn.o_proj.weight": w(h, s["heads"] * d),
            p + "mlp.gate_proj.weight": w(f, h),
            p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
        }
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "vocab_size": s["vocab"],
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": d,
        "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer(folder, s["vocab"])
    return folder


def _tokenizer(folder: Path, vocab: int) -> None:
    import io

    import sentencepiece as spm

    words = [f"w{i}" for i in range(20000)]
    text = [" ".join(words[j : j + 12]) for j in range(0, len(words), 12)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=vocab,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=True,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            }
        )
    )


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtool-bench-convert"))
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp checkout with convert_hf_to_gguf.py")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    ckpt = make_checkpoint(args.work / "gemma-shaped")
    size_gb = (ckpt / "model.safetensors").stat().st_size / 1e9
    jobs: dict[str, list[str]] = {}
    for q in ("float32", "int8", "int4"):
        out = args.work / f"out-{q}.bin"
        jobs[f"llmtool {q}"] = [
            sys.executable,
            "-m",
            "llmtool",
            "convert",
            "--model-type",
            "GEMMA_2B",
            "--input-ckpt",
            str(ckpt),
            "--output-tflite-file",
            str(out),
            "--quantization",
            q,
            "--json",
        ]
    script = args.llama_cpp / "convert_hf_to_gguf.py" if args.llama_cpp else None
    if script and script.is_file():
        for q in ("f32", "q8_0"):
            jobs[f"llama.cpp {q}"] = [
                sys.executable,
                str(script),
                str(ckpt),
                "--outtype",
                q,
                "--outfile",
                str(args.work / f"out-{q}.gguf"),
            ]
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in jobs}
    for _ in range(args.repeat):  # interleaved, so load changes hit every tool alike
        for name, cmd in jobs.items():
            runs[name].append(timed(cmd))
    for name, values in runs.items():
        results[name] = {
            "seconds_median": round(statistics.median(v[0] for v in values), 2),
            "peak_rss_gb_max": round(max(v[1] for v in values), 3),
            "seconds_all": [round(v[0], 2) for v in values],
        }
    report = {
        "checkpoint_gb": round(size_gb, 3),
        "shape": SHAPE,
        "repeat": args.repeat,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load_average": os.getloadavg(),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"checkpoint {size_gb:.2f} GB, load average {os.getloadavg()[0]:.2f}")
    base = results.get("llama.cpp f32", {}).get("seconds_median")
    for name, r in results.items():
        ratio = f"  ({r['seconds_median'] / base:.2f}x llama.cpp f32)" if base else ""
        print(
            f"{name:18s} {r['seconds_median']:7.2f} s  peak RSS {r['peak_rss_gb_max']:.2f} GB"
            f"{ratio}"
        )


if __name__ == "__main__":
    main()
