"""Metadata entries of llmtool's containers and graphs: their names, and the tokenizer pair."""

from __future__ import annotations

LLM_PARAMETERS = "odml.infra.proto.LlmParameters"  # the reference's serialized LlmParameters
BACKEND = "backend"  # b"cpu" | b"gpu"
MODEL_TYPE = "odml.infra.LlmModelType"  # the model type name, e.g. b"GEMMA_2B"
SPM_VOCAB = "spm_vocab_model"  # SentencePiece model bytes (the reference's key)
TOKENIZER_PREFIX = "llmtool.tokenizer/"  # + tokenizer.json, tokenizer_config.json, ...
MODEL_SPEC = "llmtool.model_spec"  # JSON ModelSpec: what the generic decoder needs
CONVERSION = "llmtool.conversion"  # JSON: source, quantization settings, tool version
GRAPH = "llmtool.graph"  # JSON: export settings of a graph (prefill length, cache length)
BASE_IDENTITY = "llmtool.base_identity"  # graphs: hex digest naming the base model (LoRA check)


def pack_tokenizer(files: dict[str, bytes]) -> dict[str, bytes]:
    """Tokenizer files as metadata entries (SentencePiece under the reference's key)."""
    return {
        (SPM_VOCAB if name == "tokenizer.model" else TOKENIZER_PREFIX + name): data
        for name, data in sorted(files.items())
    }


def unpack_tokenizer(metadata: dict[str, bytes]) -> dict[str, bytes]:
    """The tokenizer files stored by pack_tokenizer."""
    files = {
        k[len(TOKENIZER_PREFIX) :]: v for k, v in metadata.items() if k.startswith(TOKENIZER_PREFIX)
    }
    if SPM_VOCAB in metadata:
        files["tokenizer.model"] = metadata[SPM_VOCAB]
    return files
