"""LoRA: `lora-convert` of PEFT adapters, and adapters at run time, against transformers + peft.

Every adapter here is random and non-zero (B != 0), with alpha != r; GPT-2's uses rsLoRA and
Gemma's a per-module rank_pattern, so the scale PEFT applies is checked in all its forms.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtool import LlmInference, LlmInferenceOptions
from llmtool.config import ConversionConfig
from llmtool.errors import LlmToolError
from llmtool.formats.lora_file import LoraFile
from llmtool.pipelines.convert import convert
from llmtool.pipelines.lora_convert import lora_convert
from tests.tiny_models import load_reference

IDS = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128]
ATTENTION = {
    "GEMMA_2B": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "LLAMA": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "PHI_2": ["q_proj", "k_proj", "v_proj", "dense"],
    "GPT2": ["c_attn", "c_proj"],  # also matches mlp.c_proj: GPT-2 names collide
    "PHI_3": ["qkv_proj", "o_proj"],  # fused q/k/v (and gate/up) split like the weights
}


def peft_adapter(folder: Path, out: Path, seed: int, **lora_options) -> torch.nn.Module:
    """Save a random non-zero PEFT LoRA adapter of the checkpoint in `folder`; return the
    PEFT model (eval mode) for reference outputs."""
    from peft import LoraConfig, get_peft_model

    model = load_reference(folder)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_options))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)  # PEFT's random init is small; make the adapter matter
    peft_model.save_pretrained(out)
    return peft_model.eval()


def logits_of(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def greedy_of(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    out, tokens = [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
            tokens.append(out[-1])
    return out


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4 * float(np.abs(ref).max()), f"max |diff| {err}"


@dataclass
class Adapters:
    container: Path
    all_linear: Path  # LoRA files
    attention: Path
    folder_all: Path  # PEFT folders
    logits: dict[str, np.ndarray]  # "base", "all", "attention"
    greedy: dict[str, list[int]]


@pytest.fixture(scope="module")
def adapters(tiny_model, converted, tmp_path_factory):
    cache: dict[str, Adapters] = {}

    def make(model_type: str) -> Adapters:
        if model_type in cache:
            return cache[model_type]
        folder = tiny_model(model_type)
        container = converted(model_type, "float32")
        work = tmp_path_factory.mktemp(f"lora-{model_type.lower()}")
        rslora = model_type == "GPT2"
        all_model = peft_adapter(
            folder, work / "all", 1, r=4, lora_alpha=11, target_modules="all-linear",
            use_rslora=rslora,
        )
        attn_options: dict = dict(r=8, lora_alpha=5, target_modules=ATTENTION[model_type])
        if model_type == "GEMMA_2B":
            attn_options |= dict(rank_pattern={"k_proj": 4}, alpha_pattern={"v_proj": 13})
        attn_model = peft_adapter(folder, work / "attn", 2, **attn_options)
        logits = {
            "base": logits_of(load_reference(folder), IDS),
            "all": logits_of(all_model, IDS),
            "attention": logits_of(attn_model, IDS),
        }
        greedy = {"all": greedy_of(all_model, IDS, 8)}
        files = {}
        for name in ("all", "attn"):
            files[name] = work / f"{name}.lora.bin"
            lora_convert(work / name, container, files[name])
        cache[model_type] = Adapters(
            container, files["all"], files["attn"], work / "all", logits, greedy
        )
        return cache[model_type]

    return make


@pytest.mark.parametrize("model_type", ["GEMMA_2B", "PHI_2", "LLAMA", "GPT2"])
def test_adapters_match_peft_and_switch(adapters, model_type):
    """Static LoRA from the options, then set_lora: attention -> all-linear (re-exported with
    room for both) -> attention -> none -> all-linear, each equal to transformers + peft."""
    a = adapters(model_type)
    options = LlmInferenceOptions(model_path=str(a.container), lora_path=str(a.attention),
                                  max_tokens=64)
    with LlmInference.create_from_options(options) as llm:
        assert {"q", "k", "v", "o"} <= set(llm.engine.lora_targets)
        assert_close(llm.logits(IDS), a.logits["attention"])
        llm.set_lora(a.all_linear)
        assert "up" in llm.engine.lora_targets
        assert_close(llm.logits(IDS), a.logits["all"])
        graph = llm.graph_path
        for name, path in [("attention", a.attention), ("base", None), ("all", a.all_linear)]:
            llm.set_lora(path)
            assert llm.graph_path == graph  # switched in place, nothing re-exported
            assert_close(llm.logits(IDS), a.logits[name])
        engine = llm.engine
        engine.reset()
        logits, tokens = engine.prefill(IDS), []
        for _ in range(8):
            tokens.append(int(np.argmax(logits)))
            logits = engine.decode(tokens[-1])
        assert tokens == a.greedy["all"]


def dequantized_reference(folder: Path, container: Path, adapter: Path | None):
    """transformers (+ peft) with the container's weights, dequantized, in place of the
    checkpoint's: what the graph computes up to its activation quantization."""
    from peft import PeftModel

    from llmtool.architectures import get_architecture
    from llmtool.formats.container import Container
    from llmtool.spec import ROLE_NAMES, role_name

    model = load_reference(folder)
    state = model.state_dict()
    with Container.open(container) as c, torch.no_grad():
        for rule in get_architecture(c.model_type).rules:
            if rule.roles[0] not in ROLE_NAMES:
                continue
            layers = range(model.config.num_hidden_layers) if "{i}" in rule.hf else [None]
            for layer in layers:
                hf = rule.hf.format(i=layer)
                name = role_name(rule.roles[0], layer)
                if hf in state and rule.transform is None and name in c:
                    state[hf].copy_(torch.from_numpy(np.array(c.float(name))))
    return PeftModel.from_pretrained(model, str(adapter)).eval() if adapter else model


