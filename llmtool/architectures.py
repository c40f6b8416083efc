"""THE table: every model-specific fact lives here and nowhere else.

`ARCHITECTURES` has one row per model type: which config.json `model_type` values it accepts,
the fixed facts of the family (norm kind, activation, ...), how config.json becomes a
`ModelSpec` (spec.py, the generic vocabulary the decoder reads), and how each Hugging Face
tensor maps to roles of the generic decoder (`TensorRule`), with the transform that gets it
there written beside the rules that use it.

Adding an architecture is adding a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.spec import ModelSpec

# --------------------------------------------------------------------------------------------
# How a Hugging Face tensor becomes roles: transforms take the checkpoint tensor (float32
# numpy, as stored) and return one array per role of the rule, each [out, in] like HF Linear.

Transform = Callable[[np.ndarray, ModelSpec], list[np.ndarray]]


def split_qkv(x: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    """Rows [q; k; v] stacked along axis 0 (GPT-2's c_attn after transposing)."""
    q, k = spec.q_dim, spec.kv_dim
    return [np.ascontiguousarray(p) for p in np.split(x, [q, q + k], axis=0)]


def falcon_qkv(x: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    """Falcon-RW's fused rows, interleaved per head: [heads, (q, k, v), head_dim, ...]."""
    rest = x.shape[1:]
    fused = x.reshape(spec.num_heads, 3, spec.head_dim, *rest)
    return [np.ascontiguousarray(fused[:, j].reshape(spec.q_dim, *rest)) for j in range(3)]


def conv1d(x: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    """GPT-2's Conv1D stores [in, out]: transpose to [out, in]."""
    return [np.ascontiguousarray(x.T)]


def conv1d_qkv(x: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    return split_qkv(np.ascontiguousarray(x.T), spec)


# The transforms whose checkpoint tensor is stored [in, out] (its expected shape is reversed).
TRANSPOSED: tuple[Transform, ...] = (conv1d, conv1d_qkv)


@dataclass(frozen=True)
class TensorRule:
    """One Hugging Face tensor (name template with {i}) and the role(s) it provides."""

    hf: str
    roles: tuple[str, ...]
    transform: Transform | None = None  # None: the tensor is one role, as stored
    when: Callable[[ModelSpec], bool] | None = None  # rule applies only if this holds
    # When `when` is false the tensor may still be in the file as a copy of another one
    # (a tied output layer saved by torch): ignore it then instead of calling it unexpected.
    copy_when_skipped: bool = False


def _rules(*items: tuple) -> tuple[TensorRule, ...]:
    out = []
    for item in items:
        hf, roles, *rest = item
        roles = (roles,) if isinstance(roles, str) else tuple(roles)
        out.append(TensorRule(hf, roles, *rest))
    return tuple(out)


def _has(flag: str) -> Callable[[ModelSpec], bool]:
    return lambda spec: bool(getattr(spec, flag))


def _untied(spec: ModelSpec) -> bool:
    return not spec.tied_embeddings


def _layernorm(prefix: str, role: str) -> tuple[tuple, ...]:
    return (
        (prefix + ".weight", role + ".w"),
        (prefix + ".bias", role + ".b", None, _has("norm_bias")),
    )


def _linear(prefix: str, role: str, bias_flag: str) -> tuple[tuple, ...]:
    return (
        (prefix + ".weight", role + ".w"),
        (prefix + ".bias", role + ".b", None, _has(bias_flag)),
    )


LLAMA_STYLE_RULES = _rules(
    ("model.embed_tokens.weight", "embed"),
    ("model.norm.weight", "final_norm.w"),
    ("lm_head.weight", "lm_head.w", None, _untied, True),
    ("model.layers.{i}.input_layernorm.weight", "attn_norm.w"),
    *_linear("model.layers.{i}.self_attn.q_proj", "q", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.k_proj", "k", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.v_proj", "v", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.o_proj", "o", "attn_out_bias"),
    ("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm.w"),
    *_linear("model.layers.{i}.mlp.gate_proj", "gate", "mlp_bias"),
    *_linear("model.layers.{i}.mlp.up_proj", "up", "mlp_bias"),
    *_linear("model.layers.{i}.mlp.down_proj", "down", "mlp_bias"),
)

STABLELM_RULES = _rules(
    ("model.embed_tokens.weight", "embed"),
    *_layernorm("model.norm", "final_norm"),
    ("lm_head.weight", "lm_head.w", None, _untied, True),
    *_layernorm("model.layers.{i}.input_layernorm", "attn_norm"),
    *_linear("model.layers.{i}.self_attn.q_proj", "q", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.k_proj", "k", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.v_proj", "v", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.o_proj", "o", "attn_out_bias"),
    *_layernorm("model.layers.{i}.post_attention_layernorm", "mlp_norm"),
    *_linear("model.layers.{i}.mlp.gate_proj", "gate", "mlp_bias"),
    *_linear("model.layers.{i}.mlp.up_proj", "up", "mlp_bias"),
    *_linear("model.layers.{i}.mlp.down_proj", "down", "mlp_bias"),
)

PHI_RULES = _rules(
    ("model.embed_tokens.weight", "embed"),
    *_layernorm("model.final_layernorm", "final_norm"),
    *_linear("lm_head", "lm_head", "lm_head_bias"),
    *_layernorm("model.layers.{i}.input_layernorm", "attn_norm"),
    *_linear("model.layers.{i}.self_attn.q_proj", "q", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.k_proj", "k", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.v_proj", "v", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.dense", "o", "attn_out_bias"),
    *_linear("model.layers.{i}.mlp.fc1", "up", "mlp_bias"),
    *_linear("model.layers.{i}.mlp.fc2", "down", "mlp_bias"),
)

FALCON_RULES = _rules(
    ("transformer.word_embeddings.weight", "embed"),
    *_layernorm("transformer.ln_f", "final_norm"),
    ("lm_head.weight", "lm_head.w", None, _untied, True),
    *_layernorm("transformer.h.{i}.input_layernorm", "attn_norm"),
    (
        "transformer.h.{i}.self_attention.query_key_value.weight",
        ("q.w", "k.w", "v.w"),
        falcon_qkv,
    ),
    (
        "transformer.h.{i}.self_attention.query_key_value.bias",
        ("q.b", "k.b", "v.b"),
        falcon_qkv,
        _has("qkv_bias"),
    ),
    *_linear("transformer.h.{i}.self_attention.dense", "o", "attn_out_bias"),
    *_layernorm("transformer.h.{i}.post_attention_layernorm", "mlp_norm"),
    *_linear("transformer.h.{i}.mlp.dense_h_to_4h", "up", "mlp_bias"),
    *_linear("transformer.h.{i}.mlp.dense_4h_to_h", "down", "mlp_bias"),
)

GPT2_RULES = _rules(
    ("transformer.wte.weight", "embed"),
    ("transformer.wpe.weight", "pos_embed"),
    *_layernorm("transformer.ln_f", "final_norm"),
    *_layernorm("transformer.h.{i}.ln_1", "attn_norm"),
    ("transformer.h.{i}.attn.c_attn.weight", ("q.w", "k.w", "v.w"), conv1d_qkv),
    ("transformer.h.{i}.attn.c_attn.bias", ("q.b", "k.b", "v.b"), split_qkv),
    ("transformer.h.{i}.attn.c_proj.weight", "o.w", conv1d),
    ("transformer.h.{i}.attn.c_proj.bias", "o.b"),
    *_layernorm("transformer.h.{i}.ln_2", "mlp_norm"),
    ("transformer.h.{i}.mlp.c_fc.weight", "up.w", conv1d),
    ("transformer.h.{i}.mlp.c_fc.bias", "up.b"),
    ("transformer.h.{i}.mlp.c_proj.weight", "down.w", conv1d),
    ("transformer.h.{i}.mlp.c_proj.bias", "down.b"),
)


# --------------------------------------------------------------------------------------------
# Reading config.json


def cfg_get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key, also looking inside transformers 5's `rope_parameters`."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
        inner = config.get("rope_parameters")
        if isinstance(inner, dict) and inner.get(key) is not None:
            return inner[key]
    return default


HIDDEN_KEYS = ("hidden_size", "n_embd", "n_embed", "d_model")

ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_approx": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


@dataclass(frozen=True)
class Architecture:
    """One row of the table."""

    model_type: str
    hf_model_types: tuple[str, ...]  # config.json "model_type" values this row accepts
    description: str
    rules: tuple[TensorRule, ...]
    norm: str
    activation_keys: tuple[str, ...]  # config keys naming the activation, first found wins
    default_activation: str
    gated_mlp: bool
    # Family facts that depend on config.json; each gets the raw config.
    facts: Callable[[dict[str, Any]], dict[str, Any]] = lambda cfg: {}
    norm_offset: float = 0.0
    embedding_scale_sqrt_hidden: bool = False
    optional_prefixes: tuple[str, ...] = ()  # HF names may lack this prefix (old GPT-2 files)
    ignored: tuple[str, ...] = ()  # substrings of HF tensors that carry no weights (buffers)
    lora_targets: dict[str, str] = field(default_factory=dict)  # PEFT module -> role
    activation_overrides: dict[str, str] = field(default_factory=dict)

    def spec(self, config: dict[str, Any], path: str | None = None) -> ModelSpec:
        """Build the ModelSpec of a checkpoint from its config.json."""
        hidden = _required(config, path, *HIDDEN_KEYS)
        heads = _required(config, path, "num_attention_heads", "n_head")
        layers = _required(config, path, "num_hidden_layers", "n_layer")
        vocab = _required(config, path, "vocab_size")
        head_dim = cfg_get(config, "head_dim") or hidden // heads
        act_name = cfg_get(config, *self.activation_keys, default=self.default_activation)
        act_name = self.activation_overrides.get(act_name, act_name)
        if act_name not in ACTIVATIONS:
            raise LlmToolError(f"unsupported activation {act_name!r} in config.json", path)
        values: dict[str, Any] = dict(
            model_type=self.model_type,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(
                cfg_get(config, "intermediate_size", "n_inner", "ffn_hidden_size") or 4 * hidden
            ),
            num_layers=int(layers),
            num_heads=int(heads),
            num_kv_heads=int(cfg_get(config, "num_key_value_heads", "num_kv_heads") or heads),
            head_dim=int(head_dim),
            max_positions=int(
                cfg_get(config, "max_position_embeddings", "n_positions", default=2048)
            ),
            norm=self.norm,
            norm_eps=float(
                cfg_get(
                    config,
                    "rms_norm_eps",
                    "layer_norm_eps",
                    "layer_norm_epsilon",
                    "norm_eps",
                    default=1e-5,
                )
            ),
            norm_offset=self.norm_offset,
            activation=ACTIVATIONS[act_name],
            gated_mlp=self.gated_mlp,
            rotary_dims=int(head_dim),
            rope_theta=float(cfg_get(config, "rope_theta", default=10000.0)),
            alibi=False,
            learned_positions=False,
            parallel_residual=False,
            embedding_scale=math.sqrt(hidden) if self.embedding_scale_sqrt_hidden else 1.0,
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            qkv_bias=False,
            attn_out_bias=False,
            mlp_bias=False,
            norm_bias=self.norm == "layer",
            lm_head_bias=False,
            bos_token_id=_first_int(config.get("bos_token_id")),
            eos_token_ids=_int_tuple(config.get("eos_token_id")),
        )
        values.update(self.facts(config))
        if values["num_heads"] % values["num_kv_heads"]:
            raise LlmToolError(
                f"num_attention_heads {heads} is not a multiple of the kv heads "
                f"{values['num_kv_heads']} in config.json",
                path,
            )
        return ModelSpec(**values)


def _required(config: dict[str, Any], path: str | None, *keys: str) -> int:
    value = cfg_get(config, *keys)
    if value is None:
        raise LlmToolError(f"config.json lacks {keys[0]!r}", path)
    return int(value)


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return int(value) if value is not None else None


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rotary(fraction_keys: tuple[str, ...] = ("partial_rotary_factor",), default: float = 1.0):
    def facts(cfg: dict[str, Any]) -> dict[str, Any]:
        hidden = cfg_get(cfg, *HIDDEN_KEYS)
        heads = cfg_get(cfg, "num_attention_heads", "n_head")
        head_dim = cfg_get(cfg, "head_dim") or hidden // heads
        fraction = float(cfg_get(cfg, *fraction_keys, default=default))
        return {"rotary_dims": int(head_dim * fraction)}

    return facts


def _llama_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    window = cfg.get("sliding_window")
    if window and window < int(cfg_get(cfg, "max_position_embeddings", default=0) or 0):
        raise LlmToolError(f"sliding-window attention ({window} tokens) is not supported")
    bias = bool(cfg.get("attention_bias", False))
    return {
        "qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _gemma_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"tied_embeddings": bool(cfg.get("tie_word_embeddings", True))}


def _qwen2_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("use_sliding_window"):
        raise LlmToolError("Qwen2 sliding-window attention is not supported")
    return {"qkv_bias": True, "tied_embeddings": bool(cfg.get("tie_word_embeddings", False))}


def _phi_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("qk_layernorm"):
        raise LlmToolError("Phi checkpoints with qk_layernorm are not supported")
    return {
        **_rotary(default=0.5)(cfg),
        "parallel_residual": True,
        "qkv_bias": True,
        "attn_out_bias": True,
        "mlp_bias": True,
        "lm_head_bias": True,
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _stablelm_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("qk_layernorm") or cfg.get("use_parallel_residual"):
        raise LlmToolError(
            "StableLM checkpoints with qk_layernorm or parallel residual are not supported"
        )
    return {
        **_rotary(default=0.25)(cfg),
        "qkv_bias": bool(cfg.get("use_qkv_bias", False)),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _falcon_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    if (
        cfg.get("new_decoder_architecture")
        or cfg.get("multi_query", True)
        or cfg.get("parallel_attn", True)
    ):
        raise LlmToolError(
            "only the Falcon-RW layout is supported (multi_query, parallel_attn and "
            "new_decoder_architecture all false)"
        )
    alibi = bool(cfg.get("alibi", False))
    bias = bool(cfg.get("bias", False))
    heads = int(cfg_get(cfg, "num_attention_heads", "n_head"))
    return {
        "alibi": alibi,
        "rotary_dims": 0 if alibi else int(cfg_get(cfg, *HIDDEN_KEYS) // heads),
        "num_kv_heads": heads,
        "qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": bias,
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


def _gpt2_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
        raise LlmToolError("GPT-2 checkpoints with non-default attention scaling are not supported")
    return {
        "rotary_dims": 0,
        "learned_positions": True,
        "qkv_bias": True,
        "attn_out_bias": True,
        "mlp_bias": True,
        "tied_embeddings": True,
    }


_GEMMA = dict(
    hf_model_types=("gemma",),
    rules=LLAMA_STYLE_RULES,
    norm="rms",
    norm_offset=1.0,
    activation_keys=("hidden_activation", "hidden_act"),
    default_activation="gelu_pytorch_tanh",
    # transformers maps Gemma's legacy "gelu" to the tanh approximation.
    activation_overrides={"gelu": "gelu_pytorch_tanh"},
    gated_mlp=True,
    embedding_scale_sqrt_hidden=True,
    facts=_gemma_facts,
    lora_targets={"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"},
    ignored=("rotary_emb.inv_freq",),
)

_LLAMA_FAMILY = dict(
    rules=LLAMA_STYLE_RULES,
    norm="rms",
    activation_keys=("hidden_act",),
    default_activation="silu",
    gated_mlp=True,
    lora_targets={"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"},
    ignored=("rotary_emb.inv_freq",),
)

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("GEMMA_2B", description="Gemma 2B (MQA, GeGLU, RMSNorm 1+w)", **_GEMMA),
        Architecture("GEMMA_7B", description="Gemma 7B (MHA, GeGLU, RMSNorm 1+w)", **_GEMMA),
        Architecture(
            "PHI_2",
            hf_model_types=("phi",),
            description="Phi-2 (parallel attention+MLP, partial rotary, LayerNorm, biases)",
            rules=PHI_RULES,
            norm="layer",
            activation_keys=("hidden_act",),
            default_activation="gelu_new",
            gated_mlp=False,
            facts=_phi_facts,
            lora_targets={"q_proj": "q", "k_proj": "k", "v_proj": "v", "dense": "o"},
            ignored=("rotary_emb.inv_freq",),
        ),
        Architecture(
            "FALCON_RW_1B",
            hf_model_types=("falcon", "RefinedWebModel", "RefinedWeb"),
            description="Falcon-RW-1B (ALiBi, fused per-head QKV, LayerNorm, GELU)",
            rules=FALCON_RULES,
            norm="layer",
            activation_keys=("activation",),
            default_activation="gelu",
            gated_mlp=False,
            facts=_falcon_facts,
        ),
        Architecture(
            "STABLELM_4E1T_3B",
            hf_model_types=("stablelm", "stablelm_epoch"),
            description="StableLM-3B-4E1T (partial rotary, LayerNorm, SwiGLU)",
            rules=STABLELM_RULES,
            norm="layer",
            activation_keys=("hidden_act",),
            default_activation="silu",
            gated_mlp=True,
            facts=_stablelm_facts,
            lora_targets={"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"},
            ignored=("rotary_emb.inv_freq",),
        ),
        Architecture(
            "GPT2",
            hf_model_types=("gpt2",),
            description="GPT-2 (learned positions, Conv1D, LayerNorm, GELU)",
            rules=GPT2_RULES,
            norm="layer",
            activation_keys=("activation_function",),
            default_activation="gelu_new",
            gated_mlp=False,
            facts=_gpt2_facts,
            optional_prefixes=("transformer.",),
            ignored=(".attn.bias", ".attn.masked_bias", "lm_head.weight"),
        ),
        Architecture(
            "LLAMA",
            hf_model_types=("llama", "mistral"),
            description="Llama / Mistral-style (RMSNorm, SwiGLU, rotary, GQA)",
            facts=_llama_facts,
            **_LLAMA_FAMILY,
        ),
        Architecture(
            "QWEN2",
            hf_model_types=("qwen2",),
            description="Qwen2 / Qwen2.5 (RMSNorm, SwiGLU, rotary, GQA, QKV bias)",
            facts=_qwen2_facts,
            **_LLAMA_FAMILY,
        ),
    )
}


def get_architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type.upper()]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise LlmToolError(f"unknown model type {model_type!r} (known: {known})") from None


def check_config_matches(arch: Architecture, config: dict[str, Any], path: str | None) -> None:
    """A clear error when config.json describes another family than --model-type."""
    found = config.get("model_type")
    if found is None or found in arch.hf_model_types:
        return
    guesses = [a.model_type for a in ARCHITECTURES.values() if found in a.hf_model_types]
    hint = f" (did you mean {' or '.join(guesses)}?)" if guesses else ""
    raise LlmToolError(
        f"config.json has model_type {found!r}, which is not a {arch.model_type} checkpoint{hint}",
        path,
    )
