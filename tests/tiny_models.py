"""Tiny random-initialised Hugging Face checkpoints in the real architectures, plus references.

These are the fixtures llmtool's converter and runtime are verified against: every parameter
(norm weights and biases included) is randomised so that a mistake anywhere changes the logits,
and the architectural quirks of each family are kept (multi-query, head_dim * heads != hidden,
partial rotary, ALiBi with a per-head-interleaved fused QKV, Conv1D layouts, tied/untied heads,
lm_head bias, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_TYPES = ("GEMMA_2B", "GEMMA_7B", "PHI_2", "FALCON_RW_1B", "STABLELM_4E1T_3B", "GPT2", "LLAMA")

# The newer families (issue 10), each exercising what the decoder learnt for it; fixture name ->
# llmtool model type. Kept out of MODEL_TYPES so the format-variant tests stay fast.
NEW_FIXTURES = {
    "QWEN3": "QWEN3",  # per-head q/k RMSNorm, head_dim * heads != hidden, tied head
    "LLAMA3": "LLAMA",  # Llama 3.x rope scaling (rope_type llama3), tied head (3.2-1B)
    "MISTRAL": "LLAMA",  # sliding window on every layer, shorter than the test prompts
    "GEMMA2_2B": "GEMMA2_2B",  # pre+post norms, both soft-caps active, alternating window
    "GEMMA3_1B": "GEMMA3_1B",  # q/k norms, local/global layers with own rope, linear scaling
    "PHI_3": "PHI_3",  # fused qkv/gate_up, partial rotary, longrope (short factor), window
    "GEMMA3_4B": "GEMMA3_4B",  # the multimodal wrapper: text_config, language_model.* names
    "QWEN2": "QWEN2",  # Qwen2 / Qwen2.5: QKV bias, GQA, untied head
}


def model_type_of(fixture: str) -> str:
    """The llmtool model type a fixture name converts as."""
    return NEW_FIXTURES.get(fixture, fixture)

# The format each real checkpoint ships in (everything else: safetensors).
NATIVE_FORMAT = {"FALCON_RW_1B": "pytorch"}

# (embedding std, matrix std): large enough that logits are not all near-equal (greedy decisions
# mean something), small enough that nothing saturates. Gemma multiplies the embedding by
# sqrt(hidden) and ties the head, so with equal stds the residual stream is dominated by the input
# token's embedding and the model just predicts its input token again; a smaller embedding and
# larger matrices make the layers decide.
WEIGHT_STDS = {"GEMMA_2B": (0.03, 0.15), "GEMMA_7B": (0.03, 0.15), "GEMMA2_2B": (0.03, 0.15),
               "GEMMA3_1B": (0.03, 0.15), "GEMMA3_4B": (0.03, 0.15)}
DEFAULT_STDS = (0.08, 0.08)
BIAS_STD = 0.02
NORM_STD = 0.1

# Versions the published checkpoints' config.json were written with (legacy_config=True).
_LEGACY_VERSION = {
    "GEMMA_2B": "4.38.0.dev0",
    "GEMMA_7B": "4.38.0.dev0",
    "PHI_2": "4.37.0",
    "FALCON_RW_1B": "4.33.0.dev0",
    "STABLELM_4E1T_3B": "4.38.0",
    "GPT2": "4.26.0.dev0",
    "LLAMA": "4.31.0.dev0",
    "QWEN3": "4.51.0",
    "LLAMA3": "4.45.0.dev0",
    "MISTRAL": "4.34.0.dev0",
    "GEMMA2_2B": "4.42.4",
    "GEMMA3_1B": "4.50.0.dev0",
    "PHI_3": "4.40.2",
    "GEMMA3_4B": "4.50.0.dev0",
    "QWEN2": "4.43.1",
}


SLIDING = 6  # sliding window of the new fixtures: shorter than the test prompts
ATTN_SOFTCAP = 3.0  # small enough that tanh bends these fixtures' attention scores...
FINAL_SOFTCAP = 0.6  # ...and logits


def _config(model_type: str, vocab_size: int) -> Any:
    """The transformers config for one tiny model (hidden 64, 2 layers, 4 heads)."""
    import transformers as tf

    last = vocab_size - 1  # "<|endoftext|>" of the tiny byte-level BPE tokenizers
    common = {"vocab_size": vocab_size, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 256}
    if model_type in ("GEMMA_2B", "GEMMA_7B"):
        seven = model_type == "GEMMA_7B"
        return tf.GemmaConfig(
            **common, hidden_size=64,
            # Gemma-7B: 16 heads x 256 = 4096 != 3072 hidden; here 4 x 24 = 96 != 64.
            head_dim=24 if seven else 16, num_key_value_heads=4 if seven else 1,
            intermediate_size=192 if seven else 128, hidden_act="gelu_pytorch_tanh",
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if model_type == "PHI_2":
        # Phi has no head_dim key: head_dim = hidden / heads = 20, rotary dims int(20 * 0.4) = 8.
        return tf.PhiConfig(
            **common, hidden_size=80, intermediate_size=160, num_key_value_heads=4,
            partial_rotary_factor=0.4, rope_theta=10000.0, hidden_act="gelu_new",
            layer_norm_eps=1e-5, qk_layernorm=False, tie_word_embeddings=False,
            resid_pdrop=0.1, bos_token_id=last, eos_token_id=last)
    if model_type == "FALCON_RW_1B":
        # ffn_hidden_size left at its default 4 * hidden (the real config has no such key).
        return tf.FalconConfig(
            **common, hidden_size=64, alibi=True, multi_query=False,
            new_decoder_architecture=False, parallel_attn=False, bias=True,
            layer_norm_epsilon=1e-5, tie_word_embeddings=True,
            bos_token_id=last, eos_token_id=last)
    if model_type == "STABLELM_4E1T_3B":
        return tf.StableLmConfig(
            **common, hidden_size=64, intermediate_size=192, num_key_value_heads=2,
            partial_rotary_factor=0.25, rope_theta=10000.0, hidden_act="silu",
            layer_norm_eps=1e-5, use_qkv_bias=False, qk_layernorm=False,
            use_parallel_residual=False, tie_word_embeddings=False,
            bos_token_id=last, eos_token_id=last)
    if model_type == "GPT2":
        # n_inner null -> 4 * n_embd, as in the real config.
        return tf.GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4,
            activation_function="gelu_new", layer_norm_epsilon=1e-5,
            bos_token_id=last, eos_token_id=last)
    if model_type == "LLAMA":
        return tf.LlamaConfig(
            **common, hidden_size=64, intermediate_size=192, num_key_value_heads=2,
            hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if model_type == "QWEN2":
        return tf.Qwen2Config(
            **common, hidden_size=64, intermediate_size=128, num_key_value_heads=2,
            hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
            use_sliding_window=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if model_type == "QWEN3":
        return tf.Qwen3Config(
            **common, hidden_size=64, intermediate_size=128, num_key_value_heads=2, head_dim=32,
            hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
            use_sliding_window=False, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if model_type == "LLAMA3":
        # original_max_position_embeddings 16 puts most frequencies in the scaled bands.
        return tf.LlamaConfig(
            **common, hidden_size=64, intermediate_size=128, num_key_value_heads=2,
            hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
            bos_token_id=1, eos_token_id=2)
    if model_type == "MISTRAL":
        return tf.MistralConfig(
            **common, hidden_size=64, intermediate_size=128, num_key_value_heads=2,
            hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=SLIDING,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if model_type == "GEMMA2_2B":
        # Three layers: sliding, full, sliding. query_pre_attn_scalar != head_dim.
        return tf.Gemma2Config(
            **{**common, "num_hidden_layers": 3}, hidden_size=64, intermediate_size=128,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
            sliding_window=SLIDING, attn_logit_softcapping=ATTN_SOFTCAP,
            final_logit_softcapping=FINAL_SOFTCAP, tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if model_type == "GEMMA3_4B":
        # Gemma3ForConditionalGeneration: the 1B text model below plus a one-layer vision tower
        # and projector, whose tensors the converter skips.
        text = _config("GEMMA3_1B", vocab_size).to_dict()
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
                               image_token_index=vocab_size - 1, tie_word_embeddings=True)
    if model_type == "GEMMA3_1B":
        # Layers sliding, sliding, full (pattern 3); global layers scale rotary linearly as
        # Gemma 3 4B+ do; q_dim 128 != hidden 64.
        return tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, hidden_size=64, intermediate_size=128,
            num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, sliding_window=SLIDING,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if model_type == "PHI_3":
        # Phi-4-mini's partial rotary (0.75) and longrope; the graphs' cache (64) fits in the
        # original context, so the short factors apply, and the attention factor is not 1.
        rotary_half = 64 // 4 * 3 // 4 // 2  # head_dim 16, 12 rotary dims
        return tf.Phi3Config(
            **common, hidden_size=64, intermediate_size=128, num_key_value_heads=2,
            hidden_act="silu", rms_norm_eps=1e-5, partial_rotary_factor=0.75,
            original_max_position_embeddings=64, sliding_window=SLIDING,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0 + 0.25 * i for i in range(rotary_half)],
                             "long_factor": [2.0 + 0.5 * i for i in range(rotary_half)],
                             "partial_rotary_factor": 0.75},
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(f"unknown model type {model_type!r}; expected one of {MODEL_TYPES}")


def _randomise(model: Any, model_type: str, seed: int) -> None:
    """Give every parameter a random value, norms and biases included."""
    embed_std, weight_std = WEIGHT_STDS.get(model_type, DEFAULT_STDS)
    embedding = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    norm_modules = {name for name, module in model.named_modules()
                    if "norm" in type(module).__name__.lower()}
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters are listed once
            module_name, _, leaf = name.rpartition(".")
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if module_name in norm_modules and leaf == "weight":
                # Gemma's RMSNorm computes x * (1 + weight): the stored weight is an offset.
                offset = model_type.startswith("GEMMA")
                value = NORM_STD * noise if offset else 1.0 + NORM_STD * noise
            elif leaf == "bias":
                value = BIAS_STD * noise
            elif param is embedding:
                value = embed_std * noise
            else:
                value = weight_std * noise
            param.copy_(value)


def _split(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Split names (in order) into `shards` non-empty, roughly byte-balanced groups."""
    if shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    total = sum(sizes[n] for n in names)
    groups: list[list[str]] = [[] for _ in range(shards)]
    done, g = 0, 0
    for i, name in enumerate(names):
        target = min(shards - 1, done * shards // total)
        g = max(g, min(target, g + 1), shards - (len(names) - i))  # monotone, none empty
        groups[g].append(name)
        done += sizes[name]
    return groups


def _write_weights(state: dict[str, torch.Tensor], out_dir: Path, fmt: str, shards: int) -> None:
    """Write the state dict as model.safetensors / pytorch_model.bin, or HF-named shards."""
    from safetensors.torch import save_file

    if fmt == "safetensors":
        stem, ext, index_name = "model", "safetensors", "model.safetensors.index.json"
    else:
        stem, ext, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"

    def write(part: dict[str, torch.Tensor], path: Path) -> None:
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in part.items()}, str(path),
                      metadata={"format": "pt"})
        else:
            torch.save(part, path)

    # A rebuild into the same folder must not leave another variant's weights behind.
    for pattern in ("model*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json"):
        for stale in out_dir.glob(pattern):
            stale.unlink()
    if shards <= 1:
        write(state, out_dir / f"{stem}.{ext}")
        return
    names = list(state)
    sizes = {n: state[n].numel() * state[n].element_size() for n in names}
    weight_map: dict[str, str] = {}
    for i, group in enumerate(_split(names, sizes, shards), start=1):
        filename = f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        write({n: state[n] for n in group}, out_dir / filename)
        weight_map.update({n: filename for n in group})
    # Aliased tensors (tied lm_head in .bin files) count once, as transformers counts them.
    seen: set[int] = set()
    total = 0
    for tensor in state.values():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _legacy_config(model_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """config.json as the published checkpoints' (older) transformers wrote it."""
    cfg = dict(config)
    rope = cfg.pop("rope_parameters", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = _LEGACY_VERSION[model_type]
    if model_type in ("GEMMA_2B", "GEMMA_7B"):
        cfg.pop("use_bidirectional_attention", None)  # 5.x-only key
        # The official Gemma configs say "gelu" but mean the tanh approximation; transformers
        # still maps "gelu" to gelu_pytorch_tanh for Gemma (a converter must do the same).
        cfg["hidden_act"] = "gelu"
    if model_type in NEW_FIXTURES:
        return _legacy_new_config(model_type, cfg, rope)
    if model_type == "FALCON_RW_1B":
        # RefinedWeb key: `n_embed` is still read as hidden_size. (`n_layer`/`n_head` are not
        # read by transformers 5.x any more, so the current names stay.) The real config has no
        # ffn_hidden_size / num_kv_heads / max_position_embeddings / rope keys (ALiBi model).
        cfg["n_embed"] = cfg.pop("hidden_size")
        for key in ("ffn_hidden_size", "num_kv_heads", "num_ln_in_parallel_attn",
                    "max_position_embeddings", "activation"):
            cfg.pop(key, None)
        cfg["apply_residual_connection_post_layernorm"] = False
    elif model_type == "GPT2":
        cfg["n_ctx"] = cfg["n_positions"]
    elif rope is not None:
        cfg["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        cfg["rope_scaling"] = None
    return dict(sorted(cfg.items()))


def _legacy_rope(cfg: dict[str, Any], rope: dict[str, Any]) -> None:
    """rope_parameters -> rope_theta (+ partial_rotary_factor) and rope_scaling."""
    rope = dict(rope)
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type", "default")
    rope.pop("type", None)
    cfg["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}


def _legacy_new_config(name: str, cfg: dict[str, Any], rope: Any) -> dict[str, Any]:
    """The newer families' config.json as transformers 4.x wrote it: no layer_types, rope as
    rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq and sliding_window_pattern,
    Phi-3's "type": "longrope"); a multimodal Gemma 3 lists only non-default text keys."""
    import transformers as tf

    text = cfg.get("text_config")
    inner = dict(text) if isinstance(text, dict) else cfg
    if isinstance(text, dict):
        rope = inner.pop("rope_parameters", None)
    inner.pop("layer_types", None)
    inner.pop("use_bidirectional_attention", None)
    if isinstance(text, dict):
        inner.pop("dtype", None)
    if name.startswith("GEMMA3"):
        inner.pop("_sliding_window_pattern", None)
        inner["sliding_window_pattern"] = 3
        inner["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        _legacy_rope(inner, rope["full_attention"])
    else:
        _legacy_rope(inner, rope)
    if name == "PHI_3":
        scaling = inner["rope_scaling"]
        inner["rope_scaling"] = {"type": "longrope", "short_factor": scaling["short_factor"],
                                 "long_factor": scaling["long_factor"]}
    if isinstance(text, dict):
        defaults = tf.Gemma3TextConfig().to_dict()
        keep = {"model_type", "rope_scaling"}
        cfg["text_config"] = {k: v for k, v in sorted(inner.items())
                              if k in keep or defaults.get(k, object()) != v}
        return dict(sorted(cfg.items()))
    return dict(sorted(inner.items()))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers warnings or progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_checkpoint(model_type: str, out_dir: Path, vocab_size: int = 320, *,
                     ckpt_format: str | None = None, shards: int = 1,
                     dtype: torch.dtype = torch.float32, seed: int = 0,
                     legacy_config: bool = False) -> Path:
    """Write a tiny random HF checkpoint folder (config.json, generation_config.json, weights).

    ckpt_format None -> the format the real model ships in; "safetensors" / "pytorch" force one.
    shards > 1 -> HF-named shards plus the index json. dtype -> storage dtype of every weight.
    legacy_config -> config.json keys as the published checkpoints' older transformers wrote them.
    .bin files hold the full state dict (a tied lm_head.weight aliases the embedding, as old
    torch.save-based checkpoints did); safetensors files drop tied duplicates (save_pretrained).
    """
    import transformers
    from safetensors.torch import load_file

    if model_type not in MODEL_TYPES and model_type not in NEW_FIXTURES:
        raise ValueError(f"unknown model type {model_type!r}; expected one of {MODEL_TYPES}")
    fmt = ckpt_format or NATIVE_FORMAT.get(model_type, "safetensors")
    if fmt not in ("safetensors", "pytorch"):
        raise ValueError(f"unknown ckpt_format {ckpt_format!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = _config(model_type, vocab_size)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model.eval(), model_type, seed)
    model = model.to(dtype)

    # save_pretrained writes config.json / generation_config.json exactly as transformers does,
    # and the safetensors state dict (tied duplicates removed, original names).
    with _quiet_transformers(), tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model.save_pretrained(tmp)
        saved = load_file(os.path.join(tmp, "model.safetensors"))
        for name in ("config.json", "generation_config.json"):
            shutil.copyfile(os.path.join(tmp, name), out_dir / name)

    if fmt == "safetensors":
        state = {name: saved[name] for name in sorted(saved)}
    else:
        full = model.state_dict()
        missing = set(saved) - set(full)
        if missing:
            raise RuntimeError(f"state_dict lacks saved tensors {sorted(missing)}")
        state = {name: full[name].detach() for name in full if name in saved or
                 _aliases_saved(full, name, saved)}
    _write_weights(state, out_dir, fmt, shards)

    if legacy_config:
        path = out_dir / "config.json"
        cfg = _legacy_config(model_type, json.loads(path.read_text()))
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        gen_path = out_dir / "generation_config.json"
        gen = json.loads(gen_path.read_text())
        gen = {k: v for k, v in gen.items()
               if k in ("_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id")}
        gen["transformers_version"] = _LEGACY_VERSION[model_type]
        gen_path.write_text(json.dumps(dict(sorted(gen.items())), indent=2) + "\n")
    return out_dir


def _aliases_saved(full: dict[str, torch.Tensor], name: str, saved: dict[str, Any]) -> bool:
    """True if `name` shares storage with a tensor save_pretrained kept (a tied weight)."""
    ptr = full[name].untyped_storage().data_ptr()
    return any(full[other].untyped_storage().data_ptr() == ptr for other in saved if other in full)


def load_reference(model_dir: Path) -> Any:
    """The transformers model for a folder, in float32 with eager attention, in eval mode.

    Exception: Falcon with ALiBi uses SDPA. In transformers 5.23 the eager Falcon path adds the
    ALiBi bias twice (once folded into the causal mask, once in the attention layer), so its
    logits differ from the SDPA path and from the original RefinedWeb model by ~0.17 on these
    fixtures; SDPA adds it once, as Falcon-RW-1B was trained (checked against a hand-written
    forward pass in test_tiny_models.py). Every other architecture: eager == SDPA to ~1e-6.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(model_dir))
        alibi = config.model_type == "falcon" and bool(getattr(config, "alibi", False))
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa" if alibi else "eager")
    return model.eval()


def _with_model(model_dir: Path, fn: Callable[[Any], Any]) -> Any:
    model = load_reference(model_dir)
    with torch.no_grad():
        return fn(model)


def reference_logits(model_dir: Path, token_ids: list[int]) -> np.ndarray:
    """float32 [len(token_ids), vocab] logits of one unbatched forward pass."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    return _with_model(
        model_dir, lambda m: m(input_ids=ids).logits[0].float().numpy().astype(np.float32))


def reference_greedy(model_dir: Path, token_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy (argmax) continuation of exactly `new_tokens` tokens; only the new tokens.

    EOS is an ordinary token here: generation neither stops on it nor masks it (min_new_tokens
    would mask it and so differ from a plain argmax loop).
    """
    from transformers import GenerationConfig

    ids = torch.tensor([list(token_ids)], dtype=torch.long)

    def run(model: Any) -> list[int]:
        model.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=0,
            eos_token_id=None, bos_token_id=None, pad_token_id=0)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=model.generation_config)
        return [int(t) for t in out[0, ids.shape[1]:]]

    tokens = _with_model(model_dir, run)
    if len(tokens) != new_tokens:
        raise RuntimeError(f"generate returned {len(tokens)} tokens, expected {new_tokens}")
    return tokens
