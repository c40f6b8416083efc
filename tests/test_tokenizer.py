"""llmtool.tokenizer against transformers.AutoTokenizer on tiny locally trained tokenizers."""

from __future__ import annotations

import importlib
import json
import random
import shutil
from pathlib import Path

import pytest

from llmtool.errors import LlmToolError
from llmtool.tokenizer import Tokenizer, read_tokenizer_files
from tests.tiny_tokenizers import make_bpe, make_sentencepiece

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Wait... what?! (yes); a-b, c:d \"quoted\" 'single' #tag @user $5 100% a+b=c {x} [y] <z> ~/|\\",
    "digits 0123456789 and 3.14159, 2024-01-31 10:45",
    "multiple   spaces  here    and\ttabs\t\tend   ",
    "   leading spaces",
    "line one\nline two\n\n\nline five\r\nwindows\n",
    "café naïve 東京 😀",
    "Ünïcödé façade — “curly” quotes… and ß, Ω, я, 中文, 한국어, 🎉🇺🇸",
    "",
    " ",
    "\n",
    "a",
]

FIXTURES = ["spm", "gpt2", "gpt2_padded", "llama"]
# + a Gemma tokenizer.json (byte-fallback BPE) that transformers converts from the spm fixture
ALL = [*FIXTURES, "gemma_json"]


def build(kind: str, folder: Path) -> Path:
    if kind == "gemma_json":
        transformers = importlib.import_module("transformers")
        source = make_sentencepiece(folder.parent / f"{folder.name}-source", vocab_size=320)
        transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(folder))
        assert not (folder / "tokenizer.model").exists()
        return folder
    if kind == "spm":
        return make_sentencepiece(folder, vocab_size=320)
    if kind == "gpt2":
        return make_bpe(folder, vocab_size=320, style="gpt2")
    if kind == "gpt2_padded":  # more than the corpus can merge: padded with extra tokens
        return make_bpe(folder, vocab_size=1500, style="gpt2")
    if kind == "llama":
        return make_bpe(folder, vocab_size=400, style="llama")
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {kind: build(kind, tmp_path_factory.mktemp(kind)) for kind in ALL}


@pytest.fixture(scope="module")
def hf_tokenizers(folders: dict[str, Path]) -> dict:
    transformers = importlib.import_module("transformers")
    return {kind: transformers.AutoTokenizer.from_pretrained(str(folder))
            for kind, folder in folders.items()}


def load(folder: Path) -> Tokenizer:
    return Tokenizer.from_files(read_tokenizer_files(folder))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / folder.name
    shutil.copytree(folder, dest)
    return dest


# ------------------------------------------------------------------ fixtures themselves


@pytest.mark.parametrize("kind", FIXTURES)
def test_fixture_is_deterministic_and_exact_size(kind: str, tmp_path: Path) -> None:
    a = build(kind, tmp_path / "a")
    b = build(kind, tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    expected = {"spm": 320, "gpt2": 320, "gpt2_padded": 1500, "llama": 400}[kind]
    assert load(a).vocab_size == expected


def test_sentencepiece_fixture_layout(folders: dict[str, Path]) -> None:
    tok = load(folders["spm"])
    assert tok.kind == "sentencepiece"
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 1, True)
    # byte fallback: a character outside the corpus becomes UTF-8 byte pieces
    assert [tok.id_to_token(i) for i in tok.encode("東", add_bos=False)] == [
        "<0xE6>", "<0x9D>", "<0xB1>"]


def test_bpe_fixture_layouts(folders: dict[str, Path]) -> None:
    gpt2 = load(folders["gpt2"])
    assert gpt2.kind == "hf"
    assert gpt2.id_to_token(gpt2.bos_id) == gpt2.id_to_token(gpt2.eos_id) == "<|endoftext|>"
    assert gpt2.add_bos is False
    llama = load(folders["llama"])
    assert (llama.id_to_token(llama.bos_id), llama.id_to_token(llama.eos_id)) == ("<s>", "</s>")
    assert llama.add_bos is True
    assert llama.encode("hi")[0] == llama.bos_id
    assert llama.encode("hi", add_bos=False)[0] != llama.bos_id


# ------------------------------------------------------------------ against transformers


