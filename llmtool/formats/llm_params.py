"""The reference's `odml.infra.proto.LlmParameters` protobuf, built at import time (no protoc).

Field names and numbers follow the reference package's descriptors
(docs: /work/shared/research/llm-params-fields.txt). Like the reference's .proto files this is
proto3, with `start_token_id` / `start_token` in the oneof `start_token_union` and the fields the
reference marks `optional` given explicit presence, so the bytes match what it writes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError

from llmtool.errors import LlmToolError
from llmtool.spec import ModelSpec

_PKG = "odml.infra.proto"
_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "int32": _F.TYPE_INT32,
    "string": _F.TYPE_STRING,
    "bool": _F.TYPE_BOOL,
    "float": _F.TYPE_FLOAT,
}
_TP = "TransformerParameters"

# enum name -> values, in declaration order
_ENUMS: dict[str, list[str]] = {
    "LlmParameters.InputOutputNormalization": [
        "INPUT_OUTPUT_NORMALIZATION_UNKNOWN",
        "INPUT_OUTPUT_NORMALIZATION_BYTES_TO_UNICODE",
    ],
    f"{_TP}.AttentionMaskType": ["UNSPECIFIED", "CAUSAL", "PREFIX", "BIDIRECTIONAL"],
    f"{_TP}.Activation": ["ACTIVATION_UNSPECIFIED", "GELU", "SILU", "RELU", "RELU1P5"],
    f"{_TP}.Norm": ["NORM_UNSPECIFIED", "NO_NORM", "RMS_NORM", "LAYER_NORM"],
    f"{_TP}.AttentionScaleType": [
        "SCALE_TYPE_UNSPECIFIED",
        "SCALE_TYPE_PER_DIM_SCALE",
        "SCALE_TYPE_INV_SQRT_HEAD_DIM",
        "SCALE_TYPE_INV_SQRT_D_MODEL_DIV_NUM_HEADS",
        "SCALE_TYPE_RESCALE_FACTOR_INV_HEAD_DIM",
    ],
    f"{_TP}.WhereToInterleave": ["INTERLEAVE_UNSPECIFIED", "ALL", "EVERY_OTHER_4"],
}

# message name -> fields (name, number, type, modifier); a type is a scalar name or the
# package-relative name of a message or enum; modifier: "", "repeated", "optional" or "oneof:NAME"
_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "LlmParameters": [
        ("transformer_parameters", 1, _TP, ""),
        ("vocab_size", 2, "int32", ""),
        ("start_token_id", 4, "int32", "oneof:start_token_union"),
        ("start_token", 6, "string", "oneof:start_token_union"),
        ("stop_tokens", 5, "string", "repeated"),
        ("input_output_normalizations", 7, "LlmParameters.InputOutputNormalization", "repeated"),
        ("prompt_template", 8, "PromptTemplate", ""),
        ("num_draft_tokens", 9, "int32", "optional"),
        *(
            (f"{role}_role_token", n, "string", "optional")
            for role, n in (("user", 11), ("system", 12), ("model", 13), ("end", 14))
        ),
        ("submodel_transformer_parameters", 16, _TP, "optional"),
    ],
    _TP: [
        *(
            (name, n, "int32", "")
            for n, name in enumerate(
                [
                    "batch_size",
                    "max_seq_length",
                    "embedding_dim",
                    "hidden_dimension",
                    "head_dimension",
                    "num_heads",
                    "num_stacks",
                ],
                start=1,
            )
        ),
        ("num_kv_heads", 9, "int32", ""),
        ("feed_forward_parameters", 11, f"{_TP}.FeedForwardParameters", ""),
        ("final_project_parameters", 12, f"{_TP}.FinalProjectParameters", ""),
        ("pre_norm", 13, f"{_TP}.Norm", ""),
        ("post_norm", 14, f"{_TP}.Norm", ""),
        ("final_norm", 15, f"{_TP}.Norm", ""),
        ("self_attention_parameters", 16, f"{_TP}.SelfAttentionParameters", ""),
        ("skip_absolute_positional_embeddings", 18, "bool", ""),
        ("residual_adapter_parameters", 22, f"{_TP}.ResidualAdapterParameters", "optional"),
        ("query_rescale_factor", 25, "float", "optional"),
        ("vision_tokens_num", 26, "int32", ""),
        ("max_num_images", 28, "int32", ""),
        ("num_extra_stacks", 27, "int32", ""),
        ("audio_vocab_offset", 29, "int32", ""),
        ("audio_vocab_extra_dim", 30, "int32", ""),
        ("audio_input_embedding_dim", 31, "int32", ""),
    ],
    f"{_TP}.FeedForwardParameters": [
        ("no_bias", 1, "bool", ""),
        ("activation", 2, f"{_TP}.Activation", ""),
        ("pre_norm", 3, f"{_TP}.Norm", ""),
        ("post_norm", 4, f"{_TP}.Norm", ""),
    ],
    f"{_TP}.FinalProjectParameters": [
        ("no_bias", 1, "bool", ""),
        ("soft_cap_value", 2, "float", ""),
    ],
    f"{_TP}.SelfAttentionParameters": [
        ("qkv_no_bias", 1, "bool", ""),
        ("post_proj_no_bias", 2, "bool", ""),
        ("attention_mask_type", 3, f"{_TP}.AttentionMaskType", ""),
        ("soft_cap_value", 4, "float", ""),
        ("attention_scale_type", 5, f"{_TP}.AttentionScaleType", "optional"),
    ],
    f"{_TP}.ResidualAdapterParameters": [
        ("where_to_interleave", 1, f"{_TP}.WhereToInterleave", ""),
        ("bottleneck_dimension", 2, "int32", ""),
    ],
    "PromptTemplate": [
        (name, n, "string", "")
        for n, name in enumerate(["session_prefix", "prompt_prefix", "prompt_suffix"], start=1)
    ],
}


def _fill_message(msg: descriptor_pb2.DescriptorProto, path: str) -> None:
    real = [m[6:] for *_, m in _MESSAGES[path] if m.startswith("oneof:")]
    real = list(dict.fromkeys(real))
    for name in real:  # real oneofs first, then the synthetic ones of proto3 `optional`
        msg.oneof_decl.add(name=name)
    for name, number, type_, mod in _MESSAGES[path]:
        f = msg.field.add(name=name, number=number)
        f.label = _F.LABEL_REPEATED if mod == "repeated" else _F.LABEL_OPTIONAL
        if type_ in _SCALARS:
            f.type = _SCALARS[type_]
        else:
            f.type = _F.TYPE_ENUM if type_ in _ENUMS else _F.TYPE_MESSAGE
            f.type_name = f".{_PKG}.{type_}"
        if mod.startswith("oneof:"):
            f.oneof_index = real.index(mod[6:])
        elif mod == "optional":
            f.proto3_optional = True
            f.oneof_index = len(msg.oneof_decl)
            msg.oneof_decl.add(name=f"_{name}")
    for full, values in _ENUMS.items():
        if full.rpartition(".")[0] == path:
            enum = msg.enum_type.add(name=full.rpartition(".")[2])
            for number, value in enumerate(values):
                enum.value.add(name=value, number=number)
    for full in _MESSAGES:
        if full.rpartition(".")[0] == path:
            _fill_message(msg.nested_type.add(name=full.rpartition(".")[2]), full)


def _build() -> descriptor_pool.DescriptorPool:
    file = descriptor_pb2.FileDescriptorProto(
        name="llmtool/odml_llm_params.proto", package=_PKG, syntax="proto3"
    )
    for top in ("LlmParameters", _TP, "PromptTemplate"):
        _fill_message(file.message_type.add(name=top), top)
    pool = descriptor_pool.DescriptorPool()  # our own pool: no clash with an installed mediapipe
    pool.Add(file)
    return pool


def _message_class(pool: descriptor_pool.DescriptorPool, name: str) -> Any:
    desc = pool.FindMessageTypeByName(f"{_PKG}.{name}")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)  # pragma: no cover


_POOL = _build()
LlmParameters = _message_class(_POOL, "LlmParameters")
TransformerParameters = _message_class(_POOL, _TP)
PromptTemplate = _message_class(_POOL, "PromptTemplate")


def encode_llm_parameters(params: dict[str, Any]) -> bytes:
    """Serialize a nested dict (proto field names, enums by name) as the reference's bytes."""
    try:
        msg = json_format.ParseDict(params, LlmParameters())
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as e:
        raise LlmToolError(f"invalid LlmParameters: {e}") from e
    return msg.SerializeToString(deterministic=True)


