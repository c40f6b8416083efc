"""GPTQ rounding (llmtool/gptq.py): lower output error than nearest rounding on inputs the
calibration did not see, the layouts nearest rounding writes, exactness, determinism."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from llmtool.errors import LlmToolError
from llmtool.gptq import quantize_gptq
from llmtool.pipelines.evaluate import evaluate
from llmtool.pipelines.quantize import QuantizeOptions, quantize_model
from llmtool.quantization import dequantize, quantize
from tests.test_quantize import EXCERPT


def _inputs(rng: np.random.Generator, basis: np.ndarray, n: int) -> np.ndarray:
    """Inputs that mostly lie in a few directions (as a layer's inputs do), plus noise."""
    x = rng.standard_normal((n, len(basis))).astype(np.float32) @ basis
    return x + 0.1 * rng.standard_normal((n, basis.shape[1])).astype(np.float32)


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((48, 256)) * 0.02).astype(np.float32)
    basis = rng.standard_normal((24, 256)).astype(np.float32)
    calibration, held_out = _inputs(rng, basis, 1000), _inputs(rng, basis, 1000)
    return w, calibration.T @ calibration, held_out


def _error(w: np.ndarray, q, x: np.ndarray) -> float:
    """Relative squared output error of the quantized layer on inputs x."""
    return float(np.sum((x @ (w - dequantize(q)).T) ** 2) / np.sum((x @ w.T) ** 2))


@pytest.mark.parametrize("bits,block", [(8, 0), (4, 0), (4, 32)])
def test_lower_output_error_than_nearest_on_held_out_inputs(layer, bits, block):
    w, h, x = layer
    g = quantize_gptq(w, h, bits, block)
    nearest = quantize(w, bits, block_size=block)
    # the same layout: LiteRT reads it the same way
    assert (g.bits, g.shape, g.block_size, g.data.dtype) == (
        bits,
        w.shape,
        block,
        nearest.data.dtype,
    )
    assert g.data.shape == nearest.data.shape and g.scale.shape == nearest.scale.shape
    if bits == 8:  # rows keep the scale they would get anyway
        np.testing.assert_array_equal(g.scale, nearest.scale)
    if block:  # block scales stay float16-exact, as LiteRT stores them
        np.testing.assert_array_equal(g.scale, g.scale.astype(np.float16).astype(np.float32))
    assert _error(w, g, x) < 0.25 * _error(w, nearest, x), (_error(w, g, x), _error(w, nearest, x))


def test_weights_on_the_grid_stay_exact_and_runs_repeat(layer):
    w, h, _ = layer
    on_grid = dequantize(quantize(w, 8))
    g = quantize_gptq(on_grid, h, 8)
    np.testing.assert_array_equal(dequantize(g), on_grid)  # no error to spread: nothing moves
    a, b = quantize_gptq(w, h, 4, 32), quantize_gptq(w, h, 4, 32)
    assert a.data.tobytes() == b.data.tobytes() and a.scale.tobytes() == b.scale.tobytes()


def test_columns_no_input_reached_are_rounded_to_nearest(layer):
    w, h, _ = layer
    h = h.copy()
    h[:, :32] = 0  # the first 32 columns (rounded last) never saw a non-zero input
    h[:32, :] = 0
    g = quantize_gptq(w, h, 8)
    values = dequantize(g)
    assert np.all(np.isfinite(values))
    np.testing.assert_array_equal(values[:, :32], dequantize(quantize(w, 8))[:, :32])


def test_quantize_with_calibration_text_uses_gptq(converted, tmp_path):
    """A converted model: GPTQ on calibration text lowers KL against the float model, also
    after smoothing (whose layers see x / s: their statistics are rescaled to match)."""
    src = converted("LLAMA")
    text = EXCERPT.read_text()
    calibration = tmp_path / "cal.txt"
    calibration.write_text(text[1400:].replace(". ", ".\n"))
    scored = tmp_path / "scored.txt"
    scored.write_text(text[:1400])
    kl = {}
    for name, options in {
        "nearest": QuantizeOptions(mode="int4"),
        "gptq": QuantizeOptions(mode="int4", calibration_data=str(calibration)),
        "nearest8": QuantizeOptions(mode="dynamic-int8", smooth=True),
        "gptq8": QuantizeOptions(
            mode="dynamic-int8", smooth=True, calibration_data=str(calibration)
        ),
    }.items():
        out = tmp_path / f"{name}.bin"
        summary = quantize_model(src, out, options)
        assert (summary["gptq"] is not None) is ("gptq" in name), summary
        r = evaluate(str(out), scored, window=64, reference=str(src))["reference"]
        kl[name] = r["mean_kl"]
    # measured: int4 0.0133 -> 0.0081; smoothed int8 9.4e-5 -> 7.6e-5 (7.9e-5 without the
    # rescaled statistics)
    assert kl["gptq"] < 0.75 * kl["nearest"], kl
    assert kl["gptq8"] < 0.9 * kl["nearest8"], kl


def test_command_line_says_gptq_and_nothing_else(converted, tmp_path):
    calibration = tmp_path / "cal.txt"
    calibration.write_text(EXCERPT.read_text()[1400:].replace(". ", ".\n"))
    out = tmp_path / "q.bin"
    r = subprocess.run(
        [sys.executable, "-m", "llmtool", "quantize", str(converted("LLAMA")), str(out)]
        + ["--mode", "int4", "--calibration-data", str(calibration)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    assert "GPTQ on calibration text" in r.stdout, r.stdout
    # LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate" stays off the terminal
    assert "INFO" not in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert out.is_file() and not list(tmp_path.glob(".llmtool-*"))


def test_statistics_that_are_no_covariance_are_refused():
    w = np.ones((4, 2), np.float32)
    with pytest.raises(LlmToolError, match="not positive definite"):
        quantize_gptq(w, np.array([[1.0, 2.0], [2.0, 1.0]], np.float32), 8)


def test_a_model_too_large_to_run_says_gptq_was_skipped(converted, tmp_path, monkeypatch):
    from llmtool import smoothing

    monkeypatch.setattr(smoothing, "MAX_PROBE_BYTES", 1024)
    calibration = tmp_path / "cal.txt"
    calibration.write_text(EXCERPT.read_text()[1400:].replace(". ", ".\n"))
    out = tmp_path / "q.bin"
    options = QuantizeOptions(mode="dynamic-int8", calibration_data=str(calibration))
    summary = quantize_model(converted("LLAMA"), out, options)
    assert "GiB" in summary["gptq"]["skipped"], summary["gptq"]
    assert out.is_file() and not list(tmp_path.glob(".llmtool-*"))
