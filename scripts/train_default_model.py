#!/usr/bin/env python3
"""Train llmtool's embedded default model from scratch on a 2-core CPU.

Corpus: Jane Austen's six completed novels as shipped by the Debian package
``r-cran-janeaustenr`` (package MIT-licensed, the novels themselves are public domain).
The novels live in the R lazy-load database ``data/Rdata.rdb`` inside the package; this
script reads that database with a tiny pure-Python reader for R's XDR serialization, so
neither R nor network access beyond ``apt-get download`` is needed.

Pipeline (every step deterministic for a fixed ``--steps``):

1. ``apt-get download r-cran-janeaustenr`` (or ``--deb PATH``), extract with ``dpkg-deb -x``.
2. Clean: drop title pages, chapter/volume headings and end matter, unwrap paragraphs,
   remove ``_italic_`` markers, normalise whitespace. One document per chapter.
3. Hold out every 50th chapter (index % 50 == 25, about 2%) as the validation split.
4. Train a SentencePiece unigram tokenizer (vocab 4096, byte fallback, Gemma-style ids
   ``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3, identity normalisation).
5. Train a ``LlamaForCausalLM`` (~5.4M parameters, tied embeddings) with AdamW and a
   warmup + cosine schedule on random 256-token windows of the ``<bos> doc <eos>`` stream.
6. Save a Hugging Face folder (periodically and at the end) plus ``train_report.json``.

Usage::

    python scripts/train_default_model.py --minutes 52          # calibrate steps to the budget
    python scripts/train_default_model.py --steps 800           # exact, reproducible run
    python scripts/train_default_model.py --steps 20 --out /tmp/m --work /tmp/w   # smoke test

With ``--minutes`` the number of steps is chosen after the warmup steps from their
measured speed (the schedule during warmup does not depend on the total), and the chosen
number is written to the report, so ``--steps N`` reproduces the same weights.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

DEB_NAME = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
BOOK_ORDER = [
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
]
END_MARKERS = {"THE END", "FINIS", "Finis"}
# Northanger Abbey ends with a footnote and an editor's note on the source edition.
END_PREFIXES = ("*Vide a letter",)
CHAPTER_RE = re.compile(r"^(CHAPTER|Chapter) ([IVXLC]+|[0-9]+)\.?$")
VOLUME_RE = re.compile(r"^VOLUME [IVX]+$")

DEFAULT_OUT = "/work/main/artifacts/default-model/hf"
DEFAULT_WORK = "/work/main/artifacts/default-model/work"

TOKENIZER_CONFIG = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
}


def log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S", time.gmtime())
    print(f"[{stamp}] {msg}", flush=True)


# --------------------------------------------------------------------------- corpus


class _RReader:
    """Minimal reader for R's XDR serialization (enough for character vectors and lists)."""

    def __init__(self, data: bytes) -> None:
        self.b = data
        self.p = 0
        self.refs: list[object] = []

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def _item(self) -> object:
        flags = self._int()
        typ = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if typ == 254:  # NILVALUE_SXP
            return None
        if typ == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if typ == 1:  # SYMSXP
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if typ == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.p : self.p + n].decode("utf-8")
            self.p += n
            return s
        if typ == 2:  # LISTSXP (pairlist) -> list of (tag, value)
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            out = [(tag[1] if isinstance(tag, tuple) else None, car)]
            if cdr:
                out += cdr  # type: ignore[operator]
            return out
        if typ in (10, 13, 14, 16, 19):  # LGL, INT, REAL, STR, VEC
            n = self._int()
            if typ in (10, 13):
                v: list = list(struct.unpack_from(f">{n}i", self.b, self.p))
                self.p += 4 * n
            elif typ == 14:
                v = list(struct.unpack_from(f">{n}d", self.b, self.p))
                self.p += 8 * n
            else:
                v = [self._item() for _ in range(n)]
            attrs = dict(self._item()) if has_attr else {}  # type: ignore[arg-type]
            return (v, attrs)
        raise ValueError(f"unsupported R SEXP type {typ}")

    def read(self) -> object:
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            n = self._int()
            self.p += n
        return self._item()


def read_rdata(data_dir: Path) -> dict[str, list[str]]:
    """Read every character vector from an R package's lazy-load data database."""
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
    variables = index[0][0]  # type: ignore[index]
    names = variables[1]["names"][0]
    offsets = [entry[0] for entry in variables[0]]
    raw = (data_dir / "Rdata.rdb").read_bytes()
    out: dict[str, list[str]] = {}
    for name, (off, length) in zip(names, offsets, strict=True):
        block = raw[off : off + length]
        size = struct.unpack(">I", block[:4])[0]
        payload = zlib.decompress(block[4:])
        if len(payload) != size:
            raise ValueError(f"bad block for {name}")
        vec, _attrs = _RReader(payload).read()  # type: ignore[misc]
        out[name] = ["" if x is None else x for x in vec]
    return out


