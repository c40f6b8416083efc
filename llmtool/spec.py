"""The generic vocabulary: what a model is, whatever its family.

`ModelSpec` holds the hyperparameters of one checkpoint; the generic decoder is parameterised by
it and never asks for the model's name. Tensor *roles* ("q.w", "mlp_norm.w", ...) name the
weights of that decoder; `role_name` gives a role's name in the converted container and
`role_shape` its shape. The table of families (architectures.py) maps checkpoints onto these.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llmtool.errors import LlmToolError

# --------------------------------------------------------------------------------------------
# The generic model description


@dataclass(frozen=True)
class ModelSpec:
    """Everything the generic decoder needs to know about one checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    norm_offset: float  # RMSNorm computes x * (offset + w); Gemma stores w - 1 (offset 1.0)
    activation: str  # "gelu_tanh" | "gelu" | "silu" | "relu"
    gated_mlp: bool  # down(act(gate(x)) * up(x)) instead of down(act(up(x)))
    rotary_dims: int  # leading dims of each head that get rotary embeddings; 0 = none
    rope_theta: float
    alibi: bool  # Falcon-RW / BLOOM linear attention biases
    learned_positions: bool  # GPT-2 absolute position table
    parallel_residual: bool  # x + attn(norm(x)) + mlp(norm(x)) with one norm (Phi-2, GPT-J)
    embedding_scale: float  # Gemma multiplies embeddings by sqrt(hidden_size)
    tied_embeddings: bool  # output layer reuses the token embedding
    qkv_bias: bool
    attn_out_bias: bool
    mlp_bias: bool
    norm_bias: bool  # LayerNorm with a bias term
    lm_head_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Newer decoders (defaults describe the classic one, so older containers still read).
    post_norms: bool = False  # a norm after attention and after the MLP, before the residual
    qk_norm: bool = False  # per-head RMSNorm of q and k (before rotary), weights [head_dim]
    attn_scale: float | None = None  # query scale; None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # the same on the output logits
    sliding_window: int | None = None  # a key is visible if query_pos - key_pos < window...
    sliding_layers: tuple[int, ...] = ()  # ...in these layers (the others see everything)
    # Rotary scaling of the (full-attention) layers as transformers' rope_parameters spells it:
    # {"rope_type": "linear" | "llama3" | "longrope", factor, ...}; None: plain rotary.
    rope_scaling: dict[str, Any] | None = None
    sliding_rope_theta: float | None = None  # rotary base of sliding layers; None: rope_theta
    sliding_rope_scaling: dict[str, Any] | None = None  # rotary scaling of sliding layers

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, path: str | Path | None = None) -> ModelSpec:
        """The spec stored in a container or graph (LlmToolError naming `path` if corrupt)."""
        try:
            raw = json.loads(data)
            known = {f.name for f in fields(cls)}
            raw = {k: v for k, v in raw.items() if k in known}
            raw["eos_token_ids"] = tuple(raw.get("eos_token_ids", ()))
            raw["sliding_layers"] = tuple(raw.get("sliding_layers", ()))
            spec = cls(**raw)
        except (ValueError, TypeError, AttributeError) as exc:
            raise LlmToolError(f"corrupt model spec in the metadata ({exc})"[:200], path) from None
        spec.check(path, "the stored model spec")
        return spec

    def check(self, path: str | Path | None = None, what: str = "config.json") -> None:
        """Refuse sizes no model can have (zero heads, zero positions, ...) in one line."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LlmToolError(
                    f"{what}: {name} must be a positive integer (got {value!r})", path
                )
        if (
            isinstance(self.max_positions, bool)
            or not isinstance(self.max_positions, int)
            or (self.max_positions < 2)
        ):
            raise LlmToolError(
                f"{what}: the context length (max_position_embeddings) must be at least 2 "
                f"(got {self.max_positions!r})",
                path,
            )
        for name in ("norm_eps", "rope_theta", "embedding_scale"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise LlmToolError(
                    f"{what}: {name} must be a positive number (got {value!r})", path
                )
        if not 0 <= self.rotary_dims <= self.head_dim:
            raise LlmToolError(
                f"{what}: rotary dimensions {self.rotary_dims} do not fit a head of "
                f"{self.head_dim}",
                path,
            )
        if self.num_heads % self.num_kv_heads:
            raise LlmToolError(
                f"{what}: {self.num_heads} attention heads are not a multiple of the "
                f"{self.num_kv_heads} key/value heads",
                path,
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def default_context(self) -> int:
        """The longest cache a graph gets unless more tokens are asked for: the model's
        context, except that a longrope model keeps its original context, where its short
        rotary factors apply as in transformers (a longer cache uses the long factors)."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "longrope":
            return min(self.max_positions, int(scaling["original_max_position_embeddings"]))
        return self.max_positions

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and layer in self.sliding_layers


