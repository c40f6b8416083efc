"""`llmtool convert`: every architecture, every precision, read back and compared to the source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtool.architectures import ARCHITECTURES, get_architecture
from llmtool.checkpoint import Checkpoint
from llmtool.config import ConversionConfig
from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.llm_params import decode_llm_parameters
from llmtool.pipelines.convert import convert
from llmtool.quantization import unpack_int4
from llmtool.spec import ModelSpec
from llmtool.weights import WeightLoader, plan_weights
from tests.tiny_models import MODEL_TYPES, load_reference

SEED_TYPES = ["GEMMA_2B", "GEMMA_7B", "PHI_2", "FALCON_RW_1B", "STABLELM_4E1T_3B", "GPT2"]


def source_tensors(folder: Path, model_type: str) -> dict[str, np.ndarray]:
    """Container name -> float32 tensor, straight from the checkpoint via the table."""
    ckpt = Checkpoint.open(folder)
    arch = get_architecture(model_type)
    spec = arch.spec(ckpt.config()[0])
    planned, _ = plan_weights(arch, spec, ckpt)
    loader = WeightLoader(ckpt, spec)
    return {t.name: loader.load(t).copy() for t in planned}


def test_table_covers_all_fixture_types():
    assert set(MODEL_TYPES) <= set(ARCHITECTURES)
    assert set(SEED_TYPES) <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_float32_round_trip_is_exact(model_type, tiny_model, converted):
    folder = tiny_model(model_type)
    path = converted(model_type, "float32")
    expected = source_tensors(folder, model_type)
    hf = load_reference(folder)
    with Container.open(path) as c:
        assert c.model_type == model_type
        assert set(c.names) == set(expected)
        for name, value in expected.items():
            got = c.float(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, value, err_msg=name)
        # Every parameter of transformers' model is there once (tied weights counted once).
        assert sum(int(np.prod(t.shape)) for t in c) == sum(p.numel() for p in hf.parameters())
        spec = ModelSpec.from_json(c.metadata[keys.MODEL_SPEC])
        assert spec.num_layers == hf.config.num_hidden_layers
        params = decode_llm_parameters(c.metadata[keys.LLM_PARAMETERS])
        tp = params["transformer_parameters"]
        assert tp["num_stacks"] == hf.config.num_hidden_layers
        assert tp["embedding_dim"] == hf.config.hidden_size
        assert params["vocab_size"] == hf.config.vocab_size
        assert c.metadata[keys.BACKEND] == b"cpu"


def test_independent_spot_checks(tiny_model, converted):
    """A few tensors checked against transformers' modules, not through our table."""
    gpt2 = load_reference(tiny_model("GPT2"))
    with Container.open(converted("GPT2")) as c:
        h = gpt2.config.hidden_size
        c_attn = gpt2.transformer.h[1].attn.c_attn.weight.detach().numpy()  # Conv1D [in, out]
        np.testing.assert_array_equal(
            c.float("params.lm.transformer.x_layers_1.self_attention.k.w"), c_attn[:, h : 2 * h].T
        )
    falcon = load_reference(tiny_model("FALCON_RW_1B"))
    with Container.open(converted("FALCON_RW_1B")) as c:
        attn = falcon.transformer.h[0].self_attention
        qkv = attn.query_key_value.weight.detach().numpy()
        heads, d = attn.num_heads, attn.head_dim
        v_rows = qkv.reshape(heads, 3, d, -1)[:, 2].reshape(heads * d, -1)
        np.testing.assert_array_equal(
            c.float("params.lm.transformer.x_layers_0.self_attention.v.w"), v_rows
        )
    gemma = load_reference(tiny_model("GEMMA_2B"))
    with Container.open(converted("GEMMA_2B")) as c:
        np.testing.assert_array_equal(
            c.float("params.lm.transformer.x_layers_0.ff_layer.ffn_layer1_gate.w"),
            gemma.model.layers[0].mlp.gate_proj.weight.detach().numpy(),
        )


