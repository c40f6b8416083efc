"""`llmtool bundle`: a graph, its tokenizer and start/stop tokens as one ship-ready file.

The output's kind follows its extension: `.task` (the MediaPipe zip LiteRT-LM also runs:
graph, SentencePiece model, LlmParameters) or `.litertlm` (LiteRT-LM's own container, which
also carries a Hugging Face tokenizer.json as it is). Everything is checked before a byte is
written: the tokenizer loads, the start and stop tokens are in it, the graph has the
signatures, inputs and outputs a runtime needs, and its vocabulary covers the tokenizer's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool.chat_template import ChatTemplate
from llmtool.config import BundleConfig
from llmtool.errors import LlmToolError
from llmtool.files import refuse_overlap
from llmtool.formats import metadata as keys
from llmtool.formats.llm_params import encode_llm_parameters
from llmtool.formats.tflite_model import read_model
from llmtool.tokenizer import HF_FILE, SPM_FILE, Tokenizer, read_tokenizer_files

Progress = Callable[[int, int, str], None]
KINDS = {".task": "task", ".litertlm": "litertlm"}


def _no_progress(done: int, total: int, what: str) -> None:
    pass


@dataclass(frozen=True)
class GraphFacts:
    """What a runtime learns from a graph's signatures."""

    vocab_size: int
    kv_len: int
    prefill_lengths: tuple[int, ...]
    num_layers: int
    prefill_logits: bool  # False for litert-torch exports: their prefill returns only caches


def check_graph(path: str | Path) -> GraphFacts:
    """The graph has `decode` and `prefill_<T>` signatures with the AI Edge inputs and outputs
    (tokens, input_pos, per-layer kv_cache_k_<i>/kv_cache_v_<i>; decode returns logits)."""
    path = Path(path)
    try:
        model = read_model(path)
    except LlmToolError:
        raise
    except Exception as exc:  # a flatbuffer that does not parse
        raise LlmToolError(f"not a TFLite model ({type(exc).__name__})", path) from None
    with model:
        sigs = {s.key: s for s in model.signatures}
        prefills = sorted(int(m.group(1)) for k in sigs if (m := re.fullmatch(r"prefill_(\d+)", k)))
        if "decode" not in sigs or not prefills:
            found = ", ".join(sorted(sigs)) or "none"
            raise LlmToolError(
                f"the graph needs 'prefill_<T>' and 'decode' signatures (has: {found})", path
            )
        facts: dict[str, Any] = {}
        for key in [*(f"prefill_{t}" for t in prefills), "decode"]:
            sig = sigs[key]
            tensors = model.subgraphs[sig.subgraph_index].tensors
            for name in ("tokens", "input_pos"):
                if name not in sig.inputs:
                    raise LlmToolError(f"signature {key} has no '{name}' input", path)
            caches = {n for n in sig.inputs if n.startswith("kv_cache_")}
            layers = {n.rsplit("_", 1)[-1] for n in caches}
            expected = {f"kv_cache_{kv}_{i}" for kv in "kv" for i in layers}
            if (
                not caches
                or caches != expected
                or not {str(i) for i in range(len(layers))} == (layers)
            ):
                raise LlmToolError(
                    f"signature {key} needs kv_cache_k_<i> and kv_cache_v_<i> inputs for "
                    "layers 0..n-1",
                    path,
                )
            missing = sorted(expected - set(sig.outputs))
            if missing:
                raise LlmToolError(f"signature {key} does not output {missing[0]}", path)
            k0 = tensors[sig.inputs["kv_cache_k_0"]].shape
            v0 = tensors[sig.inputs["kv_cache_v_0"]].shape
            if len(k0) != 4 or len(v0) != 4 or (k0[1], k0[2], k0[3]) != (v0[1], v0[3], v0[2]):
                raise LlmToolError(
                    f"signature {key}: KV caches shaped {list(k0)} / {list(v0)}; runtimes need "
                    "K [1, heads, length, dim] and V [1, heads, dim, length] (litert-torch: "
                    "export with the transposed KV cache layout)",
                    path,
                )
            facts.setdefault("layers", len(layers))
            facts.setdefault("kv_len", int(k0[2]) if len(k0) == 4 else 0)
            if "logits" in sig.outputs:
                vocab = int(tensors[sig.outputs["logits"]].shape[-1])
                if facts.setdefault("vocab", vocab) != vocab:
                    raise LlmToolError(f"signature {key} has another vocabulary size", path)
            elif key == "decode":
                raise LlmToolError("signature decode has no 'logits' output", path)
        prefill_logits = all("logits" in sigs[f"prefill_{t}"].outputs for t in prefills)
    return GraphFacts(
        facts["vocab"], facts["kv_len"], tuple(prefills), facts["layers"], prefill_logits
    )


