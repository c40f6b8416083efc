"""`llmtool run` and the public Python API: open a model by name, then generate.

`LlmInference` is the reference LLM Inference API: `create_from_options(options)` resolves the
model file (a converted .bin, an exported .tflite, or the embedded default model) into a graph
through pipelines/resolve.py, then generates with the runtime's `InferenceSession`.

LoRA: with `options.lora_path`, a converted model is exported with LoRA inputs sized for that
adapter; `set_lora(path_or_None)` then switches adapters by writing those inputs only. An
adapter of larger rank, or on more projections, than the graph takes makes it re-export the
model once with room for both (an exported graph or bundle cannot be, and says so).
"""

from __future__ import annotations

from pathlib import Path

from llmtool.errors import LlmToolError
from llmtool.formats.lora_file import LORA_ROLES, LoraFile
from llmtool.formats.tflite_model import read_model
from llmtool.pipelines.resolve import PromptTemplate, bundle_kind, resolve_bundle, resolve_graph
from llmtool.runtime.inference import (
    GenerationResult,
    InferenceSession,
    LlmInferenceOptions,
    Prompt,
    ResultListener,
    open_engine,
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
        rank, targets = 0, ()
        if options.lora_path is not None:
            with LoraFile(options.lora_path) as lora:
                rank, targets = lora.info.stored_rank, lora.targets
        # No max tokens asked for: the model's default graph (512 tokens are then used,
        # capped at its cache).
        graph_path, tokenizer = resolve_graph(path, options.max_tokens or 0, rank, targets)
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

    def set_lora(self, lora_path: str | Path | None) -> None:
        """Switch to this LoRA file (None: the base model) without touching the base weights;
        re-exports a converted model once if the graph cannot hold the adapter."""
        if lora_path is not None:
            with LoraFile(lora_path) as lora:
                lora.check_base(self.base_identity, self.model_type, self.graph_path)
                if not self.lora_fits(lora) and self._exportable():
                    self._reopen_for(lora)
        super().set_lora(lora_path)

    def _exportable(self) -> bool:
        """True when the model is a converted container (so it can be exported again)."""
        model = self.options.model_path
        if model is None:
            return True
        path = Path(model)
        if bundle_kind(path):
            return False
        try:
            with read_model(path) as m:
                return not m.is_graph
        except LlmToolError:
            return False

    def _reopen_for(self, lora: LoraFile) -> None:
        """Open the model's graph with LoRA inputs for both the current and the new adapter's
        ranks and targets (exported once, then cached like any graph)."""
        rank = max(self.engine.lora_rank, lora.info.stored_rank)
        wanted = set(self.engine.lora_targets) | set(lora.targets)
        targets = tuple(r for r in LORA_ROLES if r in wanted)
        max_tokens = self.options.max_tokens or 0  # the same graph as create_from_options
        graph_path, _ = resolve_graph(self.options.model_path, max_tokens, rank, targets)
        engine = open_engine(graph_path, self.options.num_threads)
        with self._lock:
            self.engine.close()
            self.engine, self.graph_path = engine, graph_path


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
