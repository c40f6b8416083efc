"""`llmtool bundle`: every architecture to .task and .litertlm, run by LiteRT-LM and by llmtool."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmtool.cli import app
from llmtool.config import BundleConfig
from llmtool.errors import LlmToolError
from llmtool.formats.litertlm import read_sections
from llmtool.formats.task_bundle import read_task_bundle, task_bundle_entries
from llmtool.pipelines.bundle import bundle
from llmtool.pipelines.export import ExportOptions, export_graph
from llmtool.pipelines.run import LlmInference
from llmtool.runtime.inference import LlmInferenceOptions
from tests.conftest import TOKENIZER_STYLE
from tests.litert_lm_runs import litert_lm_greedy
from tests.tiny_models import MODEL_TYPES

ARCHS = (*MODEL_TYPES, "QWEN2")  # the eight rows of the seed table
PROMPT = "the quick brown fox"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def bundles(converted, tiny_model, tmp_path_factory):
    """bundles(model_type) -> {"bin", "graph", "task", "litertlm", "tokenizer"} (cached)."""
    cache: dict[str, dict[str, Path]] = {}

    def make(model_type: str) -> dict[str, Path]:
        if model_type not in cache:
            out = tmp_path_factory.mktemp(f"bundle-{model_type.lower()}")
            container = converted(model_type, "float32")
            graph = out / "model.tflite"
            export_graph(container, graph, ExportOptions(max_seq_len=64, prefill_len=8))
            paths = {"bin": container, "graph": graph, "tokenizer": tiny_model(model_type)}
            for kind in ("task", "litertlm"):
                paths[kind] = out / f"model.{kind}"
                bundle(
                    BundleConfig(
                        tflite_model=str(graph),
                        tokenizer_model=str(paths["tokenizer"]),
                        output_filename=str(paths[kind]),
                    )
                )
            cache[model_type] = paths
        return cache[model_type]

    return make


def ours(model: Path) -> dict:
    """`llmtool run --top-k 1` for exactly NEW_TOKENS new tokens (unless a stop token comes)."""
    options = LlmInferenceOptions(model_path=str(model), max_tokens=60, top_k=1)
    with LlmInference.create_from_options(options) as llm:
        llm.max_tokens = len(llm.prompt_ids(PROMPT)[0]) + NEW_TOKENS
        return llm.generate(PROMPT).as_dict()


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_architecture_bundles_and_runs(bundles, model_type):
    """The bundles run in llmtool exactly as the container does, and LiteRT-LM's greedy output
    equals `llmtool run --top-k 1` for 32 tokens: on the .litertlm for every architecture, on
    the .task where the tokenizer is SentencePiece (LiteRT-LM 0.18 ignores the .task's
    bytes-to-unicode flag that byte-level BPE models need; MediaPipe's runtime applies it)."""
    paths = bundles(model_type)
    reference = ours(paths["bin"])
    assert len(reference["token_ids"]) >= 8, "a long enough greedy run to compare"
    for kind in ("task", "litertlm"):
        got = ours(paths[kind])
        assert got["prompt_token_ids"] == reference["prompt_token_ids"], kind
        assert got["token_ids"] == reference["token_ids"], kind
    # LiteRT-LM holds back a trailing incomplete UTF-8 character that llmtool flushes as U+FFFD
    text = reference["text"].split("\x00")[0].rstrip("\ufffd")
    assert litert_lm_greedy(paths["litertlm"], PROMPT, NEW_TOKENS) == text
    if TOKENIZER_STYLE.get(model_type) == "spm":
        assert litert_lm_greedy(paths["task"], PROMPT, NEW_TOKENS) == text


def test_metadata_bytes_match_the_reference(bundles, tmp_path):
    paths = bundles("LLAMA")  # its tokenizer has <s> and </s>
    out = tmp_path / "m.task"
    bundle(
        BundleConfig(
            tflite_model=str(paths["graph"]),
            tokenizer_model=str(paths["tokenizer"]),
            start_token="<s>",
            stop_tokens=["</s>"],
            output_filename=str(out),
            enable_bytes_to_unicode_mapping=None,
        )
    )
    metadata = read_task_bundle(out, ("METADATA",))["METADATA"]
    # the bytes MediaPipe's bundler writes for start <s> / stop </s>, plus the byte mapping the
    # converted byte-level BPE tokenizer needs (field 7, packed: [1])
    assert metadata == bytes.fromhex("2a043c2f733e32033c733e3a0101")
    gemma = bundles("GEMMA_2B")
    bundle(
        BundleConfig(
            tflite_model=str(gemma["graph"]),
            tokenizer_model=str(gemma["tokenizer"]),
            start_token="<bos>",
            stop_tokens=["<eos>"],
            output_filename=str(out),
        )
    )
    expected = bytes.fromhex("2a05") + b"<eos>" + bytes.fromhex("3205") + b"<bos>"
    assert read_task_bundle(out, ("METADATA",))["METADATA"] == expected


def test_deterministic_bytes_and_cli(bundles, tmp_path):
    paths = bundles("GEMMA_2B")
    config = tmp_path / "bundle.yaml"
    config.write_text(
        f"tflite_model: {paths['graph']}\ntokenizer_model: {paths['tokenizer']}\n"
        "output_filename: ignored.task\nprompt_prefix: 'User: '\nprompt_suffix: \"\\nModel: \"\n"
    )
    runner = CliRunner()
    for kind in ("task", "litertlm"):
        out = tmp_path / f"cli.{kind}"
        result = runner.invoke(
            app, ["bundle", "--config", str(config), "--output-filename", str(out), "--json"]
        )
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["output"] == str(out) and summary["stop_tokens"] == ["<eos>"]
        first = out.read_bytes()
        runner.invoke(
            app, ["bundle", "--config", str(config), "--output-filename", str(out), "--json"]
        )
        assert out.read_bytes() == first, f"{kind} bundles differ between runs"
        llm = LlmInference.create_from_options(LlmInferenceOptions(model_path=str(out)))
        with llm:
            assert llm.template.apply("hi") == "User: hi\nModel: "
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.yaml", "cli.litertlm", "cli.task"]


def test_validation_errors_write_nothing(bundles, tiny_model, tmp_path):
    paths = bundles("GEMMA_2B")
    graph, tokenizer = str(paths["graph"]), str(paths["tokenizer"])
    out = tmp_path / "x.task"
    other_vocab = tmp_path / "small"
    from tests.tiny_tokenizers import make_sentencepiece

    make_sentencepiece(other_vocab, vocab_size=400)
    no_decode = tmp_path / "container_as_graph.tflite"
    no_decode.write_bytes(Path(paths["bin"]).read_bytes())
    cases = [
        (
            dict(tflite_model=graph, tokenizer_model=tokenizer, stop_tokens=["<nope>"]),
            "stop token '<nope>' is not in the tokenizer",
        ),
        (
            dict(tflite_model=graph, tokenizer_model=tokenizer, start_token="<nope>"),
            "start token '<nope>' is not in the tokenizer",
        ),
        (
            dict(tflite_model=graph, tokenizer_model=str(tmp_path / "missing")),
            "tokenizer path does not exist",
        ),
        (
            dict(tflite_model=graph, tokenizer_model=str(other_vocab)),
            "has 400 tokens but the graph's vocabulary is 320",
        ),
        (
            dict(tflite_model=str(no_decode), tokenizer_model=tokenizer),
            "needs 'prefill_<T>' and 'decode' signatures",
        ),
        (
            dict(tflite_model=str(tmp_path / "none.tflite"), tokenizer_model=tokenizer),
            "TFLite model not found",
        ),
        (
            dict(
                tflite_model=graph,
                tokenizer_model=tokenizer,
                enable_bytes_to_unicode_mapping=True,
                output_filename=str(tmp_path / "x.litertlm"),
            ),
            "LiteRT-LM has no bytes-to-unicode mapping",
        ),
        (
            dict(
                tflite_model=graph,
                tokenizer_model=tokenizer,
                output_filename=str(tmp_path / "x.zip"),
            ),
            "must end in .task or .litertlm",
        ),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("output_filename", str(out))
        with pytest.raises(LlmToolError, match=message.replace("[", r"\[").replace("(", r"\(")):
            bundle(BundleConfig(**kwargs))
    result = CliRunner().invoke(
        app,
        [
            "bundle",
            "--tflite-model",
            graph,
            "--tokenizer-model",
            tokenizer,
            "--stop-tokens",
            "<nope>",
            "--output-filename",
            str(out),
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "stop token '<nope>' is not in the tokenizer" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["container_as_graph.tflite", "small"]


def test_bundle_readers_refuse_escaping_or_overlapping_entries(bundles, tmp_path):
    paths = bundles("GEMMA_2B")
    good = read_task_bundle(paths["task"])
    evil = tmp_path / "evil.task"
    with zipfile.ZipFile(evil, "w") as zf:
        for name, data in good.items():
            zf.writestr(name, data)
        zf.writestr("../../etc/passwd", b"x")
    with pytest.raises(LlmToolError, match="escapes the bundle"):
        task_bundle_entries(evil)
    # Two central-directory records pointing at the same local data overlap.
    raw = bytearray(Path(paths["task"]).read_bytes())
    cd = raw.rfind(b"PK\x01\x02")  # the last record (METADATA): point it at TOKENIZER_MODEL
    first = raw.find(b"PK\x01\x02")
    second = raw.find(b"PK\x01\x02", first + 4)
    raw[cd + 42 : cd + 46] = raw[second + 42 : second + 46]
    overlapping = tmp_path / "overlap.task"
    overlapping.write_bytes(bytes(raw))
    with pytest.raises(LlmToolError, match="overlaps|bad local header|not a .task"):
        task_bundle_entries(overlapping)
    sections = read_sections(paths["litertlm"])
    assert [s.kind for s in sections] == ["TFLiteModel", "SP_Tokenizer", "LlmMetadataProto"]
    assert all(s.begin % 16384 == 0 for s in sections)


def test_inspect_shows_what_a_bundle_holds(bundles):
    from llmtool.pipelines.inspect import describe

    paths = bundles("GPT2")
    task = describe(paths["task"])
    assert [e["name"] for e in task["entries"]] == [
        "TF_LITE_PREFILL_DECODE",
        "TOKENIZER_MODEL",
        "METADATA",
    ]
    assert task["metadata"]["input_output_normalizations"] == [
        "INPUT_OUTPUT_NORMALIZATION_BYTES_TO_UNICODE"
    ]
    assert task["tokenizer"]["bytes_to_unicode"] and task["model_type"] == "GPT2"
    lm = describe(paths["litertlm"])
    assert [e["name"] for e in lm["entries"]] == [
        "TFLiteModel",
        "HF_Tokenizer_Zlib",
        "LlmMetadataProto",
    ]
    for info in (task, lm):
        assert set(info["signatures"]) == {"prefill_8", "decode"}
        assert info["tokenizer"]["stop_tokens"] == ["<|endoftext|>"]
