"""The cache folder: exported graphs (`graphs/`) and XNNPACK packed weights (`xnnpack/`).

Location: `$LLMTOOL_CACHE_DIR` (default ~/.cache/llmtool). Size: bounded by
`$LLMTOOL_CACHE_MAX_BYTES` (default 8 GiB; suffixes K, M, G, T; 0 disables caching of new
graphs beyond the one in use). When a new graph is added, the least recently used entries are
removed until the total fits; an entry is a cached graph together with its XNNPACK files, or an
XNNPACK file of a graph outside the cache. Using a graph marks it recently used: the mtime of an
empty note under `used/`, never the graph's own times, which key its XNNPACK file (touching the
graph would make every run repack its weights).
Removing a file another process has mapped is safe on POSIX: the mapping stays valid.

`llmtool cache list` and `llmtool cache clear` show and empty it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmtool.errors import LlmToolError

DEFAULT_MAX_BYTES = 8 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def cache_root() -> Path:
    return Path(os.environ.get("LLMTOOL_CACHE_DIR") or Path.home() / ".cache" / "llmtool")


def graphs_dir() -> Path:
    return cache_root() / "graphs"


def xnnpack_dir() -> Path:
    return cache_root() / "xnnpack"


def used_note(graph: Path) -> Path:
    """The empty file whose mtime says when a cached graph was last used."""
    return cache_root() / "used" / graph.name


def max_bytes() -> int:
    """The size cap from $LLMTOOL_CACHE_MAX_BYTES (e.g. 4G, 500M, 1073741824)."""
    text = os.environ.get("LLMTOOL_CACHE_MAX_BYTES", "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
    if m is None:
        raise LlmToolError(
            f"LLMTOOL_CACHE_MAX_BYTES must be a size such as 4G or 500M (got {text!r})"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def graph_path_key(graph: Path) -> str:
    """The tag XNNPACK cache files carry for the graph they belong to (see compiled_engine)."""
    return hashlib.sha256(str(graph.resolve()).encode()).hexdigest()[:12]


@dataclass
class Entry:
    """One evictable unit: a graph and its XNNPACK files, or a lone XNNPACK file."""

    name: str
    kind: str  # "graph" | "xnnpack"
    files: list[Path] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(_size(f) for f in self.files)

    @property
    def last_used(self) -> float:
        return max((_mtime(f) for f in self.files), default=0.0)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return []


def entries() -> list[Entry]:
    """Every cache entry, least recently used first."""
    by_tag: dict[str, Entry] = {}
    out: list[Entry] = []
    for g in _files(graphs_dir()):
        if g.name.startswith("."):  # a temporary file of a write in progress
            continue
        e = Entry(g.name, "graph", [g, used_note(g)])
        by_tag[graph_path_key(g)] = e
        out.append(e)
    for x in _files(xnnpack_dir()):
        parts = x.stem.rsplit("-", 2)
        tag = parts[1] if len(parts) == 3 else ""
        if tag in by_tag:
            by_tag[tag].files.append(x)
        elif x.suffix == ".xnnpack":
            out.append(Entry(x.name, "xnnpack", [x, x.with_suffix(".lock")]))
    for e in out:
        e.files = [f for f in e.files if f.exists()]
    return sorted(out, key=lambda e: (e.last_used, e.name))


def touch(graph: Path) -> None:
    """Mark a cached graph as just used (its note; the graph itself is left alone)."""
    note = used_note(graph)
    with contextlib.suppress(OSError):
        note.parent.mkdir(parents=True, exist_ok=True)
        note.touch()


def use(path: Path) -> None:
    """A cached graph is about to be used: mark it recently used, then trim the rest."""
    touch(path)
    trim(keep=[path])


def remove(entry: Entry) -> int:
    freed = 0
    for f in entry.files:
        with contextlib.suppress(OSError):
            size = _size(f)
            f.unlink()
            freed += size
    return freed


def trim(keep: list[Path] | None = None, limit: int | None = None) -> list[Entry]:
    """Remove least recently used entries until the cache fits `limit`; never those in `keep`."""
    limit = max_bytes() if limit is None else limit
    kept = {p.resolve() for p in keep or []}
    all_entries = entries()
    total = sum(e.bytes for e in all_entries)
    removed = []
    for e in all_entries:
        if total <= limit:
            break
        if any(f.resolve() in kept for f in e.files):
            continue
        total -= remove(e)
        removed.append(e)
    return removed


def clear() -> tuple[int, int]:
    """Remove every entry; returns (entries, bytes) removed."""
    count = freed = 0
    for e in entries():
        freed += remove(e)
        count += 1
    # Small notes: content hashes, uses of removed graphs, SentencePiece models' special pieces.
    for folder in ("digests", "used", "tokenizers"):
        for note in _files(cache_root() / folder):
            with contextlib.suppress(OSError):
                note.unlink()
    return count, freed


def describe() -> dict:
    items = entries()
    return {
        "cache_dir": str(cache_root()),
        "max_bytes": max_bytes(),
        "total_bytes": sum(e.bytes for e in items),
        "entries": [
            {
                "name": e.name,
                "kind": e.kind,
                "bytes": e.bytes,
                "files": [str(f) for f in e.files],
                "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used)),
            }
            for e in reversed(items)
        ],
    }