# --------------------------------------------------------------------------------------------
# Roles of tensors in the generic decoder, and their names in the converted container.
# The names follow the MediaPipe converter's (reference-formats.md), so files read alike.

LAYER = "params.lm.transformer.x_layers_{i}."

ROLE_NAMES: dict[str, str] = {
    "embed": "params.lm.token_embedding.w",
    "pos_embed": "params.lm.position_embedding.w",
    "final_norm.w": "params.lm.final_ln.scale",
    "final_norm.b": "params.lm.final_ln.bias",
    "lm_head.w": "params.lm.softmax.logits_ffn.w",
    "lm_head.b": "params.lm.softmax.logits_ffn.b",
    "attn_norm.w": LAYER + "pre_layer_norm.scale",
    "attn_norm.b": LAYER + "pre_layer_norm.bias",
    "post_attn_norm.w": LAYER + "post_layer_norm.scale",
    "q_norm.w": LAYER + "self_attention.q_norm.scale",
    "k_norm.w": LAYER + "self_attention.k_norm.scale",
    "q.w": LAYER + "self_attention.q.w",
    "q.b": LAYER + "self_attention.q.b",
    "k.w": LAYER + "self_attention.k.w",
    "k.b": LAYER + "self_attention.k.b",
    "v.w": LAYER + "self_attention.v.w",
    "v.b": LAYER + "self_attention.v.b",
    "o.w": LAYER + "self_attention.post.w",
    "o.b": LAYER + "self_attention.post.b",
    "mlp_norm.w": LAYER + "ff_layer.pre_layer_norm.scale",
    "mlp_norm.b": LAYER + "ff_layer.pre_layer_norm.bias",
    "post_mlp_norm.w": LAYER + "ff_layer.post_layer_norm.scale",
    "gate.w": LAYER + "ff_layer.ffn_layer1_gate.w",
    "up.w": LAYER + "ff_layer.ffn_layer1.w",
    "up.b": LAYER + "ff_layer.ffn_layer1.b",
    "down.w": LAYER + "ff_layer.ffn_layer2.w",
    "down.b": LAYER + "ff_layer.ffn_layer2.b",
}

# Which quantization knob a role's weight follows ("norm" roles always stay float32).
ROLE_KIND: dict[str, str] = {
    "embed": "embedding",
    "lm_head.w": "embedding",
    **{f"{r}.w": "attention" for r in ("q", "k", "v", "o")},
    **{f"{r}.w": "feedforward" for r in ("gate", "up", "down")},
}


def role_name(role: str, layer: int | None = None) -> str:
    """Container tensor name of a role (layer index for per-layer roles)."""
    template = ROLE_NAMES[role]
    return template.format(i=layer) if "{i}" in template else template


def role_shape(spec: ModelSpec, role: str) -> tuple[int, ...]:
    """Shape of a role's tensor in the container (linear weights are [out, in], as in HF)."""
    h, f = spec.hidden_size, spec.intermediate_size
    base = role.split(".")[0]
    out_in = {
        "q": (spec.q_dim, h),
        "k": (spec.kv_dim, h),
        "v": (spec.kv_dim, h),
        "o": (h, spec.q_dim),
        "gate": (f, h),
        "up": (f, h),
        "down": (h, f),
        "lm_head": (spec.vocab_size, h),
    }
    if role == "embed":
        return (spec.vocab_size, h)
    if role == "pos_embed":
        return (spec.max_positions, h)
    if base in ("attn_norm", "mlp_norm", "final_norm", "post_attn_norm", "post_mlp_norm"):
        return (h,)
    if base in ("q_norm", "k_norm"):
        return (spec.head_dim,)
    if role.endswith(".w"):
        return out_in[base]
    return (out_in[base][0],)  # bias
