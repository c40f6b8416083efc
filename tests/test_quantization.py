"""Per-channel int8/int4 quantization: ranges, error bounds, packing layout, block processing."""

from __future__ import annotations

import numpy as np
import pytest

from llmtool.errors import LlmToolError
from llmtool.quantization import (
    _ROW_DIVISORS,
    QuantizedTensor,
    _search_scales,
    dequantize,
    pack_int4,
    quantize,
    quantize_blockwise,
    unpack_int4,
)


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _values(q: QuantizedTensor) -> np.ndarray:
    return q.data if q.bits == 8 else unpack_int4(q.data, q.shape)


def _reference(w: np.ndarray, bits: int, symmetric: bool, axis: int) -> np.ndarray:
    """Straightforward (unblocked) per-channel quantization, for comparison."""
    other = tuple(i for i in range(w.ndim) if i != axis)
    qmax = 127 if bits == 8 else 7
    if symmetric:
        scale = np.abs(w).max(axis=other, keepdims=True).astype(np.float32) / np.float32(qmax)
        scale[scale == 0] = 1
        return np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    qmin = -qmax - 1
    lo = np.minimum(w.min(axis=other, keepdims=True), 0).astype(np.float32)
    hi = np.maximum(w.max(axis=other, keepdims=True), 0).astype(np.float32)
    scale = (hi - lo) / np.float32(qmax - qmin)
    scale[scale == 0] = 1
    zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
    return np.clip(np.rint(w / scale) + zp, qmin, qmax).astype(np.int8)


def _weighted_error(w: np.ndarray, q: QuantizedTensor, block: int = 0) -> np.ndarray:
    """Per row (or block) sum((|w| + mean|w|) (w - dequantized)^2): what the int4 scale
    search minimises."""
    k = block or w.shape[-1]
    x = w.reshape(-1, k)
    err = (x - dequantize(q).reshape(-1, k)) ** 2
    return ((np.abs(x) + np.abs(x).mean(1, keepdims=True)) * err).sum(1)


def _absmax_int4(w: np.ndarray, block: int = 0) -> QuantizedTensor:
    """int4 with plain absmax scales (max|w| / 7 per row; Q4_0's max / -8 per block)."""
    if not block:
        scale = np.abs(w).max(axis=1) / np.float32(7)
        v = np.clip(np.rint(w / scale[:, None]), -7, 7).astype(np.int8)
        return QuantizedTensor(pack_int4(v), scale, np.zeros(len(w), np.int64), 4, w.shape)
    x = w.reshape(len(w), -1, block)
    neg = -x.min(-1) > x.max(-1)
    amax = np.where(neg, -x.min(-1), x.max(-1))
    scale = (amax / np.where(neg, 8, 7)).astype(np.float16).astype(np.float32)
    v = np.clip(np.rint(x / scale[..., None]), -8, 7).astype(np.int8).reshape(w.shape)
    return QuantizedTensor(pack_int4(v), scale, np.zeros(len(w), np.int64), 4, w.shape, 0, block)


def test_int4_row_scale_search_beats_absmax() -> None:
    rng = _rng()
    w = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    q = quantize(w, 4)
    ours, absmax = _weighted_error(w, q), _weighted_error(w, _absmax_int4(w))
    assert ours.sum() < 0.95 * absmax.sum()  # 0.79
    # not shrunk: the least-squares scale would give 0.991 (1 - relative squared error)
    assert abs((dequantize(q) * w).sum() / (w * w).sum() - 1) < 0.005
    v = _values(q)
    assert v.min() >= -7 and v.max() <= 7
    scale = np.repeat(q.scale, 512, axis=-1).reshape(w.shape)
    # the stored values are the scale's rounding (clipped), as a runtime reads them back
    np.testing.assert_array_equal(v, np.clip(np.rint(w / scale), v.min(), 7))
    again = quantize(w.copy(), 4)
    assert np.array_equal(again.data, q.data) and np.array_equal(again.scale, q.scale)


@pytest.mark.parametrize("block", [32, 128])
def test_int4_blocks_keep_q4_0_absmax_scales(block: int) -> None:
    """Without activation statistics blocks are not searched: a plain (unweighted) search
    raised KL on a trained and a random model."""
    w = (_rng().standard_normal((64, 512)) * 0.02).astype(np.float32)
    q, ref = quantize(w, 4, block_size=block), _absmax_int4(w, block)
    np.testing.assert_array_equal(q.scale, ref.scale)
    np.testing.assert_array_equal(_values(q), _values(ref))


