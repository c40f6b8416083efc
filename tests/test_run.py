"""`llmtool export` + `run`: our LiteRT graphs against transformers, every architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from llmtool import LlmInference, LlmInferenceOptions
from llmtool.errors import LlmToolError
from llmtool.formats.tflite_model import read_model
from llmtool.pipelines.export import ExportOptions, export_graph, plan_signatures
from tests.tiny_models import MODEL_TYPES, NEW_FIXTURES, reference_greedy, reference_logits

ALL_FIXTURES = (*MODEL_TYPES, *NEW_FIXTURES)

RNG = np.random.default_rng(1234)
BUCKETS = (16, 32)


@pytest.fixture(scope="session")
def graph(converted, tmp_path_factory):
    """graph(model_type, quantization, prefill_len) -> exported .tflite (cached): a cache of 64
    with KV buckets 16 and 32 (BUCKETS), so longer inputs cross every bucket boundary."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str, quantization: str = "float32", prefill_len: int = 8) -> Path:
        key = (model_type, quantization, prefill_len)
        if key not in cache:
            out = tmp_path_factory.mktemp("graphs") / f"{model_type}-{quantization}.tflite"
            export_graph(
                converted(model_type, quantization),
                out,
                ExportOptions(max_seq_len=64, prefill_len=prefill_len, kv_buckets=BUCKETS),
            )
            cache[key] = out
        return cache[key]

    return make


def engine_for(path: Path, **options) -> LlmInference:
    options = {"max_tokens": 64, "num_threads": 1, **options}
    return LlmInference.create_from_options(LlmInferenceOptions(model_path=str(path), **options))


def random_ids(n: int, vocab: int = 300) -> list[int]:
    return [int(x) for x in RNG.integers(3, vocab, size=n)]


@pytest.mark.parametrize("model_type", ALL_FIXTURES)
def test_float32_logits_match_transformers(model_type, tiny_model, graph):
    folder = tiny_model(model_type)
    llm = engine_for(graph(model_type))
    # Spans prefill chunks of 8 and a padded remainder, is longer than the sliding window (6)
    # of the new fixtures, and crosses the KV buckets 16 and 32 into the whole cache (64).
    ids = random_ids(45)
    ours = llm.logits(ids)
    ref = reference_logits(folder, ids)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"{model_type}: relative error {err:.2e}"


@pytest.mark.parametrize("model_type", ALL_FIXTURES)
def test_greedy_tokens_match_transformers(model_type, tiny_model, graph):
    folder = tiny_model(model_type)
    llm = engine_for(graph(model_type), top_k=1)
    prompt = random_ids(5)
    steps = 40  # decode far past the sliding window and across KV buckets 16 and 32 (to 45)
    expected = reference_greedy(folder, prompt, new_tokens=steps)
    # Drive the engine directly so stop tokens don't cut the comparison short.
    llm.engine.reset()
    logits = llm.engine.prefill(prompt)
    ours = []
    for _ in range(steps):
        token = int(np.argmax(logits))
        ours.append(token)
        logits = llm.engine.decode(token)
    assert ours == expected


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


QUANT_LIMITS = (("float16", 1e-5), ("int8", 0.002), ("int4", 0.1))


@pytest.mark.parametrize(
    "model_type,limits",
    [(t, QUANT_LIMITS) for t in ("GEMMA_2B", "PHI_2", "LLAMA", "GPT2")]
    + [(t, QUANT_LIMITS[1:]) for t in NEW_FIXTURES],  # the same bounds, int8 and int4
)
def test_quantized_logits_close_to_float(model_type, limits, graph, record_property):
    ids = random_ids(16)
    ref = engine_for(graph(model_type)).logits(ids)
    for quantization, limit in limits:
        ours = engine_for(graph(model_type, quantization)).logits(ids)
        divergence = kl(ref, ours)
        record_property(f"kl_{quantization}", divergence)
        print(f"{model_type} {quantization}: KL(float || quantized) = {divergence:.5f}")
        assert np.isfinite(ours).all()
        assert divergence < limit, f"{model_type} {quantization}: KL {divergence}"