@dataclass
class _Tokenizer:
    """The tokenizer as it goes into the bundle, and as the runtime will use it."""

    kind: str  # "sentencepiece" | "hf"
    data: bytes  # SentencePiece model bytes or tokenizer.json bytes
    runtime: Tokenizer  # encodes like the bundle's runtime will (start/stop not yet applied)
    source_vocab: int  # ids the source tokenizer defines
    bytes_to_unicode: bool = False
    converted: bool = False  # a byte-level BPE turned into SentencePiece for a .task


def _load_tokenizer(files: dict[str, bytes], kind: str, mapping: bool | None, where: Any):
    from llmtool.formats.sentencepiece_bpe import bpe_to_sentencepiece, is_byte_level_bpe

    source = Tokenizer.from_files(files)
    if SPM_FILE in files:
        tok = Tokenizer.from_files({SPM_FILE: files[SPM_FILE]})
        if mapping:
            if kind == "litertlm":
                raise LlmToolError(
                    "LiteRT-LM has no bytes-to-unicode mapping: bundle the tokenizer.json "
                    "into a .litertlm instead",
                    where,
                )
            tok.use_bytes_to_unicode()
        return _Tokenizer("sentencepiece", files[SPM_FILE], tok, source.vocab_size, bool(mapping))
    data = files[HF_FILE]
    if kind == "litertlm":
        if mapping:
            raise LlmToolError(
                "--enable-bytes-to-unicode-mapping is for a SentencePiece model; a .litertlm "
                "carries the tokenizer.json as it is",
                where,
            )
        return _Tokenizer("hf", data, Tokenizer.from_files({HF_FILE: data}), source.vocab_size)
    if mapping is False or not is_byte_level_bpe(data):
        raise LlmToolError(
            "a .task needs a SentencePiece tokenizer; this tokenizer.json is not a byte-level "
            "BPE llmtool can convert: bundle it as .litertlm",
            where,
        )
    model = bpe_to_sentencepiece(data)
    tok = Tokenizer.from_files({SPM_FILE: model})
    tok.use_bytes_to_unicode()
    return _Tokenizer("sentencepiece", model, tok, source.vocab_size, True, converted=True)


def _default_tokens(source: Tokenizer) -> tuple[str | None, list[str]]:
    start = (
        source.id_to_token(source.bos_id) if source.add_bos and source.bos_id is not None else None
    )
    stops = [t for t in (source.id_to_token(i) for i in source.stop_ids) if t is not None]
    return start, stops


def chat_affixes(chat: ChatTemplate, system: str | None) -> tuple[str | None, str, str]:
    """(session prefix, prompt prefix, prompt suffix) of a chat template. A template that
    folds the system prompt into the user's turn (Gemma) keeps a given one verbatim."""
    try:
        affixes = chat.prompt_affixes(system)
    except LlmToolError:
        if system is None:
            raise
        affixes = chat.prompt_affixes()
        return system, affixes.prompt_prefix, affixes.prompt_suffix
    return affixes.session_prefix or None, affixes.prompt_prefix, affixes.prompt_suffix


def bundle(config: BundleConfig, progress: Progress = _no_progress) -> dict[str, Any]:
    """Validate the inputs, then write the bundle; returns a summary."""
    t0 = time.perf_counter()
    config.validate()
    output = Path(config.output_filename or "")
    kind = KINDS.get(output.suffix.lower())
    if kind is None:
        raise LlmToolError("the output must end in .task or .litertlm", output)
    refuse_overlap(output, [config.model, config.tflite_model, config.tokenizer_model])
    if config.model:
        return _bundle_container(config, output, kind, progress, t0)
    graph = Path(config.tflite_model or "")
    if not graph.is_file():
        raise LlmToolError("TFLite model not found", graph)
    files = read_tokenizer_files(config.tokenizer_model or "")
    return _bundle_graph(config, graph, files, output, kind, progress, t0)


def _bundle_container(
    config: BundleConfig, output: Path, kind: str, progress: Progress, t0: float
) -> dict[str, Any]:
    """--model X.bin: export the graph next to the output, bundle it, delete it."""
    import os

    from llmtool.pipelines.export import export_graph

    container = Path(config.model or "")
    if not container.is_file():
        raise LlmToolError("model file not found", container)
    with read_model(container) as m:
        if m.is_graph:
            raise LlmToolError(
                "--model takes a converted .bin; give a graph with --tflite-model", container
            )
        files = keys.unpack_tokenizer(m.metadata)
    if not files:
        raise LlmToolError("the model carries no tokenizer (was it written by llmtool?)", container)
    if config.tokenizer_model:
        files = read_tokenizer_files(config.tokenizer_model)
    output.parent.mkdir(parents=True, exist_ok=True)
    graph = output.with_name(f".{output.name}.graph-{os.getpid()}.tflite")
    try:
        progress(0, 3, "exporting the graph")
        export_graph(container, graph)
        return _bundle_graph(config, graph, files, output, kind, progress, t0)
    finally:
        graph.unlink(missing_ok=True)