@pytest.mark.parametrize("kind", ALL)
def test_matches_transformers(kind: str, folders: dict[str, Path], hf_tokenizers: dict) -> None:
    tok = load(folders[kind])
    hf = hf_tokenizers[kind]
    assert tok.vocab_size == len(hf)
    assert tok.bos_id == hf.bos_token_id
    assert tok.eos_id == hf.eos_token_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False)
        if kind != "spm" or text:  # no byte pieces for \r etc. were lost: text round-trips
            assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ALL)
def test_special_token_text_matches_transformers(kind: str, folders: dict[str, Path],
                                                 hf_tokenizers: dict) -> None:
    tok = load(folders[kind])
    hf = hf_tokenizers[kind]
    bos = tok.id_to_token(tok.bos_id)
    eos = tok.id_to_token(tok.eos_id)
    for text in [f"{bos}Hi there{eos}", f"a {eos} b", f"x{eos}{eos}y", "<unk> and <mask>"]:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False)
    assert tok.eos_id in tok.encode(f"a{eos}b")


@pytest.mark.parametrize("kind", ALL)
def test_decode_random_ids_matches_transformers(kind: str, folders: dict[str, Path],
                                                hf_tokenizers: dict) -> None:
    tok = load(folders[kind])
    hf = hf_tokenizers[kind]
    rng = random.Random(1234)
    pool = list(range(tok.vocab_size))
    if kind == "spm":  # invalid byte runs decode differently there: see the next test
        pool = [i for i in pool if not tok.id_to_token(i).startswith("<0x")]
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randrange(0, 12))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), ids
        assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False)


def test_sentencepiece_decodes_invalid_bytes_one_by_one(folders: dict[str, Path]) -> None:
    """SentencePiece replaces only the bad bytes; tokenizers' ByteFallback replaces the run."""
    tok = load(folders["spm"])
    ids = [tok.token_to_id(p) for p in ("<0x74>", "<0xE6>", "<0x9D>", "<0xB1>", "<0xAC>")]
    assert tok.decode(ids) == "t東\ufffd"
    assert tok.decode(ids[:3]) == "t\ufffd\ufffd"


def test_add_bos_token_in_config(folders: dict[str, Path], tmp_path: Path) -> None:
    """A tokenizer.model folder follows add_bos_token; with tokenizer.json transformers 5 ignores
    it and the post-processor alone decides."""
    transformers = importlib.import_module("transformers")
    for kind, value, expected in [("spm", False, False), ("llama", False, True),
                                  ("gpt2", True, False), ("gemma_json", False, True)]:
        folder = copy_of(folders[kind], tmp_path / kind)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["add_bos_token"] = value
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        tok = load(folder)
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        assert tok.add_bos is expected, kind
        for text in ("Hello world", "café"):
            assert tok.encode(text) == hf(text)["input_ids"], kind
        assert tok.encode("Hello", add_bos=True)[0] == tok.bos_id
        assert tok.bos_id not in tok.encode("Hello", add_bos=False)


