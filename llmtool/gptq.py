"""Error-compensating rounding (GPTQ, Frantar et al. 2023) for int8 / int4 weights.

Rounding each weight to its nearest level (what `quantization.quantize` does) minimises each
weight's own error. What matters is a layer's output error `(W - Q) x` on the inputs x it
actually sees: with H = sum x x^T over calibration inputs, the error to minimise is
tr((W - Q) H (W - Q)^T). GPTQ quantizes the columns of W one at a time and spreads each
column's rounding error over the columns not yet quantized, in proportion to how the inputs
correlate (through the Cholesky factor of H^-1), so later roundings cancel earlier ones.

The scales and layouts are exactly those of `quantization.quantize` / `quantize_blockwise`
(the runtime cannot tell the difference): int8 and int4 rows keep the scales they would get
anyway, computed before rounding; int4 blocks take theirs when the rounding reaches the
block, from the block's weights as updated so far (`_weighted_block_scales` with the
columns' mean x^2 as importance, or absmax).

On a model whose inputs are far from isotropic the gain is large: on the ~457M benchmark
model (English text through a byte-level vocabulary) the held-out output error of a layer
falls about 30x, int8 and int4 alike (docs/BENCHMARKS.md). The calibration inputs come from
`FcInputs`: every fully-connected layer's input recorded while the float model runs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.formats.container import Container
from llmtool.quantization import (
    _ROW_DIVISORS,
    QuantizedTensor,
    _block_scales,
    _channel_minmax,
    _params,
    _qrange,
    _search_scales,
    _weighted_block_scales,
    check_block_size,
    pack_int4,
)
from llmtool.spec import ModelSpec

DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default)
_BATCH = 128  # columns per lazy update of the rest of the matrix


def importance_of(squares: np.ndarray) -> np.ndarray:
    """Per-column weights of the int4 block scale search from each column's sum (or mean)
    of x^2, such as H's diagonal: over their mean, plus 1 so no column counts for nothing."""
    d = np.asarray(squares, np.float32)
    level = float(d.mean()) if d.size else 0.0
    return ((d / level if level > 0 else np.zeros_like(d)) + np.float32(1)).astype(np.float32)


