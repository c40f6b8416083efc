"""The newer families' config.json spellings, and the table's refusals, without running graphs.

Logits, greedy tokens, quantization and LiteRT-LM for these rows are in test_run.py and
test_task_bundle.py (parametrized over tiny_models.NEW_FIXTURES).
"""

from __future__ import annotations

import json

import pytest

from llmtool.architectures import get_architecture
from llmtool.errors import LlmToolError
from tests.tiny_models import NEW_FIXTURES, model_type_of

IGNORED = {"transformers_version", "dtype", "_name_or_path", "_sliding_window_pattern",
           "sliding_window_pattern"}


def _comparable(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k not in IGNORED}
    if isinstance(out.get("rope_parameters"), dict):  # "type" is the old name of "rope_type"
        out["rope_parameters"] = {k: v for k, v in out["rope_parameters"].items() if k != "type"}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = _comparable(out["text_config"])
    return out


@pytest.mark.parametrize("fixture", list(NEW_FIXTURES))
def test_transformers4_spellings_give_the_same_spec(fixture, tiny_model):
    """transformers 4.x wrote rope_theta + rope_scaling (+ rope_local_base_freq,
    sliding_window_pattern) and no layer_types; the multimodal Gemma 3 config lists only the
    text keys that differ from Gemma3TextConfig's defaults. transformers reads both spellings
    to one config, and the table to one ModelSpec."""
    from transformers import AutoConfig

    new, old = tiny_model(fixture), tiny_model(fixture, legacy_config=True)
    raw_new = json.loads((new / "config.json").read_text())
    raw_old = json.loads((old / "config.json").read_text())
    text = raw_old.get("text_config", raw_old)
    assert "rope_parameters" not in text and "layer_types" not in text
    assert raw_old["transformers_version"].startswith("4.")
    if fixture == "GEMMA3_4B":
        assert "rms_norm_eps" not in text and "hidden_activation" not in text  # defaults
    a = _comparable(AutoConfig.from_pretrained(str(new)).to_dict())
    b = _comparable(AutoConfig.from_pretrained(str(old)).to_dict())
    assert a == b
    arch = get_architecture(model_type_of(fixture))
    spec = arch.spec(raw_new)
    assert arch.spec(raw_old) == spec
    if fixture in ("MISTRAL", "PHI_3", "GEMMA2_2B", "GEMMA3_1B", "GEMMA3_4B"):
        assert spec.sliding_window == 6 and spec.sliding_layers
    if fixture.startswith("GEMMA3"):
        assert spec.sliding_layers == (0, 1) and spec.sliding_rope_theta == 10000.0
        assert spec.rope_theta == 1e6 and spec.rope_scaling == {"rope_type": "linear",
                                                                "factor": 4.0}


def test_published_config_shapes():
    """Hand-written configs in the shape of published ones read as transformers reads them."""
    gemma3_4b = {  # Gemma 3 4B: the text config lists only what differs from the defaults
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "eos_token_id": [1, 106],
    }
    spec = get_architecture("GEMMA3_4B").spec(gemma3_4b)
    assert (spec.vocab_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        262208, 8, 4, 256)
    assert spec.sliding_layers == tuple(i for i in range(34) if (i + 1) % 6)
    assert spec.attn_scale == 256**-0.5 and spec.eos_token_ids == (1, 106)
    assert spec.sliding_rope_theta == 10000.0 and spec.rope_theta == 1e6
    phi3 = {  # Phi-3-mini-128k / Phi-4-mini: longrope with the original context at the top
        "model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 200064,
        "intermediate_size": 8192, "partial_rotary_factor": 0.75,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                         "long_factor": [2.0] * 48},
        "sliding_window": 262144, "tie_word_embeddings": True,
    }
    spec = get_architecture("PHI_3").spec(phi3)
    assert spec.rotary_dims == 96 and spec.rope_scaling["rope_type"] == "longrope"
    assert spec.rope_scaling["attention_factor"] == pytest.approx(1.1902380714238083)
    llama32 = {  # Llama 3.2 1B
        "model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 16, "vocab_size": 128256,
        "intermediate_size": 8192, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    spec = get_architecture("LLAMA").spec(llama32)
    assert spec.rope_scaling["factor"] == 32.0 and spec.tied_embeddings
    assert spec.sliding_window is None


def test_refusals_are_clear():
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "vocab_size": 320}
    with pytest.raises(LlmToolError, match="rope_type 'yarn'"):
        get_architecture("QWEN3").spec(
            {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(LlmToolError, match="lacks 'low_freq_factor'"):
        get_architecture("LLAMA").spec(
            {**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(LlmToolError, match="layer type 'chunked_attention'"):
        get_architecture("GEMMA3_1B").spec(
            {**base, "layer_types": ["chunked_attention", "full_attention"]})