@pytest.mark.parametrize("quantization,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("model_type", ["GEMMA_2B", "PHI_2", "GPT2"])
def test_quantized_within_error(model_type, quantization, bits, tiny_model, converted):
    expected = source_tensors(tiny_model(model_type), model_type)
    with Container.open(converted(model_type, quantization)) as c:
        kinds = set()
        for name, value in expected.items():
            info = c.info(name)
            kinds.add(info.dtype)
            got = c.float(name)
            if info.dtype == "float32":  # norms, biases, positions
                assert value.ndim == 1 or "position" in name
                np.testing.assert_array_equal(got, value)
                continue
            embedding = "embedding" in name or "logits_ffn" in name
            # int4 keeps embeddings and the output layer at 8 bits unless asked otherwise, and
            # rows that are not whole blocks of 32 (the tiny Phi's 80) at 8 bits
            whole_blocks = info.shape[-1] % 32 == 0
            want = "int8" if embedding or not whole_blocks else quantization
            assert info.dtype == want, name
            q = c.quantized(name)
            if q.block_size:  # one scale per block of a row
                scale = np.repeat(q.scale, q.block_size, axis=1)
            else:
                scale = np.broadcast_to(np.asarray(q.scale).reshape(-1, 1), value.shape)
            err = np.abs(got - value)
            if q.bits == 4:
                # int4 scales are searched (max/7 to max/9 or /10, refitted): values at the
                # extreme levels may be clipped by a few steps, the others are rounded
                v = unpack_int4(q.data, q.shape)
                clipped = (v == 7) | (v == v.min())
                assert np.all(err[clipped] <= 3 * scale[clipped] + 1e-6), name
                assert np.all(err[~clipped] <= scale[~clipped] / 2 + 1e-6), name
                continue
            # Symmetric rounding: each value within half a step of its channel's scale.
            assert np.all(err <= scale / 2 + 1e-6), name
        assert quantization in kinds


def test_mixed_bits_and_float16(tiny_model, tmp_path):
    folder = tiny_model("LLAMA")
    out = tmp_path / "mixed.bin"
    convert(
        ConversionConfig(
            input_ckpt=str(folder),
            model_type="LLAMA",
            output_tflite_file=str(out),
            attention_quant_bits=4,
            feedforward_quant_bits=16,
            embedding_quant_bits=8,
        )
    )
    with Container.open(out) as c:
        assert c.info("params.lm.transformer.x_layers_0.self_attention.q.w").dtype == "int4"
        assert c.info("params.lm.transformer.x_layers_0.ff_layer.ffn_layer1.w").dtype == "float16"
        assert c.info("params.lm.token_embedding.w").dtype == "int8"
        assert c.info("params.lm.softmax.logits_ffn.w").dtype == "int8"
        assert c.info("params.lm.final_ln.scale").dtype == "float32"


def test_asymmetric_keeps_zero_points(tiny_model, tmp_path):
    folder = tiny_model("GEMMA_2B")
    expected = source_tensors(folder, "GEMMA_2B")
    out = tmp_path / "asym.bin"
    convert(
        ConversionConfig(
            input_ckpt=str(folder),
            model_type="GEMMA_2B",
            output_tflite_file=str(out),
            quantization="int4",
            is_symmetric=False,
        )
    )
    name = "params.lm.transformer.x_layers_0.ff_layer.ffn_layer2.w"
    with Container.open(out) as c:
        info = c.info(name)
        assert np.any(np.asarray(info.zero_point) != 0)
        err = np.abs(c.float(name) - expected[name]).max(axis=1)
        assert np.all(err <= np.asarray(info.scale) / 2 + 1e-6)


def test_deterministic_output(tiny_model, tmp_path):
    folder = tiny_model("STABLELM_4E1T_3B")
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.bin"
        convert(
            ConversionConfig(
                input_ckpt=str(folder),
                model_type="STABLELM_4E1T_3B",
                output_tflite_file=str(out),
                quantization="int4",
            )
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "options",
    [
        {"ckpt_format": "pytorch"},
        {"shards": 3},
        {"dtype": torch.bfloat16},
        {"dtype": torch.float16, "ckpt_format": "pytorch"},
    ],
    ids=["pytorch", "sharded", "bf16", "f16-pytorch"],
)
def test_source_variants(options, tiny_model, tmp_path):
    folder = tiny_model("GEMMA_2B", **options)
    out = tmp_path / "v.bin"
    convert(
        ConversionConfig(
            input_ckpt=str(folder),
            model_type="GEMMA_2B",
            output_tflite_file=str(out),
            quantization="float32",
        )
    )
    expected = source_tensors(folder, "GEMMA_2B")
    with Container.open(out) as c:
        for name, value in expected.items():
            np.testing.assert_array_equal(c.float(name), value)


def test_glob_input(tiny_model, tmp_path):
    folder = tiny_model("GEMMA_2B", shards=2)
    out = tmp_path / "g.bin"
    summary = convert(
        ConversionConfig(
            input_ckpt=str(folder / "model*.safetensors"),
            model_type="GEMMA_2B",
            output_tflite_file=str(out),
        )
    )
    assert summary["tensors"] > 0 and out.is_file()


def test_output_dir_and_combine_give_identical_file(tiny_model, tmp_path):
    folder = tiny_model("PHI_2")
    direct, combined, tensor_dir = tmp_path / "d.bin", tmp_path / "c.bin", tmp_path / "parts"
    convert(
        ConversionConfig(
            input_ckpt=str(folder),
            model_type="PHI_2",
            output_tflite_file=str(direct),
            output_dir=str(tensor_dir),
            quantization="int4",
        )
    )
    lines = [x for x in (tensor_dir / "layer_info.txt").read_text().splitlines() if x]
    assert "mdl_vars.params.lm.transformer.x_layers_0.self_attention.q.w.int8.80_80" in lines
    assert "mdl_vars.params.lm.transformer.x_layers_0.ff_layer.ffn_layer2.w.int4.80_160" in lines
    assert (
        tensor_dir / "params.lm.transformer.x_layers_0.self_attention.q.w_quantized_scale"
    ).is_file()
    convert(
        ConversionConfig(
            output_dir=str(tensor_dir), output_tflite_file=str(combined), combine_file_only=True
        )
    )
    assert direct.read_bytes() == combined.read_bytes()


def test_legacy_config_json(tiny_model, tmp_path):
    """Published checkpoints' config.json (rope_theta/partial_rotary_factor at top level)."""
    folder = tiny_model("PHI_2", legacy_config=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert "partial_rotary_factor" in cfg
    spec = get_architecture("PHI_2").spec(cfg)
    assert spec.rotary_dims == int(spec.head_dim * cfg["partial_rotary_factor"])


# ------------------------------------------------------------------------------------------
# The command line: YAML, flags, JSON, and one-line errors


def llmtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmtool", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_yaml_with_flag_override(tiny_model, tmp_path):
    folder = tiny_model("GPT2")
    cfg = tmp_path / "gpt2.yaml"
    cfg.write_text(
        f"model_type: GPT2\ninput_ckpt: {folder}\noutput_tflite_file: {tmp_path / 'a.bin'}\n"
        "quantization: int8\n"
    )
    r = llmtool(
        "convert",
        "--config",
        str(cfg),
        "--output-tflite-file",
        str(tmp_path / "b.bin"),
        "--embedding-quant-bits",
        "32",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["output"] == str(tmp_path / "b.bin")
    assert summary["quant_bits"] == {"attention": 8, "feedforward": 8, "embedding": 32}
    assert not (tmp_path / "a.bin").exists()
    r = llmtool("inspect", str(tmp_path / "b.bin"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model_type"] == "GPT2"
    assert info["tokenizer"]["kind"] == "hf"
    dtypes = {t["name"]: t["dtype"] for t in info["tensors"]}
    assert dtypes["params.lm.token_embedding.w"] == "float32"
    assert dtypes["params.lm.transformer.x_layers_0.self_attention.q.w"] == "int8"
    r = llmtool("inspect", str(tmp_path / "b.bin"))
    assert r.returncode == 0 and "params.lm.token_embedding.w" in r.stdout


def _bad(tmp_path: Path, folder: Path) -> list[tuple[list[str], str]]:
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    for f in folder.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    st = truncated / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    for f in folder.iterdir():
        if "token" not in f.name:
            (no_tok / f.name).write_bytes(f.read_bytes())
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model_type: [GEMMA_2B\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("model_typ: GEMMA_2B\n")
    out = str(tmp_path / "o.bin")
    base = ["convert", "--output-tflite-file", out]
    return [
        (base + ["--model-type", "GEMMA_2B", "--input-ckpt", str(tmp_path / "nope")], "not found"),
        (base + ["--model-type", "GEMMA_2B", "--input-ckpt", str(truncated)], "truncated"),
        (base + ["--model-type", "GEMMA_9Z", "--input-ckpt", str(folder)], "unknown model type"),
        (base + ["--model-type", "PHI_2", "--input-ckpt", str(folder)], "GEMMA"),
        (base + ["--model-type", "GEMMA_2B", "--input-ckpt", str(no_tok)], "tokenizer"),
        (base + ["--config", str(bad_yaml)], "invalid YAML"),
        (base + ["--config", str(unknown_key)], "unknown key"),
        (
            base
            + ["--model-type", "GEMMA_2B", "--input-ckpt", str(folder), "--quantization", "int3"],
            "unknown quantization",
        ),
        (["inspect", str(folder / "config.json")], "config.json"),
        (
            base
            + ["--model-type", "GEMMA_2B", "--input-ckpt", str(folder), "--quantization", "int4"]
            + ["--block-size", "128"],  # the tiny Gemma's rows are 64 long
            "does not divide the row length 64",
        ),
        (
            base
            + ["--model-type", "GEMMA_2B", "--input-ckpt", str(folder), "--quantization", "int4"]
            + ["--block-size", "48"],
            "block size must be 32, 64, 128",
        ),
    ]


def test_cli_bad_input_gives_one_line(tiny_model, tmp_path):
    folder = tiny_model("GEMMA_2B")
    for args, needle in _bad(tmp_path, folder):
        r = llmtool(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
        assert not (tmp_path / "o.bin").exists()
        assert not list(tmp_path.glob("o.bin.tmp*"))
