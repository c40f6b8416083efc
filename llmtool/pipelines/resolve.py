"""Which graph a model file runs as: a .tflite as given, or a container exported once into a cache.

The runtime only executes graphs; this pipeline turns what a user names (a converted .bin, an
exported .tflite, or nothing: the embedded default model) into a graph and its tokenizer.

Containers (.bin) are exported on first use to `$LLMTOOL_CACHE_DIR` (default
~/.cache/llmtool/graphs), keyed by the container's content hash and the export settings, so a
changed file is never served a stale graph. One graph per model serves every `max_tokens` up to
its KV cache (the model's context, at most DEFAULT_MAX_SEQ_LEN): its KV-bucket signatures make
short conversations cost what they hold. Only a request beyond that exports a larger graph.

The content hash is computed once per file version: it is remembered under the file's identity
(resolved path, size, mtime_ns, inode, ctime_ns), so a warm run reads no weights to find its
graph.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from llmtool import cache
from llmtool._version import __version__
from llmtool.errors import LlmToolError
from llmtool.files import atomic_output, write_bytes
from llmtool.formats import metadata as keys
from llmtool.formats.tflite_model import read_metadata
from llmtool.spec import ModelSpec
from llmtool.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "default_model.bin"


# KV cache of exported graphs unless asked otherwise: the model's context, at most this. Its
# float32 caches take 8 * layers * kv_heads * head_dim bytes per position (32 KiB for a
# 1B Llama), but only the positions a conversation reaches become resident.
DEFAULT_MAX_SEQ_LEN = 8192

# Part of the graph cache key: bump it when the exporter writes different graphs for the same
# container, so a cached graph from another exporter is exported again instead of being served.
GRAPH_REVISION = 5


def cache_root() -> Path:
    return cache.cache_root()


def cache_dir() -> Path:
    return cache.graphs_dir()


def default_model_path() -> Path:
    if not DEFAULT_MODEL.is_file():
        raise LlmToolError(
            "the embedded default model is not installed (pass --model FILE)", DEFAULT_MODEL
        )
    return DEFAULT_MODEL


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def remembered_digest(path: Path) -> str:
    """SHA-256 of a file's content, computed once per version of the file.

    Remembered under the file's identity: a rewrite changes mtime/size/inode and always
    ctime_ns (which cannot be set back), so a changed file is hashed again."""
    resolved = path.resolve()
    st = resolved.stat()
    ident = f"{resolved}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}|{st.st_ctime_ns}"
    note = cache_root() / "digests" / hashlib.sha256(ident.encode()).hexdigest()[:32]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        digest = note.read_text().strip()
        if len(digest) == 64:
            return digest
    digest = file_digest(resolved)
    with contextlib.suppress(OSError, LlmToolError):  # unwritable: only costs a hash next time
        write_bytes(note, digest.encode(), fsync=False)
    return digest


def graph_seq_len(spec: ModelSpec, max_tokens: int) -> int:
    """The KV cache of the graph exported for a request: one length per model (its default
    context, at most DEFAULT_MAX_SEQ_LEN) unless more tokens are asked for."""
    default = min(spec.default_context, DEFAULT_MAX_SEQ_LEN)
    if max_tokens <= default:
        return default
    if max_tokens <= DEFAULT_MAX_SEQ_LEN:
        return min(spec.max_positions, DEFAULT_MAX_SEQ_LEN)
    return min(spec.max_positions, max_tokens)


def resolve_graph(
    model_path: str | Path | None,
    max_tokens: int,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = (),
) -> tuple[Path, Tokenizer]:
    """The graph to run for a model file, exporting (and caching) containers as needed.

    lora_rank > 0: a container is exported with LoRA inputs of that rank on `lora_targets`
    (cached beside the plain graph); an exported graph is used as it is."""
    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_file():
        raise LlmToolError("model file not found", path)
    if bundle_kind(path):
        graph, tokenizer, _ = resolve_bundle(path)
        return graph, tokenizer
    metadata, graph = read_metadata(path)
    files = keys.unpack_tokenizer(metadata)
    spec_json = metadata.get(keys.MODEL_SPEC)
    if not files:
        raise LlmToolError("the model carries no tokenizer (was it written by llmtool?)", path)
    tokenizer = Tokenizer.from_files(files)
    if graph:
        return path, tokenizer
    if not spec_json:
        raise LlmToolError("not a converted model (no llmtool.model_spec)", path)
    seq_len = graph_seq_len(ModelSpec.from_json(spec_json, path), max_tokens)
    key = f"{remembered_digest(path)}|{seq_len}|{__version__}|graph {GRAPH_REVISION}"
    lora = {"lora_rank": lora_rank, "lora_targets": tuple(lora_targets)} if lora_rank else {}
    if lora:
        key += f"|lora {lora_rank} {','.join(lora_targets)}"
    cached = cache_dir() / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.tflite"
    if not cached.is_file():
        # Imported here: a run of an exported or cached graph never loads the exporter.
        from llmtool.pipelines.export import ExportOptions, export_graph

        cached.parent.mkdir(parents=True, exist_ok=True)
        export_graph(path, cached, ExportOptions(max_seq_len=seq_len, **lora))
    cache.use(cached)
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
        with atomic_output(cached) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
            src.seek(offset)
            remaining = size
            while remaining:
                chunk = src.read(min(remaining, 16 << 20))
                if not chunk:
                    raise LlmToolError("the bundle is truncated", path)
                dst.write(chunk)
                remaining -= len(chunk)
    cache.use(cached)
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