def decode_llm_parameters(data: bytes) -> dict[str, Any]:
    """Parse serialized LlmParameters into the dict form encode_llm_parameters takes."""
    msg = LlmParameters()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, TypeError, ValueError) as e:
        raise LlmToolError(f"invalid LlmParameters: corrupt protobuf ({e})") from e
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def llm_parameters(spec: ModelSpec, tokenizer_info: dict[str, Any]) -> dict[str, Any]:
    """The reference LlmParameters record of a model, filled from its real spec and tokenizer
    (`Tokenizer.info()`), not from per-model-type constants as the reference does."""
    norm = {"rms": "RMS_NORM", "layer": "LAYER_NORM"}[spec.norm]
    act = {"gelu": "GELU", "gelu_tanh": "GELU", "silu": "SILU", "relu": "RELU"}[spec.activation]
    info = tokenizer_info
    params: dict[str, Any] = {
        "transformer_parameters": {
            "batch_size": 1,
            "max_seq_length": spec.max_positions,
            "embedding_dim": spec.hidden_size,
            "hidden_dimension": spec.intermediate_size,
            "head_dimension": spec.head_dim,
            "num_heads": spec.num_heads,
            "num_stacks": spec.num_layers,
            "num_kv_heads": spec.num_kv_heads,
            "pre_norm": norm,
            "post_norm": norm if spec.post_norms else "NO_NORM",
            "final_norm": norm,
            "feed_forward_parameters": {
                "no_bias": not spec.mlp_bias,
                "activation": act,
                "pre_norm": "NO_NORM" if spec.parallel_residual else norm,
                "post_norm": norm if spec.post_norms else "NO_NORM",
            },
            "final_project_parameters": {"no_bias": not spec.lm_head_bias},
            "self_attention_parameters": {
                "qkv_no_bias": not spec.qkv_bias,
                "post_proj_no_bias": not spec.attn_out_bias,
                "attention_mask_type": "CAUSAL",
                "attention_scale_type": "SCALE_TYPE_INV_SQRT_HEAD_DIM",
            },
            "skip_absolute_positional_embeddings": not spec.learned_positions,
        },
        "vocab_size": spec.vocab_size,
        "stop_tokens": [t for t in info.get("stop_tokens", []) if t],
    }
    # start_token and start_token_id are a oneof in the reference proto: prefer the string.
    if info.get("bos_token"):
        params["start_token"] = info["bos_token"]
    elif info.get("bos_id") is not None:
        params["start_token_id"] = int(info["bos_id"])
    return params