def test_special_tokens_map_fallback_and_added_token_dicts(folders: dict[str, Path],
                                                           tmp_path: Path) -> None:
    folder = copy_of(folders["llama"], tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["bos_token"]
    config["eos_token"] = {"content": "</s>", "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    tok = load(folder)
    assert tok.id_to_token(tok.bos_id) == "<s>"
    assert tok.id_to_token(tok.eos_id) == "</s>"


def test_sentencepiece_without_config_uses_model_ids(folders: dict[str, Path],
                                                     tmp_path: Path) -> None:
    model = tmp_path / "only" / "tokenizer.model"
    model.parent.mkdir()
    shutil.copy(folders["spm"] / "tokenizer.model", model)
    files = read_tokenizer_files(model)
    assert set(files) == {"tokenizer.model"}
    tok = Tokenizer.from_files(files)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (2, 1, True, [1])


# ------------------------------------------------------------------ files and stop ids


def test_read_tokenizer_files_variants(folders: dict[str, Path], tmp_path: Path) -> None:
    assert set(read_tokenizer_files(folders["spm"])) == {"tokenizer.model",
                                                          "tokenizer_config.json"}
    assert set(read_tokenizer_files(folders["spm"] / "tokenizer.model")) == {
        "tokenizer.model", "tokenizer_config.json"}
    assert set(read_tokenizer_files(folders["llama"])) == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert set(read_tokenizer_files(str(folders["gpt2"] / "tokenizer.json"))) == {
        "tokenizer.json", "tokenizer_config.json"}
    # Gemma-style folder with both files: the SentencePiece model wins
    both = copy_of(folders["spm"], tmp_path)
    shutil.copy(folders["gpt2"] / "tokenizer.json", both / "tokenizer.json")
    files = read_tokenizer_files(both)
    assert "tokenizer.model" in files and "tokenizer.json" not in files
    assert Tokenizer.from_files(files).kind == "sentencepiece"


@pytest.mark.parametrize("kind", ["spm", "llama"])
def test_stop_ids_from_generation_config(kind: str, folders: dict[str, Path],
                                         tmp_path: Path) -> None:
    folder = copy_of(folders[kind], tmp_path)
    base = load(folder)
    assert base.stop_ids == [base.eos_id]
    extra = base.vocab_size - 1
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": base.bos_id, "eos_token_id": [extra, base.eos_id, 7]}))
    tok = load(folder)
    assert tok.stop_ids == sorted({base.eos_id, extra, 7})
    info = tok.info()
    assert json.loads(json.dumps(info)) == info
    assert info["stop_ids"] == tok.stop_ids
    assert info["stop_tokens"] == [tok.id_to_token(i) for i in tok.stop_ids]
    assert (info["kind"], info["vocab_size"], info["add_bos"]) == (
        tok.kind, tok.vocab_size, tok.add_bos)
    assert (info["bos_id"], info["eos_id"]) == (tok.bos_id, tok.eos_id)
    assert info["eos_token"] == tok.id_to_token(tok.eos_id)
    assert info["bos_token"] == tok.id_to_token(tok.bos_id)

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert load(folder).stop_ids == sorted({base.eos_id, 5})


def test_token_lookup(folders: dict[str, Path]) -> None:
    for kind in FIXTURES:
        tok = load(folders[kind])
        for token_id in (0, 1, tok.vocab_size // 2, tok.vocab_size - 1):
            token = tok.id_to_token(token_id)
            assert token is not None
            assert tok.token_to_id(token) == token_id
        assert tok.id_to_token(tok.vocab_size) is None
        assert tok.id_to_token(-1) is None
        assert tok.token_to_id("no such token, surely") is None


# ------------------------------------------------------------------ streaming


def stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids], decoder.flush()


@pytest.mark.parametrize("kind", ALL)
def test_stream_decoder_concatenation_random(kind: str, folders: dict[str, Path]) -> None:
    tok = load(folders[kind])
    rng = random.Random(99)
    byte_ids = [i for i in range(tok.vocab_size)
                if (tok.id_to_token(i) or "").startswith("<0x")]
    for _ in range(150):
        pool = byte_ids if byte_ids and rng.random() < 0.5 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 16))]
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), ids


@pytest.mark.parametrize("kind", ALL)
def test_stream_decoder_never_splits_characters(kind: str, folders: dict[str, Path]) -> None:
    tok = load(folders[kind])
    for text in ("café naïve 東京 😀", " the garden\n\n  ok 😀😀 end", "東京"):
        ids = tok.encode(text, add_bos=False)
        pieces, rest = stream(tok, ids)
        assert "".join(pieces) + rest == text
        assert not any("\ufffd" in piece for piece in pieces), pieces
        if kind != "gemma_json":  # everything settles once the last character is complete
            assert rest == ""
        # (tokenizers' ByteFallback may still rewrite a trailing byte run: held until flush)
        # every emitted prefix is a prefix of the final text: no premature leading space
        text_so_far = ""
        for piece in pieces:
            text_so_far += piece
            assert text.startswith(text_so_far)
    if kind == "spm":  # the multi-byte character really was split over byte pieces
        ids = tok.encode("東", add_bos=False)
        pieces, rest = stream(tok, ids)
        assert len(ids) == 3 and pieces == ["", "", "東"] and rest == ""


def test_stream_decoder_holds_incomplete_character_until_flush(folders: dict[str, Path]) -> None:
    tok = load(folders["spm"])
    first_byte = tok.token_to_id("<0xE6>")
    decoder = tok.stream_decoder()
    assert decoder.push(tok.token_to_id("a")) == "a"
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == tok.decode([tok.token_to_id("a"), first_byte])[1:]
    assert decoder.push(tok.token_to_id("a")) == "a"  # flush starts a new sequence


