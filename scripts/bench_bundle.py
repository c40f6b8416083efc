#!/usr/bin/env python3
"""Graph size against container size, decode speed, and bundling memory, on a big vocabulary.

The model is bench_convert.py's random Gemma-shaped checkpoint (Gemma-2B widths: hidden 2048,
FFN 16384, 8 heads, 1 kv head, head_dim 256; 4 layers) with Gemma's full vocabulary of 256000
and a tied embedding: ~965M parameters, 3.9 GB in float32, more than half of it the embedding.
For each precision it converts the checkpoint, exports the graph with this checkout and, with
--before SRC (an llmtool source tree, e.g. `git archive <commit> | tar -x -C SRC`), with that
version too; it reports file sizes and, side by side in one run, the decode speed of both
graphs (llmtool's engine, 16-token prompt, 32 greedy steps; median of --repeat runs, each in
its own process). Then it bundles the largest graph as .task and .litertlm and reports the
bundler's peak RSS (wait4). Files go to --work and are deleted as soon as they are measured.

    flock /work/coord/bench.lock python scripts/bench_bundle.py --work /tmp/bench-bundle \\
        [--before /tmp/llmtool-before] [--repeat 3] [--no-decode] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRECISIONS = {  # name: convert flags
    "float32": ["--quantization", "float32"],
    "float16": ["--quantization", "float16"],
    "int8": ["--quantization", "int8"],
    "int4": ["--quantization", "int4"],  # blockwise int4 layers, int8 embedding (the default)
    "int4-emb4": ["--quantization", "int4", "--embedding-quant-bits", "4"],
}

DECODE = r"""
import json, statistics, sys, time
import numpy as np
from llmtool.runtime.compiled_engine import CompiledEngine
engine = CompiledEngine(sys.argv[1], num_threads=2)
ids = [int(i) for i in np.random.default_rng(0).integers(4, 8000, 16)]
times = []
for _ in range(2):  # the first pass builds/loads XNNPACK's weight cache
    engine.reset()
    logits = engine.prefill(ids)
    t = time.perf_counter()
    for _ in range(32):
        logits = engine.decode(int(np.argmax(logits)))
    times.append(time.perf_counter() - t)
print("@@" + json.dumps({"decode_tok_s": 32 / times[-1]}))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) and stdout of one child process."""
    start = time.perf_counter()
    # cwd: not the checkout, whose llmtool/ `python -c` would import ahead of PYTHONPATH
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tempfile.gettempdir()
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out = proc.stdout.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024**2, out


def env_for(src: Path, cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(src),
        "LLMTOOL_CACHE_DIR": str(cache),
        "OMP_WAIT_POLICY": "passive",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--before", type=Path, help="llmtool sources of the version to compare")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument(
        "--no-decode", action="store_true", help="sizes and bundling memory only (no timing)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import bench_convert

    bench_convert.SHAPE["vocab"] = 256000
    work = args.work
    ckpt = bench_convert.make_checkpoint(work / "gemma-256k")
    results: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "load_before": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "precisions": {},
    }
    versions = {"after": ROOT} | ({"before": args.before} if args.before else {})
    biggest: tuple[int, Path] | None = None
    for name in args.precisions:
        container = work / f"{name}.bin"
        env = env_for(ROOT, work / "cache")
        run(
            [sys.executable, "-m", "llmtool", "convert", "--model-type", "GEMMA_2B",
             "--input-ckpt", str(ckpt), "--output-tflite-file", str(container),
             *PRECISIONS[name]],
            env,
        )  # fmt: skip
        row: dict = {"container_bytes": container.stat().st_size}
        graphs = {}
        for version, src in versions.items():
            graph = work / f"{name}-{version}.tflite"
            code = (
                "import sys; from llmtool.pipelines.export import export_graph, ExportOptions; "
                "export_graph(sys.argv[1], sys.argv[2], ExportOptions(max_seq_len=256))"
            )
            seconds, rss, _ = run(
                [sys.executable, "-c", code, str(container), str(graph)],
                env_for(src, work / f"cache-{version}"),
            )
            graphs[version] = graph
            row[f"{version}_graph_bytes"] = graph.stat().st_size
            row[f"{version}_ratio"] = round(graph.stat().st_size / row["container_bytes"], 3)
            row[f"{version}_export_seconds"] = round(seconds, 1)
        speeds: dict[str, list[float]] = {v: [] for v in graphs}
        for _ in range(0 if args.no_decode else args.repeat):  # interleaved: load hits both
            for version, graph in graphs.items():
                _, _, out = run(
                    [sys.executable, "-c", DECODE, str(graph)],
                    env_for(versions[version], work / f"cache-{version}"),
                )
                line = next(x for x in out.splitlines() if x.startswith("@@"))
                speeds[version].append(json.loads(line[2:])["decode_tok_s"])
        for version, values in speeds.items():
            if values:
                row[f"{version}_decode_tok_s"] = round(statistics.median(values), 2)
        results["precisions"][name] = row
        after = graphs["after"]
        if biggest is None or after.stat().st_size > biggest[0]:
            if biggest is not None:
                biggest[1].unlink()
            biggest = (after.stat().st_size, after)
        else:
            after.unlink()
        for version, graph in graphs.items():
            if version != "after":
                graph.unlink()
        for cache in work.glob("cache*"):
            subprocess.run(["rm", "-rf", str(cache)], check=True)
        container.unlink()
        if not args.json:
            print(name, json.dumps(row), flush=True)

    if biggest is not None:
        graph = biggest[1]
        results["bundle"] = {"graph_bytes": graph.stat().st_size}
        for kind in ("task", "litertlm"):
            out = work / f"bundle.{kind}"
            seconds, rss, _ = run(
                [sys.executable, "-m", "llmtool", "bundle", "--tflite-model", str(graph),
                 "--tokenizer-model", str(ckpt), "--output-filename", str(out), "--json"],
                env_for(ROOT, work / "cache"),
            )  # fmt: skip
            results["bundle"][kind] = {
                "seconds": round(seconds, 1),
                "peak_rss_gb": round(rss, 3),
                "bytes": out.stat().st_size,
            }
            out.unlink()
        graph.unlink()
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
