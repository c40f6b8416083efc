"""`llmtool run` and the public Python API: open a model by name, then generate.

`LlmInference` is the reference LLM Inference API: `create_from_options(options)` resolves the
model file (a converted .bin, an exported .tflite, or the embedded default model) into a graph
through pipelines/resolve.py, then generates with the runtime's `InferenceSession`.
"""

from __future__ import annotations

from pathlib import Path

from llmtool.errors import LlmToolError
from llmtool.pipelines.resolve import PromptTemplate, bundle_kind, resolve_bundle, resolve_graph
from llmtool.runtime.inference import (
    DEFAULT_MAX_TOKENS,
    GenerationResult,
    InferenceSession,
    LlmInferenceOptions,
    Prompt,
    ResultListener,
)


class LlmInference(InferenceSession):
    """Generate text with a converted model on the LiteRT interpreter."""

    template: PromptTemplate | None = None  # a bundle's prompt template, applied to prompts

    @classmethod
    def create_from_options(cls, options: LlmInferenceOptions) -> LlmInference:
        options.validate()
        path = options.model_path
        if path is not None and Path(path).is_file() and bundle_kind(Path(path)):
            graph_path, tokenizer, template = resolve_bundle(path)
            llm = cls.from_graph(graph_path, tokenizer, options)
            llm.template = template  # type: ignore[attr-defined]
            return llm  # type: ignore[return-value]
        graph_path, tokenizer = resolve_graph(path, options.max_tokens or DEFAULT_MAX_TOKENS)
        return cls.from_graph(graph_path, tokenizer, options)  # type: ignore[return-value]

    def prompt_ids(
        self, prompt: Prompt, chat: bool = False, system: str | None = None
    ) -> tuple[list[int], int]:
        if self.template is not None and isinstance(prompt, str):
            # A bundle's prompt template is its chat template, as fixed text.
            if system is not None:
                raise LlmToolError("a bundle's prompt template fixes the system prompt")
            t = self.template
            ids = self.tokenizer.encode(t.apply(prompt))
            # A framed prompt is never cut: the frame's head would go.
            return self.fit_prompt(ids, whole=bool(t.session_prefix or t.prompt_prefix))
        return super().prompt_ids(prompt, chat, system)

    @classmethod
    def create_from_model_file(cls, model_path: str) -> LlmInference:
        return cls.create_from_options(LlmInferenceOptions(model_path=model_path))


def run(
    options: LlmInferenceOptions,
    prompt: str,
    listener: ResultListener | None = None,
    chat: bool = False,
    system: str | None = None,
) -> GenerationResult:
    """One generation (the body of `llmtool run`); the engine is released afterwards."""
    with LlmInference.create_from_options(options) as llm:
        return llm.generate(prompt, listener=listener, chat=chat, system=system)