def test_graph_signatures_follow_the_convention(graph):
    model = read_model(graph("GEMMA_2B"))
    keys = {s.key: s for s in model.signatures}
    buckets = {f"kv{n}_{base}" for n in BUCKETS for base in ("prefill_8", "decode")}
    assert set(keys) == {"prefill_8", "decode", *buckets}
    for key, sig in keys.items():
        T = 1 if key.endswith("decode") else 8
        L = int(key[2:4]) if key.startswith("kv") else 64  # attended cache positions [0, L)
        names = {"tokens", "input_pos", "mask", "kv_cache_k_0", "kv_cache_v_0"}
        assert names <= set(sig.inputs)
        assert {"logits", "kv_cache_k_0", "kv_cache_v_0"} <= set(sig.outputs)
        sub = model.subgraphs[sig.subgraph_index]
        k = sub.tensors[sig.inputs["kv_cache_k_0"]].shape
        v = sub.tensors[sig.inputs["kv_cache_v_0"]].shape
        # Every signature takes the whole cache: K [1,H,S,D], V [1,H,D,S] (one set of buffers).
        assert k[2] == 64 and v[3] == 64 and k[3] == v[2]
        assert sub.tensors[sig.inputs["mask"]].shape == (1, 1, T, L)


def test_generation_is_seeded_and_streams(graph):
    path = graph("LLAMA")
    texts = [engine_for(path, random_seed=7).generate_response("the cat") for _ in range(2)]
    assert texts[0] == texts[1]
    pieces: list[tuple[str, bool]] = []
    done = threading.Event()
    errors: list[Exception] = []

    def listener(text: str, finished: bool) -> None:
        pieces.append((text, finished))
        if finished:
            done.set()

    llm = engine_for(path, random_seed=7, result_listener=listener, error_listener=errors.append)
    future = llm.generate_response_async("the cat")
    assert future.result(timeout=60) == texts[0]
    assert done.wait(5) and not errors
    assert "".join(p for p, _ in pieces) == texts[0]
    assert pieces[-1][1] is True and all(not f for _, f in pieces[:-1])


def test_async_errors_reach_the_error_listener(graph):
    errors: list[Exception] = []
    llm = engine_for(graph("LLAMA"), error_listener=errors.append)
    future = llm.generate_response_async("word " * 200)  # longer than max tokens
    with pytest.raises(LlmToolError):
        future.result(timeout=60)
    assert errors and isinstance(errors[0], LlmToolError)


def test_stop_token_ends_generation(graph):
    llm = engine_for(graph("GPT2"), top_k=1)
    eos = llm.tokenizer.eos_id
    result = llm.generate("hello")
    if result.stop_reason == "stop_token":
        assert eos not in result.token_ids
    # Force the model to stop: a stop id is any id in stop_ids.
    first = result.token_ids[0] if result.token_ids else None
    if first is not None:
        llm.tokenizer.stop_ids = [first]
        stopped = llm.generate("hello")
        assert stopped.stop_reason == "stop_token" and stopped.token_ids == []


def test_size_in_tokens_and_context_window(graph):
    llm = engine_for(graph("GEMMA_2B"), context_window=6)
    n = llm.size_in_tokens("one two three four five six seven eight nine ten")
    assert n > 6
    result = llm.generate("one two three four five six seven eight nine ten")
    assert len(result.prompt_token_ids) == 6 and result.prompt_truncated == n - 6
    assert result.prompt_token_ids[0] == llm.tokenizer.bos_id


