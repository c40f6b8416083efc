"""Shared fixtures: tiny random checkpoints in the real architectures, with tiny tokenizers."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Exported graphs and XNNPACK weight caches of the tests stay out of the user's ~/.cache, in a
# folder of this run's own that is removed at the end (each run writes ~150 MB there).
_OWN_CACHE = None
if "LLMTOOL_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["LLMTOOL_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmtool-tests-")


def pytest_unconfigure(config: pytest.Config) -> None:
    """LiteRT logs INFO lines from C++ static destructors after Python finishes; keep them
    from trailing pytest's summary line. Remove this run's cache folder."""
    import atexit

    from llmtool.pipelines.quiet import quiet_native_exit

    atexit.register(quiet_native_exit)
    if _OWN_CACHE is not None:
        atexit.register(shutil.rmtree, _OWN_CACHE, True)


VOCAB = 320
TOKENIZER_STYLE = {
    "GEMMA_2B": "spm",
    "GEMMA_7B": "spm",
    "LLAMA": "llama",
    "LLAMA3": "llama",
    "MISTRAL": "llama",
    "PHI_3": "llama",
    "GEMMA2_2B": "spm",
    "GEMMA3_1B": "spm",
    "GEMMA3_4B": "spm",
    "QWEN3": "chatml",
}  # everything else: GPT-2-style byte-level BPE with <|endoftext|>


def add_tokenizer(model_type: str, folder: Path) -> None:
    """Train the tokenizer the family ships and point config bos/eos at its special tokens."""
    from llmtool.tokenizer import Tokenizer, read_tokenizer_files
    from tests.tiny_tokenizers import make_bpe, make_sentencepiece

    style = TOKENIZER_STYLE.get(model_type, "gpt2")
    if style == "spm":
        make_sentencepiece(folder, vocab_size=VOCAB)
    else:
        make_bpe(folder, vocab_size=VOCAB, style=style)
    tok = Tokenizer.from_files(read_tokenizer_files(folder))
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["bos_token_id"] = tok.bos_id
            data["eos_token_id"] = tok.eos_id
            path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_model(model_type, **build_options) -> folder with checkpoint + tokenizer (cached)."""
    from tests.tiny_models import build_checkpoint

    cache: dict[tuple, Path] = {}

    def make(model_type: str, **options) -> Path:
        key = (model_type, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(model_type.lower())
            build_checkpoint(model_type, folder, VOCAB, **options)
            add_tokenizer(model_type, folder)
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def converted(tiny_model, tmp_path_factory) -> Callable[..., Path]:
    """converted(model_type, quantization) -> container path (cached); model_type may be a
    fixture name of tiny_models.NEW_FIXTURES."""
    from llmtool.config import ConversionConfig
    from llmtool.pipelines.convert import convert
    from tests.tiny_models import model_type_of

    cache: dict[tuple, Path] = {}

    def make(model_type: str, quantization: str = "float32") -> Path:
        key = (model_type, quantization)
        if key not in cache:
            folder = tiny_model(model_type)
            out = tmp_path_factory.mktemp("converted") / f"{model_type}-{quantization}.bin"
            convert(
                ConversionConfig(
                    input_ckpt=str(folder),
                    model_type=model_type_of(model_type),
                    output_tflite_file=str(out),
                    quantization=quantization,
                )
            )
            cache[key] = out
        return cache[key]

    return make
