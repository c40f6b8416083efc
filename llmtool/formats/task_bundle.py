"""The MediaPipe / LiteRT-LM `.task` bundle: a zip of the graph, the tokenizer and LlmParameters.

Entries, in the reference bundler's order: `TF_LITE_PREFILL_DECODE` (the TFLite graph with
`prefill_<T>` / `decode` signatures), `TOKENIZER_MODEL` (SentencePiece model bytes) and
`METADATA` (a serialized `odml.infra.proto.LlmParameters`). Every entry is stored uncompressed
with its data starting at a multiple of 4 bytes, so a runtime can mmap the entries in place; the
padding goes in a well-formed extra field of the local header (the technique of Android's
zipalign). Timestamps and attributes are fixed, so the same inputs give byte-identical bundles.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmtool.errors import LlmToolError
from llmtool.files import atomic_output
from llmtool.formats import metadata as keys
from llmtool.formats.llm_params import decode_llm_parameters, encode_llm_parameters
from llmtool.formats.tflite_model import read_model

TFLITE_ENTRY = "TF_LITE_PREFILL_DECODE"
TOKENIZER_ENTRY = "TOKENIZER_MODEL"
METADATA_ENTRY = "METADATA"
ENTRY_NAMES = (TFLITE_ENTRY, TOKENIZER_ENTRY, METADATA_ENTRY)
ALIGNMENT = 4

_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold
_PAD_EXTRA_ID = 0xD935  # zipalign's "alignment padding" extra field
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # 30 bytes, then name and extra
_CHUNK = 16 << 20


@dataclass(frozen=True)
class BundleEntry:
    """Where an entry's bytes are in the bundle file (stored, so they are the raw bytes)."""

    name: str
    offset: int
    size: int


def _entry_info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # unix, whatever platform wrote it
    info.external_attr = 0o644 << 16
    info.file_size = size
    return info


def _add_entry(zf: zipfile.ZipFile, name: str, size: int, source) -> None:
    """Write one stored entry whose data starts at a multiple of ALIGNMENT.

    `source` is a binary file object (streamed in chunks) or bytes.
    """
    info = _entry_info(name, size)
    # zipfile appends a zip64 extra field (20 bytes) to the local header when it decides the
    # entry may exceed 2 GiB; mirror its rule so the padding accounts for it.
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
    header_end = zf.start_dir + _LOCAL_HEADER.size + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -header_end % ALIGNMENT
    info.extra = struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"\0" * pad
    with zf.open(info, "w", force_zip64=zip64) as out:
        start = info.header_offset + len(info.FileHeader(zip64))
        if start % ALIGNMENT:  # pragma: no cover - guards the arithmetic above
            raise AssertionError(f"{name}: data would start at {start}, not aligned")
        if isinstance(source, (bytes, bytearray, memoryview)):
            out.write(source)
        else:
            shutil.copyfileobj(source, out, _CHUNK)


