#!/usr/bin/env python3
"""Benchmark prefill and decode speed of llmtool's LiteRT graphs against other engines.

The model is bench_convert.py's random Gemma-shaped checkpoint (Gemma-2B widths, 4 layers,
vocab 8000: ~450M parameters, 1.8 GB in float32), converted by llmtool at float32, int8 and
int4 and exported with `prefill_<prompt tokens>` and `decode` signatures. In one run,
interleaved and repeated (medians quoted), it measures:

- llmtool: the engine `llmtool run` uses (CompiledModel, XNNPACK weight cache built on a
  warm-up load): prefill on the prompt (prefill tok/s), then N greedy decode steps;
- LiteRT-LM, when `litert_lm` is importable (`pip install litert-lm-api`): Google's engine on the
  same graphs, bundled as `.task` by llmtool.formats.task_bundle, through `litert_lm.Benchmark`;
- transformers: eager float32 `generate` (greedy), OMP_WAIT_POLICY=passive, torch threads = N;
- llama.cpp, with --llama-cpp DIR: `llama-bench` on GGUF f32 / Q8_0 / Q4_0 of the same
  checkpoint (convert_hf_to_gguf.py, llama-quantize); a build without AMX if present, else
  `--repack 0` (its AMX path segfaults here).

Every measurement runs in its own process (no shared thread pools; peak RSS from wait4).
Prepared files are cached in --work, keyed by the llmtool sources that made them.
llama.cpp runs at its default OpenMP wait policy (spinning); `--llama-omp-passive` sets
OMP_WAIT_POLICY=passive for it, which slows its decode here but survives a loaded machine.

    python scripts/bench_decode.py [--llama-cpp /opt/llama.cpp-baseline] [--repeat 3] [--json]

Context sweep (`--sweep`): decode speed at positions 100 / 1000 / 2000 / 4000 / 8000 of an
8192-token context and prefill speed of prompts of those lengths, llmtool (the graph `run`
exports: one graph per model, KV buckets) side by side with llama-bench (`-d <depth>`), on the
Gemma-shaped model and on random Llama-shaped ones (`--shapes gemma,narrow,llama1b`: narrow is
30 layers of width 576 with 3 KV heads of 64 and a 49152 vocabulary, llama1b is Llama 3.2 1B's
shape):

    python scripts/bench_decode.py --sweep --llama-cpp ~/llama.cpp --shapes gemma,narrow \
        --precisions int8,int4 --repeat 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRECISIONS = ("float32", "int8", "int4")
GGUF_TYPES = {"float32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
RESULT_MARK = "@@RESULT@@"


# -- workers: each runs in its own process ----------------------------------------------------


def _prompt(n: int, vocab: int) -> list[int]:
    import numpy as np

    return [int(x) for x in np.random.default_rng(0).integers(4, vocab, size=n)]


def work_convert(ckpt: str, out: str, quantization: str) -> dict:
    from llmtool.config import ConversionConfig
    from llmtool.pipelines.convert import convert

    config = ConversionConfig(
        input_ckpt=ckpt, model_type="GEMMA_2B", output_tflite_file=out, quantization=quantization
    )
    return convert(config)


def work_export(container: str, out: str, max_seq_len: int, prefill_len: int) -> dict:
    from llmtool.pipelines.export import ExportOptions, export_graph

    options = ExportOptions(max_seq_len=max_seq_len, prefill_len=prefill_len)
    return export_graph(container, out, options)


def work_ours(graph: str, threads: int, prompt_tokens: int, decode_tokens: int) -> dict:
    import numpy as np

    from llmtool.runtime.inference import open_engine

    t0 = time.perf_counter()
    engine = open_engine(Path(graph), threads)  # what `llmtool run` uses
    load = time.perf_counter() - t0
    prompt = _prompt(prompt_tokens, engine.vocab_size)
    logits = engine.prefill(prompt)  # warm-up: the first invocations set XNNPACK up
    for _ in range(2):
        logits = engine.decode(int(np.argmax(logits)))
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        logits = engine.decode(int(np.argmax(logits)))
    t2 = time.perf_counter()
    return {
        "load_s": load,
        "prefill_tps": prompt_tokens / (t1 - t0),
        "decode_tps": decode_tokens / (t2 - t1),
    }


def work_litert_lm(bundle: str, threads: int, prompt_tokens: int, decode_tokens: int) -> dict:
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    info = litert_lm.Benchmark(
        bundle,
        backend=litert_lm.Backend.CPU(thread_count=threads),
        prefill_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        max_num_tokens=prompt_tokens + decode_tokens + 8,
        cache_dir=":nocache",
    ).run()
    return {
        "load_s": info.init_time_in_second,
        "prefill_tps": info.last_prefill_tokens_per_second,
        "decode_tps": info.last_decode_tokens_per_second,
        "tokens": [info.last_prefill_token_count, info.last_decode_token_count],
    }


def work_transformers(ckpt: str, threads: int, prompt_tokens: int, decode_tokens: int) -> dict:
    # OMP_WAIT_POLICY=passive is in this process's environment from the start (set by the parent).
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    load = time.perf_counter() - t0
    ids = torch.tensor([_prompt(prompt_tokens, model.config.vocab_size)])

    def generate(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        assert out.shape[1] == prompt_tokens + n
        return time.perf_counter() - t

    generate(2)  # warm-up
    first = generate(1)  # prefill (and one greedy pick)
    full = generate(decode_tokens + 1)
    return {
        "load_s": load,
        "prefill_tps": prompt_tokens / first,
        "decode_tps": decode_tokens / max(full - first, 1e-9),
    }


def work_convert_llama(ckpt: str, out: str, quantization: str) -> dict:
    from llmtool.config import ConversionConfig
    from llmtool.pipelines.convert import convert

    config = ConversionConfig(
        input_ckpt=ckpt, model_type="LLAMA", output_tflite_file=out, quantization=quantization
    )
    return convert(config)


def work_prepare(container: str, threads: int, max_seq_len: int) -> dict:
    """What a first `llmtool run` of a container does: export the graph into the cache, pack
    the XNNPACK weights (in a process of its own, so the sweep's peak RSS is the run's)."""
    from llmtool.pipelines.resolve import resolve_graph
    from llmtool.runtime.inference import open_engine

    t0 = time.perf_counter()
    graph, _ = resolve_graph(container, max_seq_len)
    export_s = time.perf_counter() - t0
    with open_engine(graph, threads) as warm:
        warm.prefill(_prompt(8, warm.vocab_size))
    return {"export_s": export_s, "pack_s": time.perf_counter() - t0 - export_s}


def work_sweep(
    container: str, threads: int, positions: list[int], decode_tokens: int, max_seq_len: int
) -> dict:
    """A warm `llmtool run` of a container (resolve finds the cached graph), then per position
    P: prefill P tokens from an empty cache, decode N tokens."""
    import numpy as np

    from llmtool.pipelines.resolve import resolve_graph
    from llmtool.runtime.inference import open_engine

    t0 = time.perf_counter()
    graph, _ = resolve_graph(container, max_seq_len)
    t1 = time.perf_counter()
    engine = open_engine(graph, threads)
    load = time.perf_counter() - t1
    out: dict[str, Any] = {"resolve_s": t1 - t0, "load_s": load, "graph": str(graph)}
    out["graph_bytes"] = Path(graph).stat().st_size
    for P in positions:
        if P + decode_tokens + 1 > engine.max_seq_len:
            continue
        engine.reset()
        prompt = _prompt(P, engine.vocab_size)
        t0 = time.perf_counter()
        logits = engine.prefill(prompt)
        t1 = time.perf_counter()
        logits = engine.decode(int(np.argmax(logits)))  # untimed: first call at this position
        t2 = time.perf_counter()
        for _ in range(decode_tokens):
            logits = engine.decode(int(np.argmax(logits)))
        t3 = time.perf_counter()
        out[f"prefill_tps@{P}"] = P / (t1 - t0)
        out[f"decode_tps@{P}"] = decode_tokens / (t3 - t2)
    engine.close()
    return out


WORKERS = {
    "convert": work_convert,
    "convert_llama": work_convert_llama,
    "sweep": work_sweep,
    "prepare": work_prepare,
    "export": work_export,
    "ours": work_ours,
    "litert_lm": work_litert_lm,
    "transformers": work_transformers,
}


def worker_main(spec: str) -> None:
    job = json.loads(spec)
    result = WORKERS[job.pop("kind")](**job)
    sys.stdout.write(f"\n{RESULT_MARK}{json.dumps(result, default=str)}\n")


# -- running children ---------------------------------------------------------------------------


# A child's ru_maxrss starts at its parent's resident size when it was forked (Linux keeps the
# high-water mark across exec), and this script's own process can be large (a checkpoint it
# wrote). So every command runs under a small Python trampoline that reports the peak RSS of
# the command alone (its own RUSAGE_CHILDREN) as the last line of stderr.
TRAMPOLINE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "sys.stderr.write(f'\\n@@MAXRSS@@ {peak}\\n')\n"
    "sys.exit(code)\n"
)


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """stdout, wall seconds and peak RSS (GB) of one child (measured by the trampoline)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAMPOLINE, *cmd],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(stream: Any, key: str) -> None:
        for block in iter(lambda: stream.read(65536), b""):
            chunks[key].append(block)

    readers = [
        threading.Thread(target=drain, args=(proc.stdout, "out")),
        threading.Thread(target=drain, args=(proc.stderr, "err")),
    ]
    for t in readers:
        t.start()
    code = proc.wait()
    for t in readers:
        t.join()
    seconds = time.perf_counter() - start
    err = b"".join(chunks["err"]).decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"failed (exit {code}): {' '.join(cmd)}\n{err[-3000:]}")
    peak_kb = int(err.rsplit("@@MAXRSS@@", 1)[1].split()[0])
    return b"".join(chunks["out"]).decode(errors="replace"), seconds, peak_kb / 1024**2