def test_safety_filter(graph, tmp_path):
    llm = engine_for(graph("LLAMA"), safety_filter=["badword"])
    with pytest.raises(LlmToolError, match="safety filter"):
        llm.generate("this has a BadWord in it")
    first = engine_for(graph("LLAMA"), top_k=1).generate("the cat")
    words = first.text.split()
    if words:
        word = words[len(words) // 2].strip(".,;:!?\"'")
        if word.isalnum():
            out = engine_for(graph("LLAMA"), top_k=1, safety_filter=[word]).generate("the cat")
            assert out.stop_reason == "safety_filter"
            assert word.lower() not in out.text.lower().split()


# ------------------------------------------------------------------------------------------
# The command line


def llmtool(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmtool", *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
        env=env,
    )


def test_cli_run_container_json(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "cache"))
    model = converted("GEMMA_2B", "int8")
    args = [
        "run",
        "--model",
        str(model),
        "--prompt",
        "the cat",
        "--max-tokens",
        "32",
        "--random-seed",
        "3",
        "--num-threads",
        "1",
        "--json",
    ]
    r = llmtool(*args)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["prompt_token_ids"] and data["token_ids"]
    assert len(data["prompt_token_ids"]) + len(data["token_ids"]) <= 32
    assert data["timings"]["decode_seconds"] >= 0
    cached = list((tmp_path / "cache" / "graphs").glob("*.tflite"))
    assert len(cached) == 1
    again = llmtool(*args)  # served from the cache, same text
    assert json.loads(again.stdout)["text"] == data["text"]
    other = llmtool(*args[:6], "48", *args[7:])  # another --max-tokens: the same graph
    assert other.returncode == 0, other.stderr
    assert list((tmp_path / "cache" / "graphs").glob("*.tflite")) == cached


def test_cli_export_then_run_streams(converted, tmp_path):
    graph_path = tmp_path / "m.tflite"
    r = llmtool(
        "export",
        str(converted("PHI_2")),
        "-o",
        str(graph_path),
        "--max-seq-len",
        "48",
        "--prefill-len",
        "8",
    )
    assert r.returncode == 0, r.stderr
    r = llmtool("inspect", str(graph_path), "--json")
    assert r.returncode == 0, r.stderr
    sigs = json.loads(r.stdout)["signatures"]
    assert set(sigs) == {"prefill_8", "decode"}
    assert sigs["decode"]["outputs"]["logits"] == [[1, 1, 320], "float32"]
    r = llmtool(
        "run",
        "--model",
        str(graph_path),
        "--prompt",
        "-",
        "--max-tokens",
        "40",
        "--top-k",
        "1",
        stdin="the cat",
    )
    assert r.returncode == 0, r.stderr
    greedy = engine_for(graph_path, top_k=1, max_tokens=40).generate_response("the cat")
    assert r.stdout == greedy + "\n"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-tokens", "0"], "max tokens"),
        (["--top-k", "-1"], "top-k"),
        (["--temperature", "-0.5"], "temperature"),
        (["--max-tokens", "4"], "prompt has"),
    ],
)
def test_cli_run_bad_options(args, needle, converted, tmp_path):
    graph_path = tmp_path / "g.tflite"
    export_graph(converted("LLAMA"), graph_path, ExportOptions(max_seq_len=64, prefill_len=8))
    r = llmtool(
        "run",
        "--model",
        str(graph_path),
        "--prompt",
        "a prompt that is long enough to overflow four tokens",
        *args,
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_cli_run_bad_model_files(tmp_path):
    missing = llmtool("run", "--model", str(tmp_path / "none.bin"), "--prompt", "x")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model at all" * 100)
    corrupt = llmtool("run", "--model", str(junk), "--prompt", "x")
    for r in (missing, corrupt):
        assert r.returncode == 2
        assert "Traceback" not in r.stderr
        assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1


def test_default_max_tokens_is_capped_at_the_model(graph):
    llm = LlmInference.create_from_options(
        LlmInferenceOptions(model_path=str(graph("GPT2")), num_threads=1)
    )
    assert llm.max_tokens == 64  # the default 512, capped at this graph's KV cache
    with pytest.raises(LlmToolError, match="exceeds what this model handles"):
        engine_for(graph("GPT2"), max_tokens=65)


def test_export_is_deterministic(converted, tmp_path):
    outs = []
    for i in range(2):
        path = tmp_path / f"g{i}.tflite"
        export_graph(converted("PHI_2", "int4"), path, ExportOptions(max_seq_len=32, prefill_len=8))
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]


