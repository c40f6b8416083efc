"""`llmtool evaluate`: perplexity of a converted model on a text, through the LiteRT runtime.

The text is tokenized once and cut into non-overlapping windows of `window` tokens (each
starting with BOS when the tokenizer adds one); every next-token prediction inside a window
counts. The same windows give comparable numbers for float and quantized files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.pipelines.run import LlmInference
from llmtool.runtime.inference import LlmInferenceOptions


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate(
    model: str | None,
    text_file: str | Path,
    window: int = 256,
    max_windows: int | None = None,
    num_threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmToolError(f"cannot read text ({exc})", path) from None
    if window < 2:
        raise LlmToolError(f"window must be at least 2 tokens (got {window})")
    llm = LlmInference.create_from_options(
        LlmInferenceOptions(model_path=model, max_tokens=window, num_threads=num_threads)
    )
    tok = llm.tokenizer
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    ids = tok.encode(text, add_bos=False)
    step = window - len(bos)
    windows = [bos + ids[i : i + step] for i in range(0, len(ids), step)]
    windows = [w for w in windows if len(w) >= 2]
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        raise LlmToolError("the text is too short to evaluate", path)
    nll, count = 0.0, 0
    start = time.perf_counter()
    for i, w in enumerate(windows):
        if progress:
            progress(i, len(windows), f"window {i + 1}")
        logp = _log_softmax(llm.logits(w)[:-1])
        targets = np.asarray(w[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    if progress:
        progress(len(windows), len(windows), "done")
    return {
        "model": str(llm.graph_path if model is None else model),
        "text": str(path),
        "windows": len(windows),
        "window": window,
        "tokens_scored": count,
        "mean_nll": round(nll / count, 5),
        "perplexity": round(math.exp(nll / count), 4),
        "seconds": round(time.perf_counter() - start, 2),
    }
