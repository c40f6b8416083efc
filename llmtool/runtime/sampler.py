"""Next-token choice: greedy, or top-k with temperature from a seeded generator."""

from __future__ import annotations

import functools

import numpy as np

from llmtool.errors import LlmToolError


def validate_sampling(top_k: int, temperature: float) -> None:
    """The one check of sampling options (LlmInferenceOptions and Sampler both use it)."""
    if top_k < 1:
        raise LlmToolError(f"top-k must be at least 1 (got {top_k})")
    if not (temperature >= 0) or not np.isfinite(temperature):
        raise LlmToolError(f"temperature must be a finite number >= 0 (got {temperature})")


class Sampler:
    """Same seed + same logits sequence -> same tokens, on every run and machine."""

    def __init__(self, top_k: int = 40, temperature: float = 0.8, seed: int = 0):
        validate_sampling(top_k, temperature)
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self.seed = int(seed) & (2**63 - 1)

    @functools.cached_property
    def rng(self) -> np.random.Generator:
        """The generator, made on the first draw: greedy decoding never imports numpy.random."""
        return np.random.Generator(np.random.PCG64(self.seed))

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.greedy:
            return int(np.argmax(logits))
        k = min(self.top_k, logits.size)
        top = np.argpartition(-logits, k - 1)[:k]
        # Order by (logit desc, id asc) so ties never depend on argpartition's internals.
        top = top[np.lexsort((top, -logits[top]))]
        # Shift first, so a tiny temperature gives -inf (probability 0), never inf - inf = NaN.
        with np.errstate(over="ignore", under="ignore"):
            z = (logits[top] - logits[top].max()) / self.temperature
            p = np.exp(z)
        p /= p.sum()
        choice = int(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"))
        return int(top[min(choice, k - 1)])
