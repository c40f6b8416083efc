#!/usr/bin/env python3
"""Package the embedded default model: convert the trained checkpoint with llmtool itself.

Run after scripts/train_default_model.py:

    python scripts/package_default_model.py [--hf artifacts/default-model/hf]

1. converts the Hugging Face folder with `llmtool convert` to int8 (shipped as
   llmtool/data/default_model.bin) and to float32 (for comparison, not shipped);
2. rebuilds the held-out split exactly as training made it (same package, same cleaning);
3. measures held-out perplexity of both through llmtool's LiteRT runtime;
4. writes llmtool/data/default_model.json, the facts `llmtool models` shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import train_default_model as training  # noqa: E402

from llmtool.config import ConversionConfig  # noqa: E402
from llmtool.pipelines.convert import convert  # noqa: E402
from llmtool.pipelines.evaluate import evaluate  # noqa: E402
from llmtool.pipelines.resolve import file_digest  # noqa: E402

DATA = ROOT / "llmtool" / "data"
MAX_BYTES = 25 * 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hf", type=Path, default=ROOT / "artifacts/default-model/hf")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts/default-model/work")
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()

    report = json.loads((args.hf / "train_report.json").read_text())
    DATA.mkdir(exist_ok=True)
    shipped = DATA / "default_model.bin"
    float_file = args.work / "default_model_float32.bin"
    for quantization, out in (("int8", shipped), ("float32", float_file)):
        convert(ConversionConfig(input_ckpt=str(args.hf), model_type="LLAMA",
                                 output_tflite_file=str(out), quantization=quantization))
    size = shipped.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{shipped} is {size} bytes, over the 25 MB budget")

    books, _ = training.fetch_corpus(args.work, None)
    _, val_docs, val_ids = training.split_documents(training.build_documents(books))
    heldout = args.work / "heldout.txt"
    heldout.write_text("\n\n".join(val_docs), encoding="utf-8")
    ppl = {
        q: evaluate(str(f), heldout, window=args.window)
        for q, f in (("float32", float_file), ("int8", shipped))
    }
    model = report["model"]
    card = {
        "summary": "Llama-style decoder trained from scratch on Jane Austen's six novels",
        "model_type": "LLAMA",
        "parameters": model["parameters"],
        "architecture": {k: model[k] for k in model if k not in ("class", "parameters")},
        "file_bytes": size,
        "sha256": file_digest(shipped),
        "weights": "int8 per-channel symmetric (norms float32)",
        "corpus": f"{report['corpus']['package']} {report['corpus']['version']} (Debian)",
        "license": report["corpus"]["license"],
        "heldout": {
            "documents": val_ids,
            "tokens_scored": ppl["int8"]["tokens_scored"],
            "window": args.window,
        },
        "heldout_perplexity": {
            "float32": ppl["float32"]["perplexity"],
            "int8": ppl["int8"]["perplexity"],
        },
        "training": {
            k: report["training"].get(k)
            for k in ("steps_done", "tokens_seen", "epochs_seen", "total_wall_seconds",
                      "final_train_loss", "torch_threads", "seed", "reproduce_with")
        },
        "hf_reference_heldout": report.get("eval"),
        "model_card": "docs/MODEL_CARD.md",
    }
    (DATA / "default_model.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
