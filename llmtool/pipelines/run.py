"""`llmtool run` and the public Python API: open a model by name, then generate.

`LlmInference` is the reference LLM Inference API: `create_from_options(options)` resolves the
model file (a converted .bin, an exported .tflite, or the embedded default model) into a graph
through pipelines/resolve.py, then generates with the runtime's `InferenceSession`.
"""

from __future__ import annotations

from llmtool.pipelines.resolve import resolve_graph
from llmtool.runtime.inference import (
    DEFAULT_MAX_TOKENS,
    GenerationResult,
    InferenceSession,
    LlmInferenceOptions,
    ResultListener,
)


class LlmInference(InferenceSession):
    """Generate text with a converted model on the LiteRT interpreter."""

    @classmethod
    def create_from_options(cls, options: LlmInferenceOptions) -> LlmInference:
        options.validate()
        graph_path, tokenizer = resolve_graph(
            options.model_path, options.max_tokens or DEFAULT_MAX_TOKENS
        )
        return cls.from_graph(graph_path, tokenizer, options)  # type: ignore[return-value]

    @classmethod
    def create_from_model_file(cls, model_path: str) -> LlmInference:
        return cls.create_from_options(LlmInferenceOptions(model_path=model_path))


def run(
    options: LlmInferenceOptions, prompt: str, listener: ResultListener | None = None
) -> GenerationResult:
    """One generation (the body of `llmtool run`); the engine is released afterwards."""
    with LlmInference.create_from_options(options) as llm:
        return llm.generate(prompt, listener=listener)