def run_worker(job: dict, env: dict[str, str] | None = None) -> tuple[dict, float, float]:
    out, seconds, rss = run_child(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)], env
    )
    line = next(x for x in reversed(out.splitlines()) if x.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK) :]), seconds, rss


# -- preparation (cached) -----------------------------------------------------------------------


def source_key(*extra: Any, skip: tuple[str, ...] = ()) -> str:
    """A digest of the llmtool sources (less `skip` prefixes) and the given settings, so files
    made by older code are not reused."""
    import llmtool

    root = Path(llmtool.__file__).resolve().parent
    h = hashlib.sha256(repr(extra).encode())
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(skip):
            h.update(rel.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare_ours(args: argparse.Namespace, ckpt: Path, with_bundle: bool) -> dict[str, dict]:
    """Container, graph and (for LiteRT-LM) .task bundle per precision."""
    from llmtool.formats.task_bundle import write_task_bundle_from_graph

    S = args.prompt_tokens + args.decode_tokens + 16
    unused = ("runtime/", "cli.py", "__main__.py", "pipelines/evaluate.py", "pipelines/inspect.py")
    ckey = source_key(skip=("decoder.py", "pipelines/export.py", *unused))
    gkey = source_key(S, args.prompt_tokens, skip=unused)
    files: dict[str, dict] = {}
    for q in PRECISIONS:
        container = args.work / f"llmtool-{q}-{ckey}.bin"
        graph = args.work / f"llmtool-{q}-{gkey}.tflite"
        bundle = args.work / f"llmtool-{q}-{gkey}.task"
        if not graph.is_file():
            if not container.is_file():
                log(f"llmtool convert {q}")
                run_worker(
                    {"kind": "convert", "ckpt": str(ckpt), "out": str(container), "quantization": q}
                )
            log(f"llmtool export {q} (prefill {args.prompt_tokens}, cache {S})")
            run_worker(
                {
                    "kind": "export",
                    "container": str(container),
                    "out": str(graph),
                    "max_seq_len": S,
                    "prefill_len": args.prompt_tokens,
                }
            )
        if with_bundle and not bundle.is_file():
            write_task_bundle_from_graph(bundle, graph)
        files[q] = {"graph": graph, "bundle": bundle, "gb": graph.stat().st_size / 1e9}
    for old in args.work.glob("llmtool-*"):  # files made by older sources or other settings
        if ckey not in old.name and gkey not in old.name:
            old.unlink()
    return files


def find_llama_cpp(root: Path) -> dict[str, Path]:
    """llama-bench, llama-quantize and convert_hf_to_gguf.py (with its gguf-py) under root."""
    tools: dict[str, Path] = {}
    # A build without AMX (build-noamx) runs llama.cpp's repacked Q8_0/Q4_0 kernels; a native
    # build's AMX path segfaults on this CPU, so there llama-bench needs --repack 0.
    for name in ("llama-bench", "llama-quantize"):
        dirs = ("build-noamx/bin", "build/bin", "bin", ".")
        for cand in (root / d / name for d in dirs):
            if cand.is_file():
                tools[name] = cand
                break
        else:
            raise SystemExit(f"--llama-cpp: no {name} under {root}")
    scripts = sorted(root.glob("**/convert_hf_to_gguf.py"), key=lambda p: len(p.parts))
    if not scripts:
        raise SystemExit(f"--llama-cpp: no convert_hf_to_gguf.py under {root}")
    tools["convert"] = scripts[0]
    return tools


def prepare_llama(
    args: argparse.Namespace,
    ckpt: Path,
    tools: dict[str, Path],
    name: str = "gemma-shaped",
    precisions: tuple[str, ...] = PRECISIONS,
) -> dict[str, Path]:
    env = dict(os.environ)
    gguf_py = tools["convert"].parent / "gguf-py"
    if gguf_py.is_dir():
        env["PYTHONPATH"] = f"{gguf_py}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = {}
    f32 = args.work / f"{name}-f32.gguf"
    if not f32.is_file():
        log("llama.cpp convert_hf_to_gguf f32")
        tmp = f32.with_suffix(".tmp")
        run_child(
            [
                sys.executable,
                str(tools["convert"]),
                str(ckpt),
                "--outtype",
                "f32",
                "--outfile",
                str(tmp),
            ],
            env,
        )
        tmp.rename(f32)
    for q in precisions:
        gtype = GGUF_TYPES[q]
        path = args.work / f"{name}-{gtype.lower()}.gguf"
        if not path.is_file():
            log(f"llama-quantize {gtype}")
            tmp = path.with_suffix(".tmp")
            run_child([str(tools["llama-quantize"]), str(f32), str(tmp), gtype])
            tmp.rename(path)
        out[q] = path
    return out


# -- measuring ----------------------------------------------------------------------------------


def measure_llama(
    tools: dict[str, Path], gguf: Path, args: argparse.Namespace
) -> tuple[dict, float, float]:
    cmd = [
        str(tools["llama-bench"]), "-m", str(gguf), "-p", str(args.prompt_tokens),
        "-n", str(args.decode_tokens), "-t", str(args.threads), "-r", "1", "-o", "json",
    ]  # fmt: skip
    if "build-noamx" not in str(tools["llama-bench"]):
        cmd += ["--repack", "0"]
    out, seconds, rss = run_child(cmd, llama_env(args))
    rows = json.loads(out[out.index("[") :])
    result: dict[str, Any] = {"build": rows[0].get("build_commit")}
    for row in rows:
        kind = "prefill_tps" if row.get("n_prompt") else "decode_tps"
        result[kind] = float(row["avg_ts"])
    return result, seconds, rss


def llama_env(args: argparse.Namespace) -> dict[str, str]:
    """llama.cpp's environment: its default OpenMP wait policy unless --llama-omp-passive."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if args.llama_omp_passive:
        env["OMP_WAIT_POLICY"] = "passive"
    return env


def measure_llama_sweep(
    tools: dict[str, Path], gguf: Path, args: argparse.Namespace, positions: list[int]
) -> tuple[dict, float, float]:
    """llama-bench: decode of N tokens at each depth, and prefill of --prefill-at prompts."""
    base = [str(tools["llama-bench"]), "-m", str(gguf), "-t", str(args.threads), "-r", "1",
            "-o", "json"]  # fmt: skip
    if "build-noamx" not in str(tools["llama-bench"]):
        base += ["--repack", "0"]
    depths = ",".join(map(str, positions))
    result: dict[str, Any] = {}
    seconds = rss = 0.0
    for cmd in (
        [*base, "-p", "0", "-n", str(args.decode_tokens), "-d", depths],
        [*base, "-p", args.prefill_at, "-n", "0"],
    ):
        out, sec, peak = run_child(cmd, llama_env(args))
        seconds, rss = seconds + sec, max(rss, peak)
        for row in json.loads(out[out.index("[") :]):
            result["build"] = row.get("build_commit")
            if row.get("n_gen"):
                result[f"decode_tps@{row['n_depth']}"] = float(row["avg_ts"])
            else:
                result[f"prefill_tps@{row['n_prompt']}"] = float(row["avg_ts"])
    return result, seconds, rss


def machine_info() -> dict[str, Any]:
    from importlib import metadata as md

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()[1]
        mem_gb = round(int(mem) / 1024**2, 1)
    except OSError:
        mem_gb = None
    versions = {}
    for pkg in ("ai-edge-litert", "litert-lm-api", "torch", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "versions": versions,
    }


def summarize(runs: list[tuple[dict, float, float]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [r[0][key] for r in runs if r[0].get(key) is not None]
        return round(statistics.median(values), 2) if values else None

    return {
        "prefill_tps": med("prefill_tps"),
        "decode_tps": med("decode_tps"),
        "prefill_tps_all": [round(r[0].get("prefill_tps") or 0, 2) for r in runs],
        "decode_tps_all": [round(r[0].get("decode_tps") or 0, 2) for r in runs],
        "peak_rss_gb": round(max(r[2] for r in runs), 3),
        "load_s": med("load_s"),
        **({"tokens": runs[0][0]["tokens"]} if "tokens" in runs[0][0] else {}),
    }


# -- the context sweep --------------------------------------------------------------------------

LLAMA_SHAPES = {  # random Llama-architecture checkpoints (transformers' LlamaConfig)
    "narrow": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                    vocab_size=128256, rope_theta=500000.0),
}  # fmt: skip


def make_llama_checkpoint(folder: Path, shape: str, tokenizer_from: Path) -> Path:
    """A random float32 Llama-shaped checkpoint with an 8192-token context (written once),
    with the Gemma-shaped model's SentencePiece tokenizer."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **LLAMA_SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    with torch.no_grad():
        model = LlamaForCausalLM(config)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, tmp / name)
    tmp.rename(folder)
    return folder


