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

    python scripts/bench_startup.py --model model.bin --baseline main --src . --repeat 9
    python scripts/bench_startup.py --model model.bin --src /tmp/old --src . --repeat 9
    python scripts/bench_startup.py --model model.bin --baseline main --src . --phases

`--baseline REF` adds a `git archive` of that commit (first, as the reference). Every tree is
byte-compiled first, as an installed package is (without .pyc files each run would compile the
sources: ~0.04 s here). `--phases`: a timeline of warm runs, in time since the interpreter
started: when numpy, the run pipeline, the graph, the engine, the prefill and the first byte
are done (functions wrapped as their modules load; the run itself is the real command), and the
interpreter's own start (`python -c pass`, site and .pth files included).

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


# Runs `llmtool run` in-process (its real entry point) with a few functions wrapped as their
# modules load, printing when each milestone was reached (seconds since the code started).
_TRACE = r"""
import importlib.abc, importlib.util, json, os, sys, time
T0 = time.perf_counter()
marks = {}
WRAP = {"llmtool.pipelines.resolve": ["resolve_graph"], "llmtool.runtime.inference":
        ["open_engine"], "llmtool.runtime.engine": ["EngineBase.prefill"]}
DONE = {"numpy": "numpy imported", "llmtool.pipelines.run": "run pipeline imported"}

def wrap(module, qual):
    owner = module
    *path, name = qual.split(".")
    for part in path:
        owner = getattr(owner, part)
    fn = getattr(owner, name)
    def timed(*a, **k):
        try:
            return fn(*a, **k)
        finally:
            marks.setdefault(qual + " done", time.perf_counter() - T0)
    setattr(owner, name, timed)

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in WRAP and name not in DONE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            for qual in WRAP.get(name, ()):
                wrap(module, qual)
            if name in DONE:
                marks[DONE[name]] = time.perf_counter() - T0
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Finder())

class Out:
    def write(self, text):
        marks.setdefault("first byte", time.perf_counter() - T0)
        return len(text)
    def flush(self):
        pass
    def isatty(self):
        return False

sys.argv = ["llmtool", *ARGS]
sys.stdout = Out()
from ENTRY import main
try:
    main()
except SystemExit:
    pass
sys.stderr.write("@@MARKS@@" + json.dumps(marks) + "\n")
"""
MILESTONES = ["numpy imported", "run pipeline imported", "resolve_graph done", "open_engine done",
              "EngineBase.prefill done", "first byte"]  # fmt: skip


def phases(srcs: list[Path], model: Path, args: argparse.Namespace) -> None:
    """Timeline of warm runs, every tree interleaved (see the module docstring)."""
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in srcs}
    start: dict[str, list[float]] = {s.name: [] for s in srcs}
    run_args = ["run", "--model", str(model), "--prompt", args.prompt, "--max-tokens",
                str(args.max_tokens), "--top-k", "1",
                "--num-threads", str(args.threads)]  # fmt: skip
    code = _TRACE.replace("ARGS", repr(run_args))
    # The command's entry point in each tree (trees before the fast path have only cli.py; the
    # editable install's finder would find another tree's entry.py).
    entry = {s.name: "llmtool.entry" if (s / "llmtool/entry.py").is_file() else "llmtool.cli"
             for s in srcs}  # fmt: skip
    load_before = [round(x, 2) for x in os.getloadavg()]
    for _ in range(args.repeat):
        for src in srcs:
            cache = str(args.cache / src.name)
            env = dict(os.environ, PYTHONPATH=str(src), LLMTOOL_CACHE_DIR=cache)
            begin = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, cwd=args.cache)
            start[src.name].append(time.perf_counter() - begin)
            traced = code.replace("ENTRY", entry[src.name])
            proc = subprocess.run([sys.executable, "-c", traced], env=env, capture_output=True,
                                  text=True, check=True, cwd=args.cache)  # fmt: skip
            line = [x for x in proc.stderr.splitlines() if x.startswith("@@MARKS@@")][-1]
            runs[src.name].append(json.loads(line[len("@@MARKS@@") :]))
    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"warm `llmtool run` timeline, s since the interpreter started (median of "
          f"{args.repeat}); load average before {load_before}, after {load_after}")  # fmt: skip
    names = [s.name for s in srcs]
    print(f"{'milestone':26s}" + "".join(f"{n:>16s}" for n in names))
    cells = [f"{statistics.median(start[n]):16.3f}" for n in names]
    print(f"{'(python -c pass)':26s}" + "".join(cells))
    for milestone in MILESTONES:
        row = [[r[milestone] for r in runs[n] if milestone in r] for n in names]
        cells = [f"{statistics.median(v):16.3f}" if v else f"{'-':>16s}" for v in row]
        print(f"{milestone:26s}" + "".join(cells))


def prepare(src: Path) -> None:
    """Byte-compile a tree, as an installed package is."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmd = [sys.executable, "-m", "compileall", "-q", str(src / "llmtool")]
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a converted container (.bin)")
    ap.add_argument("--src", type=Path, action="append", help="source tree(s) to compare")
    ap.add_argument("--baseline", help="also a git commit of this repository (e.g. main), first")
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
    tmp = None
    if args.cache is None:
        tmp = args.cache = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        if args.baseline:
            base = args.cache / f"baseline-{args.baseline.replace('/', '-')}"
            base.mkdir(exist_ok=True)
            repo = Path(__file__).resolve().parent.parent
            archive = subprocess.run(["git", "-C", str(repo), "archive", args.baseline],
                                     capture_output=True, check=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            srcs.insert(0, base)
        if len({s.name for s in srcs}) != len(srcs):
            ap.error("source trees need distinct folder names (they name their caches)")
        for src in srcs:
            prepare(src)
        if args.phases:
            for src in srcs:
                first_byte(src, args.model, args.cache / src.name, args)  # warm the cache
            phases(srcs, args.model, args)
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
