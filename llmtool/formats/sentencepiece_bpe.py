"""A byte-level BPE tokenizer (Hugging Face tokenizer.json) as a SentencePiece model.

The `.task` bundle carries only a SentencePiece model. For GPT-2-style byte-level BPE models the
reference runtime maps the input's UTF-8 bytes to printable characters first (GPT-2's
bytes-to-unicode table, `enable_bytes_to_unicode_mapping`), encodes the mapped text with the
SentencePiece model, and maps the output back. This module writes such a model from a
tokenizer.json: the same pieces at the same ids (so the graph's logits line up), and BPE merge
priorities as SentencePiece scores.

SentencePiece's BPE merges the best-scoring adjacent pair anywhere in the text, whereas the
Hugging Face tokenizer first splits the text with a regex (words, numbers, punctuation,
whitespace runs) and merges only inside each part. So the ids agree on most text but not all:
merges that would cross such a boundary (an apostrophe before a word, the last space of a run
that belongs to the next word) can differ. Whitespace-only pieces are given the lowest priority,
which makes a run's last space join the following word first, as the regex does; with that,
agreement measured on ~3,100 lines of code, prose and multilingual text is 94.9-98.9% of lines
(docs/BENCHMARKS.md). A `.litertlm` carries the tokenizer.json itself, exactly.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from llmtool.errors import LlmToolError

_WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"


@cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's table: every byte to a printable character (printable Latin-1 bytes map to
    themselves, the rest to U+0100 and up)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


@cache
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def bytes_to_unicode(text: str) -> str:
    """What the runtime feeds the SentencePiece model for `text`."""
    table = byte_to_char()
    return "".join(table[b] for b in text.encode("utf-8"))


def unicode_to_bytes(text: str) -> bytes:
    """The inverse of bytes_to_unicode for model output; other characters pass as UTF-8."""
    table = char_to_byte()
    out = bytearray()
    for ch in text:
        b = table.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def is_byte_level_bpe(tokenizer_json: bytes) -> bool:
    """Whether a tokenizer.json is a byte-level BPE (the kind this module converts)."""
    try:
        data = json.loads(tokenizer_json)
    except (ValueError, UnicodeDecodeError):
        return False
    return (
        isinstance(data, dict)
        and (data.get("model") or {}).get("type") == "BPE"
        and "ByteLevel" in json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    )


def bpe_to_sentencepiece(tokenizer_json: bytes, unk_token: str | None = None) -> bytes:
    """A serialized SentencePiece BPE model with the tokenizer's pieces at the same ids.

    Added tokens become user-defined pieces (matched whole in the text, as Hugging Face splits
    them out first); a non-special added token is stored in its byte-mapped form. SentencePiece
    needs an unknown piece: `unk_token` when it names a token, else one appended after the last
    id (never produced: every byte-mapped character is a piece).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    try:
        data: dict[str, Any] = json.loads(tokenizer_json)
        model = data["model"]
        vocab: dict[str, int] = dict(model["vocab"])
        merges = model.get("merges") or []
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise LlmToolError("not a tokenizer.json with a BPE model", "tokenizer.json") from None
    if model.get("type") != "BPE" or not is_byte_level_bpe(tokenizer_json):
        raise LlmToolError(
            "only byte-level BPE tokenizers convert to SentencePiece", "tokenizer.json"
        )
    added: dict[str, int] = {}
    for token in data.get("added_tokens") or []:
        content = token["content"] if token.get("special") else bytes_to_unicode(token["content"])
        vocab.pop(content, None)  # the added token wins: it is split out before BPE runs
        added[content] = token["id"]
    pieces: dict[int, str] = {i: t for t, i in vocab.items()}
    pieces.update({i: t for t, i in added.items()})
    size = max(pieces) + 1

    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    whitespace = {byte_to_char()[b] for b in _WHITESPACE_BYTES}
    last = len(merges) + 1

    proto = pb.ModelProto()
    kinds = pb.ModelProto.SentencePiece
    unk_id = None
    for i in range(size):
        sp = proto.pieces.add()
        piece = pieces.get(i)
        if piece is None:  # a hole in the ids: keep later ids in place
            sp.piece, sp.type, sp.score = f"<unused-{i}>", kinds.UNUSED, -1e9
            continue
        sp.piece = piece
        if unk_token is not None and piece == unk_token:
            sp.type, sp.score, unk_id = kinds.UNKNOWN, 0.0, i
        elif piece in added:
            sp.type, sp.score = kinds.USER_DEFINED, 0.0
        elif len(piece) == 1:
            sp.score = 0.0
        elif piece in rank:
            r = rank[piece] + (last if set(piece) <= whitespace else 0)
            sp.score = -float(r + 1)
        else:  # in the vocabulary but made by no merge: never produce it
            sp.type, sp.score = kinds.UNUSED, -1e9
    if unk_id is None:
        names = {p.piece for p in proto.pieces}
        sp = proto.pieces.add()
        sp.piece = next(n for n in ("<unk>", "<llmtool-unk>") if n not in names)
        sp.type, sp.score, unk_id = kinds.UNKNOWN, 0.0, size

    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.unk_id = unk_id
    proto.trainer_spec.bos_id = -1
    proto.trainer_spec.eos_id = -1
    proto.trainer_spec.pad_id = -1
    for spec in (proto.normalizer_spec, proto.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = False
        spec.remove_extra_whitespaces = False
        spec.escape_whitespaces = False
    return proto.SerializeToString(deterministic=True)