def test_stream_decoder_skips_special_tokens(folders: dict[str, Path]) -> None:
    tok = load(folders["llama"])
    ids = tok.encode("Hello world") + [tok.eos_id]
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) + rest == "Hello world"


# ------------------------------------------------------------------ errors


def assert_error_names(path: Path, call) -> LlmToolError:
    with pytest.raises(LlmToolError) as info:
        call()
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    return info.value


def test_error_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert_error_names(missing, lambda: read_tokenizer_files(missing))


def test_error_folder_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert_error_names(tmp_path, lambda: read_tokenizer_files(tmp_path))


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model\x00\xff",
                                     b"\x0a\x05short"])
def test_error_corrupt_tokenizer_model(content: bytes, folders: dict[str, Path],
                                       tmp_path: Path) -> None:
    folder = copy_of(folders["spm"], tmp_path)
    (folder / "tokenizer.model").write_bytes(content)
    assert_error_names(folder / "tokenizer.model", lambda: read_tokenizer_files(folder))
    assert_error_names(folder / "tokenizer.model",
                       lambda: read_tokenizer_files(folder / "tokenizer.model"))


def test_error_corrupt_tokenizer_json(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(folders["gpt2"], tmp_path)
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    assert_error_names(folder / "tokenizer.json", lambda: read_tokenizer_files(folder))


@pytest.mark.parametrize("kind", ["spm", "gpt2"])
@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json",
                                  "special_tokens_map.json"])
def test_error_invalid_side_json(kind: str, name: str, folders: dict[str, Path],
                                 tmp_path: Path) -> None:
    folder = copy_of(folders[kind], tmp_path)
    (folder / name).write_text('{"bos_token": "<bos>",,}')
    err = assert_error_names(folder / name, lambda: read_tokenizer_files(folder))
    assert "JSON" in str(err)


def test_error_bad_generation_eos(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(folders["spm"], tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 99999]}))
    assert_error_names(folder / "generation_config.json", lambda: read_tokenizer_files(folder))


def test_from_files_errors_name_the_file() -> None:
    with pytest.raises(LlmToolError, match="tokenizer.model"):
        Tokenizer.from_files({"tokenizer.model": b"garbage"})
    with pytest.raises(LlmToolError):
        Tokenizer.from_files({"tokenizer_config.json": b"{}"})


@pytest.mark.parametrize("kind", ["spm", "gpt2"])
def test_decode_ignores_ids_outside_the_vocabulary(kind: str, folders: dict[str, Path]) -> None:
    tok = load(folders[kind])
    ids = tok.encode("ab", add_bos=False)
    assert tok.decode([ids[0], tok.vocab_size, -1, *ids[1:], 10**6]) == "ab"
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in (ids[0], tok.vocab_size, *ids[1:])]
    assert "".join(pieces) + decoder.flush() == "ab"


def test_special_pieces_are_remembered(folders: dict[str, Path], tmp_path: Path, monkeypatch):
    """A SentencePiece model's control and user-defined pieces are found by parsing its proto
    once; later loads of the same model use the note (a damaged note is ignored)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    from llmtool import tokenizer as tk

    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "cache"))
    files = read_tokenizer_files(folders["spm"])
    proto = model_pb2.ModelProto()
    proto.ParseFromString(files["tokenizer.model"])
    piece = proto.pieces.add()
    piece.piece, piece.type = "<turn>", model_pb2.ModelProto.SentencePiece.USER_DEFINED
    files["tokenizer.model"] = proto.SerializeToString()
    parsed: list[bytes] = []
    real = tk._special_pieces
    monkeypatch.setattr(tk, "_special_pieces", lambda data: parsed.append(data) or real(data))
    text = "a<turn>b <mask> c"
    first = Tokenizer.from_files(files)
    second = Tokenizer.from_files(files)
    assert len(parsed) == 1  # the second load read the note
    turn, mask = first.token_to_id("<turn>"), first.token_to_id("<mask>")
    ids = first.encode(text, add_bos=False)
    assert turn in ids and mask in ids and second.encode(text, add_bos=False) == ids
    assert second.decode(ids) == first.decode(ids) == "a<turn>b  c"  # control dropped
    tk._special_pieces_note(files["tokenizer.model"]).write_text('{"special": [[99999, "X"]]}')
    third = Tokenizer.from_files(files)
    assert len(parsed) == 2 and third.encode(text, add_bos=False) == ids
