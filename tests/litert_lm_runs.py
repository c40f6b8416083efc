"""Google's LiteRT-LM engine as the tests run it: one greedy answer from a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest


def litert_lm_greedy(bundle_path: Path, prompt: str, new_tokens: int) -> str:
    """LiteRT-LM's greedy text for `prompt` (no chat template), at most `new_tokens` tokens."""
    litert_lm = pytest.importorskip("litert_lm")  # the test extra (linux x86_64)
    engine = litert_lm.Engine(
        str(bundle_path),
        backend=litert_lm.Backend.CPU(thread_count=1),
        cache_dir=":nocache",
        max_num_tokens=64,
    )
    session = engine.create_session(
        apply_prompt_template=False,
        sampler_config=litert_lm.SamplerConfig(top_k=1, temperature=0.0, seed=0),
        max_output_tokens=new_tokens,
    )
    session.run_prefill([prompt])
    text = session.run_decode().texts[0]
    return text.split("\x00")[0].rstrip("\ufffd")  # its C API returns NUL-terminated text