def fetch_corpus(work: Path, deb: str | None) -> tuple[dict[str, list[str]], dict]:
    """Get the .deb (apt-get download unless given), extract it and read the novels."""
    work.mkdir(parents=True, exist_ok=True)
    if deb is None:
        debs = sorted(work.glob(f"{DEB_NAME}_*.deb"))
        if not debs:
            log(f"apt-get download {DEB_NAME}={DEB_VERSION}")
            r = subprocess.run(
                ["apt-get", "download", f"{DEB_NAME}={DEB_VERSION}"], cwd=work,
                capture_output=True, text=True,
            )
            if r.returncode != 0:
                log(f"pinned version unavailable ({r.stderr.strip()}); trying latest")
                subprocess.run(["apt-get", "download", DEB_NAME], cwd=work, check=True)
            debs = sorted(work.glob(f"{DEB_NAME}_*.deb"))
        deb_path = debs[-1]
    else:
        deb_path = Path(deb)
    extract = work / "extract"
    if extract.exists():
        shutil.rmtree(extract)
    subprocess.run(["dpkg-deb", "-x", str(deb_path), str(extract)], check=True)
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb_path), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    books = read_rdata(extract / RDATA_DIR)
    info = {
        "package": DEB_NAME,
        "version": version,
        "registry": "Debian (apt-get download)",
        "deb_file": deb_path.name,
        "deb_sha256": hashlib.sha256(deb_path.read_bytes()).hexdigest(),
        "deb_size_bytes": deb_path.stat().st_size,
        "files_used": [f"{RDATA_DIR}/Rdata.rdb", f"{RDATA_DIR}/Rdata.rdx"],
        "objects_used": BOOK_ORDER,
        "license": "package: MIT (Copyright 2016-2017 Julia Silge; debian/ 2021 Andreas "
        "Tille); texts: Jane Austen's novels (1811-1818), public domain",
        "raw_text_bytes": sum(len("\n".join(v).encode()) for v in books.values()),
    }
    return books, info


def _clean_paragraph(lines: list[str]) -> str:
    text = " ".join(line.strip() for line in lines)
    text = text.replace("_", "")
    return re.sub(r"\s+", " ", text).strip()


def book_chapters(lines: list[str]) -> list[str]:
    """Split one novel into cleaned chapter documents (paragraphs joined by newlines)."""
    chapters: list[list[str]] = []
    para: list[str] = []
    current: list[str] | None = None  # None = front matter before the first chapter

    def flush() -> None:
        if para and current is not None:
            p = _clean_paragraph(para)
            if p:
                current.append(p)
        para.clear()

    for line in lines:
        s = line.strip()
        if s in END_MARKERS or s.startswith(END_PREFIXES):
            break
        if CHAPTER_RE.match(s):
            flush()
            current = []
            chapters.append(current)
            continue
        if VOLUME_RE.match(s):
            flush()
            continue
        if not s:
            flush()
        else:
            para.append(s)
    flush()
    return ["\n".join(c) for c in chapters if c]


def build_documents(books: dict[str, list[str]]) -> list[tuple[str, int, str]]:
    docs = []
    for name in BOOK_ORDER:
        for i, text in enumerate(book_chapters(books[name])):
            docs.append((name, i + 1, text))
    return docs


