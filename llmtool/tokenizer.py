"""SentencePiece models and Hugging Face tokenizer.json files behind one small interface.

The contract is to behave like `transformers.AutoTokenizer` on the same folder: `encode(text)`
gives the ids of `tok(text)["input_ids"]` (BOS/EOS included the same way) and `decode(ids)` the
text of `tok.decode(ids, skip_special_tokens=True)`. The tokenization itself is done by the
`sentencepiece` and `tokenizers` libraries; this module only reads the configuration around them
(special tokens, whether BOS is added, stop ids) the way transformers does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmtool.errors import LlmToolError

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
GENERATION_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SIDE_FILES = (CONFIG_FILE, SPECIAL_MAP_FILE, GENERATION_FILE, CHAT_TEMPLATE_FILE)
# The special token ids of the model's config.json, packed by convert only when
# tokenizer_config.json names a BOS/EOS token the vocabulary lacks (see Tokenizer._resolve_id).
MODEL_CONFIG_FILE = "model_special_ids.json"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Named special tokens that transformers registers as special added tokens.
_NAMED_SPECIALS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def read_tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """Read a tokenizer from a folder, a tokenizer.model file or a tokenizer.json file.

    Returns {canonical file name: bytes} holding exactly one of tokenizer.model / tokenizer.json
    (tokenizer.model wins when a folder has both, as Gemma folders do: it is what the on-device
    bundle needs) plus whichever of tokenizer_config.json, special_tokens_map.json and
    generation_config.json sit beside it. The result is validated by loading it, so a corrupt or
    inconsistent file raises LlmToolError naming that file here rather than later.
    """
    p = Path(path)
    if not p.exists():
        raise LlmToolError("tokenizer path does not exist", path=p)
    if p.is_dir():
        folder = p
        if (p / SPM_FILE).is_file():
            main_path, main_name = p / SPM_FILE, SPM_FILE
        elif (p / HF_FILE).is_file():
            main_path, main_name = p / HF_FILE, HF_FILE
        else:
            raise LlmToolError(f"no {SPM_FILE} or {HF_FILE} in this folder", path=p)
    else:
        folder = p.parent
        main_path = p
        main_name = HF_FILE if p.suffix.lower() == ".json" else SPM_FILE

    files = {main_name: _read_bytes(main_path)}
    for name in SIDE_FILES:
        side = folder / name
        if side.is_file() and side != main_path:
            files[name] = _read_bytes(side)

    locations = {name: folder / name for name in files}
    locations[main_name] = main_path
    try:
        Tokenizer.from_files(files).chat_template  # noqa: B018 - compiles it: errors now
    except LlmToolError as err:
        where = locations.get(err.path or "", p)
        message = str(err)
        if err.path and message.startswith(f"{err.path}: "):
            message = message[len(err.path) + 2 :]
        raise LlmToolError(message, path=where) from None
    return files


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise LlmToolError(f"cannot read file ({err.strerror or err})", path=path) from None


def _load_json(files: dict[str, bytes], name: str) -> dict[str, Any]:
    """Parse one optional JSON side file; errors carry the canonical file name as path."""
    if name not in files:
        return {}
    try:
        data = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LlmToolError(f"invalid JSON ({err})", path=name) from None
    if not isinstance(data, dict):
        raise LlmToolError("expected a JSON object", path=name)
    return data


def _token_content(value: Any) -> str | None:
    """A special token entry is either a string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _token_entries(config: dict[str, Any], special_map: dict[str, Any]) -> list[tuple[Any, bool]]:
    """(entry, special) for every token the configs declare, in transformers' precedence."""
    entries: list[tuple[Any, bool]] = []
    for source in (config, special_map):
        for key in _NAMED_SPECIALS:
            if source.get(key) is not None:
                entries.append((source[key], True))
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = source.get(key)
            if isinstance(extra, dict):  # transformers 5 also allows {name: token}
                extra = list(extra.values())
            if isinstance(extra, list):
                entries.extend((item, True) for item in extra)
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for value in decoder.values():
            special = bool(value.get("special", False)) if isinstance(value, dict) else True
            entries.append((value, special))
    return entries


def _named_token(name: str, config: dict[str, Any], special_map: dict[str, Any]) -> str | None:
    for source in (config, special_map):
        content = _token_content(source.get(name))
        if content is not None:
            return content
    return None