def sweep_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from bench_convert import make_checkpoint

    positions = [int(x) for x in args.positions.split(",")]
    precisions = args.precisions.split(",")
    gemma = make_checkpoint(args.work / "gemma-shaped")
    ckpts = {}
    for shape in args.shapes.split(","):
        if shape == "gemma":
            ckpts[shape] = gemma
        elif shape in LLAMA_SHAPES:
            log(f"checkpoint {shape}")
            ckpts[shape] = make_llama_checkpoint(args.work / f"{shape}-shaped", shape, gemma)
        else:
            raise SystemExit(f"--shapes: unknown shape {shape!r}")
    tools = find_llama_cpp(args.llama_cpp) if args.llama_cpp else None
    containers: dict[tuple[str, str], Path] = {}
    ggufs: dict[tuple[str, str], Path] = {}
    # Sources that cannot change a container or a graph (running, other verbs, bundles):
    # a change there does not make the sweep convert and export everything again.
    unused = ("runtime/", "cli.py", "__main__.py", "cache.py", "chat_template.py",
              "pipelines/run.py", "pipelines/bundle.py", "pipelines/release.py",
              "pipelines/evaluate.py", "pipelines/inspect.py", "pipelines/quantize.py",
              "pipelines/lora_convert.py", "formats/task_bundle.py", "formats/litertlm.py",
              "formats/llm_params.py")  # fmt: skip
    ckey = source_key(skip=("decoder.py", "pipelines/export.py", *unused))
    # `run` caches graphs by container content, not by the code that exported them: the sweep
    # keeps one graph cache per version of the exporting sources, so a changed exporter is
    # measured (older caches, and containers of older sources, are removed: gigabytes).
    gkey = source_key(skip=unused)
    graph_cache = args.work / f"sweep-cache-{gkey}"
    os.environ["LLMTOOL_CACHE_DIR"] = str(graph_cache)
    for old in [*args.work.glob("sweep-cache-*"), *args.work.glob("sweep-*.bin")]:
        if old != graph_cache and ckey not in old.name:
            log(f"removing {old.name} (older sources)")
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for shape, ckpt in ckpts.items():
        for q in precisions:
            out = args.work / f"sweep-{shape}-{q}-{ckey}.bin"
            if not out.is_file():
                log(f"llmtool convert {shape} {q}")
                kind = "convert" if shape == "gemma" else "convert_llama"
                run_worker({"kind": kind, "ckpt": str(ckpt), "out": str(out), "quantization": q})
            containers[(shape, q)] = out
        if tools:
            made = prepare_llama(args, ckpt, tools, ckpt.name, tuple(precisions))
            ggufs.update({(shape, q): made[q] for q in precisions})

    prepared: dict[tuple[str, str], dict] = {}
    for key, container in containers.items():
        log(f"llmtool first run (export, weight packing) {' '.join(key)}")
        prepared[key] = run_worker(
            {"kind": "prepare", "container": str(container), "threads": args.threads,
             "max_seq_len": args.context}
        )[0]  # fmt: skip
        log(f"  {json.dumps(prepared[key])}")
    if args.prepare_only:
        return

    jobs: dict[tuple[str, str, str], Any] = {}
    for shape in ckpts:
        for q in precisions:
            jobs[(shape, q, "llmtool")] = lambda shape=shape, q=q: run_worker(
                {"kind": "sweep", "container": str(containers[(shape, q)]),
                 "threads": args.threads, "positions": positions,
                 "decode_tokens": args.decode_tokens, "max_seq_len": args.context}
            )  # fmt: skip
            if tools:
                jobs[(shape, q, "llama.cpp")] = lambda shape=shape, q=q: measure_llama_sweep(
                    tools, ggufs[(shape, q)], args, positions
                )
    load_before = os.getloadavg()
    started = time.time()
    runs: dict[tuple[str, str, str], list] = {k: [] for k in jobs}
    for rep in range(args.repeat):
        for name, job in jobs.items():
            log(f"sweep {rep + 1}/{args.repeat}: {' '.join(name)}")
            try:
                runs[name].append(job())
            except (RuntimeError, ValueError, KeyError) as exc:
                log(f"  failed: {str(exc).strip().splitlines()[-1][:300]}")
                continue
            result, _, rss = runs[name][-1]  # also logged as it comes: runs are long
            log(f"  {json.dumps({**result, 'rss_gb': round(rss, 3), 'load': os.getloadavg()})}")
    results: dict[str, Any] = {}
    for (shape, q, engine), values in runs.items():
        if not values:
            continue
        keys = sorted({k for v in values for k in v[0] if "@" in k})
        entry: dict[str, Any] = {
            k: round(statistics.median(v[0][k] for v in values if k in v[0]), 2) for k in keys
        }
        entry["peak_rss_gb"] = round(max(v[2] for v in values), 3)
        for extra in ("load_s", "resolve_s", "graph_bytes", "build"):
            if extra in values[0][0]:
                entry[extra] = values[0][0][extra]
        if engine == "llmtool":
            entry.update(prepared[(shape, q)])  # the first run: export_s, pack_s
        results[f"{shape} {q} {engine}"] = entry
    report = {
        "positions": positions,
        "settings": {"decode_tokens": args.decode_tokens, "threads": args.threads,
                     "repeat": args.repeat, "context": args.context,
                     "llama_cpp_omp": "passive" if args.llama_omp_passive else "default"},
        "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.time() - started, 1),
        "results": results,
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_sweep(report)


def print_sweep(report: dict[str, Any]) -> None:
    st = report["settings"]
    print(
        f"context sweep: decode {st['decode_tokens']} tokens at each position, "
        f"{st['threads']} threads, median of {st['repeat']}, llama.cpp OpenMP {st['llama_cpp_omp']}"
    )
    print(
        f"load average before {report['load_average_before']}, after "
        f"{report['load_average_after']}; {report['wall_seconds']} s"
    )
    groups = sorted({k.rsplit(" ", 1)[0] for k in report["results"]})
    for group in groups:
        ours = report["results"].get(f"{group} llmtool", {})
        theirs = report["results"].get(f"{group} llama.cpp", {})
        print(f"\n{group}: peak RSS llmtool {ours.get('peak_rss_gb')} GB, "
              f"llama.cpp {theirs.get('peak_rss_gb')} GB")  # fmt: skip
        print(f"{'position':>8} {'decode tok/s':>13} {'llama.cpp':>10} {'ratio':>6}"
              f" {'prefill tok/s':>14} {'llama.cpp':>10} {'ratio':>6}")  # fmt: skip
        for P in report["positions"]:
            row = [f"{P:>8}"]
            for kind, width in (("decode_tps", 13), ("prefill_tps", 14)):
                a, b = ours.get(f"{kind}@{P}"), theirs.get(f"{kind}@{P}")
                ratio = f"{a / b:6.2f}" if a and b else f"{'':>6}"
                row.append(f"{a or 0:>{width}.2f} {b or 0:>10.2f} {ratio}")
            print(" ".join(row))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtool-bench"))
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp build (llama-bench, llama-quantize)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument(
        "--llama-omp-passive",
        action="store_true",
        help="run llama.cpp with OMP_WAIT_POLICY=passive (default: its own default)",
    )
    ap.add_argument("--sweep", action="store_true", help="the context sweep (see above)")
    ap.add_argument("--positions", default="100,1000,2000,4000,8000")
    ap.add_argument("--shapes", default="gemma", help="gemma, narrow, llama1b (comma-separated)")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--context", type=int, default=8192, help="max tokens asked of `run`")
    ap.add_argument("--prefill-at", default="2000", help="llama.cpp prompt lengths to time")
    ap.add_argument("--prepare-only", action="store_true",
                    help="sweep: make every file (checkpoints, containers, GGUFs, graphs, "
                         "packed weights), measure nothing")
    args = ap.parse_args()  # fmt: skip
    # Exported graphs and XNNPACK weight caches of the benchmark stay in its work folder.
    os.environ.setdefault("LLMTOOL_CACHE_DIR", str(args.work / "cache"))
    if args.repeat < 1 or args.decode_tokens < 1 or args.prompt_tokens < 1 or args.threads < 1:
        ap.error("--repeat, --decode-tokens, --prompt-tokens and --threads must be positive")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        sweep_main(args)
        return

    sys.path.insert(0, str(HERE))
    from bench_convert import SHAPE, make_checkpoint

    ckpt = make_checkpoint(args.work / "gemma-shaped")
    try:
        import litert_lm  # noqa: F401

        have_litert_lm = True
    except ImportError:
        have_litert_lm = False
    ours = prepare_ours(args, ckpt, have_litert_lm)
    tools = find_llama_cpp(args.llama_cpp) if args.llama_cpp else None
    ggufs = prepare_llama(args, ckpt, tools) if tools else {}

    common = {
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
    }
    jobs: dict[tuple[str, str], Any] = {}
    for q in PRECISIONS:
        jobs[("llmtool", q)] = lambda q=q: run_worker(
            {"kind": "ours", "graph": str(ours[q]["graph"]), **common}
        )
        if have_litert_lm:
            jobs[("litert_lm", q)] = lambda q=q: run_worker(
                {"kind": "litert_lm", "bundle": str(ours[q]["bundle"]), **common}
            )
        if tools:
            jobs[("llama.cpp", q)] = lambda q=q: measure_llama(tools, ggufs[q], args)
    if not args.skip_transformers:
        env = dict(os.environ, OMP_WAIT_POLICY="passive", OMP_NUM_THREADS=str(args.threads))
        jobs[("transformers", "float32")] = lambda: run_worker(
            {"kind": "transformers", "ckpt": str(ckpt), **common}, env
        )

    load_before = os.getloadavg()
    started = time.time()
    runs: dict[tuple[str, str], list] = {k: [] for k in jobs}
    failures: dict[tuple[str, str], str] = {}
    for rep in range(args.repeat):  # interleaved: load changes hit every engine alike
        for name, job in jobs.items():
            if name in failures:
                continue
            log(f"run {rep + 1}/{args.repeat}: {name[0]} {name[1]}")
            try:
                runs[name].append(job())
            except (RuntimeError, ValueError, KeyError) as exc:
                failures[name] = str(exc).strip().splitlines()[-1][:300]
                log(f"  failed: {failures[name]}")
    load_after = os.getloadavg()

    results: dict[str, dict[str, Any]] = {}
    for (engine, q), values in runs.items():
        if values:
            entry = summarize(values)
            if engine == "llama.cpp":
                entry["gguf"] = GGUF_TYPES[q]
                entry["build"] = values[0][0].get("build")
            results[f"{engine} {q}"] = entry
    for (engine, q), reason in failures.items():
        results.setdefault(f"{engine} {q}", {})["error"] = reason
    for q in PRECISIONS:  # ratios against llama.cpp at the matching precision
        base = results.get(f"llama.cpp {q}", {})
        for engine in ("llmtool", "litert_lm", "transformers"):
            r = results.get(f"{engine} {q}")
            if not r or "error" in r or "error" in base or not base:
                continue
            for kind in ("prefill_tps", "decode_tps"):
                if r.get(kind) and base.get(kind):
                    r[f"{kind}_vs_llama_cpp"] = round(r[kind] / base[kind], 3)
    report = {
        "model": {
            "shape": SHAPE,
            "parameters_m": round(_parameters(SHAPE) / 1e6, 1),
            "graph_gb": {q: round(ours[q]["gb"], 3) for q in PRECISIONS},
        },
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "threads": args.threads,
            "repeat": args.repeat,
            "kv_cache_len": args.prompt_tokens + args.decode_tokens + 16,
        },
        "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "wall_seconds": round(time.time() - started, 1),
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)


