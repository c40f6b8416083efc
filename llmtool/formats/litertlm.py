"""LiteRT-LM's own container, `.litertlm`: a header, then 16 KiB-aligned sections.

Layout (LiteRT-LM file format 1.x, schema from the `litert-lm-builder` package): the magic
`LITERTLM`, three little-endian uint32 version numbers, at byte 24 a uint64 giving where the
header ends, from byte 32 a `LiteRTLMMetaData` flatbuffer (system metadata key/values and one
record per section: data type, begin and end offset, key/values), then each section's bytes at
a multiple of 16 KiB. llmtool writes three sections: the TFLite graph (`TFLiteModel`, model type
`tf_lite_prefill_decode`), the tokenizer (`SP_Tokenizer`: SentencePiece model bytes, or
`HF_Tokenizer_Zlib`: a Hugging Face tokenizer.json, zlib-compressed after its uint64 size) and an
`LlmMetadataProto` (start/stop tokens, prompt templates).

The builder package stamps every file with a random UUID and the current time; this writer
uses the same schema without them, so the same inputs give byte-identical files, and it streams
the graph from its file (never held in memory).
"""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtool.errors import LlmToolError
from llmtool.files import atomic_output

MAGIC = b"LITERTLM"
VERSION = (1, 7, 0)  # the format version litert-lm-builder 0.18.1 writes
BLOCK = 16 * 1024
HEADER_END_AT = 24
METADATA_AT = 32
MODEL_TYPE_PREFILL_DECODE = "tf_lite_prefill_decode"
_CHUNK = 16 << 20


def _schema() -> Any:
    try:
        from litert_lm_builder import litertlm_header_schema_py_generated as schema
    except ImportError:  # pragma: no cover - depends on the environment
        raise LlmToolError(
            ".litertlm files need litert-lm-builder: pip install litert-lm-builder"
        ) from None
    return schema


def llm_metadata_class() -> Any:
    """LiteRT-LM's LlmMetadata protobuf message class."""
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    return llm_metadata_pb2.LlmMetadata


@dataclass(frozen=True)
class Section:
    """One section: its data type name, where its bytes are, and its key/values."""

    kind: str  # "TFLiteModel", "SP_Tokenizer", "HF_Tokenizer_Zlib", "LlmMetadataProto", ...
    begin: int
    end: int
    items: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.end - self.begin


@dataclass
class _Source:
    kind: str
    items: dict[str, str]
    data: bytes | None = None
    path: Path | None = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None else len(self.data or b"")


def _kind_code(schema: Any, kind: str) -> int:
    return getattr(schema.AnySectionDataType, kind)


def _metadata_bytes(schema: Any, sources: list[_Source], offsets: list[tuple[int, int]]) -> bytes:
    import flatbuffers

    objects = []
    for src, (begin, end) in zip(sources, offsets, strict=True):
        items = [
            schema.KeyValuePairT(
                key=k, value=schema.StringValueT(v), valueType=schema.VData.StringValue
            )
            for k, v in sorted(src.items.items())
        ]
        objects.append(
            schema.SectionObjectT(
                items=items,
                dataType=_kind_code(schema, src.kind),
                beginOffset=begin,
                endOffset=end,
            )
        )
    meta = schema.LiteRTLMMetaDataT(
        systemMetadata=schema.SystemMetadataT(entries=[]),
        sectionMetadata=schema.SectionMetadataT(objects=objects),
    )
    builder = flatbuffers.Builder(BLOCK)
    builder.Finish(meta.Pack(builder))
    return bytes(builder.Output())