class Tokenizer:
    """A loaded tokenizer; build it with `Tokenizer.from_files(read_tokenizer_files(path))`."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    stop_ids: list[int]

    def __init__(self) -> None:
        self._sp: Any = None
        self._hf: Any = None
        self._special_ids: set[int] = set()  # skipped by decode(skip_special=True)
        self._split_re: re.Pattern[str] | None = None  # SentencePiece: added tokens in text
        self._split_ids: dict[str, int] = {}
        self._byte_ids: frozenset[int] | None = None
        self.bytes_to_unicode = False  # SentencePiece over GPT-2's byte-mapped text (.task)
        self._chat: tuple[str | None, str, dict[str, str | None]] = (None, "", {})
        self._chat_template: Any = None
        self._model_ids: dict[str, int] = {}  # bos_token_id / eos_token_id of config.json
        # Special tokens the configs name but the vocabulary lacks (with no model id to use).
        self.missing_specials: dict[str, str] = {}

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> Tokenizer:
        """Build from the dict read_tokenizer_files returns (errors name the canonical file)."""
        config = _load_json(files, CONFIG_FILE)
        special_map = _load_json(files, SPECIAL_MAP_FILE)
        generation = _load_json(files, GENERATION_FILE)
        tok = cls()
        model_config = _load_json(files, MODEL_CONFIG_FILE)
        for key in ("bos_token_id", "eos_token_id"):
            value = model_config.get(key)
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int) and not isinstance(value, bool):
                tok._model_ids[key] = value
        if SPM_FILE in files:
            tok._init_sentencepiece(files[SPM_FILE], config, special_map)
        elif HF_FILE in files:
            tok._init_hf(files[HF_FILE], config, special_map)
        else:
            raise LlmToolError(f"no {SPM_FILE} or {HF_FILE} among the tokenizer files")
        tok._init_stop_ids(generation)
        from llmtool.chat_template import template_source

        specials = {name: _named_token(name, config, special_map) for name in _NAMED_SPECIALS}
        tok._chat = (*template_source(config, files), specials)
        return tok

    @property
    def chat_template(self) -> Any:
        """The model's ChatTemplate (compiled on first use), or None if it has none."""
        source, origin, specials = self._chat
        if source is None:
            return None
        if self._chat_template is None:
            from llmtool.chat_template import ChatTemplate

            self._chat_template = ChatTemplate(source, specials, origin)
        return self._chat_template

    def _init_sentencepiece(
        self, data: bytes, config: dict[str, Any], special_map: dict[str, Any]
    ) -> None:
        import sentencepiece

        if not data:
            raise LlmToolError("empty SentencePiece model", path=SPM_FILE)
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError, TypeError, ValueError):
            raise LlmToolError("not a valid SentencePiece model", path=SPM_FILE) from None
        size = sp.get_piece_size()
        if size <= 0:
            raise LlmToolError("SentencePiece model has no pieces", path=SPM_FILE)
        special = _remembered_special_pieces(data, size)  # checked before: skip the checks
        if special is None:
            try:  # every piece must be text; a damaged model would fail later, mid-generation
                sp.id_to_piece(list(range(size)))
            except (UnicodeDecodeError, ValueError, RuntimeError):
                message = "not a valid SentencePiece model (a piece is not UTF-8)"
                raise LlmToolError(message, SPM_FILE) from None
            special = _special_pieces(data)
            _remember_special_pieces(data, special)
        self._sp = sp
        self.kind = "sentencepiece"
        self.vocab_size = size

        # Pieces transformers turns into added tokens: control and user-defined symbols, <unk>,
        # and every token the configs name that exists in the vocabulary.
        added: dict[str, int] = {}
        for i, kind in special.items():
            added[sp.id_to_piece(i)] = i
            if kind in ("CONTROL", "UNKNOWN"):
                self._special_ids.add(i)
        for entry, special in _token_entries(config, special_map):
            content = _token_content(entry)
            token_id = self.token_to_id(content) if content else None
            if content and token_id is not None:
                added[content] = token_id
                if special:
                    self._special_ids.add(token_id)
        self._split_ids = {text: i for text, i in added.items() if text}
        if self._split_ids:
            alternatives = sorted(self._split_ids, key=lambda t: (-len(t), t))
            self._split_re = re.compile("|".join(re.escape(t) for t in alternatives))

        self.bos_id = self._resolve_id("bos_token", config, special_map, sp.bos_id())
        self.eos_id = self._resolve_id("eos_token", config, special_map, sp.eos_id())
        self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
        self.add_eos = bool(config.get("add_eos_token", False)) and self.eos_id is not None
        self._prefix = [self.bos_id] if self.bos_id is not None else []
        self._suffix = [self.eos_id] if self.eos_id is not None else []

    def _init_hf(self, data: bytes, config: dict[str, Any], special_map: dict[str, Any]) -> None:
        import tokenizers

        try:
            hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception; also bad UTF-8
            raise LlmToolError(f"not a valid tokenizer.json ({err})", path=HF_FILE) from None
        self._hf = hf
        self.kind = "hf"

        # transformers registers the configured special tokens as special added tokens; do the
        # same for those that exist in the vocabulary so splitting and skipping match.
        to_add = []
        for entry, special in _token_entries(config, special_map):
            content = _token_content(entry)
            if not content or hf.token_to_id(content) is None:
                continue
            opts = entry if isinstance(entry, dict) else {}
            to_add.append(
                tokenizers.AddedToken(
                    content,
                    single_word=bool(opts.get("single_word", False)),
                    lstrip=bool(opts.get("lstrip", False)),
                    rstrip=bool(opts.get("rstrip", False)),
                    normalized=bool(opts.get("normalized", not special)),
                    special=special,
                )
            )
        known = hf.get_added_tokens_decoder()
        known_contents = {t.content for t in known.values()}
        new = [t for t in to_add if t.content not in known_contents]
        if new:
            hf.add_tokens([t for t in new if not t.special])
            hf.add_special_tokens([t for t in new if t.special])
        added = hf.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        self.vocab_size = max([hf.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in added])

        # What the post-processor adds around a single sequence.
        probe = "Hello world"
        plain = hf.encode(probe, add_special_tokens=False).ids
        full = hf.encode(probe, add_special_tokens=True).ids
        prefix, suffix = _split_around(full, plain)

        self.bos_id = self._resolve_id(
            "bos_token", config, special_map, prefix[0] if len(prefix) == 1 else -1
        )
        self.eos_id = self._resolve_id(
            "eos_token", config, special_map, suffix[-1] if len(suffix) == 1 else -1
        )
        # transformers 5 ignores add_bos_token/add_eos_token from tokenizer_config.json when a
        # tokenizer.json exists: its post-processor alone decides what encode() adds.
        self.add_bos, self.add_eos = bool(prefix), bool(suffix)
        self._prefix = prefix or ([self.bos_id] if self.bos_id is not None else [])
        self._suffix = suffix or ([self.eos_id] if self.eos_id is not None else [])

    def _resolve_id(
        self, name: str, config: dict[str, Any], special_map: dict[str, Any], fallback: int
    ) -> int | None:
        content = _named_token(name, config, special_map)
        if content is not None:
            token_id = self.token_to_id(content)
            if token_id is not None:
                return token_id
            # A named token missing from the vocabulary would get a new id past the model's
            # embeddings in transformers: use the model's own id (config.json's bos_token_id /
            # eos_token_id, packed as MODEL_CONFIG_FILE by convert) when it has one.
            model_id = self._model_ids.get(f"{name}_id")
            if model_id is not None and 0 <= model_id < self.vocab_size:
                return model_id
            self.missing_specials[name] = content
            return None
        return fallback if 0 <= fallback < self.vocab_size else None

    def _init_stop_ids(self, generation: dict[str, Any]) -> None:
        stops = set() if self.eos_id is None else {self.eos_id}
        value = generation.get("eos_token_id")
        values = value if isinstance(value, list) else [] if value is None else [value]
        for item in values:
            if (
                isinstance(item, bool)
                or not isinstance(item, int)
                or not (0 <= item < self.vocab_size)
            ):
                raise LlmToolError(
                    f"eos_token_id {item!r} is not a token id of this tokenizer "
                    f"(vocab size {self.vocab_size})",
                    path=GENERATION_FILE,
                )
            stops.add(item)
        self.stop_ids = sorted(stops)

    # ------------------------------------------------------------------- use
    def encode(
        self, text: str, add_bos: bool | None = None, add_eos: bool | None = None
    ) -> list[int]:
        """Token ids of `text`; BOS/EOS follow the tokenizer's defaults unless given."""
        if self._hf is not None:
            ids = list(self._hf.encode(text, add_special_tokens=False).ids)
        else:
            ids = self._encode_sentencepiece(text)
        if add_bos if add_bos is not None else self.add_bos:
            ids = self._prefix + ids
        if add_eos if add_eos is not None else self.add_eos:
            ids = ids + self._suffix
        return ids

    def use_bytes_to_unicode(self) -> None:
        """Encode the byte-mapped text and map decoded text back, as the reference runtime does
        for a `.task` whose METADATA asks for BYTES_TO_UNICODE (a byte-level BPE model stored as
        SentencePiece)."""
        if self._sp is None:
            raise LlmToolError("bytes-to-unicode mapping needs a SentencePiece model")
        self.bytes_to_unicode = True

    def use_start_and_stop(self, start_token: str | None, stop_tokens: Sequence[str]) -> None:
        """Take BOS and stop tokens from a bundle's metadata (see use_start_and_stop_ids)."""
        ids = []
        for token in [*([start_token] if start_token is not None else []), *stop_tokens]:
            token_id = self.token_to_id(token)
            if token_id is None:
                raise LlmToolError(f"token {token!r} is not in the tokenizer")
            ids.append(token_id)
        start_id = ids.pop(0) if start_token is not None else None
        self.use_start_and_stop_ids(start_id, ids)

    def use_start_and_stop_ids(self, start_id: int | None, stop_ids: Sequence[int]) -> None:
        """The runtime prepends the start token (nothing when there is none) and stops at any
        stop token, whatever the tokenizer's own configuration says."""
        for token_id in [*([start_id] if start_id is not None else []), *stop_ids]:
            if not 0 <= token_id < self.vocab_size:
                raise LlmToolError(f"token id {token_id} is not in the tokenizer")
        if start_id is not None:
            self.bos_id, self._prefix = start_id, [start_id]
        self.add_bos = start_id is not None
        self.stop_ids = sorted(set(stop_ids))
        if self.stop_ids and self.eos_id not in self.stop_ids:
            self.eos_id = self.stop_ids[0]

    def _encode_sentencepiece(self, text: str) -> list[int]:
        if self.bytes_to_unicode:
            from llmtool.formats.sentencepiece_bpe import bytes_to_unicode

            text = bytes_to_unicode(text)
        if self._split_re is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        pos = 0
        for match in self._split_re.finditer(text):
            if match.start() > pos:
                ids.extend(self._sp.encode(text[pos : match.start()]))
            ids.append(self._split_ids[match.group()])
            pos = match.end()
        if pos < len(text):
            ids.extend(self._sp.encode(text[pos:]))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless skip_special is False.

        Ids outside the vocabulary decode to nothing, as in `tokenizers`: a model's embedding
        table can be larger than its tokenizer (Phi-2: 51200 rows, 50295 tokens).
        """
        size = self.vocab_size
        ids = [i for i in map(int, ids) if 0 <= i < size]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if self.bytes_to_unicode:
            from llmtool.formats.sentencepiece_bpe import unicode_to_bytes

            text = self._decode_sentencepiece(ids, skip_special)
            return unicode_to_bytes(text).decode("utf-8", errors="replace")
        return self._decode_sentencepiece(ids, skip_special)

    def _decode_sentencepiece(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # SentencePiece drops control pieces and renders <unk> as " ⁇ "; transformers prints
        # special tokens literally, so decode the runs between them.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self.vocab_size:
            return None
        if self._hf is not None:
            return self._hf.id_to_token(token_id)
        return self._sp.id_to_piece(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether decode(skip_special=True) drops this id."""
        return token_id in self._special_ids

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(
            lambda ids: self.decode(ids, skip_special=skip_special), self._unsettled_byte_ids()
        )

    def _unsettled_byte_ids(self) -> frozenset[int]:
        """Byte-fallback ids whose text can still change as more bytes follow.

        The `tokenizers` ByteFallback decoder turns a whole run of byte tokens into U+FFFD as
        soon as it stops being valid UTF-8, so text from a trailing byte run is not final.
        SentencePiece decodes invalid bytes one by one, which only affects the trailing
        incomplete character (held back anyway).
        """
        if self._byte_ids is None:
            ids: set[int] = set()
            if self._hf is not None and getattr(self._hf.model, "byte_fallback", False):
                ids = {
                    i
                    for token, i in self._hf.get_vocab(with_added_tokens=False).items()
                    if _BYTE_PIECE.fullmatch(token)
                }
            self._byte_ids = frozenset(ids)
        return self._byte_ids

    def info(self) -> dict[str, Any]:
        """JSON-able summary for `llmtool` commands and metadata."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_token": None if self.bos_id is None else self.id_to_token(self.bos_id),
            "bos_id": self.bos_id,
            "eos_token": None if self.eos_id is None else self.id_to_token(self.eos_id),
            "eos_id": self.eos_id,
            "stop_tokens": [self.id_to_token(i) for i in self.stop_ids],
            "stop_ids": list(self.stop_ids),
            "add_bos": self.add_bos,
        }


def _special_pieces(data: bytes) -> dict[int, str]:
    """{id: type name} of the CONTROL, UNKNOWN and USER_DEFINED pieces (the processor API
    cannot tell USER_DEFINED apart, so the model proto is parsed)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(data)
    names = {value: name for name, value in model_pb2.ModelProto.SentencePiece.Type.items()}
    wanted = {"CONTROL", "UNKNOWN", "USER_DEFINED"}
    kinds = (names.get(piece.type, "NORMAL") for piece in proto.pieces)
    return {i: kind for i, kind in enumerate(kinds) if kind in wanted}