def _parameters(s: dict[str, int]) -> int:
    h, f, d = s["hidden"], s["ffn"], s["head_dim"]
    layer = h * d * (2 * s["heads"] + 2 * s["kv_heads"]) + 3 * h * f + 2 * h
    return s["vocab"] * h + s["layers"] * layer + h


def print_table(report: dict[str, Any]) -> None:
    m, st = report["machine"], report["settings"]
    print(
        f"Gemma-shaped model, {report['model']['parameters_m']}M parameters; "
        f"prompt {st['prompt_tokens']} tokens, decode {st['decode_tokens']} tokens, "
        f"{st['threads']} threads, median of {st['repeat']}"
    )
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    )
    print(
        f"load average before {report['load_average_before']}, "
        f"after {report['load_average_after']}; {report['wall_seconds']} s"
    )
    header = (
        f"{'engine':26s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'peak RSS':>10s}"
        "  vs llama.cpp (prefill, decode)"
    )
    print(header)
    print("-" * len(header))
    for name, r in report["results"].items():
        if "error" in r:
            print(f"{name:26s} failed: {r['error']}")
            continue
        label = f"{name} ({r['gguf']})" if "gguf" in r else name
        ratio = ""
        if "decode_tps_vs_llama_cpp" in r:
            p, d = r.get("prefill_tps_vs_llama_cpp", 0), r["decode_tps_vs_llama_cpp"]
            ratio = f"{p:.2f}x, {d:.2f}x"
        print(
            f"{label:26s} {r['prefill_tps'] or 0:13.1f} {r['decode_tps'] or 0:12.2f} "
            f"{r['peak_rss_gb']:7.2f} GB  {ratio}"
        )


if __name__ == "__main__":
    main()