def test_int4_activation_weighted_block_scales() -> None:
    """With per-column importance, the activation-weighted error is lower than absmax's, the
    columns that meet large activations come out more exact, and the error is uncorrelated
    with the weights (no shrink of the layer's output)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    importance = np.ones(256, np.float32)
    importance[::16] = 50.0  # outlier activation channels
    plain = quantize_blockwise(w, 4, 32)
    weighted = quantize_blockwise(w, 4, 32, importance)

    def err(q):
        return ((dequantize(q) - w) ** 2 * importance).sum()

    assert err(weighted) < 0.85 * err(plain), (err(weighted), err(plain))
    hot = np.abs(dequantize(weighted) - w)[:, ::16].mean()
    assert hot < 0.8 * np.abs(dequantize(plain) - w)[:, ::16].mean()
    # sum(a w (w - dequantized)) ~ 0 per row: no shrink (only float16 rounding remains)
    a_w = w * importance
    corr = np.einsum("ij,ij->i", a_w, w - dequantize(weighted))
    assert np.abs(corr).max() < 0.01 * np.einsum("ij,ij->i", a_w, w).min()
    # deterministic, float16-exact positive scales, values in [-8, 7]
    again = quantize_blockwise(w, 4, 32, importance)
    np.testing.assert_array_equal(again.data, weighted.data)
    s = weighted.scale
    assert np.all(s > 0) and np.array_equal(s, s.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="int4 only"):
        quantize_blockwise(w, 8, 32, importance)
    with pytest.raises(ValueError, match="int4 only"):
        quantize_blockwise(w, 4, 32, -importance)


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_range_and_error(bits: int) -> None:
    w = _rng().standard_normal((17, 33)).astype(np.float32)
    w[3] *= 100  # channels with very different ranges
    q = quantize(w, bits, symmetric=True)
    qmax = 127 if bits == 8 else 7
    if bits == 4:  # searched scales (test_int4_scale_search_beats_absmax)
        v = _values(q)
        assert v.min() >= -qmax and v.max() <= qmax and q.scale.shape == (17,)
        assert q.scale[3] > 50 * np.delete(q.scale, 3).max()
        return
    v = _values(q)
    assert v.dtype == np.int8 and v.shape == w.shape
    assert v.min() >= -qmax and v.max() <= qmax
    assert np.all(np.abs(v).max(axis=1) == qmax)  # each channel uses its full range
    assert q.scale.dtype == np.float32 and q.scale.shape == (17,)
    assert q.zero_point.dtype == np.int64 and not q.zero_point.any()
    np.testing.assert_allclose(q.scale, np.abs(w).max(axis=1) / qmax, rtol=1e-6)
    err = np.abs(dequantize(q) - w)
    assert np.all(err <= q.scale[:, None] * 0.5001)
    assert dequantize(q).dtype == np.float32


@pytest.mark.parametrize("bits", [8, 4])
def test_asymmetric_range_zero_point_and_error(bits: int) -> None:
    rng = _rng()
    w = rng.standard_normal((9, 20)).astype(np.float32)
    w[0] = np.abs(w[0]) + 0.5  # all positive
    w[1] = -np.abs(w[1]) - 0.5  # all negative
    w[2] = w[2] * 0.1 + 3.0  # skewed
    w[3, :5] = 0.0
    q = quantize(w, bits, symmetric=False)
    qmin, qmax = (-128, 127) if bits == 8 else (-8, 7)
    v = _values(q)
    assert v.min() >= qmin and v.max() <= qmax
    assert np.all((q.zero_point >= qmin) & (q.zero_point <= qmax))
    assert len(set(q.zero_point.tolist())) > 1  # per-channel zero points are kept
    err = np.abs(dequantize(q) - w)
    assert np.all(err <= q.scale[:, None] * 0.5001)
    assert np.all(dequantize(q)[3, :5] == 0)  # zero is exactly representable


def test_asymmetric_beats_symmetric_on_skewed_int4() -> None:
    w = (_rng().random((8, 64)) * 2.0 + 1.0).astype(np.float32)  # [1, 3]: one-sided
    e_sym = np.abs(dequantize(quantize(w, 4, True)) - w).mean()
    e_asym = np.abs(dequantize(quantize(w, 4, False)) - w).mean()
    assert e_asym < e_sym * 0.6


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_channel(symmetric: bool) -> None:
    w = _rng().standard_normal((4, 6)).astype(np.float32)
    w[2] = 0
    for bits in (8, 4):
        q = quantize(w, bits, symmetric=symmetric)
        assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
        assert q.scale[2] == 1.0
        assert np.all(dequantize(q)[2] == 0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_matches_reference_on_large_tensor(bits: int, symmetric: bool) -> None:
    # 2100 rows x 1001 columns: many processing blocks, odd last dimension
    w = _rng().standard_normal((2100, 1001)).astype(np.float32)
    q = quantize(w, bits, symmetric=symmetric)
    if bits == 4 and symmetric:  # searched scales: the same as for the whole matrix at once
        whole = _search_scales(w, -7, 7, _ROW_DIVISORS, float16=False)
        np.testing.assert_array_equal(q.scale, whole)
        v = np.clip(np.rint(w / whole[:, None]), -7, 7)
        np.testing.assert_array_equal(_values(q), v)
    else:
        np.testing.assert_array_equal(_values(q), _reference(w, bits, symmetric, 0))
    if bits == 4:
        assert q.data.shape == (2100, 501) and q.data.dtype == np.uint8


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("bits", [8, 4])
def test_other_axes_and_ranks(axis: int, bits: int) -> None:
    w = _rng().standard_normal((3, 4, 5)).astype(np.float32)
    q = quantize(w, bits, symmetric=False, axis=axis)
    assert q.axis == axis % 3
    assert q.scale.shape == (w.shape[axis],)
    np.testing.assert_array_equal(_values(q), _reference(w, bits, False, axis % 3))
    err = np.abs(dequantize(q) - w)
    bshape = [1, 1, 1]
    bshape[axis % 3] = -1
    assert np.all(err <= q.scale.reshape(bshape) * 0.5001)


@pytest.mark.parametrize("bits", [8, 4])
def test_one_dimensional(bits: int) -> None:
    w = _rng().standard_normal(7).astype(np.float32)
    q = quantize(w, bits)
    assert q.scale.shape == (7,)
    assert np.all(np.abs(dequantize(q) - w) <= q.scale * 0.5001)


def test_float16_and_float64_inputs() -> None:
    w = _rng().standard_normal((5, 8))
    q64 = quantize(w, 8)
    q16 = quantize(w.astype(np.float16), 8)
    assert q64.scale.dtype == np.float32 and q16.scale.dtype == np.float32
    assert np.abs(dequantize(q16) - w).max() < 0.05


def test_rejects_nan_and_bad_bits() -> None:
    w = np.ones((2, 3), np.float32)
    w[1, 1] = np.nan
    with pytest.raises(LlmToolError, match="NaN"):
        quantize(w, 8)
    with pytest.raises(ValueError):
        quantize(np.ones((2, 3), np.float32), 3)
    with pytest.raises(ValueError):
        quantize(np.ones((2, 3), np.int32), 8)


def test_int4_layout_low_nibble_first() -> None:
    packed = pack_int4(np.array([1, -1, -8, 7, 3], np.int8))
    # element 0 in the low nibble; two's complement nibbles; odd count padded with 0
    assert packed.tolist() == [0xF1, 0x78, 0x03]
    np.testing.assert_array_equal(unpack_int4(packed, (5,)), [1, -1, -8, 7, 3])


@pytest.mark.parametrize("shape", [(16,), (3, 7), (2, 3, 4), (5, 1)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    v = _rng().integers(-8, 8, size=shape).astype(np.int8)
    p = pack_int4(v)
    assert p.dtype == np.uint8 and p.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    np.testing.assert_array_equal(unpack_int4(p, shape), v)
    np.testing.assert_array_equal(unpack_int4(p.reshape(-1), shape), v)  # flat input accepted
    with pytest.raises(ValueError):
        unpack_int4(p.reshape(-1)[:-1], shape)


# --------------------------------------------------------------------------------------------
# blockwise


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [32, 128])
def test_blockwise_scales_and_error(bits: int, block: int) -> None:
    w = _rng().standard_normal((40, 256)).astype(np.float32)
    w[3, :32] *= 50  # an outlier block must not spoil the rest of its row
    q = quantize(w, bits, block_size=block)
    assert q.block_size == block and q.scale.shape == (40, 256 // block)
    # scales are float16 values (how LiteRT stores them) and positive
    np.testing.assert_array_equal(q.scale.astype(np.float16).astype(np.float32), q.scale)
    assert np.all(q.scale > 0)
    values = _values(q).astype(np.int64)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert values.min() >= lo and values.max() <= hi
    blocks = values.reshape(40, -1, block)
    wb = w.reshape(40, -1, block)
    neg = -wb.min(-1) > wb.max(-1)
    err = np.abs(dequantize(q) - w).reshape(40, -1, block)
    step = q.scale[..., None]
    # each block uses its extreme level: -2^(bits-1) if its extreme is negative, else qmax
    assert np.all(np.where(neg, blocks.min(-1) == lo, blocks.max(-1) == hi))
    assert np.all(err <= step * 1.0 + 1e-6)
    assert np.mean(err <= step / 2 + 1e-6) > 0.95
    # the outlier block only: the rest of row 3 keeps a fine step
    assert q.scale[3, 0] > 10 * q.scale[3, 1:].max()


def test_blockwise_beats_per_channel_int4() -> None:
    w = _rng().standard_normal((64, 512)).astype(np.float32)
    w[:, ::97] *= 8  # scattered outliers, as trained weights have
    per_row = np.abs(dequantize(quantize(w, 4)) - w).mean()
    blocked = np.abs(dequantize(quantize(w, 4, block_size=32)) - w).mean()
    assert blocked < 0.7 * per_row


def test_blockwise_rejects_bad_shapes() -> None:
    w = np.ones((4, 688), np.float32)
    with pytest.raises(LlmToolError, match="does not divide the row length 688"):
        quantize(w, 4, block_size=32)
    with pytest.raises(LlmToolError, match="needs a matrix"):
        quantize(np.ones(64, np.float32), 4, block_size=32)
    with pytest.raises(ValueError, match="symmetric"):
        quantize(np.ones((4, 64), np.float32), 4, symmetric=False, block_size=32)
    zeros = quantize(np.zeros((2, 64), np.float32), 4, block_size=32)
    assert np.all(zeros.scale == 1) and np.all(dequantize(zeros) == 0)