def test_fused_phi3_projections(adapters, tmp_path):
    """Phi-3's fused qkv_proj and gate_up_proj adapters, split like the weights. (A graph
    with a short cache: Phi-3's longrope picks its short factors as transformers does on
    these short inputs.)"""
    from llmtool.formats.lora_file import LORA_ROLES
    from llmtool.pipelines.export import ExportOptions, export_graph
    from llmtool.runtime.compiled_engine import CompiledEngine

    a = adapters("PHI_3")
    graph = tmp_path / "phi3.tflite"
    export_graph(a.container, graph,
                 ExportOptions(max_seq_len=64, lora_rank=16, lora_targets=LORA_ROLES))
    with CompiledEngine(graph, num_threads=1, weight_cache=False) as engine:
        for name, path in [("all", a.all_linear), ("attention", a.attention), ("base", None)]:
            if path is None:
                engine.set_lora_inputs(None)
            else:
                with LoraFile(path) as lora:
                    engine.set_lora_inputs(lora.padded(engine.lora_rank))
            engine.reset()
            assert_close(engine.prefill(IDS, all_logits=True), a.logits[name])


@pytest.mark.parametrize("quantization", ["float16", "int8", "int4"])
def test_adapter_over_quantized_bases(adapters, tiny_model, converted, quantization):
    """The file converted for the float32 base applies to the same model stored quantized (the
    base identity ignores how weights are stored): float16 equals PEFT over the float16
    weights; int8/int4 add no error beyond the base's own activation quantization."""
    a = adapters("LLAMA")
    container = converted("LLAMA", quantization)
    options = LlmInferenceOptions(model_path=str(container), lora_path=str(a.all_linear),
                                  max_tokens=64)
    with LlmInference.create_from_options(options) as llm:
        ours = llm.logits(IDS)
        llm.set_lora(None)
        ours_base = llm.logits(IDS)
    folder = tiny_model("LLAMA")
    ref = logits_of(dequantized_reference(folder, container, a.folder_all), IDS)
    ref_base = logits_of(dequantized_reference(folder, container, None), IDS)
    if quantization == "float16":
        assert_close(ours, ref)
    else:
        # Mean errors: the largest of a few hundred logits varies 2x with how the weights
        # happen to round (int4 with searched scales: 3.6x the base's largest, mean 1.0x).
        err = np.abs(ours - ref).mean()
        base_err = np.abs(ours_base - ref_base).mean()
        assert err < 2 * base_err


