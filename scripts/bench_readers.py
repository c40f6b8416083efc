#!/usr/bin/env python3
"""Benchmark llmtool's TFLite reader: graph parse time and fuzz cases per second.

Side by side, for this checkout and (with --baseline) another one, each measurement in its own
process, the two trees alternating, medians of --repeat runs:

- open: `read_model(graph)` (the tables checked; what `run` pays before LiteRT loads the graph);
- all: open, then every tensor and operator unpacked (what quantize and bundle touch);
- inspect: `llmtool inspect`'s `describe(graph)` in-process (graph, tokenizer, signatures);
- fuzz: cases per second of tests/fuzz_readers.py (this checkout's driver, the tree's readers)
  on each kind of file: container (.bin), graph (.tflite), .task, .litertlm;
- with --cli: wall time of `llmtool inspect GRAPH` and of `llmtool run --model GRAPH` (a short
  prompt, 16 tokens in all, warm XNNPACK cache) for the big graphs, as a user sees them.

The small files are the fuzz test's (a tiny random Gemma-2B, int8, exported with a 32-token
cache and bundled), written once to --work. --big also exports bench_convert.py's ~457M
Gemma-shaped checkpoint at int8 with the default cache (12 signatures, ~480 MB), and
--narrow a 30-layer Llama shape (bench_decode.py's `narrow`: many operators), into --work.
Any other graph can be given with --graph.

    python scripts/bench_readers.py --work /tmp/bench-readers --baseline /path/to/old/checkout \\
        [--big] [--narrow] [--graph x.tflite] [--repeat 5] [--fuzz-seconds 6]
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

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "tests" / "fuzz_readers.py"

CHILD = r"""
import json, sys, time
from llmtool.formats.tflite_model import read_model
from llmtool.pipelines.inspect import describe

