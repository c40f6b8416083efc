#!/usr/bin/env python3
"""Benchmark LoRA at run time: decode speed with an adapter against without, and switch time.

The model is bench_convert.py's random Gemma-shaped checkpoint (Gemma-2B widths, 4 layers,
vocab 8000: ~457M parameters), converted by llmtool (int8 by default). Random PEFT-layout
adapters (adapter_config.json + adapter_model.safetensors, B != 0) are written for it and
converted with lora-convert: rank 8 and rank 16 on the attention projections, rank 16 on
every linear layer ("all-linear").

In one run, interleaved and repeated (medians quoted), each in its own process:
- decode tokens/s of the base graph (no LoRA inputs: what `llmtool run` uses without
  --lora-path) and of the LoRA graphs (rank-16 inputs; a rank-8 adapter is stored padded to
  16) with the adapter set, through `LlmInference` as `llmtool run --lora-path` runs it;
- the time of `LlmInference.set_lora(path)`: adapter A -> adapter B -> None -> A, i.e. reading
  the LoRA file and writing the graph's LoRA inputs (the base weights are untouched).

    python scripts/bench_lora.py --work /tmp/llmtool-bench-lora --prepare   # files, caches
    flock /work/coord/bench.lock python scripts/bench_lora.py --work /tmp/llmtool-bench-lora
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

HERE = Path(__file__).resolve().parent
RESULT_MARK = "@@RESULT@@"
ADAPTERS = {  # name -> (rank, PEFT modules)
    "attn_r8": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "attn_r16": (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "all_r16": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def write_adapter(ckpt: Path, out: Path, rank: int, modules: tuple[str, ...], seed: int) -> Path:
    """A random PEFT LoRA adapter folder for the checkpoint (lora_alpha = 2 * rank)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shapes = {k: v.shape for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        if parts[-1] != "weight" or parts[-2] not in modules:
            continue
        prefix = "base_model.model." + name.removesuffix(".weight")
        out_dim, in_dim = shape
        tensors[prefix + ".lora_A.weight"] = (rng.standard_normal((rank, in_dim)) * 0.02).astype(
            np.float32
        )
        tensors[prefix + ".lora_B.weight"] = (rng.standard_normal((out_dim, rank)) * 0.02).astype(
            np.float32
        )
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


# -- workers: each runs in its own process ----------------------------------------------------


def work_decode(model: str, lora: str | None, threads: int, decode_tokens: int) -> dict:
    import numpy as np

    from llmtool import LlmInference, LlmInferenceOptions

    options = LlmInferenceOptions(
        model_path=model, lora_path=lora, max_tokens=512, num_threads=threads
    )
    t0 = time.perf_counter()
    llm = LlmInference.create_from_options(options)
    load = time.perf_counter() - t0
    engine = llm.engine
    prompt = [int(x) for x in np.random.default_rng(0).integers(4, 8000, size=16)]
    logits = engine.prefill(prompt)  # warm-up
    for _ in range(2):
        logits = engine.decode(int(np.argmax(logits)))
    engine.reset()
    logits = engine.prefill(prompt)
    times = []
    for _ in range(decode_tokens):
        t = time.perf_counter()
        logits = engine.decode(int(np.argmax(logits)))
        times.append(time.perf_counter() - t)
    llm.close()
    return {
        "load_s": load,
        "decode_tps": 1 / statistics.median(times),
        "lora_rank": engine.lora_rank,
    }


def work_switch(model: str, loras: list[str], threads: int, rounds: int) -> dict:
    from llmtool import LlmInference, LlmInferenceOptions

    options = LlmInferenceOptions(
        model_path=model, lora_path=loras[0], max_tokens=512, num_threads=threads
    )
    llm = LlmInference.create_from_options(options)
    graph = llm.graph_path
    times: list[float] = []
    for _ in range(rounds):
        for path in [loras[1], None, loras[0]]:
            t = time.perf_counter()
            llm.set_lora(path)
            times.append(time.perf_counter() - t)
    assert llm.graph_path == graph, "a switch must not re-export"
    llm.close()
    return {"switch_ms": [1e3 * t for t in times]}


WORKERS = {"decode": work_decode, "switch": work_switch}


def run_worker(job: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise RuntimeError(f"worker {job['kind']} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        result = WORKERS[job.pop("kind")](**job)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtool-bench-lora"))
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--prepare", action="store_true", help="only write the files and caches, measure nothing"
    )
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import bench_convert

    from llmtool.config import ConversionConfig
    from llmtool.pipelines.convert import convert
    from llmtool.pipelines.lora_convert import lora_convert

    work = args.work
    os.environ.setdefault("LLMTOOL_CACHE_DIR", str(work / "cache"))
    ckpt = bench_convert.make_checkpoint(work / "ckpt")
    base = work / f"base_{args.quantization}.bin"
    if not base.is_file():
        convert(
            ConversionConfig(
                input_ckpt=str(ckpt),
                model_type="GEMMA_2B",
                output_tflite_file=str(base),
                quantization=args.quantization,
            )
        )
    loras = {}
    for i, (name, (rank, modules)) in enumerate(ADAPTERS.items()):
        folder = write_adapter(ckpt, work / f"adapter_{name}", rank, modules, seed=i)
        loras[name] = work / f"{name}.lora.bin"
        lora_convert(folder, base, loras[name])
    # A second rank-16 attention adapter to switch to.
    other = write_adapter(ckpt, work / "adapter_attn_r16_b", 16, ADAPTERS["attn_r16"][1], 9)
    lora_convert(other, base, work / "attn_r16_b.lora.bin")

    cases = {"base": None, **{k: str(v) for k, v in loras.items()}}
    for lora in cases.values():  # warm-up: export graphs, build XNNPACK weight caches
        run_worker(
            dict(kind="decode", model=str(base), lora=lora, threads=args.threads, decode_tokens=4)
        )
    if args.prepare:
        return
    loads = [os.getloadavg()[0]]
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, lora in cases.items():
            job = dict(
                kind="decode",
                model=str(base),
                lora=lora,
                threads=args.threads,
                decode_tokens=args.decode_tokens,
            )
            runs[name].append(run_worker(job)["decode_tps"])
        loads.append(os.getloadavg()[0])
    switch = run_worker(
        dict(
            kind="switch",
            model=str(base),
            loras=[str(loras["attn_r16"]), str(work / "attn_r16_b.lora.bin")],
            threads=args.threads,
            rounds=5,
        )
    )["switch_ms"]
    switch_all = run_worker(
        dict(
            kind="switch",
            model=str(base),
            loras=[str(loras["all_r16"]), str(loras["attn_r8"])],
            threads=args.threads,
            rounds=5,
        )
    )["switch_ms"]
    base_tps = statistics.median(runs["base"])
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_1min": [round(x, 2) for x in loads],
        "quantization": args.quantization,
        "threads": args.threads,
        "decode_tps_median": {k: round(statistics.median(v), 2) for k, v in runs.items()},
        "decode_ratio_vs_base": {
            k: round(statistics.median(v) / base_tps, 3) for k, v in runs.items()
        },
        "decode_tps_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "switch_ms_median_attn_r16": round(statistics.median(switch), 2),
        "switch_ms_max_attn_r16": round(max(switch), 2),
        "switch_ms_median_all_r16": round(statistics.median(switch_all), 2),
        "switch_ms_max_all_r16": round(max(switch_all), 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