def test_adapter_for_a_smoothed_base(adapters, tmp_path):
    """quantize's outlier smoothing rescales the base (norm gains, v/up rows, columns of the
    projections): an adapter converted for the smoothed base folds the same scales in and
    equals PEFT (weights kept float32, so exactly); the one converted for the unsmoothed
    base is refused there instead of running wrong."""
    from llmtool.pipelines.quantize import QuantizeOptions, quantize_model

    a = adapters("LLAMA")
    base = tmp_path / "smoothed.bin"
    bits = dict(attention_bits=32, feedforward_bits=32, embedding_bits=32)
    assert quantize_model(a.container, base, QuantizeOptions(**bits, smooth=True))["smoothing"]
    lora = tmp_path / "all.lora.bin"
    lora_convert(a.folder_all, base, lora)
    options = LlmInferenceOptions(model_path=str(base), lora_path=str(lora), max_tokens=64)
    with LlmInference.create_from_options(options) as llm:
        assert_close(llm.logits(IDS), a.logits["all"])
        with pytest.raises(LlmToolError, match="was converted for"):
            llm.set_lora(a.all_linear)


def test_lora_file_contents_and_determinism(adapters, tmp_path):
    a = adapters("LLAMA")
    again = lora_convert(a.folder_all, a.container, tmp_path / "again.bin")
    assert Path(again["output"]).read_bytes() == a.all_linear.read_bytes()
    assert again["rank"] == 4 and again["stored_rank"] == 16 and again["scale"] == 11 / 4
    from safetensors.numpy import load_file

    peft = load_file(a.folder_all / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.k_proj"
    with LoraFile(a.all_linear) as lora:
        a_prime = lora.tensors["lora_atten_k_a_prime_weight_1"]
        b_prime = lora.tensors["lora_atten_k_b_prime_weight_1"]
        np.testing.assert_allclose(a_prime[:, :4], 11 / 4 * peft[prefix + ".lora_A.weight"].T)
        np.testing.assert_array_equal(b_prime[:4], peft[prefix + ".lora_B.weight"].T)
        assert not a_prime[:, 4:].any() and not b_prime[4:].any()
        assert lora._model.metadata_index["lora_rank"] == 16  # LiteRT-LM reads it there
    assert a.all_linear.stat().st_size % 4096 == 0


def edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_one_line_errors(adapters, tiny_model, converted, tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    a = adapters("LLAMA")
    folder, base = tiny_model("LLAMA"), a.container

    def refused(adapter: Path, container: Path = base, rank: int | None = None) -> str:
        with pytest.raises(LlmToolError) as e:
            lora_convert(adapter, container, tmp_path / "out.bin", lora_rank=rank)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out.bin").exists()
        return str(e.value)

    assert "--lora-rank 8 disagrees" in refused(a.folder_all, rank=8)
    assert "has rank 4" in refused(a.folder_all, rank=8)
    assert "says r=6 but" in refused(edited_copy(a.folder_all, tmp_path / "r6", r=6))
    assert "DoRA" in refused(edited_copy(a.folder_all, tmp_path / "dora", use_dora=True))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(a.folder_all / "adapter_model.safetensors", lonely)
    assert "no adapter_config.json" in refused(lonely / "adapter_model.safetensors")
    gpt2 = converted("GPT2", "float32")
    assert "for another architecture" in refused(a.folder_all, gpt2)
    gemma = adapters("GEMMA_2B")
    assert "another model size" in refused(gemma.folder_all, base)

    def saved(name: str, config) -> Path:
        model = get_peft_model(load_reference(folder), config)
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    head = saved("head", LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "unsupported LoRA target modules for LLAMA: lm_head" in refused(head)
    ia3 = saved("ia3", IA3Config(target_modules=["k_proj", "down_proj"],
                                 feedforward_modules=["down_proj"]))
    assert "PEFT type IA3 is not supported" in refused(ia3)
    kept = saved("kept", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert "modules_to_save" in refused(kept)

    # An adapter converted for one checkpoint is refused on another of the same architecture.
    other_dir = tiny_model("LLAMA", seed=7)
    other = tmp_path / "other.bin"
    convert(ConversionConfig(input_ckpt=str(other_dir), model_type="LLAMA",
                             output_tflite_file=str(other), quantization="int8"))
    with pytest.raises(LlmToolError, match=r"converted for LLAMA base .*not for this LLAMA"):
        LlmInference.create_from_options(
            LlmInferenceOptions(model_path=str(other), lora_path=str(a.all_linear))
        )


def llmtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtool", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_convert_with_lora_then_run(adapters, tiny_model, tmp_path):
    """`convert --lora-ckpt` writes base and LoRA file; `run --lora-path` generates PEFT's
    greedy tokens."""
    a = adapters("LLAMA")
    base, lora = tmp_path / "base.bin", tmp_path / "lora.bin"
    r = llmtool("convert", "--model-type", "LLAMA", "--input-ckpt", str(tiny_model("LLAMA")),
                "--quantization", "float32", "--output-tflite-file", str(base),
                "--lora-ckpt", str(a.folder_all), "--lora-output-tflite-file", str(lora))
    assert r.returncode == 0, r.stderr
    assert "LoRA rank 4" in r.stdout
    r = llmtool("run", "--model", str(base), "--lora-path", str(lora), "--prompt", "the",
                "--top-k", "1", "--max-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    peft_model = peft_model_for(tiny_model("LLAMA"), a.folder_all)
    ids, tokens = result["prompt_token_ids"], result["token_ids"]
    assert tokens == greedy_of(peft_model, ids, len(tokens))


def peft_model_for(folder: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_reference(folder), str(adapter)).eval()


def test_litert_lm_runs_our_lora(adapters, tmp_path):
    """Google's LiteRT-LM applies our LoRA file to our graph (its rank-16 attention
    convention) and decodes greedily as our engine does."""
    litert_lm = pytest.importorskip("litert_lm")
    import sentencepiece as spm

    from llmtool.formats import metadata as keys
    from llmtool.formats.container import Container
    from llmtool.formats.llm_params import decode_llm_parameters, encode_llm_parameters
    from llmtool.formats.task_bundle import write_task_bundle
    from llmtool.pipelines.export import ExportOptions, export_graph
    from llmtool.runtime.compiled_engine import CompiledEngine

    a = adapters("GEMMA_2B")
    graph = tmp_path / "g.tflite"
    export_graph(a.container, graph, ExportOptions(max_seq_len=64, prefill_len=8, lora_rank=16))
    with Container.open(a.container) as c:
        tokenizer = keys.unpack_tokenizer(dict(c.metadata))["tokenizer.model"]
        ref = decode_llm_parameters(c.metadata[keys.LLM_PARAMETERS])
    params = encode_llm_parameters({"start_token": ref["start_token"],
                                    "stop_tokens": ref["stop_tokens"]})
    bundle = write_task_bundle(tmp_path / "g.task", graph, tokenizer, params)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    theirs = litert_lm.Engine(str(bundle), backend=litert_lm.Backend.CPU(thread_count=1),
                              cache_dir=":nocache", max_num_tokens=64,
                              lora_rank_config=litert_lm.LoraRankConfig(lora_rank=16))
    ours = CompiledEngine(graph, num_threads=1, weight_cache=False)
    with LoraFile(a.attention) as lora:
        ours.set_lora_inputs(lora.padded(16))
    texts = []
    for prompt in ["w7 w3", "w10 w11 w2"]:
        session = theirs.create_session(
            apply_prompt_template=False,
            sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0, seed=0),
            max_output_tokens=10,
            lora_config=litert_lm.LoraConfig(lora_path=str(a.attention)),
        )
        session.run_prefill([prompt])
        text = session.run_decode().texts[0]
        ours.reset()
        logits, out = ours.prefill([sp.bos_id(), *sp.encode(prompt)]), []
        for _ in range(10):
            out.append(int(np.argmax(logits)))
            logits = ours.decode(out[-1])
        assert text == sp.decode(out).split("\x00")[0], prompt
        texts.append(text)
    assert "".join(texts), "the prompts should produce comparable (NUL-free) text"
    ours.close()