def write_task_bundle(
    path: str | Path, tflite_model: str | Path, tokenizer_model: bytes, llm_parameters: bytes
) -> Path:
    """Write a `.task` bundle; the graph is streamed from its file, never held in memory.

    `llm_parameters` is a serialized LlmParameters (see
    `llmtool.formats.llm_params.encode_llm_parameters`). The bundle is written under a temporary
    name next to `path` and renamed, so a failure never leaves a partial bundle behind.
    """
    path, tflite_model = Path(path), Path(tflite_model)
    if not tflite_model.is_file():
        raise LlmToolError("TFLite model not found", tflite_model)
    with open(tflite_model, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise LlmToolError("not a TFLite model (no TFL3 identifier)", tflite_model)
    if not tokenizer_model:
        raise LlmToolError("the tokenizer model is empty", path)
    decode_llm_parameters(llm_parameters)  # raises LlmToolError on bytes that do not parse
    with atomic_output(path, inputs=[tflite_model]) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            with open(tflite_model, "rb") as src:
                _add_entry(zf, TFLITE_ENTRY, tflite_model.stat().st_size, src)
            _add_entry(zf, TOKENIZER_ENTRY, len(tokenizer_model), bytes(tokenizer_model))
            _add_entry(zf, METADATA_ENTRY, len(llm_parameters), bytes(llm_parameters))
    return path


def write_task_bundle_from_graph(
    path: str | Path,
    graph: str | Path,
    start_token: str | None = None,
    stop_tokens: list[str] | None = None,
) -> Path:
    """A `.task` of an llmtool graph: its SentencePiece tokenizer, and start/stop tokens from
    its LlmParameters (else the SentencePiece model's own BOS/EOS) unless given."""
    with read_model(graph) as model:
        files = keys.unpack_tokenizer(model.metadata)
        params = model.metadata.get(keys.LLM_PARAMETERS)
    tokenizer = files.get("tokenizer.model")
    if tokenizer is None:
        raise LlmToolError("the graph carries no SentencePiece tokenizer for a .task", graph)
    ref = decode_llm_parameters(params) if params else {}
    if start_token is None or stop_tokens is None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=tokenizer)
        if start_token is None:
            start_token = ref.get("start_token") or sp.id_to_piece(sp.bos_id())
        if stop_tokens is None:
            stop_tokens = ref.get("stop_tokens") or [sp.id_to_piece(sp.eos_id())]
    metadata = encode_llm_parameters({"start_token": start_token, "stop_tokens": stop_tokens})
    return write_task_bundle(path, graph, tokenizer, metadata)


def task_bundle_entries(path: str | Path) -> dict[str, BundleEntry]:
    """Name -> (data offset, size) of every entry; checks the bundle holds the three entries,
    stored uncompressed."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            entries: dict[str, BundleEntry] = {}
            spans: list[tuple[int, int, str]] = []
            for info in zf.infolist():
                name = info.filename
                if (
                    not name
                    or name.startswith(("/", "\\"))
                    or any(part in ("", ".", "..") for part in name.replace("\\", "/").split("/"))
                    or ":" in name
                    or "\0" in name
                ):
                    raise LlmToolError(f"entry name {name!r} escapes the bundle", path)
                if name in entries:
                    raise LlmToolError(f"entry {name} appears twice", path)
                if info.compress_type != zipfile.ZIP_STORED:
                    raise LlmToolError(f"entry {info.filename} is compressed, not stored", path)
                f.seek(info.header_offset)
                header = f.read(_LOCAL_HEADER.size)
                if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                    raise LlmToolError(f"entry {info.filename}: bad local header", path)
                fields = _LOCAL_HEADER.unpack(header)
                name_len, extra_len = fields[-2], fields[-1]
                offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
                entries[name] = BundleEntry(name, offset, info.file_size)
                spans.append((info.header_offset, offset + info.compress_size, name))
            end_of_data = zf.start_dir
    except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError, EOFError) as exc:
        # zipfile raises NotImplementedError for a damaged "version needed" field and
        # UnicodeDecodeError (a ValueError) for a damaged UTF-8 entry name
        raise LlmToolError(f"not a .task bundle ({type(exc).__name__}: {exc})", path) from None
    previous_end, previous = 0, ""
    for start, end, name in sorted(spans):
        if start < previous_end:
            raise LlmToolError(f"entry {name} overlaps entry {previous}", path)
        if end > end_of_data:
            raise LlmToolError(f"entry {name} runs past the end of the data", path)
        previous_end, previous = end, name
    missing = [n for n in ENTRY_NAMES if n not in entries]
    if missing:
        raise LlmToolError(f"bundle lacks {', '.join(missing)}", path)
    return entries


def read_task_bundle(path: str | Path, names: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """The bytes of the named entries (default: all of them)."""
    path = Path(path)
    entries = task_bundle_entries(path)
    out = {}
    with open(path, "rb") as f:
        for name in names or tuple(entries):
            if name not in entries:
                raise LlmToolError(f"bundle has no entry {name}", path)
            entry = entries[name]
            f.seek(entry.offset)
            out[name] = f.read(entry.size)
            if len(out[name]) != entry.size:
                raise LlmToolError(f"entry {name} is truncated", path)
    return out
