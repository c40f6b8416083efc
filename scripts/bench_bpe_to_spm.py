#!/usr/bin/env python3
"""How often a byte-level BPE tokenizer converted for a .task gives the Hugging Face ids.

For each tokenizer.json given, llmtool.formats.sentencepiece_bpe converts it to the
SentencePiece model a `.task` carries; each line of a corpus is encoded by the Hugging Face
tokenizer and by the SentencePiece model over the bytes-to-unicode mapped text, and the line
counts as agreeing when the id lists are equal. The corpus is built from what any Python
install has: code (the first 40 lines of the first 40 modules of the standard library),
prose (GPL-3 and Apache-2.0 license texts from /usr/share/common-licenses, when present) and
multilingual text (CPython's test/cjkencodings/*-utf8.txt, when present), plus --extra files
(one sample per line, or llama.cpp's tokenizer test inputs split on __ggml_vocab_test__).

    python scripts/bench_bpe_to_spm.py gpt2/tokenizer.json qwen2/tokenizer.json [--extra F]
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def corpus(extra: list[Path]) -> dict[str, list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code: list[str] = []
    for f in sorted(stdlib.glob("*.py"))[:40]:
        code += f.read_text(encoding="utf-8").split("\n")[:40]
    prose: list[str] = []
    for name in ("GPL-3", "Apache-2.0"):
        f = Path("/usr/share/common-licenses") / name
        if f.is_file():
            prose += f.read_text(encoding="utf-8").split("\n")[:500]
    unicode: list[str] = []
    for f in sorted((stdlib / "test" / "cjkencodings").glob("*-utf8.txt")):
        unicode += f.read_text(encoding="utf-8").split("\n")[:40]
    for f in extra:
        unicode += f.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    return {"code": code, "prose": prose, "unicode": unicode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizers", nargs="+", type=Path)
    parser.add_argument("--extra", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    import sentencepiece as spm
    import tokenizers

    from llmtool.formats.sentencepiece_bpe import bpe_to_sentencepiece, bytes_to_unicode

    lines = corpus(args.extra)
    results = {}
    for path in args.tokenizers:
        data = path.read_bytes()
        hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        sp = spm.SentencePieceProcessor(model_proto=bpe_to_sentencepiece(data))
        row = {}
        for kind, texts in lines.items():
            same = sum(
                hf.encode(t, add_special_tokens=False).ids == sp.encode(bytes_to_unicode(t))
                for t in texts
            )
            row[kind] = [same, len(texts)]
        same, total = (sum(v[i] for v in row.values()) for i in (0, 1))
        row["all"] = [same, total, round(100 * same / total, 2)]
        results[str(path)] = row
        print(path, json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
