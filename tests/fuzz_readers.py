"""Fuzz llmtool's file readers with truncated and bit-flipped copies of valid files.

    python -m tests.fuzz_readers --seconds 12 --seed 0 model.bin graph.tflite model.task

Each case damages a copy of one file (a truncation, or a few bytes XORed; most of them in the
first 64 KiB, where the flatbuffer, zip headers and metadata live) and reads it the way
`llmtool inspect` and `llmtool run` do before handing a graph to LiteRT. A case passes when the
reader succeeds or raises LlmToolError; any other exception is a failure, printed with the case.
Runs in its own process (see tests/test_hardening.py) so that a crash or a hang is seen as one;
a case that takes more than CASE_LIMIT seconds in Python code is interrupted and is a failure.
The time budget is shared equally by the files. Prints one JSON line:
{"cases": N, "by_kind": {...}, "cpu_seconds": S, "failures": [...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from llmtool.errors import LlmToolError

HEAD = 64 * 1024
CASE_LIMIT = 10.0  # seconds; a reader stuck in a loop on a damaged file fails its case


class Stuck(Exception):
    pass


def _stuck(signum: int, frame: object) -> None:
    raise Stuck(f"no answer after {CASE_LIMIT} s")


def kind_of(path: Path) -> str:
    kinds = {".bin": "container", ".tflite": "graph", ".task": "task", ".litertlm": "litertlm"}
    return kinds.get(path.suffix, "other")


def read_like_the_tools(path: Path, kind: str) -> None:
    """What `llmtool inspect` reads (every reader of the file's format: flatbuffer, metadata,
    model spec, tokenizer, LlmParameters, bundle entries), plus the tensor data."""
    from llmtool.pipelines.inspect import describe

    describe(path)
    if kind == "container":
        from llmtool.formats.container import Container

        with Container.open(path) as c:
            for info in c:
                c.raw(info.name)
                if info.nbytes <= 16384:
                    c.float(info.name)


def structure_regions(path: Path, original: bytes) -> list[tuple[int, int]]:
    """Byte ranges that readers interpret (as opposed to weight data, which they only copy):
    the head (flatbuffer tables, zip / LiteRT-LM headers, the inner graph's flatbuffer), the
    tail (zip central directory) and every metadata entry (tokenizer, spec, parameters)."""
    from llmtool.formats.tflite_model import read_model

    size = len(original)
    regions = [(0, min(size, HEAD)), (max(0, size - HEAD), size)]
    if path.suffix in (".bin", ".tflite"):
        with read_model(path) as m:
            for value in m.metadata.values():
                at = original.find(value) if value else -1
                if at >= 0:
                    regions.append((at, at + len(value)))
    return regions


def mutate(
    rng: random.Random, original: bytes, work: Path, regions: list[tuple[int, int]]
) -> tuple[str, Callable[[], None]]:
    """Damage `work` (a copy of original) in place; returns a description and an undo."""
    size = len(original)

    def position() -> int:
        if rng.random() < 0.2:
            return rng.randrange(0, size)
        start, end = rng.choice(regions)
        return rng.randrange(start, max(start + 1, end))

    if rng.random() < 0.25:
        n = position()
        os.truncate(work, n)

        def undo() -> None:
            with open(work, "r+b") as f:
                f.seek(n)
                f.write(original[n:])

        return f"truncate to {n}", undo
    flips = [(position(), rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))]
    with open(work, "r+b") as f:
        for pos, x in flips:
            f.seek(pos)
            f.write(bytes([original[pos] ^ x]))

    def undo_flips() -> None:
        with open(work, "r+b") as f:
            for pos, _ in flips:
                f.seek(pos)
                f.write(original[pos : pos + 1])

    return "xor " + ", ".join(f"@{p}^{x:#04x}" for p, x in flips), undo_flips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--seconds", type=float, default=12.0, help="time budget for all files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    budget = args.seconds / len(args.files)
    by_kind: dict[str, int] = {}
    failures: list[dict] = []
    signal.signal(signal.SIGALRM, _stuck)
    cpu = time.process_time()
    with tempfile.TemporaryDirectory(prefix="llmtool-fuzz-") as tmp:
        for src in args.files:
            kind = kind_of(src)
            work = Path(tmp) / src.name
            shutil.copyfile(src, work)
            original = src.read_bytes()
            read_like_the_tools(work, kind)  # the undamaged file must read
            regions = structure_regions(work, original)
            end = time.monotonic() + budget
            while time.monotonic() < end:
                what, undo = mutate(rng, original, work, regions)
                signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT)
                try:
                    read_like_the_tools(work, kind)
                except LlmToolError:
                    pass
                except Exception as exc:  # noqa: BLE001 - exactly what the fuzz looks for
                    failures.append(
                        {
                            "file": src.name,
                            "case": what,
                            "error": f"{type(exc).__name__}: {exc}"[:300],
                            "where": traceback.format_exc().strip().splitlines()[-3][:200],
                        }
                    )
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    undo()
                by_kind[kind] = by_kind.get(kind, 0) + 1
            if work.read_bytes() != original:
                raise SystemExit("fuzz bug: the working copy was not restored")
    report = {
        "cases": sum(by_kind.values()),
        "by_kind": by_kind,
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "failures": failures,
    }
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
