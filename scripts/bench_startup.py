#!/usr/bin/env python3
"""Time to first byte of `llmtool run`: whole process, warm and cold, one or more source trees.

Each measurement is a fresh `python -m llmtool run` process (what a user types), timed from
spawn to the first byte on its stdout (a pipe: nothing is echoed, so the first byte is the first
generated text), with its CPU time (user + system, from wait4). Several source trees
(`--src DIR`, e.g. a checkout of main before a change and the working tree after it) run
interleaved, repeated, medians quoted, so load changes hit every tree alike.

- warm: the graph and XNNPACK cache already exist (one untimed run first);
- cold: first use of the container: an empty cache directory each time (export + weight
  packing), timed to the first byte likewise.

    python scripts/bench_startup.py --model model.bin --src /tmp/old --src . --repeat 9
    python scripts/bench_startup.py --model model.bin --src . --phases   # in-process breakdown

The model is any converted container, e.g. bench_decode.py's Gemma-shaped int8 one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def first_byte(src: Path, model: Path, cache: Path, args: argparse.Namespace) -> dict[str, float]:
    """Spawn one `llmtool run`; wall seconds to its first stdout byte and to its exit, CPU s."""
    env = dict(os.environ, PYTHONPATH=str(src), LLMTOOL_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "llmtool", "run", "--model", str(model), "--prompt",
           args.prompt, "--max-tokens", str(args.max_tokens), "--top-k", "1",
           "--num-threads", str(args.threads)]  # fmt: skip
    start = time.perf_counter()
    # cwd: not a source tree (`python -m` puts the working directory first on sys.path)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cache.parent
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    ttfb = time.perf_counter() - start
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    total = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0 or not first:
        raise SystemExit(f"{' '.join(cmd)} failed (src {src})")
    return {"ttfb_s": ttfb, "total_s": total, "cpu_s": usage.ru_utime + usage.ru_stime}


def phases(src: Path, model: Path, args: argparse.Namespace) -> None:
    """Wall and CPU time of each step of a warm run, measured in a child process."""
    code = f"""
import time, json, os
t = [(time.perf_counter(), time.process_time())]
def mark(): t.append((time.perf_counter(), time.process_time()))
import llmtool.cli
mark()
from llmtool.pipelines.resolve import resolve_graph
from llmtool.runtime.inference import open_engine
mark()
graph, tok = resolve_graph({str(model)!r}, {args.max_tokens})
mark()
engine = open_engine(graph, {args.threads})
mark()
ids = tok.encode({args.prompt!r})
logits = engine.prefill(ids)
mark()
names = ["import llmtool.cli", "import resolve + runtime", "resolve (metadata, tokenizer)",
         "engine load", "encode + prefill"]
print(json.dumps([(n, b[0] - a[0], b[1] - a[1]) for n, a, b in zip(names, t, t[1:])]))
"""
    env = dict(os.environ, PYTHONPATH=str(src), LLMTOOL_CACHE_DIR=str(args.cache / src.name))
    rows: list[list[tuple[str, float, float]]] = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=args.cache).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'step':32s} {'wall s':>8s} {'CPU s':>8s}   (median of {args.repeat}, {src})")
    for i, (name, _, _) in enumerate(rows[0]):
        wall = statistics.median(r[i][1] for r in rows)
        cpu = statistics.median(r[i][2] for r in rows)
        print(f"{name:32s} {wall:8.3f} {cpu:8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a converted container (.bin)")
    ap.add_argument("--src", type=Path, action="append", help="source tree(s) to compare")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--cold", type=int, default=1, help="cold runs per tree (0: none)")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, help="cache folder (default: a temporary one)")
    ap.add_argument("--phases", action="store_true", help="in-process breakdown of a warm run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    srcs = [s.resolve() for s in (args.src or [Path(__file__).resolve().parent.parent])]
    if len({s.name for s in srcs}) != len(srcs):
        ap.error("--src folders need distinct names (they name their caches)")
    tmp = None
    if args.cache is None:
        tmp = args.cache = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        if args.phases:
            for src in srcs:
                first_byte(src, args.model, args.cache / src.name, args)  # warm the cache
                phases(src, args.model, args)
            return
        report = measure(srcs, args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"llmtool run, {args.model.name}, prompt {args.prompt!r}, {args.threads} threads; "
          f"load average before {report['load_before']}, after {report['load_after']}")  # fmt: skip
    print(f"{'source':24s} {'case':5s} {'first byte s':>12s} {'CPU s':>7s} {'exit s':>7s}  runs")
    for name, r in report["results"].items():
        src, case = name.rsplit(" ", 1)
        print(f"{src:24s} {case:5s} {r['ttfb_s']:12.3f} {r['cpu_s']:7.3f} {r['total_s']:7.3f}"
              f"  {r['n']}")  # fmt: skip


def measure(srcs: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict[str, float]]] = {}
    for src in srcs:  # untimed: export the graph and pack the weights once
        first_byte(src, args.model, args.cache / src.name, args)
    for _ in range(args.repeat):
        for src in srcs:
            runs.setdefault(f"{src.name} warm", []).append(
                first_byte(src, args.model, args.cache / src.name, args)
            )
    for i in range(args.cold):
        for src in srcs:
            cold = args.cache / f"{src.name}-cold-{i}"
            runs.setdefault(f"{src.name} cold", []).append(first_byte(src, args.model, cold, args))
            shutil.rmtree(cold, ignore_errors=True)
    results = {
        name: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} | {"n": len(rs)}
        for name, rs in runs.items()
    }
    return {"load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
            "results": results}  # fmt: skip


if __name__ == "__main__":
    main()