def split_documents(docs: list[tuple[str, int, str]]) -> tuple[list[str], list[str], list[str]]:
    train, val, val_ids = [], [], []
    for i, (name, chap, text) in enumerate(docs):
        if i % 50 == 25:
            val.append(text)
            val_ids.append(f"{name}:{chap}")
        else:
            train.append(text)
    return train, val, val_ids


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(train_docs: list[str], work: Path, vocab: int) -> Path:
    import sentencepiece as spm

    corpus = work / "tokenizer_train.txt"
    with corpus.open("w", encoding="utf-8") as f:
        for doc in train_docs:
            for para in doc.split("\n"):
                f.write(para + "\n")
    prefix = work / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="unigram",
        vocab_size=vocab,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=16384,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=2,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def encode_stream(sp, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids.append(2)
        ids.extend(sp.encode(doc))
        ids.append(1)
    return ids


# ---------------------------------------------------------------------------- model


def make_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        initializer_range=0.02,
        torch_dtype="float32",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    return model.float()


def evaluate(model, stream, context: int, max_windows: int | None = None) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping windows covering ``stream``."""
    import torch

    model.eval()
    total, count = 0.0, 0
    n = len(stream)
    starts = list(range(0, n - 1, context))
    if max_windows is not None:
        starts = starts[:max_windows]
    with torch.no_grad():
        for s in starts:
            chunk = stream[s : s + context + 1]
            if chunk.numel() < 2:
                continue
            x = chunk[:-1].unsqueeze(0)
            y = chunk[1:].unsqueeze(0)
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum"
            )
            total += loss.item()
            count += y.numel()
    model.train()
    return total / max(count, 1), count


def save_folder(model, tok_model: Path, out: Path) -> None:
    """Write the HF folder atomically (tmp dir + rename) so a crash never leaves half a model."""
    from transformers import GenerationConfig

    tmp = out.parent / (out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copyfile(tok_model, tmp / "tokenizer.model")
    (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    report = out / "train_report.json"
    if report.exists():
        shutil.copyfile(report, tmp / "train_report.json")
    old = out.parent / (out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def write_report(out: Path, report: dict) -> None:
    path = out / "train_report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, total - args.warmup)
    frac = min(1.0, frac)
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=DEFAULT_OUT, help="Hugging Face output folder")
    ap.add_argument("--work", default=DEFAULT_WORK, help="scratch folder (deb, tokenizer)")
    ap.add_argument("--deb", default=None, help="use this r-cran-janeaustenr .deb")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="exact number of optimizer steps")
    g.add_argument("--minutes", type=float, default=None,
                   help="training-loop budget; steps are calibrated after warmup (default 52)")
    ap.add_argument("--hard-stop-minutes", type=float, default=None,
                    help="stop the loop (and save) after this many minutes whatever --steps says")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every-minutes", type=float, default=6.0)
    args = ap.parse_args(argv)
    if args.steps is None and args.minutes is None:
        args.minutes = 52.0

    # Passive OpenMP waiting: on a shared, oversubscribed 2-core box spinning threads only
    # slow everyone down (must be set before torch initialises its thread pool).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import sentencepiece as spm
    import torch

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    work = Path(args.work)
    out.parent.mkdir(parents=True, exist_ok=True)

    books, corpus_info = fetch_corpus(work, args.deb)
    docs = build_documents(books)
    train_docs, val_docs, val_ids = split_documents(docs)
    train_text = "\n".join(train_docs)
    val_text = "\n".join(val_docs)
    corpus_info.update(
        {
            "documents": len(docs),
            "documents_train": len(train_docs),
            "documents_val": len(val_docs),
            "val_documents": val_ids,
            "clean_text_bytes_train": len(train_text.encode()),
            "clean_text_bytes_val": len(val_text.encode()),
            "clean_text_sha256": hashlib.sha256(
                "\n\x00".join(d[2] for d in docs).encode()
            ).hexdigest(),
            "cleaning": "dropped title pages/front matter before the first chapter heading, "
            "chapter and volume headings, end markers and end matter; unwrapped paragraphs; "
            "removed '_' italic markers; collapsed whitespace; one document per chapter, "
            "paragraphs joined with '\\n'",
            "split": "validation = documents with index % 50 == 25 (in book order S&S, P&P, "
            "MP, Emma, NA, Persuasion)",
        }
    )
    log(f"corpus: {len(docs)} chapters, train {len(train_text)} chars, val {len(val_text)} chars")

    tok_model = train_tokenizer(train_docs, work, args.vocab)
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    assert sp.piece_to_id("<pad>") == 0 and sp.piece_to_id("<eos>") == 1
    assert sp.piece_to_id("<bos>") == 2 and sp.piece_to_id("<unk>") == 3
    sample = val_docs[0][:2000]
    roundtrip_ok = sp.decode(sp.encode(sample)) == sample
    train_ids = torch.tensor(encode_stream(sp, train_docs), dtype=torch.long)
    val_ids_t = torch.tensor(encode_stream(sp, val_docs), dtype=torch.long)
    log(f"tokenizer: vocab {sp.get_piece_size()}, train {len(train_ids)} tokens, "
        f"val {len(val_ids_t)} tokens, roundtrip {'ok' if roundtrip_ok else 'MISMATCH'}")

    model = make_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    span = args.context + 1
    max_start = len(train_ids) - span

    total_steps = args.steps if args.steps is not None else 10**9
    calibrated = args.steps is not None
    t_loop = time.time()
    hard_stop = None
    if args.hard_stop_minutes is not None:
        hard_stop = t_loop + args.hard_stop_minutes * 60
    elif args.minutes is not None:
        hard_stop = t_loop + args.minutes * 60 * 1.04
    step_times: list[float] = []
    history: list[dict] = []
    losses: list[float] = []
    last_save = time.time()
    stopped_early = False
    step = 0

    def make_report(status: str, final: dict | None = None) -> dict:
        r = {
            "status": status,
            "corpus": corpus_info,
            "tokenizer": {
                "type": "sentencepiece unigram",
                "vocab_size": sp.get_piece_size(),
                "byte_fallback": True,
                "special_ids": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3},
                "normalization": "identity, no dummy prefix, no whitespace collapsing",
                "roundtrip_ok_on_val_sample": roundtrip_ok,
                "train_tokens": int(len(train_ids)),
                "val_tokens": int(len(val_ids_t)),
            },
            "model": {
                "class": "LlamaForCausalLM",
                "parameters": n_params,
                "hidden": args.hidden,
                "intermediate": args.intermediate,
                "layers": args.layers,
                "heads": args.heads,
                "kv_heads": args.kv_heads,
                "context": args.context,
                "tie_word_embeddings": True,
                "dtype": "float32",
            },
            "training": {
                "seed": args.seed,
                "optimizer": "AdamW(betas=(0.9,0.95), eps=1e-8)",
                "weight_decay": args.weight_decay,
                "lr_peak": args.lr,
                "lr_min_ratio": args.min_lr_ratio,
                "warmup_steps": args.warmup,
                "schedule": "linear warmup + cosine",
                "batch_size": args.batch,
                "tokens_per_step": args.batch * args.context,
                "planned_steps": total_steps if calibrated else None,
                "steps_done": step,
                "tokens_seen": step * args.batch * args.context,
                "epochs_seen": step * args.batch * args.context / max(1, len(train_ids)),
                "torch_threads": args.threads,
                "budget_minutes": args.minutes,
                "stopped_early_by_time_limit": stopped_early,
                "reproduce_with": f"--steps {total_steps}" if calibrated else None,
                "mean_step_seconds": (sum(step_times) / len(step_times)) if step_times else None,
                "loop_wall_seconds": time.time() - t_loop,
                "total_wall_seconds": time.time() - t_start,
                "final_train_loss": (sum(losses[-20:]) / len(losses[-20:])) if losses else None,
                "history": history,
            },
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "sentencepiece": spm.__version__,
            },
        }
        if final:
            r["eval"] = final
        return r

    model.train()
    while step < total_steps:
        if hard_stop is not None and time.time() > hard_stop:
            stopped_early = True
            log(f"time limit reached at step {step}/{total_steps}; stopping")
            break
        t0 = time.time()
        lr = lr_at(step, total_steps, args)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, max_start + 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + span] for s in starts.tolist()])
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        step_times.append(time.time() - t0)

        if not calibrated and step == args.warmup:
            recent = sorted(step_times[3:]) or sorted(step_times)
            median = recent[len(recent) // 2]
            remaining = args.minutes * 60 - (time.time() - t_loop)
            # 10% margin for eval/saves and for other jobs on the shared machine.
            total_steps = max(step + 1, step + int(0.90 * remaining / median))
            calibrated = True
            log(f"calibrated: median step {median:.2f}s -> total_steps {total_steps} "
                f"(reproduce with --steps {total_steps})")

        if step % args.log_every == 0 or step == 1:
            window = losses[-args.log_every:]
            mean = sum(window) / len(window)
            elapsed = time.time() - t_loop
            entry = {"step": step, "train_loss": round(mean, 4), "lr": lr,
                     "grad_norm": round(float(gnorm), 3), "elapsed_s": round(elapsed, 1)}
            history.append(entry)
            plan = total_steps if calibrated else "?"
            log(f"step {step}/{plan} loss {mean:.4f} lr {lr:.2e} gnorm {float(gnorm):.2f} "
                f"step_s {step_times[-1]:.2f} elapsed {elapsed / 60:.1f}m")

        if time.time() - last_save > args.save_every_minutes * 60 and step < total_steps:
            vloss, _ = evaluate(model, val_ids_t, args.context, max_windows=16)
            history.append({"step": step, "val_loss_subset": round(vloss, 4)})
            log(f"step {step}: val loss (first 16 windows) {vloss:.4f}; saving checkpoint")
            save_folder(model, tok_model, out)
            write_report(out, make_report("in_progress"))
            last_save = time.time()

    log("training loop done; saving final model")
    save_folder(model, tok_model, out)
    write_report(out, make_report("evaluating"))

    # Held-out evaluation with the saved HF model, float32, whole validation split.
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    vloss, vcount = evaluate(hf, val_ids_t, args.context)
    final = {
        "val_loss": vloss,
        "val_perplexity": math.exp(vloss),
        "val_tokens_scored": vcount,
        "method": "saved HF model (float32), non-overlapping 256-token windows over the whole "
        "validation token stream, each window scored from its own start",
    }
    log(f"held-out loss {vloss:.4f} perplexity {math.exp(vloss):.2f} over {vcount} tokens")
    write_report(out, make_report("done", final))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