def test_short_prompts_take_one_short_prefill(converted, tiny_model, tmp_path):
    """The first bucket carries short prefills 4x apart below the prefill length: a prompt of
    up to that length is one call padded at most 4x (not a padded long chunk), and exact."""
    assert [name for name, _, _ in plan_signatures(8192, 64, (256, 512), 8)] == [
        "prefill_64", "decode", "kv256_prefill_8", "kv256_prefill_32", "kv256_prefill_64",
        "kv256_decode", "kv512_prefill_64", "kv512_decode",
    ]  # fmt: skip
    path = tmp_path / "llama.tflite"
    options = ExportOptions(max_seq_len=64, prefill_len=32, kv_buckets=(48,), short_prefill_len=2)
    assert export_graph(converted("LLAMA"), path, options)["signatures"] == [
        "prefill_32", "decode", "kv48_prefill_2", "kv48_prefill_8", "kv48_prefill_32",
        "kv48_decode",
    ]  # fmt: skip
    llm = engine_for(path)
    calls: list[str] = []
    run = llm.engine._run
    llm.engine._run = lambda key, *rest: calls.append(key) or run(key, *rest)
    for n, key in ((2, "kv48_prefill_2"), (3, "kv48_prefill_8"), (9, "kv48_prefill_32")):
        calls.clear()
        ids = random_ids(n)
        ours, ref = llm.logits(ids), reference_logits(tiny_model("LLAMA"), ids)
        assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
        assert calls == [key], (n, calls)