# Parsing the proto (and importing protobuf) takes 0.05 s at an 8k vocabulary and ~0.5 s at
# 256k, on every run: what it finds is remembered per SentencePiece model (by content hash) in
# the cache folder, as are the validity checks it passed.
def _special_pieces_note(data: bytes) -> Path:
    import hashlib

    from llmtool.cache import cache_root

    return cache_root() / "tokenizers" / f"{hashlib.sha256(data).hexdigest()[:32]}.json"


def _remembered_special_pieces(data: bytes, size: int) -> dict[int, str] | None:
    try:
        saved = json.loads(_special_pieces_note(data).read_bytes())
        special = {int(i): str(kind) for i, kind in saved["special"]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    kinds = {"CONTROL", "UNKNOWN", "USER_DEFINED"}
    if all(0 <= i < size and kind in kinds for i, kind in special.items()):
        return special
    return None


def _remember_special_pieces(data: bytes, special: dict[int, str]) -> None:
    import contextlib

    from llmtool.files import write_bytes

    text = json.dumps({"special": sorted(special.items())}).encode()
    with contextlib.suppress(OSError, LlmToolError):  # unwritable: only costs a parse next time
        write_bytes(_special_pieces_note(data), text, fsync=False)


def _split_around(full: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """(prefix, suffix) with full == prefix + plain + suffix (empty if no such split)."""
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == plain:
            return full[:start], full[start + n :]
    return [], []


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive.

    Incremental: each push decodes only the ids since the start of the previous emission (the
    shared first piece keeps SentencePiece's leading-space handling identical in both decodes)
    and emits the difference, so a generation costs O(n), not O(n^2). A trailing U+FFFD (an
    incomplete UTF-8 character) is held back until it resolves, as is a trailing run of
    byte-fallback tokens the decoder may still rewrite. "".join(pushes) + flush() ==
    decode(all ids).
    """

    def __init__(
        self, decode: Callable[[list[int]], str], unsettled_ids: frozenset[int] = frozenset()
    ):
        self._decode = decode
        self._unsettled = unsettled_ids
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were emitted last; they give the context
        self._read = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        end = len(self._ids)
        while end > self._read and self._ids[end - 1] in self._unsettled:
            end -= 1
        if end == self._read:
            return ""
        try:
            before = self._decode(self._ids[self._prefix : self._read])
            text = self._decode(self._ids[self._prefix : end])
        except Exception:
            self._ids.pop()
            raise
        if text.endswith("\ufffd") or len(text) <= len(before) or not text.startswith(before):
            return ""
        self._prefix, self._read = self._read, end
        return text[len(before) :]

    def flush(self) -> str:
        """The held-back rest; the decoder then starts a new, empty sequence."""
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        rest = text[len(before) :] if text.startswith(before) else ""
        self._ids, self._prefix, self._read = [], 0, 0
        return rest
