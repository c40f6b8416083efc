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


def split_halves(x: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    """Rows [gate; up] stacked along axis 0 (Phi-3's gate_up_proj)."""
    return [np.ascontiguousarray(p) for p in np.split(x, 2, axis=0)]


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


def lora_rows(transform: Transform | None, b: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    """A PEFT lora_B [out, r] split into the rule's roles like the weight's rows. lora_B is
    [out, r] even where the checkpoint stores the weight [in, out] (Conv1D, fan_in_fan_out),
    so only the row split of those transforms applies."""
    if transform is None or transform is conv1d:
        return [np.ascontiguousarray(b)]
    if transform is conv1d_qkv:
        return split_qkv(b, spec)
    return transform(b, spec)


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


LLAMA_STYLE_RULES_ITEMS = (
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
LLAMA_STYLE_RULES = _rules(*LLAMA_STYLE_RULES_ITEMS)


# Gemma 2 / 3: Llama's tensors plus a norm after attention and one around the MLP (the
# checkpoint's post_attention_layernorm is the norm *after* attention there), and Gemma 3's
# per-head q/k norms.
GEMMA2_RULES = _rules(
    ("model.embed_tokens.weight", "embed"),
    ("model.norm.weight", "final_norm.w"),
    ("lm_head.weight", "lm_head.w", None, _untied, True),
    ("model.layers.{i}.input_layernorm.weight", "attn_norm.w"),
    ("model.layers.{i}.self_attn.q_norm.weight", "q_norm.w", None, _has("qk_norm")),
    ("model.layers.{i}.self_attn.k_norm.weight", "k_norm.w", None, _has("qk_norm")),
    *_linear("model.layers.{i}.self_attn.q_proj", "q", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.k_proj", "k", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.v_proj", "v", "qkv_bias"),
    *_linear("model.layers.{i}.self_attn.o_proj", "o", "attn_out_bias"),
    ("model.layers.{i}.post_attention_layernorm.weight", "post_attn_norm.w"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "mlp_norm.w"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "post_mlp_norm.w"),
    *_linear("model.layers.{i}.mlp.gate_proj", "gate", "mlp_bias"),
    *_linear("model.layers.{i}.mlp.up_proj", "up", "mlp_bias"),
    *_linear("model.layers.{i}.mlp.down_proj", "down", "mlp_bias"),
)

# Qwen3: Llama's tensors plus per-head q/k norms.
QWEN3_RULES = _rules(
    *LLAMA_STYLE_RULES_ITEMS,
    ("model.layers.{i}.self_attn.q_norm.weight", "q_norm.w"),
    ("model.layers.{i}.self_attn.k_norm.weight", "k_norm.w"),
)

# Phi-3 / Phi-4-mini: fused qkv_proj rows [q; k; v] and gate_up_proj rows [gate; up].
PHI3_RULES = _rules(
    ("model.embed_tokens.weight", "embed"),
    ("model.norm.weight", "final_norm.w"),
    ("lm_head.weight", "lm_head.w", None, _untied, True),
    ("model.layers.{i}.input_layernorm.weight", "attn_norm.w"),
    ("model.layers.{i}.self_attn.qkv_proj.weight", ("q.w", "k.w", "v.w"), split_qkv),
    ("model.layers.{i}.self_attn.o_proj.weight", "o.w"),
    ("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm.w"),
    ("model.layers.{i}.mlp.gate_up_proj.weight", ("gate.w", "up.w"), split_halves),
    ("model.layers.{i}.mlp.down_proj.weight", "down.w"),
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

# What a config.json value must be, checked before any arithmetic so that a string or a zero
# where a size belongs is one clear line, not a ValueError or ZeroDivisionError.
POSITIVE_INT_KEYS = (
    *HIDDEN_KEYS, "num_attention_heads", "n_head", "num_hidden_layers", "n_layer", "vocab_size",
    "head_dim", "intermediate_size", "n_inner", "ffn_hidden_size", "num_key_value_heads",
    "num_kv_heads", "max_position_embeddings", "n_positions", "sliding_window",
    "sliding_window_pattern", "max_window_layers", "original_max_position_embeddings",
    "query_pre_attn_scalar",
)  # fmt: skip
POSITIVE_NUMBER_KEYS = (
    "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta",
    "rope_local_base_freq", "partial_rotary_factor", "rotary_pct", "factor",
    "attn_logit_softcapping", "final_logit_softcapping",
)  # fmt: skip
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
BOOL_KEYS = (
    "tie_word_embeddings", "attention_bias", "mlp_bias", "use_qkv_bias", "bias", "alibi",
    "multi_query", "parallel_attn", "new_decoder_architecture", "use_sliding_window",
    "qk_layernorm", "use_parallel_residual",
)  # fmt: skip


def check_config_values(config: dict[str, Any], path: str | None) -> None:
    """Refuse config.json values of the wrong type or out of range, naming the key."""

    def bad(key: str, value: Any, want: str) -> LlmToolError:
        return LlmToolError(f"config.json: {key} must be {want} (got {value!r})"[:200], path)

    scopes = [config]
    if isinstance(config.get("rope_parameters"), dict):
        scopes.append(config["rope_parameters"])
    for scope in scopes:
        for key in POSITIVE_INT_KEYS:
            value = scope.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, value, "a positive integer")
        for key in POSITIVE_NUMBER_KEYS:
            value = scope.get(key)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise bad(key, value, "a positive number")
    for key in TOKEN_ID_KEYS:
        value = config.get(key)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item is not None and (
                isinstance(item, bool) or not isinstance(item, int) or item < 0
            ):
                raise bad(key, value, "a token id (an integer >= 0) or a list of them")
    for key in BOOL_KEYS:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise bad(key, value, "true or false")


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
    # PEFT module names (last component) that may carry a LoRA adapter; which roles each one
    # feeds comes from the rules (GPT-2's c_proj is the attention output in `attn.c_proj` and
    # the MLP's down projection in `mlp.c_proj`). PEFT's "all-linear" is all of them.
    lora_targets: tuple[str, ...] = ()
    activation_overrides: dict[str, str] = field(default_factory=dict)
    # config.json values the family's transformers config class fills in when a file omits
    # them (Gemma 3's multimodal configs list only what differs from these).
    config_defaults: dict[str, Any] = field(default_factory=dict)
    # HF names may carry this prefix before the table's names (a multimodal checkpoint's
    # language model: "language_model.model.layers...").
    strip_prefixes: tuple[str, ...] = ()

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The language model's config: a multimodal config's `text_config` (with the
        top-level token ids), over the family's defaults."""
        text = config.get("text_config")
        if isinstance(text, dict):
            top = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
            config = {**text, **top}
        return {**self.config_defaults, **config}

    def spec(self, config: dict[str, Any], path: str | None = None) -> ModelSpec:
        """Build the ModelSpec of a checkpoint from its config.json."""
        config = self.text_config(config)
        check_config_values(config, path)
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
            **_rope_facts(config, path),
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
        spec = ModelSpec(**values)
        spec.check(path)
        return spec


ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def _rope_facts(cfg: dict[str, Any], path: str | None) -> dict[str, Any]:
    """Rotary bases and scaling, from any spelling: transformers 5's `rope_parameters` (one
    dict, or one per layer type), or the older `rope_theta` + `rope_scaling` (+ Gemma 3's
    `rope_local_base_freq` for its sliding-window layers)."""
    params = cfg.get("rope_parameters")
    per_type = isinstance(params, dict) and any(
        k in params for k in ("full_attention", "sliding_attention")
    )
    if per_type:
        full = dict(params.get("full_attention") or {})
        sliding = dict(params["sliding_attention"]) if params.get("sliding_attention") else None
    else:
        full = dict(params) if isinstance(params, dict) else {}
        legacy = cfg.get("rope_scaling")
        if isinstance(legacy, dict):
            full = {**legacy, **full}
        sliding = None
        if cfg.get("rope_local_base_freq") is not None:
            sliding = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
    theta = full.get("rope_theta", cfg.get("rope_theta"))
    theta = float(theta if theta is not None else 10000.0)
    facts: dict[str, Any] = {
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(full, cfg, path),
    }
    if sliding is not None:
        facts["sliding_rope_theta"] = float(sliding.get("rope_theta", theta))
        facts["sliding_rope_scaling"] = _rope_scaling(sliding, cfg, path)
    return facts


def _rope_scaling(
    params: dict[str, Any], cfg: dict[str, Any], path: str | None
) -> dict[str, Any] | None:
    """The scaling part of one rope_parameters dict, with what the decoder needs filled in."""
    kind = params.get("rope_type", params.get("type")) or "default"
    kind = {"su": "longrope"}.get(kind, kind)
    if kind in ("default", "dynamic"):
        # Dynamic NTK changes nothing within max_position_embeddings, which bounds any graph.
        return None
    if kind not in ROPE_KEYS:
        raise LlmToolError(f"rope_type {kind!r} in config.json is not supported", path)
    out: dict[str, Any] = {"rope_type": kind}
    for key in ROPE_KEYS[kind]:
        value = params.get(key, cfg.get(key))
        if value is None:
            raise LlmToolError(f"config.json's {kind} rope scaling lacks {key!r}", path)
        out[key] = value
    if kind == "longrope":
        original = int(out["original_max_position_embeddings"])
        factor = params.get("factor") or int(cfg_get(cfg, "max_position_embeddings")) / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            )
        out["attention_factor"] = float(attention)
    return out


def _sliding_facts(cfg: dict[str, Any], default: Callable[[int], bool]) -> dict[str, Any]:
    """The sliding window and its layers: `layer_types` when config.json lists them (as
    transformers 5 writes it), else the family's default pattern."""
    window = cfg.get("sliding_window")
    layers = int(cfg_get(cfg, "num_hidden_layers", "n_layer"))
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise LlmToolError(f"layer type {unknown[0]!r} in config.json is not supported")
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    else:
        sliding = [i for i in range(layers) if default(i)]
    if window is None or not sliding:
        return {}
    return {"sliding_window": int(window), "sliding_layers": tuple(sliding)}


def _every_layer(i: int) -> bool:
    return True


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
    bias = bool(cfg.get("attention_bias", False))
    return {
        **_sliding_facts(cfg, _every_layer),  # Mistral: every layer when sliding_window is set
        "qkv_bias": bias,
        "attn_out_bias": bias,
        "mlp_bias": bool(cfg.get("mlp_bias", False)),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _gemma_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"tied_embeddings": bool(cfg.get("tie_word_embeddings", True))}


def _gemma2_facts(cfg: dict[str, Any], pattern: int = 2) -> dict[str, Any]:
    """Gemma 2 and 3: norms after attention and MLP, query_pre_attn_scalar, soft-capping,
    sliding-window layers (all but every `pattern`-th: Gemma 2 alternates)."""
    bias = bool(cfg.get("attention_bias", False))
    return {
        **_sliding_facts(cfg, lambda i: (i + 1) % pattern != 0),
        "post_norms": True,
        "attn_scale": float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5,
        "attn_softcap": _float_or_none(cfg.get("attn_logit_softcapping")),
        "final_softcap": _float_or_none(cfg.get("final_logit_softcapping")),
        "qkv_bias": bias,
        "attn_out_bias": bias,
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


def _gemma3_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2's layer plus per-head q/k norms; five sliding layers of every six."""
    if cfg.get("use_bidirectional_attention"):
        raise LlmToolError("Gemma 3 with bidirectional attention (an encoder) is not supported")
    pattern = int(cfg.get("sliding_window_pattern") or 6)
    return {**_gemma2_facts(cfg, pattern), "qk_norm": True}


def _qwen3_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    layers = int(cfg_get(cfg, "num_hidden_layers"))
    first = int(cfg.get("max_window_layers") or layers)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    bias = bool(cfg.get("attention_bias", False))
    return {
        **_sliding_facts({**cfg, "sliding_window": window}, lambda i: i >= first),
        "qk_norm": True,
        "qkv_bias": bias,
        "attn_out_bias": bias,
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _phi3_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise LlmToolError("Phi-3 checkpoints with biases are not supported")
    return {
        **_rotary()(cfg),
        **_sliding_facts(cfg, _every_layer),
        "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _float_or_none(value: Any) -> float | None:
    return float(value) if value is not None else None


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


LLAMA_STYLE_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

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
    lora_targets=LLAMA_STYLE_LORA,
    ignored=("rotary_emb.inv_freq",),
)

_LLAMA_FAMILY = dict(
    rules=LLAMA_STYLE_RULES,
    norm="rms",
    activation_keys=("hidden_act",),
    default_activation="silu",
    gated_mlp=True,
    lora_targets=LLAMA_STYLE_LORA,
    ignored=("rotary_emb.inv_freq",),
)

_GEMMA2 = dict(
    _GEMMA,
    hf_model_types=("gemma2",),
    rules=GEMMA2_RULES,
    facts=_gemma2_facts,
)

# Gemma3TextConfig's defaults: the multimodal (4B and larger) configs omit these.
_GEMMA3_DEFAULTS = {
    "vocab_size": 262_208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
}

_GEMMA3 = dict(
    _GEMMA,
    hf_model_types=("gemma3_text", "gemma3"),
    rules=GEMMA2_RULES,
    facts=_gemma3_facts,
    config_defaults=_GEMMA3_DEFAULTS,
    strip_prefixes=("language_model.",),
    ignored=("rotary_emb.inv_freq", "vision_tower.", "multi_modal_projector."),
)

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("GEMMA_2B", description="Gemma 2B (MQA, GeGLU, RMSNorm 1+w)", **_GEMMA),
        Architecture("GEMMA_7B", description="Gemma 7B (MHA, GeGLU, RMSNorm 1+w)", **_GEMMA),
        Architecture(
            "GEMMA2_2B",
            description="Gemma 2 (any size: pre+post norms, soft-capping, local/global layers)",
            **_GEMMA2,
        ),
        *(
            Architecture(
                name,
                description=f"Gemma 3 {size} text (q/k norms, 5:1 local/global, 262k vocab)",
                **_GEMMA3,
            )
            for name, size in (
                ("GEMMA3_300M", "270M"),
                ("GEMMA3_1B", "1B"),
                ("GEMMA3_4B", "4B"),
                ("GEMMA3_12B", "12B"),
                ("GEMMA3_27B", "27B"),
            )
        ),
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
            lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
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
            lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
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
            lora_targets=LLAMA_STYLE_LORA,
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
            lora_targets=("c_attn", "c_proj", "c_fc"),
        ),
        Architecture(
            "LLAMA",
            hf_model_types=("llama", "mistral"),
            description="Llama 1-3.x, SmolLM, TinyLlama, Mistral (RMSNorm, SwiGLU, GQA, "
            "llama3 rope scaling, sliding window)",
            facts=_llama_facts,
            **_LLAMA_FAMILY,
        ),
        Architecture(
            "PHI_3",
            hf_model_types=("phi3",),
            description="Phi-3 / Phi-4-mini (fused qkv and gate_up, partial rotary, longrope)",
            rules=PHI3_RULES,
            norm="rms",
            activation_keys=("hidden_act",),
            default_activation="silu",
            gated_mlp=True,
            facts=_phi3_facts,
            ignored=("rotary_emb.inv_freq",),
            lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        ),
        Architecture(
            "QWEN3",
            hf_model_types=("qwen3",),
            description="Qwen3 (RMSNorm, SwiGLU, rotary, GQA, per-head q/k norms)",
            facts=_qwen3_facts,
            **dict(_LLAMA_FAMILY, rules=QWEN3_RULES),
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
