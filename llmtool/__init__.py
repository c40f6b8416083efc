"""llmtool: convert Hugging Face checkpoints to on-device TFLite artifacts and run them.

Python API, mirroring the reference LLM Inference API:

    from llmtool import LlmInference, LlmInferenceOptions
    llm = LlmInference.create_from_options(LlmInferenceOptions(model_path="model.bin"))
    print(llm.generate_response("Once upon a time"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtool._version import __version__

__all__ = ["LlmInference", "LlmInferenceOptions", "__version__"]

if TYPE_CHECKING:
    from llmtool.pipelines.run import LlmInference
    from llmtool.runtime.inference import LlmInferenceOptions


def __getattr__(name: str) -> Any:
    # Lazy, so that `import llmtool` (and the CLI's start-up) stays cheap.
    if name == "LlmInference":
        from llmtool.pipelines.run import LlmInference

        return LlmInference
    if name == "LlmInferenceOptions":
        from llmtool.runtime.inference import LlmInferenceOptions

        return LlmInferenceOptions
    raise AttributeError(name)
