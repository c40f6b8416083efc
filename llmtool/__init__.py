"""llmtool: convert Hugging Face checkpoints to on-device TFLite artifacts and run them.

Python API, mirroring the reference LLM Inference API:

    from llmtool import LlmInference, LlmInferenceOptions
    llm = LlmInference.create_from_options(LlmInferenceOptions(model_path="model.bin"))
    print(llm.generate_response("Once upon a time"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LlmInference", "LlmInferenceOptions", "__version__"]

if TYPE_CHECKING:
    from llmtool.runtime.inference import LlmInference, LlmInferenceOptions


def __getattr__(name: str) -> Any:
    # Lazy, so that `import llmtool` (and the CLI's start-up) stays cheap.
    if name in ("LlmInference", "LlmInferenceOptions"):
        from llmtool.runtime import inference

        return getattr(inference, name)
    raise AttributeError(name)