def test_signature_choice_follows_the_cache_and_logits_stay_exact(converted, tiny_model, tmp_path):
    """Each call runs on the shortest KV bucket holding its positions (a short prompt on the
    short prefill), and the logits still match transformers across every boundary."""
    path = tmp_path / "llama.tflite"
    options = ExportOptions(max_seq_len=64, prefill_len=16, kv_buckets=BUCKETS)
    summary = export_graph(converted("LLAMA"), path, options)
    assert summary["signatures"] == [
        "prefill_16", "decode", "kv16_prefill_8", "kv16_prefill_16", "kv16_decode",
        "kv32_prefill_16", "kv32_decode",
    ]  # fmt: skip
    llm = engine_for(path)
    calls: list[tuple[str, int]] = []
    run = llm.engine._run

    def spy(key, tokens, pos, want_logits):
        calls.append((key, pos))
        return run(key, tokens, pos, want_logits)

    llm.engine._run = spy
    ids = random_ids(5)
    ours, ref = llm.logits(ids), reference_logits(tiny_model("LLAMA"), ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    assert calls == [("kv16_prefill_8", 0)]
    calls.clear()
    ids = random_ids(50)
    ours, ref = llm.logits(ids), reference_logits(tiny_model("LLAMA"), ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    assert calls == [("kv16_prefill_16", 0), ("kv32_prefill_16", 16), ("prefill_16", 32),
                     ("decode", 48), ("decode", 49)]  # fmt: skip
    calls.clear()
    llm.engine.reset()
    llm.engine.prefill(random_ids(14))
    for _ in range(20):
        llm.engine.decode(7)
    keys = [k for k, _ in calls[1:]]
    assert keys == ["kv16_decode"] * 2 + ["kv32_decode"] * 16 + ["decode"] * 2


def test_content_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    from llmtool.pipelines import resolve

    monkeypatch.setenv("LLMTOOL_CACHE_DIR", str(tmp_path / "cache"))
    hashed: list[Path] = []
    real = resolve.file_digest
    monkeypatch.setattr(resolve, "file_digest", lambda p: hashed.append(p) or real(p))
    model = tmp_path / "m.bin"
    model.write_bytes(b"first version")
    first = resolve.remembered_digest(model)
    assert resolve.remembered_digest(model) == first and len(hashed) == 1  # remembered
    model.write_bytes(b"other version")  # a rewrite (new ctime) is hashed again
    second = resolve.remembered_digest(model)
    assert second != first and second == real(model) and len(hashed) == 2


@pytest.mark.parametrize("entry", ["llmtool.entry", "llmtool.cli"])
def test_warm_run_imports_neither_exporter_nor_torch(converted, tmp_path, entry):
    """A run whose graph is cached loads what running needs: not the exporter or torch, nor
    pydantic (Typer's option coercion), protobuf (the SentencePiece proto) or the LiteRT
    schema (metadata is read without it); through the command's entry point (a plain `run`
    parsed without Typer) not even Typer, Click or Rich."""
    env = {**os.environ, "LLMTOOL_CACHE_DIR": str(tmp_path / "cache")}
    args = ["run", "--model", str(converted("GEMMA_2B", "int8")), "--prompt", "the cat",
            "--max-tokens", "12", "--num-threads", "1"]  # fmt: skip
    assert llmtool(*args, env=env).returncode == 0  # cold: exports into the cache
    report = tmp_path / "modules.json"
    code = (
        "import atexit, json, sys\n"
        f"out = open({str(report)!r}, 'w')\n"
        "atexit.register(lambda: out.write(json.dumps(list(sys.modules))) and out.close())\n"
        f"sys.argv = ['llmtool', *{args!r}]\n"
        f"from {entry} import main\n"
        "main()\n"
    )
    warm = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert warm.returncode == 0, warm.stderr
    loaded = {m.split(".")[0] if m.startswith(("typer", "rich", "click")) else m
              for m in json.loads(report.read_text())}  # fmt: skip
    assert "llmtool.runtime.compiled_engine" in loaded and "sentencepiece" in loaded
    heavy = {"llmtool.decoder", "llmtool.pipelines.export", "torch", "transformers", "pydantic",
             "google.protobuf", "ai_edge_litert.schema_py_generated", "flatbuffers"}  # fmt: skip
    if entry == "llmtool.entry":
        heavy |= {"typer", "click", "rich", "llmtool.cli"}
    assert not loaded & heavy, loaded & heavy


def test_run_fast_path_parses_as_typer(tmp_path):
    """entry.py parses a plain `llmtool run` without Typer: it knows every option of cli.run
    with Typer's defaults, and what it takes it parses to the values Typer passes; anything
    else it leaves to Typer."""
    import typer.main

    from llmtool import cli, entry

    command = typer.main.get_command(cli.app).commands["run"]
    flags = {f for p in command.params for f in [*p.opts, *p.secondary_opts]}
    assert flags == set(entry.RUN_OPTIONS)  # (--help is not a parameter)
    defaults = {p.name: p.default for p in command.params if p.name != "prompt"}
    assert defaults == entry.RUN_DEFAULTS
    model = str(tmp_path / "m.bin")
    cases = [
        ["--prompt", "hi"],
        ["--prompt", "-", "--model", model, "--max-tokens", " 64 ", "--top-k", "+1"],
        ["--temperature", "0", "--prompt", "--json", "--json", "--no-stream", "--chat"],
        ["--prompt", "hi", "--temperature", "1e-3", "--random-seed", "-7", "--system", "be",
         "--context-window", "3", "--num-threads", "2", "--safety-filter", "w.txt",
         "--lora-path", "a//b/", "--stream", "--model", ""],
        # left to Typer: a value Typer coerces or refuses, forms and options it alone parses
        ["--prompt", "hi", "--max-tokens", "3.0"],
        ["--prompt", "hi", "--temperature", "inf"],
        ["--prompt", "hi", "--top-k", "1_000"],
        ["--prompt=hi"],
        ["--prompt", "hi", "--prompt", "again"],
        ["--prompt", "hi", "extra"],
        ["--prompt", "hi", "--help"],
        ["--prompt", "hi", "--", "--json"],
        ["--model", model],
        ["--prompt"],
    ]  # fmt: skip
    taken = 0
    for args in cases:
        ours = entry.parse_run(args)
        if ours is None:
            continue
        taken += 1
        theirs = command.make_context("run", list(args)).params
        assert ours == theirs, args
        assert [type(v) for v in ours.values()] == [type(theirs[k]) for k in ours], args
    assert taken == 4


def test_longrope_default_cache_keeps_the_short_factors(converted, tiny_model):
    """Run without --max-tokens: a longrope model's graph keeps its original context (64 here,
    max positions 256), where the short rotary factors apply, so logits equal transformers'."""
    options = LlmInferenceOptions(model_path=str(converted("PHI_3", "float32")))
    with LlmInference.create_from_options(options) as llm:
        assert llm.engine.max_seq_len == 64
        ids = random_ids(20)
        ours = llm.logits(ids)
    ref = reference_logits(tiny_model("PHI_3"), ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
