#!/usr/bin/env python3
"""Micro-benchmark: the attention part of a decode step, in several TFLite formulations.

Builds attention-only graphs (no weights) for a model shape: per layer, the new K/V row is
written into float32 caches [1,KVH,S,D] / [1,KVH,D,S] in place (DYNAMIC_UPDATE_SLICE, caches
bound as both input and output TensorBuffers, as the `run` engine binds them), the caches are
SLICEd to the signature's bucket [0, L), then scores, mask, softmax and probs x V, as:

- `bmm`: the caches as BATCH_MATMUL's right operand (scores = q K^T, ctx = probs V^T): what
  decoder.py exports. XNNPACK packs a non-constant right operand on every call: the bucket is
  read, written packed, and read again;
- `lhs`: the caches as the left operand (scores^T = K q^T [KVH, L, G*T], ctx^T = V probs^T
  [KVH, D, G*T]), the small results transposed back: only q and probs are packed. The same
  dot products, the same cache layouts. Faster here with heads of 128 and 256, slower with 64,
  but whole-model decode did not follow reliably (docs/BENCHMARKS.md), so it is not exported;
- suffix `_full`: a cache of exactly L positions (no SLICE: what the bucket slice costs);
  suffix `_nodus`: no cache update; `dus_only`: only the cache updates.

All variants of a shape and bucket run interleaved in one process (CompiledModel, XNNPACK);
the time quoted is the median CPU time per call (process time, all threads): on a shared,
loaded machine that is the call's own work, not its wait for a core, so use 1 thread (with
more threads the spinning of idle workers is counted too). Ratios are against the first
variant. Run it under the benchmark lock:

    flock /work/coord/bench.lock python scripts/bench_attention.py --shapes gemma,narrow \
        --buckets 256,1024,4096 --variants bmm,lhs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtool.decoder import _Subgraph, _Weights  # noqa: E402
from llmtool.formats.tflite_model import ModelWriter, Signature, Subgraph  # noqa: E402

SHAPES = {  # layers, query heads, kv heads, head dim
    "gemma": (4, 8, 1, 256),
    "narrow": (30, 9, 3, 64),
    "llama3b": (28, 24, 8, 128),  # Llama 3.2 3B's attention
    "llama1b": (16, 32, 8, 64),  # Llama 3.2 1B's attention
}
VARIANTS = ("bmm", "lhs", "lhs_full")


def attention(g: _Subgraph, variant: str, layer: int, shape: tuple, T: int, S: int, L: int,
              q: int, kv: int, mask: int, k_start: int, v_start: int) -> int:
    _, NH, KVH, D = shape
    G = NH // KVH
    k_cache = g.input(f"kv_cache_k_{layer}", (1, KVH, S, D))
    v_cache = g.input(f"kv_cache_v_{layer}", (1, KVH, D, S))
    k_new = g.reshape(g.transpose(kv, (1, 0, 2)), (1, KVH, T, D))
    v_new = g.reshape(g.transpose(kv, (1, 2, 0)), (1, KVH, D, T))
    if "nodus" in variant:  # attention over the caches as given (no update)
        k_all, v_all = k_cache, v_cache
    else:
        k_all = g.op("DYNAMIC_UPDATE_SLICE", [k_cache, k_new, k_start], (1, KVH, S, D))
        v_all = g.op("DYNAMIC_UPDATE_SLICE", [v_cache, v_new, v_start], (1, KVH, D, S))
        g.outputs[f"kv_cache_k_{layer}"] = k_all
        g.outputs[f"kv_cache_v_{layer}"] = v_all
    if variant == "dus_only":
        return g.reshape(g.mul(q, g.scalar(1.0)), (T, NH * D))
    if L != S:
        k_all = g.slice(k_all, (0, 0, 0, 0), (1, KVH, L, D))
        v_all = g.slice(v_all, (0, 0, 0, 0), (1, KVH, D, L))
    qg = g.reshape(g.transpose(q, (1, 0, 2)), (KVH, G * T, D))
    k3, v3 = g.reshape(k_all, (KVH, L, D)), g.reshape(v_all, (KVH, D, L))
    if variant.startswith("bmm"):
        scores = g.batch_matmul(qg, k3, adj_y=True)  # [KVH, G*T, L]
    else:
        scores = g.transpose(g.batch_matmul(k3, qg, adj_y=True), (0, 2, 1))
    scores = g.add(g.reshape(scores, (NH, T, L)), mask)
    probs = g.op("SOFTMAX", [scores], (NH, T, L), options={"beta": 1.0})
    probs = g.reshape(probs, (KVH, G * T, L))
    if variant.startswith("bmm"):
        ctx = g.batch_matmul(probs, v3, adj_y=True)  # [KVH, G*T, D]
    else:
        ctx = g.transpose(g.batch_matmul(v3, probs, adj_y=True), (0, 2, 1))
    heads = g.transpose(g.reshape(ctx, (NH, T, D)), (1, 0, 2))
    return g.reshape(heads, (T, NH * D))


def build(path: Path, variant: str, shape: tuple, T: int, S: int, L: int) -> None:
    layers, NH, KVH, D = shape
    writer = ModelWriter()
    g = _Subgraph(_Weights(None, writer))  # no container: constants only
    q = g.input("q", (T, NH, D))
    kv = g.input("kv", (T, KVH, D))
    pos = g.input("input_pos", (T,), "int32")
    mask = g.reshape(g.input("mask", (1, 1, T, L)), (1, T, L))
    pos0 = g.slice(pos, (0,), (1,))
    k_start = g.concat([g.ints([0, 0]), pos0, g.ints([0])], axis=0)
    v_start = g.concat([g.ints([0, 0, 0]), pos0], axis=0)
    out = None
    for layer in range(layers):
        y = attention(g, variant, layer, shape, T, S, L, q, kv, mask, k_start, v_start)
        out = y if out is None else g.add(out, y)
    g.outputs["out"] = out
    index = writer.add_subgraph(
        Subgraph("main", g.tensors, list(g.inputs.values()), list(g.outputs.values()), g.ops)
    )
    writer.add_signature(Signature("main", index, dict(g.inputs), dict(g.outputs)))
    writer.write(path)


class Runner:
    def __init__(self, path: Path, threads: int, pos: int, T: int, L: int, seed: int = 0):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.environment import Environment
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options

        options = Options(HardwareAccelerator.CPU, cpu_options=CpuOptions(num_threads=threads))
        self.env = Environment.create()
        self.model = CompiledModel.from_file(str(path), environment=self.env, options=options)
        details = self.model.get_input_tensor_details("main")
        rng = np.random.default_rng(seed)
        self.ins, self.outs = {}, {}
        outs_known = self.model.get_output_tensor_details("main")
        for name, d in details.items():
            buf = self.model.create_input_buffer_by_name("main", name)
            shp = tuple(int(s) for s in d["shape"])
            if name == "input_pos":
                buf.write(np.arange(pos, pos + T, dtype=np.int32))
            elif name == "mask":
                keys = np.arange(L)[None, :]
                rows = np.arange(pos, pos + T)[:, None]
                buf.write(np.where(keys > rows, np.float32(-1e9), np.float32(0)))
            else:
                buf.write(rng.standard_normal(shp, dtype=np.float32))
            self.ins[name] = buf
            if name.startswith("kv_cache") and name in outs_known:
                self.outs[name] = buf
        self.outs["out"] = self.model.create_output_buffer_by_name("main", "out")
        self.out_count = int(np.prod(self.model.get_output_tensor_details("main")["out"]["shape"]))

    def run(self) -> float:
        """CPU seconds of one call (this process's, all threads): on a machine shared with
        other work this counts the call's own work, not the time it waited for a core."""
        t0 = time.process_time()
        self.model.run_by_name("main", self.ins, self.outs)
        return time.process_time() - t0

    def result(self) -> np.ndarray:
        return self.outs["out"].read(self.out_count, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="gemma,narrow")
    ap.add_argument("--buckets", default="256,4096", help="attended lengths L")
    ap.add_argument("--context", type=int, default=8192, help="cache length S")
    ap.add_argument("--tokens", type=int, default=1, help="T, tokens per call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=30, help="timed calls per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    variants = args.variants.split(",")
    T, S = args.tokens, args.context
    report = {"load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
              time.gmtime()), "threads": args.threads, "tokens": T, "context": S,
              "results": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for shape_name in args.shapes.split(","):
            shape = SHAPES[shape_name]
            for L in (int(x) for x in args.buckets.split(",")):
                pos = L - 96 if L > 256 else min(100, L - T)  # where `run` would use L
                runners = {}
                for v in variants:
                    path = Path(tmp) / f"{shape_name}-{v}-{L}.tflite"
                    build(path, v, shape, T, L if "full" in v else S, L)
                    runners[v] = Runner(path, args.threads, pos, T, L)
                # Same inputs (same seed) -> the same output up to float rounding.
                outs = {v: (r.run(), r.result())[1] for v, r in runners.items()}
                ref = outs[variants[0]]
                diff = {v: float(np.max(np.abs(o - ref)) / np.max(np.abs(ref))) for v, o in
                        outs.items()}  # fmt: skip
                times: dict[str, list[float]] = {v: [] for v in variants}
                for _ in range(args.rounds):
                    for v, r in runners.items():
                        r.run()
                        times[v].append(statistics.median(r.run() for _ in range(args.calls)))
                med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
                base = med[variants[0]]
                key = f"{shape_name} L={L} pos={pos}"
                report["results"][key] = {
                    v: {"ms": round(med[v], 3), "speedup": round(base / med[v], 2),
                        "rel_diff": diff[v]} for v in variants
                }  # fmt: skip
                print(key, "  ".join(
                    f"{v} {med[v]:.2f} ms ({base / med[v]:.2f}x, diff {diff[v]:.1e})"
                    for v in variants), flush=True)  # fmt: skip
                del runners
    report["load_after"] = os.getloadavg()
    print("load before", report["load_before"], "after", report["load_after"])
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
