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
from dataclasses import dataclass
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
    if bundle_kind(path):
        graph, tokenizer, _ = resolve_bundle(path)
        return graph, tokenizer
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


# ------------------------------------------------------------------------------------------
# bundles (.task / .litertlm)


@dataclass(frozen=True)
class PromptTemplate:
    """What a bundle says to put around a prompt: a session prefix (the system prompt) once,
    then prefix + prompt + suffix."""

    session_prefix: str = ""
    prompt_prefix: str = ""
    prompt_suffix: str = ""

    def apply(self, prompt: str) -> str:
        return self.session_prefix + self.prompt_prefix + prompt + self.prompt_suffix


def bundle_kind(path: Path) -> str | None:
    """ "task" for a zip, "litertlm" for a LiteRT-LM file, else None (by the file's magic)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        return "task"
    if head == b"LITERTLM":
        return "litertlm"
    return None


def _extract(path: Path, offset: int, size: int) -> Path:
    """The bundle's graph as a file of its own in the cache (runtimes load graphs by path),
    keyed by the bundle's content hash; streamed, never held in memory."""
    key = hashlib.sha256(f"{file_digest(path)}|{__version__}".encode()).hexdigest()[:32]
    cached = cache_dir() / f"{path.stem}-{key}.tflite"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(offset)
                remaining = size
                while remaining:
                    chunk = src.read(min(remaining, 16 << 20))
                    if not chunk:
                        raise LlmToolError("the bundle is truncated", path)
                    dst.write(chunk)
                    remaining -= len(chunk)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
    return cached


def resolve_bundle(path: str | Path) -> tuple[Path, Tokenizer, PromptTemplate]:
    """Graph, tokenizer (start/stop tokens and byte mapping as the bundle says) and prompt
    template of a .task or .litertlm; the graph is extracted once into the cache."""
    path = Path(path)
    tokenizer, template, (offset, size) = bundle_tokenizer(path)
    return _extract(path, offset, size), tokenizer, template


def bundle_tokenizer(path: Path) -> tuple[Tokenizer, PromptTemplate, tuple[int, int]]:
    """A bundle's tokenizer and prompt template, and where its graph lies in the file."""
    kind = bundle_kind(path)
    if kind == "task":
        from llmtool.formats.llm_params import decode_llm_parameters
        from llmtool.formats.task_bundle import (
            METADATA_ENTRY,
            TFLITE_ENTRY,
            TOKENIZER_ENTRY,
            read_task_bundle,
            task_bundle_entries,
        )

        entry = task_bundle_entries(path)[TFLITE_ENTRY]
        data = read_task_bundle(path, (TOKENIZER_ENTRY, METADATA_ENTRY))
        params = decode_llm_parameters(data[METADATA_ENTRY])
        tokenizer = Tokenizer.from_files({"tokenizer.model": data[TOKENIZER_ENTRY]})
        if "INPUT_OUTPUT_NORMALIZATION_BYTES_TO_UNICODE" in params.get(
            "input_output_normalizations", []
        ):
            tokenizer.use_bytes_to_unicode()
        try:
            tokenizer.use_start_and_stop(params.get("start_token"), params.get("stop_tokens") or [])
        except LlmToolError as exc:
            raise LlmToolError(f"METADATA: {exc}", path) from None
        t = params.get("prompt_template") or {}
        template = PromptTemplate(
            t.get("session_prefix", ""), t.get("prompt_prefix", ""), t.get("prompt_suffix", "")
        )
        return tokenizer, template, (entry.offset, entry.size)
    if kind == "litertlm":
        from llmtool.formats.litertlm import read_litertlm

        info = read_litertlm(path)
        tok_kind, tok_data = info["tokenizer"]
        name = "tokenizer.model" if tok_kind == "sentencepiece" else "tokenizer.json"
        tokenizer = Tokenizer.from_files({name: tok_data})
        meta = info["metadata"]

        def ids(union) -> list[int]:
            if union.HasField("token_ids"):
                return list(union.token_ids.ids)
            token_id = tokenizer.token_to_id(union.token_str)
            if token_id is None:
                raise LlmToolError(f"token {union.token_str!r} is not in the tokenizer", path)
            return [token_id]

        start = ids(meta.start_token) if meta.HasField("start_token") else []
        stops = [i for u in meta.stop_tokens for i in ids(u)]
        try:
            tokenizer.use_start_and_stop_ids(start[0] if start else None, stops)
        except LlmToolError as exc:
            raise LlmToolError(f"LlmMetadata: {exc}", path) from None
        pt = meta.prompt_templates
        template = PromptTemplate(
            pt.system.prefix + pt.system.suffix if pt.system.prefix else "",
            pt.user.prefix,
            pt.user.suffix + pt.model.prefix,
        )
        graph = info["graph"]
        return tokenizer, template, (graph.begin, graph.size)
    raise LlmToolError("not a .task or .litertlm bundle", path)