def _bundle_graph(
    config: BundleConfig,
    graph: Path,
    files: dict[str, bytes],
    output: Path,
    kind: str,
    progress: Progress,
    t0: float,
) -> dict[str, Any]:
    progress(1, 3, "checking")
    where = config.tokenizer_model or config.model
    facts = check_graph(graph)
    tok = _load_tokenizer(files, kind, config.enable_bytes_to_unicode_mapping, where)
    source = Tokenizer.from_files(files)
    if tok.source_vocab > facts.vocab_size:
        raise LlmToolError(
            f"the tokenizer has {tok.source_vocab} tokens but the graph's vocabulary is "
            f"{facts.vocab_size}: they do not belong together",
            where,
        )
    start, stops = _default_tokens(source)
    if config.start_token is not None:
        start = config.start_token
    if config.stop_tokens is not None:
        stops = list(config.stop_tokens)
    if not stops:
        raise LlmToolError("no stop tokens: give --stop-tokens", where)
    for what, token in [("start", start), *(("stop", t) for t in stops)]:
        if token is not None and tok.runtime.token_to_id(token) is None:
            raise LlmToolError(f"{what} token {token!r} is not in the tokenizer", where)
    session, prefix, suffix = config.system_prompt, config.prompt_prefix, config.prompt_suffix
    chat = source.chat_template
    roles = None  # per-role (prefix, suffix) of the chat template, for LiteRT-LM's metadata
    if chat is not None and prefix is None and suffix is None:
        roles = chat.role_affixes()
        # The model's chat template, as the fixed text the reference runtimes put around
        # each prompt, and its end-of-turn token among the stop tokens.
        session, prefix, suffix = chat_affixes(chat, config.system_prompt)
        end = chat.end_of_turn()
        if config.stop_tokens is None and end and end not in stops:
            if tok.runtime.token_to_id(end) is not None:
                stops.append(end)
    tok.runtime.use_start_and_stop(start, stops)

    progress(2, 3, f"writing {output.name}")
    if kind == "task":
        from llmtool.formats.task_bundle import write_task_bundle

        params: dict[str, Any] = {"stop_tokens": stops}
        if start is not None:
            params["start_token"] = start
        if tok.bytes_to_unicode:
            params["input_output_normalizations"] = ["INPUT_OUTPUT_NORMALIZATION_BYTES_TO_UNICODE"]
        template = {"session_prefix": session, "prompt_prefix": prefix, "prompt_suffix": suffix}
        if any(v for v in template.values()):
            params["prompt_template"] = {k: v for k, v in template.items() if v}
        write_task_bundle(output, graph, tok.data, encode_llm_parameters(params))
    else:
        from llmtool.formats.litertlm import llm_metadata_class, write_litertlm

        meta = llm_metadata_class()()
        if start is not None:
            meta.start_token.token_ids.ids.append(tok.runtime.bos_id)
        for token_id in [tok.runtime.token_to_id(t) for t in stops]:
            meta.stop_tokens.add().token_ids.ids.append(token_id)
        if roles is not None:
            # LiteRT-LM frames each message with its role's pair; a system pair would only
            # wrap a system message given at run time, so a template's default system turn
            # is left out here (the .task keeps it as its session prefix).
            for role in ("user", "model"):
                field = getattr(meta.prompt_templates, role)
                field.prefix, field.suffix = roles[role]
            if config.system_prompt:
                meta.prompt_templates.system.prefix = session or ""
        else:
            if prefix or suffix:
                meta.prompt_templates.user.prefix = prefix or ""
                meta.prompt_templates.user.suffix = suffix or ""
            if session:
                meta.prompt_templates.system.prefix = session
        if facts.kv_len:
            meta.max_num_tokens = facts.kv_len
        write_litertlm(
            output, graph, tok.data, tok.kind, meta.SerializeToString(deterministic=True)
        )
    progress(3, 3, "done")
    return {
        "output": str(output),
        "output_bytes": output.stat().st_size,
        "kind": kind,
        "tokenizer": tok.kind + (" (converted from byte-level BPE)" if tok.converted else ""),
        "bytes_to_unicode": tok.bytes_to_unicode,
        "start_token": start,
        "stop_tokens": stops,
        "prompt_template": {
            "session_prefix": session,
            "prompt_prefix": prefix,
            "prompt_suffix": suffix,
        },
        "vocab_size": facts.vocab_size,
        "kv_cache": facts.kv_len,
        "prefill_lengths": list(facts.prefill_lengths),
        "seconds": round(time.perf_counter() - t0, 2),
    }
