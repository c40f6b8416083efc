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
from typing import TYPE_CHECKING

import numpy as np

from llmtool.formats.container import Container
from llmtool.quantization import (
    _ROW_DIVISORS,
    QuantizedTensor,
    _block_scales,
    _qrange,
    _search_scales,
    _weighted_block_scales,
    check_block_size,
    pack_int4,
)
from llmtool.spec import ModelSpec

if TYPE_CHECKING:  # imported when used: the run path never loads torch
    import torch

DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default)
_BATCH = 128  # columns per lazy update of the rest of the matrix


def importance_of(h_diag: np.ndarray) -> np.ndarray:
    """Per-column weights of the int4 block scale search from H's diagonal (sum x^2): the
    mean square over its mean, plus 1 so no column counts for nothing."""
    d = np.asarray(h_diag, np.float64)
    level = float(d.mean()) if d.size else 0.0
    return ((d / level if level > 0 else np.zeros_like(d)) + 1).astype(np.float32)


def quantize_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int = 0,
    weighted_blocks: bool = True,
) -> QuantizedTensor:
    """Quantize `w` [rows, columns] (symmetric; per row, or blockwise along rows) so that
    tr((W - Q) H (W - Q)^T) is small for `hessian` H [columns, columns] = sum x x^T."""
    import torch

    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"GPTQ quantizes matrices, not shape {list(w.shape)}")
    rows, cols = w.shape
    h = torch.from_numpy(np.array(hessian, np.float32, copy=True))
    if tuple(h.shape) != (cols, cols):
        raise ValueError(f"hessian of shape {list(h.shape)} for a matrix of {cols} columns")
    if block_size and check_block_size(w.shape, block_size):
        raise ValueError(check_block_size(w.shape, block_size))
    if block_size:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        qmin, qmax = _qrange(bits, True)
    importance = importance_of(np.diag(hessian)) if block_size and weighted_blocks else None
    u = _inverse_factor(h)
    W = torch.from_numpy(w.copy())
    Q = torch.empty((rows, cols), dtype=torch.int8)
    if block_size:
        scale = np.empty((rows, cols // block_size), np.float32)
        s = None
    else:
        if bits == 8:
            scale = np.abs(w).max(axis=1) / np.float32(qmax)
            scale[scale == 0] = 1.0
            scale = scale.astype(np.float32)
        else:
            scale = _search_scales(w.copy(), qmin, qmax, _ROW_DIVISORS, float16=False)
        s = torch.from_numpy(scale)
    for i1 in range(0, cols, _BATCH):
        i2 = min(i1 + _BATCH, cols)
        w1 = W[:, i1:i2].clone()
        err = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            if block_size and c % block_size == 0:
                b = c // block_size
                # the block's weights as updated so far (the batch holds whole blocks)
                blk = w1[:, j : j + block_size].numpy()[:, None, :]
                bs = _block_scales(blk, bits)
                if importance is not None:
                    imp = importance[c : c + block_size][None, :]
                    bs = _weighted_block_scales(blk, imp, bs)
                scale[:, b] = bs[:, 0]
                s = torch.from_numpy(np.ascontiguousarray(bs[:, 0]))
            col = w1[:, j]
            q = torch.clamp(torch.round(col / s), qmin, qmax)
            Q[:, c] = q.to(torch.int8)
            e = (col - q * s) / u1[j, j]
            w1[:, j + 1 :] -= e[:, None] * u1[j, j + 1 :][None, :]
            err[:, j] = e
        W[:, i2:] -= err @ u[i1:i2, i2:]
    values = Q.numpy()
    data = values if bits == 8 else pack_int4(values)
    return QuantizedTensor(
        data=data,
        scale=np.asarray(scale, np.float32),
        zero_point=np.zeros(rows, np.int64),
        bits=bits,
        shape=(rows, cols),
        axis=0,
        block_size=block_size,
    )


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1 (U^T U = H^-1). Columns no calibration
    input reached get the mean diagonal and no correlation, so they are rounded to nearest
    and take no other column's error.

    With J the exchange matrix (J A J reverses A's rows and columns) and L the lower
    Cholesky factor of J H J, U = J L^-1 J: one factorisation and one triangular inverse,
    2n^3/3 operations where factor, invert and factor again take 5n^3/3."""
    import torch

    diag = torch.diagonal(h)
    dead = diag <= 0
    live = diag[~dead]
    level = float(live.mean()) if live.numel() else 1.0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = level
    diag += DAMPING * level
    h = torch.flip(h, (0, 1))
    for _ in range(4):  # float32 rounding can leave H just short of positive definite
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        torch.diagonal(h).add_(DAMPING * level)
    else:
        raise ValueError("calibration statistics are not positive definite")
    eye = torch.eye(len(h), dtype=h.dtype)
    return torch.flip(torch.linalg.solve_triangular(factor, eye, upper=False), (0, 1))


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
        """sum x x^T [columns, columns] (float32) of the weight `name`'s input; the last one
        is kept, as q, k and v (and gate, up) come one after another."""
        import torch

        key = self.keys[name]
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        x = self._arrays[key]
        h = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float32)
        for r in range(0, self._filled, 1024):
            chunk = torch.from_numpy(np.array(x[r : min(r + 1024, self._filled)]))
            h.addmm_(chunk.T, chunk)
        self._cached = (key, h.numpy())
        return self._cached[1]

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