def median_ms(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3

def unpack_all(path):
    with read_model(path) as m:
        for sg in m.subgraphs:
            list(sg.tensors)
            list(sg.operators)

out = {}
describe(sys.argv[2])  # imports
for path in sys.argv[2:]:
    n = int(sys.argv[1])
    with open(path, "rb") as f:  # the page cache
        while f.read(64 << 20):
            pass
    with read_model(path) as m:
        ops = sum(len(sg.operators) for sg in m.subgraphs)
        tensors = sum(len(sg.tensors) for sg in m.subgraphs)
    out[path] = {
        "operators": ops,
        "tensors": tensors,
        "open_ms": median_ms(lambda: read_model(path).close(), n),
        "all_ms": median_ms(lambda: unpack_all(path), n),
        "inspect_ms": median_ms(lambda: describe(path), n),
    }
print(json.dumps(out))
"""


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def run_child(tree: Path, args: list[str], env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    p = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tree, timeout=3600
    )
    if p.returncode not in (0, 1):
        raise SystemExit(f"{tree}: {' '.join(args[:2])} failed:\n{p.stderr[-3000:]}")
    return p.stdout.strip().splitlines()[-1]


def time_command(tree: Path, args: list[str], cache: Path) -> float:
    """Wall seconds of `python -m llmtool ARGS` with the tree's llmtool."""
    env = {**os.environ, "PYTHONPATH": str(tree), "LLMTOOL_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "llmtool", *args], capture_output=True, env=env, cwd=tree
    )
    if p.returncode:
        raise SystemExit(f"{tree}: llmtool {' '.join(args)} failed:\n{p.stderr.decode()[-2000:]}")
    return time.perf_counter() - start


def make_small(work: Path) -> list[Path]:
    """The fuzz test's four files (tests/test_hardening.py::test_fuzz_readers)."""
    names = [work / f"g{s}" for s in (".bin", ".tflite", ".task", ".litertlm")]
    if all(p.is_file() for p in names):
        return names
    sys.path.insert(0, str(REPO))
    from llmtool.config import BundleConfig, ConversionConfig
    from llmtool.pipelines.bundle import bundle
    from llmtool.pipelines.convert import convert
    from llmtool.pipelines.export import ExportOptions, export_graph
    from tests.conftest import VOCAB, add_tokenizer
    from tests.tiny_models import build_checkpoint

    ckpt = work / "tiny-gemma"
    build_checkpoint("GEMMA_2B", ckpt, VOCAB)
    add_tokenizer("GEMMA_2B", ckpt)
    container, graph = names[0], names[1]
    convert(
        ConversionConfig(
            input_ckpt=str(ckpt),
            model_type="GEMMA_2B",
            output_tflite_file=str(container),
            quantization="int8",
        )
    )
    export_graph(container, graph, ExportOptions(max_seq_len=32, prefill_len=8))
    for out in names[2:]:
        bundle(
            BundleConfig(
                tflite_model=str(graph), tokenizer_model=str(ckpt), output_filename=str(out)
            )
        )
    return names


def make_big(work: Path, shape: str) -> Path:
    """bench_convert's Gemma-shaped 457M checkpoint (gemma) or bench_decode's 30-layer Llama
    (narrow), converted at int8 and exported with export's defaults."""
    graph = work / f"{shape}-int8.tflite"
    if graph.is_file():
        return graph
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO))
    import bench_convert

    from llmtool.config import ConversionConfig
    from llmtool.pipelines.convert import convert
    from llmtool.pipelines.export import export_graph

    gemma = bench_convert.make_checkpoint(work / "gemma-ckpt")
    if shape == "gemma":
        ckpt, model_type = gemma, "GEMMA_2B"
    else:
        import bench_decode

        ckpt = bench_decode.make_llama_checkpoint(work / f"{shape}-ckpt", shape, gemma)
        model_type = "LLAMA"
    container = work / f"{shape}-int8.bin"
    if not container.is_file():
        convert(
            ConversionConfig(
                input_ckpt=str(ckpt),
                model_type=model_type,
                output_tflite_file=str(container),
                quantization="int8",
            )
        )
    export_graph(container, graph)
    return graph


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtool-bench-readers"))
    ap.add_argument("--baseline", type=Path, help="another llmtool checkout to compare with")
    ap.add_argument("--graph", type=Path, action="append", default=[], help="more graphs")
    ap.add_argument("--big", action="store_true", help="also the ~457M Gemma-shaped int8 graph")
    ap.add_argument("--narrow", action="store_true", help="also a 30-layer Llama-shaped graph")
    ap.add_argument("--repeat", type=int, default=5, help="processes per tree (medians)")
    ap.add_argument("--inner", type=int, default=3, help="timings per process (median)")
    ap.add_argument("--fuzz-seconds", type=float, default=6.0, help="per file and tree")
    ap.add_argument("--cli", action="store_true", help="also time `inspect` and `run` commands")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    small = make_small(args.work)
    graphs = [small[1], *args.graph]
    if args.big:
        graphs.append(make_big(args.work, "gemma"))
    if args.narrow:
        graphs.append(make_big(args.work, "narrow"))
    trees = {"this": REPO}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    load_start = uptime()
    parse: dict[str, dict[str, dict[str, list[float]]]] = {t: {} for t in trees}
    facts: dict[str, dict[str, int]] = {}
    for _ in range(args.repeat):
        for tree_name, tree in trees.items():
            line = run_child(tree, ["-c", CHILD, str(args.inner), *map(str, graphs)])
            for path, r in json.loads(line).items():
                facts[path] = {"operators": r["operators"], "tensors": r["tensors"]}
                row = parse[tree_name].setdefault(path, {})
                for key in ("open_ms", "all_ms", "inspect_ms"):
                    row.setdefault(key, []).append(r[key])
    fuzz: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for seed in range(max(1, args.repeat // 2)):
        for path in small:
            for tree_name, tree in trees.items():
                line = run_child(
                    tree,
                    [
                        str(FUZZ),
                        "--seconds",
                        str(args.fuzz_seconds),
                        "--seed",
                        str(seed),
                        str(path),
                    ],
                )
                report = json.loads(line)
                if report["failures"]:
                    print(f"{tree_name} {path.name}: failures {report['failures'][:3]}")
                for kind, n in report["by_kind"].items():
                    fuzz[tree_name].setdefault(kind, []).append(n / args.fuzz_seconds)
    cli: dict[str, dict[str, dict[str, list[float]]]] = {t: {} for t in trees}
    if args.cli:
        commands = {
            "inspect": ["inspect"],
            "run": ["run", "--prompt", "It is a truth", "--max-tokens", "16", "--num-threads", "2"],
        }
        big = [g for g in graphs if g != small[1]]
        for rep in range(args.repeat + 1):  # the first round warms caches and is not counted
            for tree_name, tree in trees.items():
                for g in big:
                    for name, command in commands.items():
                        extra = ["--model", str(g)] if name == "run" else [str(g)]
                        seconds = time_command(tree, [*command, *extra], args.work / "cache")
                        if rep:
                            row = cli[tree_name].setdefault(str(g), {})
                            row.setdefault(name, []).append(seconds)
    load_end = uptime()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "load": [load_start, load_end],
        "graphs": {
            p: {
                **facts[p],
                **{
                    f"{t}_{k}": round(statistics.median(v), 2)
                    for t in trees
                    for k, v in parse[t][p].items()
                },
            }
            for p in map(str, graphs)
        },
        "cli_s": {
            t: {g: {k: round(statistics.median(v), 2) for k, v in r.items()} for g, r in c.items()}
            for t, c in cli.items()
        },
        "fuzz_cases_per_s": {
            t: {k: round(statistics.median(v), 1) for k, v in fuzz[t].items()} for t in trees
        },
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['machine']}; load average {load_start} -> {load_end}")
    for path, r in result["graphs"].items():
        size = Path(path).stat().st_size / 2**20
        print(
            f"{Path(path).name}: {size:.1f} MiB, {r['operators']} operators, {r['tensors']} tensors"
        )
        for key in ("open_ms", "all_ms", "inspect_ms"):
            line = f"  {key[:-3]:8s} this {r[f'this_{key}']:9.1f} ms"
            if "baseline" in trees:
                base = r[f"baseline_{key}"]
                line += f"   baseline {base:9.1f} ms   {base / max(r[f'this_{key}'], 1e-9):6.1f}x"
            print(line)
    for g, r in result["cli_s"]["this"].items():
        for name, seconds in r.items():
            line = f"{Path(g).name}: llmtool {name:8s} this {seconds:6.2f} s"
            if "baseline" in trees:
                base = result["cli_s"]["baseline"][g][name]
                line += f"   baseline {base:6.2f} s   {base / seconds:5.1f}x"
            print(line)
    print("fuzz cases/s (median):")
    for kind in result["fuzz_cases_per_s"]["this"]:
        line = f"  {kind:9s} this {result['fuzz_cases_per_s']['this'][kind]:7.1f}"
        if "baseline" in trees:
            base = result["fuzz_cases_per_s"]["baseline"].get(kind, 0.0)
            line += f"   baseline {base:7.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
