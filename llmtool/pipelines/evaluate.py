"""`llmtool evaluate`: perplexity of a converted model on a text, through the LiteRT runtime,
and, with a reference model, how far a quantized model's predictions are from it.

The text is tokenized once and cut into non-overlapping windows of `window` tokens (each
starting with BOS when the tokenizer adds one); every next-token prediction inside a window
counts. The same windows give comparable numbers for float and quantized files.

With `reference` (a float model file, or a Hugging Face folder run with transformers), both
models score the same token ids (the model's tokenization; whether the reference's tokenizer
agrees is reported), and the report adds mean and max KL(reference || model) of the
next-token distributions, top-1 agreement, and greedy agreement over 32 generated tokens.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.config import check_arguments
from llmtool.errors import LlmToolError
from llmtool.pipelines.quiet import quiet
from llmtool.pipelines.run import LlmInference
from llmtool.runtime.inference import LlmInferenceOptions

GREEDY_TOKENS = 32
GREEDY_PROMPT = 16  # tokens of the text (after BOS) that prompt the greedy comparison


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Scorer:
    """Next-token logits of token ids [n, vocab] and the text's ids, for one model."""

    name: str
    vocab_size: int

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError


class _LiteRtScorer(_Scorer):
    def __init__(self, model: str | None, window: int, num_threads: int | None):
        self.llm = LlmInference.create_from_options(
            LlmInferenceOptions(model_path=model, max_tokens=window, num_threads=num_threads)
        )
        self.name = str(self.llm.graph_path if model is None else model)
        self.tokenizer = self.llm.tokenizer

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.llm.logits(ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False)


class _TransformersScorer(_Scorer):
    """A Hugging Face folder run in float32 with transformers (the reference implementation)."""

    def __init__(self, folder: Path, num_threads: int | None):
        with quiet():
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        if num_threads:
            torch.set_num_threads(num_threads)
        self.torch = torch
        self.name = str(folder)
        try:
            with quiet():
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            self.model = model.eval()
        except (OSError, ValueError, KeyError) as exc:
            raise LlmToolError(f"transformers cannot load the reference ({exc})", folder) from None
        try:
            with quiet():
                self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise LlmToolError(f"transformers cannot load its tokenizer ({exc})", folder) from None

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(input_ids=self.torch.tensor([ids], dtype=self.torch.long))
        return out.logits[0].float().numpy()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _reference_scorer(reference: str, window: int, num_threads: int | None) -> _Scorer:
    path = Path(reference)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmToolError("a reference folder needs config.json (a Hugging Face model)", path)
        return _TransformersScorer(path, num_threads)
    if not path.is_file():
        raise LlmToolError("reference model not found", path)
    return _LiteRtScorer(reference, window, num_threads)


def _greedy(scorer: _Scorer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(scorer.logits(ids)[-1])))
    return ids[len(prompt) :]


def evaluate(
    model: str | os.PathLike[str] | None,
    text_file: str | os.PathLike[str],
    window: int = 256,
    max_windows: int | None = None,
    num_threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    reference: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    check_arguments(
        evaluate,
        model=model,
        text_file=text_file,
        window=window,
        max_windows=max_windows,
        num_threads=num_threads,
        progress=progress,
        reference=reference,
    )
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmToolError(f"cannot read text ({exc})", path) from None
    if window < 2:
        raise LlmToolError(f"window must be at least 2 tokens (got {window})")
    if max_windows is not None and max_windows < 1:
        raise LlmToolError(f"max windows must be at least 1 (got {max_windows})")
    cand = _LiteRtScorer(model, window, num_threads)
    ref = _reference_scorer(reference, window, num_threads) if reference else None
    tok = cand.tokenizer
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    ids = cand.encode(text)
    step = window - len(bos)
    windows = [bos + ids[i : i + step] for i in range(0, len(ids), step)]
    windows = [w for w in windows if len(w) >= 2]
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        raise LlmToolError("the text is too short to evaluate", path)
    total = len(windows) + (GREEDY_TOKENS if ref else 0)
    nll, ref_nll, count = 0.0, 0.0, 0
    kls: list[np.ndarray] = []
    top1: list[np.ndarray] = []
    start = time.perf_counter()
    for i, w in enumerate(windows):
        if progress:
            progress(i, total, f"window {i + 1}")
        logp = _log_softmax(cand.logits(w)[:-1])
        targets = np.asarray(w[1:])
        rows = np.arange(len(targets))
        nll -= float(logp[rows, targets].sum())
        count += len(targets)
        if ref is not None:
            ref_logits = ref.logits(w)[:-1]
            if ref_logits.shape[-1] != logp.shape[-1]:
                raise LlmToolError(
                    f"the reference predicts {ref_logits.shape[-1]} tokens, the model "
                    f"{logp.shape[-1]}: not the same vocabulary",
                    reference,
                )
            ref_logp = _log_softmax(ref_logits)
            ref_nll -= float(ref_logp[rows, targets].sum())
            kls.append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1))
            top1.append(ref_logp.argmax(-1) == logp.argmax(-1))
    result: dict[str, Any] = {
        "model": cand.name,
        "text": str(path),
        "windows": len(windows),
        "window": window,
        "tokens_scored": count,
        "mean_nll": round(nll / count, 5),
        "perplexity": round(math.exp(nll / count), 4),
    }
    if ref is not None:
        kl = np.maximum(np.concatenate(kls), 0.0)  # rounding can make a near-zero KL negative
        prompt = windows[0][: len(bos) + GREEDY_PROMPT]
        n = max(0, min(GREEDY_TOKENS, window - len(prompt)))
        if progress:
            progress(len(windows), total, "greedy generation")
        mine, theirs = _greedy(cand, prompt, n), _greedy(ref, prompt, n)
        ref_ids = ref.encode(text)
        same = ref_ids == ids
        first_diff = None
        if not same:
            first_diff = next(
                (i for i, (a, b) in enumerate(zip(ids, ref_ids, strict=False)) if a != b),
                min(len(ids), len(ref_ids)),
            )
        common = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), n)
        result["reference"] = {
            "model": ref.name,
            "perplexity": round(math.exp(ref_nll / count), 4),
            "mean_kl": float(f"{kl.mean():.6g}"),
            "max_kl": float(f"{kl.max():.6g}"),
            "top1_agreement": round(float(np.concatenate(top1).mean()), 5),
            "greedy_tokens": n,
            "greedy_agreement": round(float(np.mean(np.equal(mine, theirs))) if n else 1.0, 5),
            "greedy_common_prefix": common,
            "same_tokenization": same,
            "first_tokenization_difference": first_diff,
        }
    if progress:
        progress(total, total, "done")
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
