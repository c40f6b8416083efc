#!/usr/bin/env python3
"""Quality and speed of every quantization mode, beside llama.cpp's Q8_0 / Q4_0 of the same model.

    python scripts/bench_quality.py --reference f32.bin --hf hf-folder --text heldout.txt \\
        --calibration train-excerpt.txt --llama-cpp ~/llama.cpp --work /tmp/bq [--speed]

1. From the float32 container --reference, `llmtool quantize` writes float16, dynamic-int8,
   int4 per-channel, int4 blocks of 32 and 128, full-int8 and int16x8 (calibrated on
   --calibration, which must not overlap --text).
2. Quality, llama-perplexity's protocol: the text (BOS + the model's own tokenization) is cut
   into chunks of --ctx tokens, each evaluated from scratch with BOS first, and the second
   half of each chunk is scored. The reference's log-probabilities are written in llama.cpp's
   `--kl-divergence-base` format; our variants are scored against exactly those values by
   this script, llama.cpp's F32 / Q8_0 / Q4_0 GGUFs (convert_hf_to_gguf.py + llama-quantize
   on --hf) by `llama-perplexity --kl-divergence` reading the same file: same tokens, same
   positions, same reference. --decode-chunks N scores our graphs' decode signature too
   (teacher-forced, one token a step) on the first N chunks, against the same reference.
3. --speed: prefill (--prompt-tokens) and decode (--decode-tokens) tokens/s of each graph
   with the engine `llmtool run` uses, and llama-bench for the GGUFs, interleaved, each in its
   own process, median of --repeat (scripts/bench_decode.py's workers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402  (its workers, llama.cpp discovery, machine info)

from llmtool.errors import LlmToolError  # noqa: E402
from llmtool.pipelines.export import ExportOptions, export_graph  # noqa: E402
from llmtool.pipelines.quantize import QuantizeOptions, quantize_model  # noqa: E402

VARIANTS: dict[str, QuantizeOptions | None] = {
    "float32": None,
    "float16": QuantizeOptions(mode="float16"),
    "dynamic-int8": QuantizeOptions(mode="dynamic-int8"),
    "dynamic-int8 one-pass": QuantizeOptions(mode="dynamic-int8"),
    "dynamic-int8 smoothed one-pass": QuantizeOptions(mode="dynamic-int8", smooth=True),
    "int4 per-channel": QuantizeOptions(mode="int4", block_size=0),
    "int4 block 32": QuantizeOptions(mode="int4"),  # the default: 32 where it divides a row
    "int4 block 32 absmax": QuantizeOptions(mode="int4", activation_weighted=False),
    "int4 block 128": QuantizeOptions(mode="int4", block_size=128),
    # GPTQ rounding on --calibration (text, none of the held-out text)
    "dynamic-int8 gptq": QuantizeOptions(mode="dynamic-int8"),
    "int4 block 32 gptq": QuantizeOptions(mode="int4"),
    "full-int8": QuantizeOptions(mode="full-int8"),
    "int16x8": QuantizeOptions(mode="int16x8"),
}
# Export's `activations` of variants that are not exported with the default (auto: split
# int8-weight layers, decoder.py); these are scored through their exported graph.
ACTIVATIONS = {
    "dynamic-int8 one-pass": "single",
    "dynamic-int8 smoothed one-pass": "single",
}
# Variants quantized with --calibration as their calibration data.
CALIBRATED = ("dynamic-int8 gptq", "int4 block 32 gptq")
LLAMA_TYPES = ("F32", "Q8_0", "Q4_0")
log = bench_decode.log


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# -- llama.cpp's --kl-divergence-base format (tools/perplexity/perplexity.cpp) -----------------


def encode_row(logits: np.ndarray) -> np.ndarray:
    """One position's logits as llama.cpp stores them: float scale and min log-prob (as four
    uint16) then each log-prob above max-16 quantized to 16 bits."""
    x = logits.astype(np.float32)
    mx, mn = np.float32(x.max()), np.float32(x.min())
    mn = np.float32(max(mn, mx - 16))
    log_sum_exp = np.float32(math.log(np.exp((x - mx).astype(np.float64)).sum()))
    min_log_prob = np.float32(mn - mx - log_sum_exp)
    scale = np.float32((mx - mn) / np.float32(65535))
    n = x.size
    row = np.zeros(2 * ((n + 1) // 2) + 4, np.uint16)
    row[:4] = np.asarray([scale, min_log_prob], np.float32).view(np.uint16)
    if scale:
        q = np.rint((x - mn) / scale)  # llama.cpp multiplies by 1/scale: same up to a rounding
        row[4 : 4 + n] = np.where(x > mn, q, 0).astype(np.uint16)
    return row


def decode_row(row: np.ndarray, n: int) -> np.ndarray:
    """The log-probabilities llama.cpp reads back from a stored row."""
    scale, min_log_prob = row[:4].view(np.float32)
    return scale * row[4 : 4 + n].astype(np.float64) + min_log_prob


def write_base(path: Path, n_ctx: int, vocab: int, tokens: np.ndarray, rows: list) -> None:
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.asarray([n_ctx, vocab, len(tokens) // n_ctx], np.int32).tobytes())
        f.write(tokens.astype(np.int32).tobytes())
        for chunk in rows:
            f.write(np.stack(chunk).tobytes())


# -- our models ---------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """Each variant's graph (quantized containers exported; static modes write graphs), and
    its size: the container's, or the graph's for the static modes."""
    files: dict[str, Path] = {}
    for name, options in VARIANTS.items():
        if args.skip_static and options is not None and options.mode in ("full-int8", "int16x8"):
            continue
        if args.only and name not in args.only and options is not None:
            continue  # float32 (the reference's graph) always
        slug = _slug(name)
        graph = args.work / f"{slug}.tflite"
        if options is not None and options.mode in ("full-int8", "int16x8"):
            if not graph.is_file():
                log(f"quantize {name}")
                # the float32 graph (exported first, with the same options as the others)
                quantize_model(
                    args.work / "float32.tflite",
                    graph,
                    QuantizeOptions(mode=options.mode, calibration_data=str(args.calibration)),
                )
            files[name] = graph
            continue
        container = args.reference if options is None else args.work / f"{slug}.bin"
        if not container.is_file():
            log(f"quantize {name}")
            if name in CALIBRATED:
                options = dataclasses.replace(options, calibration_data=str(args.calibration))
            try:
                quantize_model(args.reference, container, options)
            except LlmToolError as exc:  # e.g. a block size that does not divide every row
                log(f"skip {name}: {exc}")
                continue
        if not graph.is_file():
            log(f"export {name}")
            options = ExportOptions(
                args.max_seq_len, args.prompt_tokens, activations=ACTIVATIONS.get(name, "auto")
            )
            export_graph(container, graph, options)
        files[name] = graph if name in ACTIVATIONS else container
    return files


def chunk_logprobs(model: Path, chunks: list[list[int]], first: int, threads: int) -> list:
    from llmtool.pipelines.run import LlmInference
    from llmtool.runtime.inference import LlmInferenceOptions

    llm = LlmInference.create_from_options(
        LlmInferenceOptions(model_path=str(model), max_tokens=len(chunks[0]), num_threads=threads)
    )
    return [llm.logits(c)[first:-1] for c in chunks]


def chunk_decode_logprobs(model: Path, chunks: list[list[int]], first: int, threads: int) -> list:
    """The same positions' logits from the decode signature, one token a step after a prefill
    of the first `first` tokens (teacher-forced): what generation runs, where chunk_logprobs
    runs prefill. A graph whose decode is calibrated or quantized apart shows it here."""
    from llmtool.pipelines.run import LlmInference
    from llmtool.runtime.inference import LlmInferenceOptions

    llm = LlmInference.create_from_options(
        LlmInferenceOptions(model_path=str(model), max_tokens=len(chunks[0]), num_threads=threads)
    )
    out = []
    for c in chunks:
        llm.engine.reset()
        llm.engine.prefill(c[:first])
        out.append(np.stack([llm.engine.decode(t) for t in c[first:-1]]))
    llm.close()
    return out


def score(ref_rows: list, logits: list, chunks: list[list[int]], first: int, vocab: int) -> dict:
    kl, top1, nll = [], [], []
    for rows, lg, c in zip(ref_rows, logits, chunks, strict=True):
        lp = _log_softmax(lg)
        ref = np.stack([decode_row(r, vocab) for r in rows])
        # as llama.cpp computes it: sum of p (ref - lp) over the stored log-probs above -16
        kl.append(np.where(ref > -16, np.exp(ref) * (ref - lp), 0.0).sum(-1))
        top1.append(ref.argmax(-1) == lp.argmax(-1))
        targets = np.asarray(c[first + 1 :])
        nll.append(-lp[np.arange(len(targets)), targets])
    k = np.concatenate(kl)
    return {
        "perplexity": float(np.exp(np.concatenate(nll).mean())),
        "mean_kl": float(k.mean()),
        "max_kl": float(k.max()),
        "top1": float(np.concatenate(top1).mean()),
    }


# -- llama.cpp ----------------------------------------------------------------------------------


def prepare_gguf(args: argparse.Namespace, tools: dict[str, Path]) -> dict[str, Path]:
    env = dict(os.environ)
    gguf_py = tools["convert"].parent / "gguf-py"
    env["PYTHONPATH"] = f"{gguf_py}{os.pathsep}{env.get('PYTHONPATH', '')}"
    f32 = args.work / "model-f32.gguf"
    if not f32.is_file():
        log("convert_hf_to_gguf f32")
        cmd = [sys.executable, str(tools["convert"]), str(args.hf), "--outtype", "f32"]
        bench_decode.run_child([*cmd, "--outfile", str(f32)], env)
    out = {"F32": f32}
    for t in LLAMA_TYPES[1:]:
        path = args.work / f"model-{t.lower()}.gguf"
        if not path.is_file():
            log(f"llama-quantize {t}")
            bench_decode.run_child([str(tools["llama-quantize"]), str(f32), str(path), t])
        out[t] = path
    return out


def llama_kl(tools: dict[str, Path], gguf: Path, base: Path, args: argparse.Namespace) -> dict:
    exe = tools["llama-quantize"].parent / "llama-perplexity"
    cmd = [
        str(exe), "-m", str(gguf), "--kl-divergence-base", str(base), "--kl-divergence",
        "-c", str(args.ctx), "-b", str(args.ctx), "-t", str(args.threads), "--no-repack",
    ]  # fmt: skip
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    env["LD_LIBRARY_PATH"] = str(exe.parent)
    log_file = args.work / f"{gguf.stem}.perplexity.log"
    for _ in range(3):  # its asynchronous log sometimes loses the summary at exit: run again
        # into a file: through a pipe the summary was lost on every try
        with open(log_file, "w") as out:
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=3600)
        text = log_file.read_text(errors="replace")
        if r.returncode:
            raise RuntimeError(f"llama-perplexity failed on {gguf}:\n{text[-2000:]}")
        if "Maximum KLD" in text and "Mean PPL(Q)" in text:
            break

    def grab(label: str) -> float:
        m = re.search(rf"{label}\s*:?\s*([-\d.]+)", text)
        if m is None:
            raise RuntimeError(f"no {label!r} in llama-perplexity's output:\n{text[-2000:]}")
        return float(m.group(1))

    return {
        "perplexity": grab(r"Mean PPL\(Q\)\s*"),
        "mean_kl": grab("Mean    KLD"),
        "max_kl": grab("Maximum KLD"),
        "top1": grab(r"Same top p:") / 100,
    }


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        bench_decode.worker_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="float32 container (.bin)")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--calibration", type=Path, required=True, help="text for full-int8/int16x8")
    ap.add_argument("--hf", type=Path, help="the same model as an HF folder (for llama.cpp)")
    ap.add_argument("--llama-cpp", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmtool-bench-quality"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true",
                    help="--speed without the quality part (files prepared by an earlier run)")
    ap.add_argument("--skip-static", action="store_true", help="no full-int8 / int16x8")
    ap.add_argument("--only", type=lambda v: [x.strip() for x in v.split(",")], default=None,
                    help=f"comma-separated variants (of: {', '.join(VARIANTS)}); llama.cpp's "
                    "rows are kept (--llama-cpp)")
    ap.add_argument("--decode-chunks", type=int, default=0,
                    help="also score our graphs' decode signature (teacher-forced, one token a "
                    "step) on the first N chunks")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llama-omp-passive", action="store_true",
                    help="llama-bench with OMP_WAIT_POLICY=passive (bench_decode.llama_env)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=256)
    args = ap.parse_args()
    args.speed = args.speed or args.speed_only
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]

    from llmtool.formats import metadata as keys
    from llmtool.formats.container import Container
    from llmtool.tokenizer import Tokenizer

    with Container.open(args.reference) as c:
        tok = Tokenizer.from_files(keys.unpack_tokenizer(c.metadata))
        vocab = json.loads(c.metadata[keys.MODEL_SPEC])["vocab_size"]
    stream = np.asarray(tok.encode(args.text.read_text(encoding="utf-8")), np.int64)
    n_chunk = len(stream) // args.ctx
    if args.chunks:
        n_chunk = min(n_chunk, args.chunks)
    stream = stream[: n_chunk * args.ctx]
    first = args.ctx // 2
    chunks = [[tok.bos_id, *stream[i * args.ctx + 1 : (i + 1) * args.ctx].tolist()]
              for i in range(n_chunk)]  # fmt: skip
    files = prepare(args)

    rows: dict[str, dict[str, Any]] = {n: {"bytes": p.stat().st_size} for n, p in files.items()}
    if not args.speed_only:
        log("reference log-probabilities")
        ref_logits = chunk_logprobs(args.work / "float32.tflite", chunks, first, args.threads)
        ref_rows = [[encode_row(r) for r in lg] for lg in ref_logits]
        base = args.work / "reference.logits"
        # llama.cpp reads the tokens it scores from this file: each chunk starts with BOS, as
        # ours do (it puts BOS there itself only when the GGUF says to add one)
        base_tokens = stream.copy()
        if tok.bos_id is not None:
            base_tokens[:: args.ctx] = tok.bos_id
        write_base(base, args.ctx, vocab, base_tokens, ref_rows)
    for name, path in files.items():
        if args.speed_only:
            continue
        log(f"score {name}")
        graph = args.work / f"{_slug(name)}.tflite"  # the exported graph: no second export
        rows[name] = score(ref_rows, chunk_logprobs(graph, chunks, first, args.threads), chunks,
                           first, vocab)  # fmt: skip
        rows[name]["bytes"] = path.stat().st_size
        if args.decode_chunks:
            n = min(args.decode_chunks, n_chunk)
            log(f"score {name} through decode")
            dec = score(ref_rows[:n], chunk_decode_logprobs(graph, chunks[:n], first, args.threads),
                        chunks[:n], first, vocab)  # fmt: skip
            rows[name].update({"decode_mean_kl": dec["mean_kl"], "decode_max_kl": dec["max_kl"],
                               "decode_top1": dec["top1"], "decode_chunks": n})  # fmt: skip
    ggufs: dict[str, Path] = {}
    if args.llama_cpp and args.hf:
        tools = bench_decode.find_llama_cpp(args.llama_cpp)
        ggufs = prepare_gguf(args, tools)
        for t, path in ggufs.items():
            kl = {}
            if not args.speed_only:
                log(f"llama-perplexity --kl-divergence {t}")
                try:
                    kl = llama_kl(tools, path, base, args)
                except RuntimeError as exc:  # e.g. too few chunks for its statistics
                    log(f"no llama.cpp KL for {t}: {str(exc)[:200]}")
            rows[f"llama.cpp {t}"] = {**kl, "bytes": path.stat().st_size}
    if args.speed:
        graphs = {n: args.work / f"{_slug(n)}.tflite" for n in files}
        runs: dict[str, list[dict]] = {n: [] for n in [*graphs, *ggufs]}
        for i in range(args.repeat):
            for name, graph in graphs.items():
                job = {"kind": "ours", "graph": str(graph), "threads": args.threads,
                       "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens}
                log(f"speed {name} ({i + 1}/{args.repeat})")
                runs[name].append(bench_decode.run_worker(job)[0])
            for t, path in ggufs.items():
                log(f"llama-bench {t} ({i + 1}/{args.repeat})")
                runs[t].append(bench_decode.measure_llama(tools, path, args)[0])
        for name, results in runs.items():
            key = name if name in rows else f"llama.cpp {name}"
            for k in ("prefill_tps", "decode_tps"):
                rows[key][k] = statistics.median(r[k] for r in results)
    report = {
        "date": start,
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0],
        "machine": bench_decode.machine_info(),
        "text": str(args.text),
        "chunks": n_chunk,
        "ctx": args.ctx,
        "scored_tokens": n_chunk * (args.ctx - 1 - first),
        "rows": rows,
    }
    (args.work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    head = "| model | file | perplexity | mean KL | max KL | top-1 | prefill tok/s | decode tok/s |"
    print("\n" + head)
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        speed = [f"{r[k]:.1f}" if k in r else "" for k in ("prefill_tps", "decode_tps")]
        if "mean_kl" not in r:
            print(f"| {name} | {r['bytes'] / 2**20:.1f} MiB | | | | | {speed[0]} | {speed[1]} |")
            continue
        print(f"| {name} | {r['bytes'] / 2**20:.1f} MiB | {r['perplexity']:.3f} | "
              f"{r['mean_kl']:.5f} | {r['max_kl']:.4f} | {100 * r['top1']:.2f}% | "
              f"{speed[0]} | {speed[1]} |")  # fmt: skip
    decoded = {n: r for n, r in rows.items() if "decode_mean_kl" in r}
    if decoded:
        print("\n| model | decode: mean KL | max KL | top-1 | chunks |\n|---|---|---|---|---|")
        for name, r in decoded.items():
            print(f"| {name} | {r['decode_mean_kl']:.5f} | {r['decode_max_kl']:.4f} | "
                  f"{100 * r['decode_top1']:.2f}% | {r['decode_chunks']} |")  # fmt: skip


if __name__ == "__main__":
    main()
