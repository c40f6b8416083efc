"""Which graph a model file runs as: a .tflite as given, or a container exported once into a cache.

The runtime only executes graphs; this pipeline turns what a user names (a converted .bin, an
exported .tflite, or nothing: the embedded default model) into a graph and its tokenizer.

Containers (.bin) are exported on first use to `$LLMTOOL_CACHE_DIR` (default
~/.cache/llmtool/graphs), keyed by the container's content hash and the export settings, so a
changed file is never served a stale graph.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from llmtool._version import __version__
from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.tflite_model import read_model
from llmtool.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "default_model.bin"


def cache_dir() -> Path:
    root = os.environ.get("LLMTOOL_CACHE_DIR") or Path.home() / ".cache" / "llmtool"
    return Path(root) / "graphs"


def default_model_path() -> Path:
    if not DEFAULT_MODEL.is_file():
        raise LlmToolError(
            "the embedded default model is not installed (pass --model FILE)", DEFAULT_MODEL
        )
    return DEFAULT_MODEL


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_graph(model_path: str | Path | None, max_tokens: int) -> tuple[Path, Tokenizer]:
    """The graph to run for a model file, exporting (and caching) containers as needed."""
    # Imported here: a run of an exported or cached graph never loads the exporter.
    from llmtool.pipelines.export import ExportOptions, export_graph

    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_file():
        raise LlmToolError("model file not found", path)
    with read_model(path) as model:
        files = keys.unpack_tokenizer(model.metadata)
        graph = model.is_graph
    if not files:
        raise LlmToolError("the model carries no tokenizer (was it written by llmtool?)", path)
    tokenizer = Tokenizer.from_files(files)
    if graph:
        return path, tokenizer
    options = ExportOptions(max_seq_len=max(max_tokens, 16))
    key = hashlib.sha256(f"{file_digest(path)}|{options}|{__version__}".encode()).hexdigest()[:32]
    cached = cache_dir() / f"{path.stem}-{key}.tflite"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        export_graph(path, cached, options)
    return cached, tokenizer
