"""The tiny checkpoints the converter and runtime are verified against: are they fit for that?"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.tiny_models import (
    MODEL_TYPES,
    build_checkpoint,
    load_reference,
    reference_greedy,
    reference_logits,
)

torch.set_num_threads(1)

VOCAB = 320
IDS = [5, 17, 300, 42, 9, 128, 77, 3, 250, 61, 200, 11, 99]
PROMPT = [7, 123, 45, 260, 31]
TIED = {"GEMMA_2B", "GEMMA_7B", "FALCON_RW_1B", "GPT2"}
WEIGHT_FILES = {"safetensors": "model.safetensors", "pytorch": "pytorch_model.bin"}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(model_type, **options) -> checkpoint folder (cached per module)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str, **options) -> Path:
        key = (model_type, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(model_type.lower())
            cache[key] = build_checkpoint(model_type, folder, VOCAB, **options)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def logits(build):
    """logits(model_type, **options) -> reference logits of IDS (cached per module)."""
    cache: dict[tuple, np.ndarray] = {}

    def make(model_type: str, **options) -> np.ndarray:
        key = (model_type, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in cache:
            cache[key] = reference_logits(build(model_type, **options), IDS)
        return cache[key]

    return make


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's weight files (single or sharded, either format)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    for path in sorted(folder.glob("*.bin")):
        out.update(torch.load(path, map_location="cpu", weights_only=True))
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_builds_loads_and_gives_finite_varied_logits(model_type, build, logits):
    folder = build(model_type)
    native = "pytorch" if model_type == "FALCON_RW_1B" else "safetensors"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "generation_config.json", WEIGHT_FILES[native]])
    out = logits(model_type)
    assert out.dtype == np.float32 and out.shape == (len(IDS), VOCAB)
    assert np.isfinite(out).all()
    # Not near-constant, not saturated: per-position spreads are a few units.
    spread = out.max(axis=1) - out.min(axis=1)
    assert spread.min() > 0.5 and spread.max() < 50, spread
    # Different positions predict different things.
    assert len(set(out.argmax(axis=1).tolist())) > len(IDS) // 2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_parameter_is_randomised(model_type, build):
    """Norm weights != 1 (Gemma: != 0), biases != 0: mistakes there must show in the logits."""
    tensors = read_tensors(build(model_type))
    model = load_reference(build(model_type))
    params = dict(model.named_parameters())
    assert set(tensors) <= set(model.state_dict())
    for name, param in params.items():  # every parameter made it into the checkpoint
        stored = tensors.get(name)
        if stored is None:  # only a tied head may be left out (safetensors)
            assert model_type in TIED and name == "lm_head.weight"
            continue
        assert torch.equal(stored.float(), param.detach())
        t = param.detach()
        assert t.std() > 0.01, name
        assert not torch.allclose(t, torch.ones_like(t), atol=0.02), name
        assert t.abs().mean() > 0.005, name


def test_architecture_features(build):
    def cfg(model_type: str) -> dict:
        return json.loads((build(model_type) / "config.json").read_text())

    def shapes(model_type: str) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in read_tensors(build(model_type)).items()}

    g2, g7 = cfg("GEMMA_2B"), cfg("GEMMA_7B")
    assert g2["num_key_value_heads"] == 1 and g2["hidden_act"] == "gelu_pytorch_tanh"
    assert g7["num_attention_heads"] * g7["head_dim"] != g7["hidden_size"]
    assert shapes("GEMMA_7B")["model.layers.0.self_attn.o_proj.weight"] == (64, 96)
    assert shapes("GEMMA_2B")["model.layers.0.self_attn.k_proj.weight"] == (16, 64)
    assert (g2["bos_token_id"], g2["eos_token_id"], g2["pad_token_id"]) == (2, 1, 0)

    phi = cfg("PHI_2")
    head_dim = phi["hidden_size"] // phi["num_attention_heads"]
    rotary = int(head_dim * phi["rope_parameters"]["partial_rotary_factor"])
    assert rotary % 2 == 0 and 0 < rotary < head_dim
    assert {"lm_head.weight", "lm_head.bias"} <= set(shapes("PHI_2"))

    falcon = cfg("FALCON_RW_1B")
    assert falcon["alibi"] and falcon["bias"] and falcon["tie_word_embeddings"]
    assert not (falcon["multi_query"] or falcon["new_decoder_architecture"]
                or falcon["parallel_attn"])
    assert shapes("FALCON_RW_1B")["transformer.h.0.self_attention.query_key_value.weight"] == (
        192, 64)

    st = cfg("STABLELM_4E1T_3B")
    assert st["num_key_value_heads"] == 2 and st["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert "model.layers.0.input_layernorm.bias" in shapes("STABLELM_4E1T_3B")

    assert shapes("GPT2")["transformer.h.0.attn.c_attn.weight"] == (64, 192)  # Conv1D: [in, out]
    assert cfg("GPT2")["n_positions"] == 256
    llama = cfg("LLAMA")
    assert llama["num_key_value_heads"] == 2 and not llama["tie_word_embeddings"]
    assert (llama["bos_token_id"], llama["eos_token_id"]) == (1, 2)

    for model_type in MODEL_TYPES:
        config = cfg(model_type)
        gen = json.loads((build(model_type) / "generation_config.json").read_text())
        assert gen["eos_token_id"] == config["eos_token_id"]
        assert gen["bos_token_id"] == config["bos_token_id"]
        if model_type in ("PHI_2", "FALCON_RW_1B", "STABLELM_4E1T_3B", "GPT2"):
            assert config["bos_token_id"] == config["eos_token_id"] == VOCAB - 1
        names = set(shapes(model_type))
        # safetensors drop a tied head; .bin files (Falcon's native format) alias it.
        has_head = model_type not in TIED or model_type == "FALCON_RW_1B"
        assert ("lm_head.weight" in names) == has_head
        assert config.get("tie_word_embeddings", True) == (model_type in TIED)


def test_pytorch_bin_keeps_the_tied_head_as_an_alias(build):
    """Old torch.save checkpoints hold lm_head.weight too; it must equal the embedding."""
    tensors = read_tensors(build("FALCON_RW_1B"))
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.word_embeddings.weight"])


VARIANTS = {
    "safetensors": ({"ckpt_format": "safetensors"}, 0.0),
    "pytorch": ({"ckpt_format": "pytorch"}, 0.0),
    "safetensors-3-shards": ({"ckpt_format": "safetensors", "shards": 3}, 0.0),
    "pytorch-2-shards": ({"ckpt_format": "pytorch", "shards": 2}, 0.0),
    "float16": ({"dtype": torch.float16}, 1e-2),
    "bfloat16": ({"dtype": torch.bfloat16}, 6e-2),
}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_format_variants_load_to_the_same_logits(model_type, build, logits):
    base = logits(model_type)
    for name, (options, tol) in VARIANTS.items():
        err = rel_err(logits(model_type, **options), base)
        assert err <= tol, f"{model_type} {name}: relative error {err:.2e}"
        if tol:  # rounding must actually have happened (weights really stored reduced)
            assert err > 0, name


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
def test_sharded_files_and_index(fmt, build):
    folder = build("LLAMA", ckpt_format=fmt, shards=3)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    files = [f"{stem}-{i:05d}-of-00003.{ext}" for i in (1, 2, 3)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*files, f"{stem}.{ext}.index.json", "config.json", "generation_config.json"])
    index = json.loads((folder / f"{stem}.{ext}.index.json").read_text())
    single = read_tensors(build("LLAMA", ckpt_format=fmt))
    assert set(index["weight_map"]) == set(single)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in single.values())
    for file in files:  # each shard holds exactly the tensors the index says
        shard = read_tensors_one(folder / file)
        assert set(shard) == {k for k, v in index["weight_map"].items() if v == file}


def read_tensors_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_reduced_precision_storage(dtype, name, build):
    for fmt in ("safetensors", "pytorch"):
        folder = build("PHI_2", dtype=dtype, ckpt_format=fmt)
        assert json.loads((folder / "config.json").read_text())["dtype"] == name
        assert {t.dtype for t in read_tensors(folder).values()} == {dtype}
    legacy = build("PHI_2", dtype=dtype, legacy_config=True)
    assert json.loads((legacy / "config.json").read_text())["torch_dtype"] == name


def test_falcon_reference_adds_alibi_once(build, logits):
    """Hand-written Falcon-RW forward (ALiBi added once, scaled with the scores) == reference."""
    folder = build("FALCON_RW_1B")
    cfg = json.loads((folder / "config.json").read_text())
    sd = read_tensors(folder)
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    hd, eps, n = hidden // heads, cfg["layer_norm_epsilon"], len(IDS)

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (hidden,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps)

    def lin(x, p):
        return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
    bias = slopes[:, None, None] * torch.arange(n, dtype=torch.float32)[None, None, :]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    x = sd["transformer.word_embeddings.weight"][IDS]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{layer}"
        qkv = lin(ln(x, f"{p}.input_layernorm"), f"{p}.self_attention.query_key_value")
        q, k, v = qkv.view(n, heads, 3, hd).permute(2, 1, 0, 3)  # per-head [q, k, v] interleave
        scores = ((q @ k.transpose(-1, -2) + bias) / hd**0.5).masked_fill(future, float("-inf"))
        attn = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(n, hidden)
        x = x + lin(attn, f"{p}.self_attention.dense")
        h = torch.nn.functional.gelu(lin(ln(x, f"{p}.post_attention_layernorm"),
                                         f"{p}.mlp.dense_h_to_4h"))
        x = x + lin(h, f"{p}.mlp.dense_4h_to_h")
    ours = (ln(x, "transformer.ln_f") @ sd["transformer.word_embeddings.weight"].T).numpy()
    assert rel_err(ours, logits("FALCON_RW_1B")) < 1e-5


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_is_discriminative_and_plain_argmax(model_type, build, tmp_path):
    folder = build(model_type)
    tokens = reference_greedy(folder, PROMPT, new_tokens=10)
    assert len(tokens) == 10 and all(0 <= t < VOCAB for t in tokens)
    assert len(set(tokens)) > 1, f"{model_type}: greedy always picks {tokens[0]}"
    # Same as a cache-free argmax loop.
    model = load_reference(folder)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(PROMPT):] == tokens
    # EOS neither stops generation nor is masked: make the 2nd new token the EOS id.
    copy = tmp_path / "eos"
    shutil.copytree(folder, copy)
    for file in ("config.json", "generation_config.json"):
        data = json.loads((copy / file).read_text())
        data["eos_token_id"] = tokens[1]
        (copy / file).write_text(json.dumps(data))
    assert reference_greedy(copy, PROMPT, new_tokens=10) == tokens


def test_builds_are_deterministic(tmp_path, build):
    def contents(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    for model_type, options in [("GEMMA_7B", {}), ("GPT2", {"shards": 2}),
                                ("FALCON_RW_1B", {})]:
        again = build_checkpoint(model_type, tmp_path / model_type, VOCAB, **options)
        assert contents(again) == contents(build(model_type, **options)), model_type
    other = build_checkpoint("GEMMA_7B", tmp_path / "seed1", VOCAB, seed=1)
    assert contents(other)["model.safetensors"] != contents(build("GEMMA_7B"))["model.safetensors"]


def test_rebuild_in_place_replaces_the_weights(tmp_path):
    build_checkpoint("GPT2", tmp_path, VOCAB, shards=2)
    build_checkpoint("GPT2", tmp_path, VOCAB, ckpt_format="pytorch")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "pytorch_model.bin"]


def test_build_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_checkpoint("LLAMA", tmp_path, VOCAB)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_legacy_config_loads_to_the_same_model(model_type, build, logits):
    from transformers import AutoConfig

    folder = build(model_type, legacy_config=True)
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in raw and "dtype" not in raw
    assert raw["torch_dtype"] == "float32" and raw["transformers_version"].startswith("4.")
    if model_type in ("PHI_2", "STABLELM_4E1T_3B"):
        assert raw["partial_rotary_factor"] in (0.4, 0.25) and raw["rope_theta"] == 10000.0
    if model_type in ("GEMMA_2B", "GEMMA_7B", "LLAMA"):
        assert raw["rope_theta"] == 10000.0
    if model_type.startswith("GEMMA"):
        assert raw["hidden_act"] == "gelu"  # as published; transformers reads it as tanh-gelu
    if model_type == "FALCON_RW_1B":
        assert raw["n_embed"] == 64 and "hidden_size" not in raw
        assert "ffn_hidden_size" not in raw and "max_position_embeddings" not in raw
    if model_type == "GPT2":
        assert raw["n_ctx"] == 256
    # transformers reads the legacy file into the same config...
    new = AutoConfig.from_pretrained(build(model_type)).to_dict()
    old = AutoConfig.from_pretrained(folder).to_dict()
    ignored = {"transformers_version", "dtype", "_name_or_path"}
    if model_type == "FALCON_RW_1B":
        ignored.add("max_position_embeddings")  # unused with ALiBi; absent from the real file
    diff = {k: (v, old.get(k)) for k, v in new.items() if k not in ignored and old.get(k) != v}
    assert not diff, diff
    # ...and the same logits.
    assert np.array_equal(logits(model_type, legacy_config=True), logits(model_type))


def test_rejects_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="unknown model type"):
        build_checkpoint("MAMBA", tmp_path)
    with pytest.raises(ValueError, match="ckpt_format"):
        build_checkpoint("GPT2", tmp_path, ckpt_format="gguf")