def _round_up(x: int) -> int:
    return -(-x // BLOCK) * BLOCK


def write_litertlm(
    path: str | Path,
    tflite_model: str | Path,
    tokenizer: bytes,
    tokenizer_kind: str,
    llm_metadata: bytes,
) -> Path:
    """Write a `.litertlm`; `tokenizer_kind` is "sentencepiece" (model bytes) or "hf"
    (tokenizer.json bytes). Written under a temporary name and renamed when complete."""
    schema = _schema()
    path, tflite_model = Path(path), Path(tflite_model)
    if tokenizer_kind == "sentencepiece":
        tok = _Source("SP_Tokenizer", {}, data=bytes(tokenizer))
    elif tokenizer_kind == "hf":
        packed = struct.pack("<Q", len(tokenizer)) + zlib.compress(bytes(tokenizer), 9)
        tok = _Source("HF_Tokenizer_Zlib", {}, data=packed)
    else:
        raise ValueError(f"unknown tokenizer kind {tokenizer_kind!r}")
    sources = [
        _Source("TFLiteModel", {"model_type": MODEL_TYPE_PREFILL_DECODE}, path=tflite_model),
        tok,
        _Source("LlmMetadataProto", {}, data=bytes(llm_metadata)),
    ]
    # Section offsets are uint64 fields the flatbuffer writes at a fixed size whatever their
    # value (non-zero), so lay out with the size of a placeholder header, then fill them in.
    placeholder = _metadata_bytes(schema, sources, [(1, 1)] * len(sources))
    offsets, pos = [], _round_up(METADATA_AT + len(placeholder))
    for src in sources:
        offsets.append((pos, pos + src.size))
        pos = _round_up(pos + src.size)
    header = _metadata_bytes(schema, sources, offsets)
    if len(header) != len(placeholder):  # pragma: no cover - guards the reasoning above
        raise AssertionError("the LiteRT-LM header changed size")

    with atomic_output(path, inputs=[tflite_model]) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<3I", *VERSION))
        f.write(b"\0" * (HEADER_END_AT - f.tell()))
        f.write(struct.pack("<Q", METADATA_AT + len(header)))
        f.write(header)
        for src, (begin, end) in zip(sources, offsets, strict=True):
            f.write(b"\0" * (begin - f.tell()))
            if src.path is not None:
                with open(src.path, "rb") as s:
                    shutil.copyfileobj(s, f, _CHUNK)
            else:
                f.write(src.data or b"")
            if f.tell() != end:
                raise LlmToolError("an input changed size while it was written", src.path)
    return path


def _value(schema: Any, kvp: Any) -> Any:
    names = {v: k for k, v in vars(schema.VData).items() if not k.startswith("_")}
    kind = names.get(kvp.ValueType())
    table = kvp.Value()
    if kind is None or kind == "NONE" or table is None:
        return None
    cls = getattr(schema, kind)
    obj = cls()
    obj.Init(table.Bytes, table.Pos)
    value = obj.Value()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def read_sections(path: str | Path) -> list[Section]:
    """The sections of a `.litertlm`, checked to lie inside the file without overlapping."""
    schema = _schema()
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(METADATA_AT)
            if len(head) < METADATA_AT or head[:8] != MAGIC:
                raise LlmToolError("not a .litertlm file (no LITERTLM magic)", path)
            major = struct.unpack_from("<I", head, 8)[0]
            if major != VERSION[0]:
                raise LlmToolError(f"unsupported .litertlm version {major}", path)
            header_end = struct.unpack_from("<Q", head, HEADER_END_AT)[0]
            if not METADATA_AT < header_end <= size:
                raise LlmToolError("corrupt .litertlm header (bad header size)", path)
            raw = f.read(header_end - METADATA_AT)
    except OSError as exc:
        raise LlmToolError(f"cannot read file ({exc.strerror or exc})", path) from None
    names = {v: k for k, v in vars(schema.AnySectionDataType).items() if not k.startswith("_")}
    sections = []
    try:
        meta = schema.LiteRTLMMetaData.GetRootAs(raw, 0)
        objects = meta.SectionMetadata()
        for i in range(objects.ObjectsLength() if objects else 0):
            obj = objects.Objects(i)
            items = {}
            for j in range(obj.ItemsLength()):
                kvp = obj.Items(j)
                items[(kvp.Key() or b"").decode("utf-8", errors="replace")] = _value(schema, kvp)
            kind = names.get(obj.DataType(), f"unknown({obj.DataType()})")
            sections.append(Section(kind, obj.BeginOffset(), obj.EndOffset(), items))
    except Exception as exc:  # flatbuffers raises assorted errors on corrupt bytes
        raise LlmToolError(f"corrupt .litertlm header ({type(exc).__name__})", path) from None
    previous_end, previous = header_end, "the header"
    for s in sorted(sections, key=lambda s: s.begin):
        if not s.begin <= s.end <= size:
            raise LlmToolError(f"section {s.kind} lies outside the file", path)
        if s.begin < previous_end:
            raise LlmToolError(f"section {s.kind} overlaps {previous}", path)
        previous_end, previous = s.end, f"section {s.kind}"
    return sections


def read_section(path: str | Path, section: Section) -> bytes:
    with open(path, "rb") as f:
        f.seek(section.begin)
        return f.read(section.size)


def read_litertlm(path: str | Path) -> dict[str, Any]:
    """The graph's location, the tokenizer (kind, bytes) and the LlmMetadata message."""
    path = Path(path)
    sections = read_sections(path)
    graphs = [
        s
        for s in sections
        if s.kind == "TFLiteModel" and s.items.get("model_type") == MODEL_TYPE_PREFILL_DECODE
    ]
    if not graphs:
        raise LlmToolError("the .litertlm holds no prefill/decode TFLite model", path)
    tokenizer: tuple[str, bytes] | None = None
    metadata = llm_metadata_class()()
    for s in sections:
        if s.kind == "SP_Tokenizer" and tokenizer is None:
            tokenizer = ("sentencepiece", read_section(path, s))
        elif s.kind == "HF_Tokenizer_Zlib" and tokenizer is None:
            blob = read_section(path, s)
            try:
                size = struct.unpack_from("<Q", blob)[0]
                text = zlib.decompress(blob[8:])
            except (struct.error, zlib.error):
                raise LlmToolError("corrupt HF tokenizer section", path) from None
            if len(text) != size:
                raise LlmToolError("corrupt HF tokenizer section (size differs)", path)
            tokenizer = ("hf", text)
        elif s.kind == "LlmMetadataProto":
            try:
                metadata.ParseFromString(read_section(path, s))
            except Exception:
                raise LlmToolError("corrupt LlmMetadata section", path) from None
    if tokenizer is None:
        raise LlmToolError("the .litertlm holds no tokenizer", path)
    return {"graph": graphs[0], "tokenizer": tokenizer, "metadata": metadata, "sections": sections}
