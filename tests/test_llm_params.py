"""The LlmParameters protobuf: reference bytes, round trips, errors."""

from __future__ import annotations

import pytest

from llmtool.errors import LlmToolError
from llmtool.formats.llm_params import (
    LlmParameters,
    PromptTemplate,
    TransformerParameters,
    decode_llm_parameters,
    encode_llm_parameters,
)

FULL = {
    "transformer_parameters": {
        "batch_size": 1, "max_seq_length": 512, "embedding_dim": 64, "hidden_dimension": 256,
        "head_dimension": 16, "num_heads": 4, "num_stacks": 2, "num_kv_heads": 1,
        "feed_forward_parameters": {
            "no_bias": True, "activation": "GELU", "pre_norm": "RMS_NORM", "post_norm": "NO_NORM"},
        "final_project_parameters": {"no_bias": True, "soft_cap_value": 30.0},
        "pre_norm": "RMS_NORM", "post_norm": "LAYER_NORM", "final_norm": "RMS_NORM",
        "self_attention_parameters": {
            "qkv_no_bias": True, "post_proj_no_bias": True, "attention_mask_type": "CAUSAL",
            "soft_cap_value": 50.0, "attention_scale_type": "SCALE_TYPE_INV_SQRT_HEAD_DIM"},
        "skip_absolute_positional_embeddings": True,
        "residual_adapter_parameters": {
            "where_to_interleave": "EVERY_OTHER_4", "bottleneck_dimension": 8},
        "query_rescale_factor": 0.0625, "vision_tokens_num": 3, "max_num_images": 1,
        "num_extra_stacks": 1, "audio_vocab_offset": 5, "audio_vocab_extra_dim": 6,
        "audio_input_embedding_dim": 7,
    },
    "vocab_size": 320,
    "start_token": "<bos>",
    "stop_tokens": ["<eos>", "<end_of_turn>"],
    "input_output_normalizations": ["INPUT_OUTPUT_NORMALIZATION_BYTES_TO_UNICODE"],
    "prompt_template": {"session_prefix": "sys", "prompt_prefix": "<u>", "prompt_suffix": "<m>"},
    "num_draft_tokens": 4,
    "user_role_token": "user", "system_role_token": "system", "model_role_token": "model",
    "end_role_token": "<end>",
    "submodel_transformer_parameters": {"num_stacks": 1, "pre_norm": "NO_NORM"},
}


def test_reference_bundle_example_bytes() -> None:
    data = encode_llm_parameters({"start_token": "<s>", "stop_tokens": ["</s>"]})
    assert data == bytes.fromhex("2a 04 3c 2f 73 3e 32 03 3c 73 3e")


def test_field_numbers_and_enum_values() -> None:
    fields = LlmParameters.DESCRIPTOR.fields_by_name
    assert fields["submodel_transformer_parameters"].number == 16
    assert fields["start_token_id"].containing_oneof.name == "start_token_union"
    tp = TransformerParameters.DESCRIPTOR
    assert tp.fields_by_name["audio_input_embedding_dim"].number == 31
    assert tp.enum_types_by_name["AttentionScaleType"].values_by_name[
        "SCALE_TYPE_RESCALE_FACTOR_INV_HEAD_DIM"].number == 4
    assert PromptTemplate.DESCRIPTOR.fields_by_name["prompt_suffix"].number == 3
    # hand-encoded: 1 {7: 2, 13: RMS_NORM(2)}, 2: 320, 4: 2 (start_token_id)
    data = encode_llm_parameters({
        "transformer_parameters": {"num_stacks": 2, "pre_norm": "RMS_NORM"},
        "vocab_size": 320, "start_token_id": 2})
    assert data == bytes.fromhex("0a 04 38 02 68 02 10 c0 02 20 02")


def test_full_round_trip_and_determinism() -> None:
    data = encode_llm_parameters(FULL)
    assert decode_llm_parameters(data) == FULL
    assert encode_llm_parameters(decode_llm_parameters(data)) == data
    assert encode_llm_parameters(dict(reversed(list(FULL.items())))) == data
    msg = LlmParameters.FromString(data)
    assert msg.transformer_parameters.self_attention_parameters.attention_mask_type == 1
    assert list(msg.input_output_normalizations) == [1]


def test_explicit_presence_fields_keep_zero() -> None:
    data = encode_llm_parameters({"start_token_id": 0, "num_draft_tokens": 0})
    assert data == bytes.fromhex("20 00 48 00")
    assert decode_llm_parameters(data) == {"start_token_id": 0, "num_draft_tokens": 0}
    assert encode_llm_parameters({"vocab_size": 0}) == b""  # plain proto3 scalar: omitted


@pytest.mark.parametrize("params", [
    {"vocab_size": 1, "no_such_field": 2},
    {"transformer_parameters": {"pre_norm": "NOT_A_NORM"}},
    {"stop_tokens": "</s>"},
    {"start_token": "<s>", "start_token_id": 1},
    {"vocab_size": "many"},
])
def test_invalid_params_raise(params: dict) -> None:
    with pytest.raises(LlmToolError, match="invalid LlmParameters"):
        encode_llm_parameters(params)


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x2a\x10<s>"])
def test_corrupt_bytes_raise(data: bytes) -> None:
    with pytest.raises(LlmToolError, match="invalid LlmParameters"):
        decode_llm_parameters(data)
