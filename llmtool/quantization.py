"""Per-channel and blockwise int8 / int4 weight quantization, dequantization and int4 packing.

Layouts follow TFLite: int8 values are stored as they are; int4 values are signed
two's-complement nibbles packed two per byte along the last axis, low nibble first
(element 2i in the low nibble of byte i), an odd last dimension padded with a zero nibble.
Dequantization is `(q - zero_point) * scale` per channel along `axis`.

Blockwise (`block_size` > 0, axis 0, symmetric): each row is cut into blocks of `block_size`
consecutive values along the last axis, each with its own scale (llama.cpp's Q4_0 / Q8_0 use
blocks of 32). Scales are rounded to float16 before the values are, because that is how LiteRT
stores them (XNNPACK's blockwise fully-connected kernels); `scale` is then float32
[rows, columns // block_size] holding float16-exact values.

int4 block scales are absmax (Q4_0's), unless the caller knows how large each input column's
activations are (`importance`, mean x^2 per column from running the float model): then each
block takes the candidate scale max|w| / d with the smallest activation-weighted squared
error, the layer output's expected error (llama.cpp's imatrix idea; `_weighted_block_scales`).

int4 row scales are searched per channel: absmax (max|w| / 7) spends a level on one outlier, so
each row takes the values of the candidate scale `max|w| / d`, for a small grid of divisors d,
with the smallest weighted squared error (as llama.cpp's make_qx_quants searches), and then the
scale that leaves the error uncorrelated with the weights (`_search_scales`). Blocks keep
absmax scales (Q4_0's): the same search lowered KL on the trained default model but raised it
on SmolLM2-135M and on a random 457M model (docs/BENCHMARKS.md). int8 keeps absmax scales.

Large tensors are processed in row blocks, so the peak extra memory is the output plus a
few megabytes, never a float copy of the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmtool.errors import LlmToolError

_BLOCK_ELEMENTS = 1 << 16  # elements per block: 256 KiB of float32 stays in cache
# Divisors d tried for int4 row scales max|w| / d (7 is absmax for [-7, 7]).
# Finer grids gain under 1% of the error for twice the time.
_ROW_DIVISORS = (7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0)
# Divisors d tried for activation-weighted int4 block scales max|w| / d. Steps of 1/8: a
# grid of 1/4 leaves 1% more error on Gaussian weights.
_BLOCK_DIVISORS = tuple(6.0 + 0.125 * i for i in range(25))


@dataclass
class QuantizedTensor:
    """A quantized tensor: values, per-channel scale and zero point along `axis`."""

    data: np.ndarray  # int8 of shape `shape` (bits=8) or uint8 packed (*shape[:-1], ceil(n/2))
    scale: np.ndarray  # float32 [shape[axis]]
    zero_point: np.ndarray  # int64 [shape[axis]] (all 0 when symmetric)
    bits: int  # 8 or 4
    shape: tuple[int, ...]  # logical shape
    axis: int = 0
    block_size: int = 0  # > 0: scale is [shape[0], shape[-1] // block_size], zero points 0

    @property
    def symmetric(self) -> bool:
        return not np.any(self.zero_point)

    @property
    def blockwise(self) -> bool:
        return self.block_size > 0


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if bits == 8:
        return (-127, 127) if symmetric else (-128, 127)
    if bits == 4:
        return (-7, 7) if symmetric else (-8, 7)
    raise ValueError(f"unsupported number of bits {bits} (use 8 or 4)")


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the packed int4 bytes of a tensor of logical shape `shape`."""
    if not shape:
        return (1,)
    return (*shape[:-1], (shape[-1] + 1) // 2)


def _channel_minmax(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    other = tuple(i for i in range(w.ndim) if i != axis)
    if w.size == 0:
        n = w.shape[axis]
        return np.zeros(n, np.float32), np.zeros(n, np.float32)
    lo = np.min(w, axis=other).astype(np.float32)
    hi = np.max(w, axis=other).astype(np.float32)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise LlmToolError("cannot quantize a tensor that contains NaN or infinity")
    return lo, hi


def _params(
    lo: np.ndarray, hi: np.ndarray, symmetric: bool, qmin: int, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale float32, zero point int64) from channel minima and maxima."""
    if symmetric:
        scale = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(qmax)
        scale[scale == 0] = 1.0
        return scale.astype(np.float32), np.zeros(scale.shape, np.int64)
    lo = np.minimum(lo, 0)
    hi = np.maximum(hi, 0)
    scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
    scale[scale == 0] = 1.0
    zero_point = np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)
    return scale, zero_point


def quantize(
    w: np.ndarray,
    bits: int,
    symmetric: bool = True,
    axis: int = 0,
    block_size: int = 0,
    importance: np.ndarray | None = None,
) -> QuantizedTensor:
    """Quantize per channel along `axis` (the output channel: 0 for [out, in] and [vocab, dim]).

    Symmetric: scale = max|w| / qmax, zero point 0, values in [-qmax, qmax] (qmax 127 or 7).
    Asymmetric: the channel range [min(w, 0), max(w, 0)] maps onto the full signed range
    ([-128, 127] or [-8, 7]) with a per-channel zero point inside that range.
    An all-zero channel gets scale 1. `block_size` > 0: see `quantize_blockwise`.
    """
    if block_size:
        if not symmetric or axis % max(np.ndim(w), 1) != 0:
            raise ValueError("blockwise quantization is symmetric, along rows (axis 0)")
        return quantize_blockwise(w, bits, block_size, importance)
    w = np.asarray(w)
    if w.ndim == 0:
        raise ValueError("cannot quantize a scalar per channel")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize expects a float array, got {w.dtype}")
    axis = axis % w.ndim
    qmin, qmax = _qrange(bits, symmetric)
    shape = tuple(int(s) for s in w.shape)
    out = np.empty(shape if bits == 8 else packed_shape(shape), np.int8 if bits == 8 else np.uint8)
    bshape = [1] * w.ndim
    bshape[axis] = -1
    if axis != 0:  # channels span every row block: reduce over the whole tensor first
        scale, zero_point = _params(*_channel_minmax(w, axis), symmetric, qmin, qmax)
    else:  # each row block holds whole channels: one pass over memory
        scale = np.empty(shape[0], np.float32)
        zero_point = np.empty(shape[0], np.int64)

    if w.ndim == 1:
        blocks = [slice(0, shape[0])]
    else:
        row = max(1, int(np.prod(shape[1:])))
        step = max(1, _BLOCK_ELEMENTS // row)
        blocks = [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]
    for rows in blocks:
        chunk = w[rows]
        if axis == 0:
            s, z = _params(*_channel_minmax(chunk, 0), symmetric, qmin, qmax)
            if bits == 4 and symmetric and chunk.size:
                flat = chunk.reshape(len(chunk), -1).astype(np.float32, copy=False)
                s = _search_scales(flat, qmin, qmax, _ROW_DIVISORS, float16=False)
            scale[rows], zero_point[rows] = s, z
        else:
            s, z = scale, zero_point
        tmp = np.empty(chunk.shape, np.float32)
        np.divide(chunk, s.reshape(bshape), out=tmp, casting="unsafe")
        np.rint(tmp, out=tmp)
        if not symmetric:
            tmp += z.astype(np.float32).reshape(bshape)
        np.clip(tmp, qmin, qmax, out=tmp)
        if bits == 8:
            out[rows] = tmp
        else:
            out[rows] = pack_int4(tmp.astype(np.int8))
    return QuantizedTensor(
        data=out, scale=scale, zero_point=zero_point, bits=bits, shape=shape, axis=axis
    )


def check_block_size(shape: tuple[int, ...], block_size: int) -> str | None:
    """Why a tensor of this shape cannot be cut into blocks of `block_size` (None if it can)."""
    if block_size < 2 or block_size % 2:
        return f"block size must be an even number of at least 2 (got {block_size})"
    if len(shape) != 2:
        return f"blockwise quantization needs a matrix, not shape {list(shape)}"
    if shape[1] % block_size:
        return f"block size {block_size} does not divide the row length {shape[1]}"
    return None


def _round_scale(scale: np.ndarray, float16: bool) -> np.ndarray:
    """Positive scales as stored: float16-exact (as float32, at least the smallest float16
    subnormal) when `float16`, else float32 of at least the smallest normal float32."""
    if not float16:
        return np.maximum(scale, np.float32(np.finfo(np.float32).tiny))
    scale = np.minimum(scale, np.float32(np.finfo(np.float16).max))
    scale = scale.astype(np.float16).astype(np.float32)
    return np.maximum(scale, np.float32(np.finfo(np.float16).smallest_subnormal))


def _search_scales(
    x: np.ndarray, qmin: int, qmax: int, divisors: tuple[float, ...], float16: bool
) -> np.ndarray:
    """One scale per row of `x` [n, k] (float32): the values q = clip(rint(x / s), qmin, qmax)
    of the candidate s = max|x| / d (d in `divisors`) with the smallest weighted squared error
    sum(w (x - s q)^2), then the scale sum(x x) / sum(x q) for those values.

    The weights w = |x| + mean|x| (as llama.cpp's k-quants weigh errors) keep the largest
    values of a row precise: with plain squared error one scale per row clipped them and lost
    more than absmax did (trained default model). The final scale makes the error
    uncorrelated with the weights (sum(x (x - s q)) = 0), so a layer's output is not shrunk:
    the least-squares scale shrinks it and, on a random 457M model, raised KL by a fifth.
    Ties keep the earlier candidate (deterministic). An all-zero row gets scale 1.
    """
    ax = np.abs(x)
    amax = ax.max(axis=1)
    if not np.all(np.isfinite(amax)):
        raise LlmToolError("cannot quantize a tensor that contains NaN or infinity")
    w = ax
    w += (np.einsum("ij->i", ax) / np.float32(x.shape[1]))[:, None]
    wx = w * x
    x2 = np.einsum("ij,ij->i", wx, x)
    best = np.ones(len(x), np.float32)
    best_err = np.full(len(x), np.inf, np.float32)
    q = np.empty_like(x)
    for d in divisors:
        s = _round_scale(amax / np.float32(d), float16)
        np.multiply(x, (1 / s)[:, None], out=q)  # the final rounding divides; ties may differ
        np.clip(q, qmin, qmax, out=q)
        np.rint(q, out=q)
        sxq = np.einsum("ij,ij->i", wx, q)
        sqq = np.einsum("ij,ij,ij->i", w, q, q)  # one pass: half the time of w * q first
        err = x2 - 2 * s * sxq + s * s * sqq
        better = err < best_err
        best_err[better] = err[better]
        best[better] = s[better]
    np.multiply(x, (1 / best)[:, None], out=q)
    np.clip(q, qmin, qmax, out=q)
    np.rint(q, out=q)
    sxq = np.einsum("ij,ij->i", x, q)
    gain = _round_scale(np.einsum("ij,ij->i", x, x) / np.maximum(sxq, np.float32(1e-30)), float16)
    best = np.where(sxq > 0, gain, best)
    best[amax == 0] = 1.0
    return best


def _block_scales(blocks: np.ndarray, bits: int) -> np.ndarray:
    """float16-exact positive scales (as float32) for blocks [..., block].

    Values range over [-2^(bits-1), 2^(bits-1) - 1] like llama.cpp's Q4_0 (one more level for
    negative values). int8: absmax (a block whose largest magnitude is negative maps it to
    -128, otherwise to 127), int4 likewise (-8 or 7), as Q4_0 does.
    """
    qmax = (1 << (bits - 1)) - 1
    hi = blocks.max(axis=-1)
    lo = blocks.min(axis=-1)
    if not (np.all(np.isfinite(hi)) and np.all(np.isfinite(lo))):
        raise LlmToolError("cannot quantize a tensor that contains NaN or infinity")
    neg = -lo > hi
    amax = np.where(neg, -lo, hi)
    scale = amax / np.where(neg, np.float32(qmax + 1), np.float32(qmax))
    return _block_scale_as_stored(scale, amax)


def _block_scale_as_stored(scale: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """Block scales as LiteRT stores them: float16-exact (as float32), positive (1 for an
    all-zero block, else at least the smallest float16 subnormal)."""
    scale = np.minimum(scale, np.float32(np.finfo(np.float16).max))
    scale = scale.astype(np.float16).astype(np.float32)
    tiny = np.float32(np.finfo(np.float16).smallest_subnormal)
    small = scale < tiny
    scale[small] = np.where(amax[small] > 0, tiny, np.float32(1.0))
    return scale


def _weighted_block_scales(
    blocks: np.ndarray, importance: np.ndarray, absmax: np.ndarray
) -> np.ndarray:
    """int4 block scales [rows, nb] for blocks [rows, nb, block] with column weights
    importance [nb, block]: of absmax and the candidates max|w| / d (d in _BLOCK_DIVISORS),
    the values of the one with the smallest sum(importance * (w - s q)^2), then rescaled so
    that their error is uncorrelated with the weights (below), kept only where that still
    beats absmax. Ties keep the earlier candidate (absmax first), so the result is
    deterministic.

    Q4_0's signed scale puts its extra level (-8) on the side of a block's largest weight;
    LiteRT's positive block scales get it only when that weight is negative, and plain
    squared error (the same search unweighted) raised KL on SmolLM2-135M: the weights that
    meet large activations are the ones to keep exact."""
    amax = np.abs(blocks).max(axis=-1)
    best = absmax.copy()
    buf = np.empty_like(blocks)

    def error(s: np.ndarray) -> np.ndarray:
        np.divide(blocks, s[..., None], out=buf)
        np.rint(buf, out=buf)
        np.clip(buf, -8, 7, out=buf)
        np.multiply(buf, s[..., None], out=buf)
        np.subtract(buf, blocks, out=buf)
        np.multiply(buf, buf, out=buf)
        return np.einsum("rbi,bi->rb", buf, importance)

    best_err = error(best)
    absmax_err = best_err.copy()
    for d in _BLOCK_DIVISORS:
        s = _block_scale_as_stored(amax / np.float32(d), amax)
        err = error(s)
        better = err < best_err
        best_err[better] = err[better]
        best[better] = s[better]
    # The search's clipping shrinks blocks' outputs; a shrink repeated in every layer adds
    # up instead of averaging out (on a random 457M model it doubled KL's excess over Q4_0).
    # So the chosen values get the scale that leaves their error uncorrelated with the
    # weights, in the same activation weighting: sum(a w (w - s q)) = 0.
    np.divide(blocks, best[..., None], out=buf)
    np.rint(buf, out=buf)
    np.clip(buf, -8, 7, out=buf)
    aw = blocks * importance
    num = np.einsum("rbi,rbi->rb", aw, blocks)
    den = np.einsum("rbi,rbi->rb", aw, buf)
    fair = _block_scale_as_stored(np.divide(num, den, out=best.copy(), where=den > 0), amax)
    # ... unless that leaves the block worse than absmax (itself unbiased) by the weighted error
    return np.where(error(fair) <= absmax_err, fair, absmax)


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None
) -> QuantizedTensor:
    """Symmetric quantization of a matrix with one float16 scale per `block_size` values of
    a row; values lie in [-2^(bits-1), 2^(bits-1) - 1]. `importance` (int4, one positive
    weight per column): scales searched for the least importance-weighted error."""
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize expects a float array, got {w.dtype}")
    shape = tuple(int(s) for s in w.shape)
    problem = check_block_size(shape, block_size)
    if problem:
        raise LlmToolError(problem)
    _qrange(bits, True)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    rows, cols = shape
    if importance is not None:
        importance = np.asarray(importance, np.float32).reshape(cols // block_size, block_size)
        if bits != 4 or not np.all(np.isfinite(importance)) or np.any(importance < 0):
            raise ValueError("importance: int4 only, one finite weight >= 0 per column")
    blocks = w.reshape(rows, cols // block_size, block_size)
    out = np.empty(shape if bits == 8 else packed_shape(shape), np.int8 if bits == 8 else np.uint8)
    scale = np.empty((rows, cols // block_size), np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    for r in range(0, rows, step):
        chunk = blocks[r : r + step].astype(np.float32)
        s = _block_scales(chunk, bits)
        if importance is not None:
            s = _weighted_block_scales(chunk, importance, s)
        q = np.rint(chunk / s[..., None])
        np.clip(q, qmin, qmax, out=q)
        q = q.astype(np.int8).reshape(len(chunk), cols)
        out[r : r + step] = q if bits == 8 else pack_int4(q)
        scale[r : r + step] = s
    return QuantizedTensor(
        data=out,
        scale=scale,
        zero_point=np.zeros(rows, np.int64),
        bits=bits,
        shape=shape,
        axis=0,
        block_size=block_size,
    )


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """float32 values `(q - zero_point) * scale`."""
    if q.block_size:
        values = (
            np.asarray(q.data).reshape(q.shape) if q.bits == 8 else unpack_int4(q.data, q.shape)
        )
        rows, cols = q.shape
        blocks = values.reshape(rows, cols // q.block_size, q.block_size).astype(np.float32)
        blocks *= np.asarray(q.scale, np.float32).reshape(rows, -1, 1)
        return blocks.reshape(q.shape)
    if q.bits == 8:
        values = np.asarray(q.data).reshape(q.shape)
    elif q.bits == 4:
        values = unpack_int4(q.data, q.shape)
    else:
        raise ValueError(f"unsupported number of bits {q.bits}")
    out = values.astype(np.float32)
    if not q.shape:
        return out
    bshape = [1] * len(q.shape)
    bshape[q.axis] = -1
    if np.any(q.zero_point):
        out -= np.asarray(q.zero_point, np.float32).reshape(bshape)
    out *= np.asarray(q.scale, np.float32).reshape(bshape)
    return out


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack int4 values (any integer dtype, range [-8, 7]) two per byte along the last axis."""
    v = np.asarray(values)
    if v.ndim == 0:
        v = v.reshape(1)
    n = v.shape[-1]
    nib = v.astype(np.uint8) & np.uint8(0x0F)
    out = nib[..., 0::2].copy()
    hi = nib[..., 1::2]
    out[..., : hi.shape[-1]] |= hi << np.uint8(4)
    assert out.shape[-1] == (n + 1) // 2
    return out


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """Signed int8 values of logical `shape` from bytes packed by `pack_int4`."""
    shape = tuple(int(s) for s in shape)
    pshape = packed_shape(shape)
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        p = p.view(np.uint8)
    if p.shape != pshape:
        if p.size != int(np.prod(pshape)):
            raise ValueError(f"{p.size} packed bytes do not hold an int4 tensor of shape {shape}")
        p = p.reshape(pshape)
    out = np.empty((*pshape[:-1], 2 * pshape[-1]), np.int8)
    lo = (p & np.uint8(0x0F)).view(np.int8)
    hi = (p >> np.uint8(4)).view(np.int8)
    # sign-extend 4-bit two's complement: (x ^ 8) - 8
    out[..., 0::2] = (lo ^ np.int8(8)) - np.int8(8)
    out[..., 1::2] = (hi ^ np.int8(8)) - np.int8(8)
    if not shape:
        return out[..., 0].reshape(())
    return out[..., : shape[-1]]
