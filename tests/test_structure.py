"""The layering the code relies on, and the round trips of the small formats."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llmtool.formats import metadata as keys
from llmtool.formats.container import TensorPlan
from llmtool.formats.tensor_dir import TensorDir, read_layer_info, read_metadata, read_tensor
from llmtool.quantization import QuantizedTensor, dequantize, quantize


def test_runtime_imports_no_exporter_table_pipeline_or_torch():
    """`import llmtool.runtime.*` must stay light: it executes graphs, nothing else."""
    code = (
        "import sys, json\n"
        "import llmtool.runtime.inference, llmtool.runtime.compiled_engine\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('llmtool', 'torch')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    forbidden = {"llmtool.decoder", "llmtool.architectures", "llmtool.pipelines", "torch"}
    assert not {m for m in loaded if m in forbidden or m.startswith("llmtool.pipelines.")}
    assert "llmtool.runtime.inference" in loaded


def test_tensor_dir_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    values = {
        "a.f32": w,
        "b.f16": w.astype(np.float16),
        "c.i8": quantize(w, bits=8, symmetric=True, axis=0),
        "d.i4": quantize(w, bits=4, symmetric=False, axis=0),
    }
    dtypes = {"a.f32": "float32", "b.f16": "float16", "c.i8": "int8", "d.i4": "int4"}
    plan = [TensorPlan(n, (6, 5), dtypes[n]) for n in values]
    metadata = {"x": b"1", "llmtool.tokenizer/tokenizer.json": b"{}"}
    folder = TensorDir(tmp_path / "parts")
    for entry in plan:
        folder.write(entry, values[entry.name])
    folder.finish(plan, metadata)

    assert read_layer_info(tmp_path / "parts") == plan
    assert read_metadata(tmp_path / "parts") == metadata
    for entry in plan:
        got, want = read_tensor(tmp_path / "parts", entry), values[entry.name]
        if isinstance(want, QuantizedTensor):
            assert isinstance(got, QuantizedTensor)
            np.testing.assert_array_equal(dequantize(got), dequantize(want))
        else:
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer.model": b"\x0a\x01spm"},
        {"tokenizer.json": b"{}", "tokenizer_config.json": b'{"a": 1}'},
        {"tokenizer.json": b"{}", "generation_config.json": b"{}", "tokenizer.model": b"x"},
    ],
)
def test_tokenizer_pack_unpack_round_trip(files):
    packed = keys.pack_tokenizer(files)
    if "tokenizer.model" in files:
        assert packed[keys.SPM_VOCAB] == files["tokenizer.model"]  # the reference's key
    assert keys.unpack_tokenizer({**packed, "unrelated": b"?"}) == files