def quantize_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int = 0,
    weighted_blocks: bool = True,
) -> QuantizedTensor:
    """Quantize `w` [rows, columns] (symmetric; per row, or blockwise along rows) so that
    tr((W - Q) H (W - Q)^T) is small for `hessian` H [columns, columns] = sum x x^T, of
    which only the lower triangle (with the diagonal) is read.

    Columns are rounded from the last to the first: with L the Cholesky factor of H
    (H = L L^T) and M = L^-1, the error e of column c, divided by M[c, c], is taken off the
    columns c' < c in proportion to M[c, c']. That is GPTQ's update in reversed column
    order (its factor of H^-1 for the reversed order is M with rows and columns reversed),
    which needs no more than one factorisation and one triangular inverse, both in place."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"GPTQ quantizes matrices, not shape {list(w.shape)}")
    rows, cols = w.shape
    if np.shape(hessian) != (cols, cols):
        raise ValueError(f"hessian of shape {list(np.shape(hessian))} for {cols} columns")
    if block_size:
        problem = check_block_size(w.shape, block_size)
        if problem:
            raise ValueError(problem)
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        qmin, qmax = _qrange(bits, True)
    wt = np.array(w.T, np.float32, order="C")  # column c is row c: updated in place
    if not np.all(np.isfinite(wt)):
        raise LlmToolError("cannot quantize a tensor that contains NaN or infinity")
    importance = importance_of(np.diag(hessian)) if block_size and weighted_blocks else None
    m = _inverse_factor(hessian)
    qt = np.empty((cols, rows), np.int8)
    if block_size:
        scale = np.empty((rows, cols // block_size), np.float32)
        s = np.ones(rows, np.float32)
        batch = block_size * -(-_BATCH // block_size)  # whole blocks in every batch
    else:
        if bits == 8:  # the scales `quantization.quantize` gives
            scale, _ = _params(*_channel_minmax(w, 0), True, qmin, qmax)
        else:
            scale = _search_scales(np.array(w, np.float32), qmin, qmax, _ROW_DIVISORS, False)
        s = scale
        batch = _BATCH
    col = np.empty(rows, np.float32)
    for i1 in reversed(range(0, cols, batch)):
        i2 = min(i1 + batch, cols)
        mb = np.ascontiguousarray(m[i1:i2, i1:i2])
        err = np.empty((i2 - i1, rows), np.float32)
        for j in reversed(range(i2 - i1)):
            c = i1 + j
            if block_size and (c + 1) % block_size == 0:  # a block's last column: its scale
                blk = np.ascontiguousarray(wt[c + 1 - block_size : c + 1].T)[:, None, :]
                bs = _block_scales(blk, bits)
                if importance is not None:
                    imp = importance[c + 1 - block_size : c + 1][None, :]
                    bs = _weighted_block_scales(blk, imp, bs)
                s = np.ascontiguousarray(bs[:, 0])
                scale[:, c // block_size] = s
            np.divide(wt[c], s, out=col)
            np.rint(col, out=col)
            np.clip(col, qmin, qmax, out=col)
            qt[c] = col
            e = err[j]
            np.multiply(col, s, out=e)
            np.subtract(wt[c], e, out=e)
            e /= mb[j, j]
            if j:
                wt[i1 : i1 + j] -= mb[j, :j, None] * e[None, :]
        if i1:
            wt[:i1] -= m[i1:i2, :i1].T @ err
    values = np.ascontiguousarray(qt.T)
    return QuantizedTensor(
        data=values if bits == 8 else pack_int4(values),
        scale=np.asarray(scale, np.float32),
        zero_point=np.zeros(rows, np.int64),
        bits=bits,
        shape=(rows, cols),
        axis=0,
        block_size=block_size,
    )


def _inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """M = L^-1 (lower triangle; the upper one holds leftovers) for H + damping = L L^T,
    from H's lower triangle. Columns no calibration input reached get the mean diagonal and
    no correlation, so they are rounded to nearest and pass no error on."""
    from scipy.linalg import lapack

    n = len(hessian)
    idx = np.arange(n)
    diag = np.asarray(hessian, np.float32)[idx, idx]
    dead = ~(diag > 0)
    level = float(diag[~dead].mean()) if np.any(~dead) else 1.0
    diag = np.where(dead, np.float32(level), diag)
    factor = None
    for attempt in range(4):  # float32 rounding can leave H just short of positive definite
        h = factor = None  # free a failed attempt's copy before making the next
        h = np.array(hessian, np.float32, order="F")
        if np.any(dead):
            h[dead, :] = 0
            h[:, dead] = 0
        h[idx, idx] = diag + np.float32((1 + attempt) * DAMPING * level)
        factor, info = lapack.spotrf(h, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            break
    else:
        raise LlmToolError("calibration statistics are not positive definite")
    inverse, info = lapack.strtri(factor, lower=1, overwrite_c=1)
    if info != 0:
        raise LlmToolError("calibration statistics are singular")
    return inverse


class FcInputs:
    """Every fully-connected layer's input over calibration sequences, recorded on disk
    (float32, [tokens, columns] per input) by running the float model once; keyed by the
    weight names that share the input (q, k, v; gate, up)."""

    def __init__(
        self, folder: Path, shapes: dict[tuple[str, ...], int], rows: int, targets: set[str]
    ):
        self.rows = rows
        self.keys = {name: key for key in shapes for name in key if name in targets}
        self._arrays = {
            key: np.lib.format.open_memmap(
                folder / f"x{i}.npy", mode="w+", dtype=np.float32, shape=(rows, k)
            )
            for i, (key, k) in enumerate(shapes.items())
        }
        self._filled = 0
        self._cached: tuple[tuple[str, ...], np.ndarray] | None = None

    def add(self, inputs: dict[tuple[str, ...], np.ndarray]) -> None:
        """One sequence's inputs ([n, columns] each, n the sequence's tokens)."""
        n = len(next(iter(inputs.values())))
        for key, x in inputs.items():
            self._arrays[key][self._filled : self._filled + n] = x
        self._filled += n

    def hessian(self, name: str) -> np.ndarray:
        """sum x x^T [columns, columns] (float32, lower triangle only) of the weight `name`'s
        input; the last one is kept, as q, k and v (and gate, up) come one after another."""
        from scipy.linalg import blas

        key = self.keys[name]
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._cached = None
        x = self._arrays[key]
        h = np.zeros((x.shape[1], x.shape[1]), np.float32, order="F")
        for r in range(0, self._filled, 1024):
            chunk = np.array(x[r : min(r + 1024, self._filled)])
            h = blas.ssyrk(1.0, chunk.T, beta=1.0, c=h, trans=0, lower=1, overwrite_c=1)
        self._cached = (key, h)
        return h

    def __contains__(self, name: str) -> bool:
        return name in self.keys


@contextmanager
def recorded_inputs(
    c: Container, spec: ModelSpec, sequences: list[list[int]], work_dir: Path, targets: set[str]
) -> Iterator[FcInputs]:
    """Run the float container `c` on `sequences` and record the inputs of the FC layers
    whose weights include one of `targets`, in a temporary folder in `work_dir` that is
    deleted on exit."""
    from llmtool import smoothing

    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".llmtool-gptq-") as tmp:
        holder: dict[str, FcInputs] = {}

        def start(shapes: dict[tuple[str, ...], int], rows: int) -> set[tuple[str, ...]]:
            keep = {k: n for k, n in shapes.items() if set(k) & targets}
            holder["x"] = FcInputs(Path(tmp), keep, rows, targets)
            return set(keep)

        smoothing.run_probe(c, spec, sequences, work_dir, start, lambda x: holder["x"].add(x))
        yield holder["x"]
