"""Write the files README.md's commands use, so every command there runs as written.

    python scripts/make_examples.py [FOLDER]      # default: the current folder

Writes into FOLDER (a few MiB, about half a minute; needs the test extra: transformers,
sentencepiece):
- `austen-hf/`: the embedded default model as a Hugging Face Llama checkpoint (model.safetensors,
  config.json, generation_config.json, tokenizer.model, tokenizer_config.json), rebuilt from
  the container's int8 weights (so numbers differ slightly from those of the float original that
  `scripts/train_default_model.py` writes);
- `heldout.txt`: held-out Jane Austen text (a few paragraphs not used in training);
- `prompt.txt`: a prompt for `--prompt -`;
- tiny random stand-ins, with the tokenizer each family ships, for the per-model-type examples:
  `gemma-2b/` (two safetensors shards + tokenizer.model), `gemma-7b/`, `phi-2/`,
  `falcon-rw-1b/` (pytorch_model.bin), `stablelm-3b-4e1t/`, `gpt2/`,
  `qwen3-0.6b/` (with a chat template); and PEFT LoRA adapters of the phi-2 stand-in,
  `my-peft-adapter/` and `my-other-adapter/`.
  They are the test suite's fixtures (tests/tiny_models.py): random weights, real layouts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# folder -> (model type, build options): the README's per-model-type examples.
STAND_INS = {
    "gemma-2b": ("GEMMA_2B", {"shards": 2}),
    "gemma-7b": ("GEMMA_7B", {}),
    "phi-2": ("PHI_2", {}),
    "falcon-rw-1b": ("FALCON_RW_1B", {"ckpt_format": "pytorch"}),
    "stablelm-3b-4e1t": ("STABLELM_4E1T_3B", {}),
    "gpt2": ("GPT2", {}),
    "qwen3-0.6b": ("QWEN3", {}),  # with a ChatML chat template
}

# PEFT LoRA adapters of the phi-2 stand-in (the README's LoRA examples).
ADAPTERS = ("my-peft-adapter", "my-other-adapter")

PROMPT = "It is a truth universally acknowledged"


def write_austen_hf(out: Path) -> None:
    """The default model's container back as a Hugging Face Llama folder."""
    from safetensors.numpy import save_file

    from llmtool.architectures import get_architecture
    from llmtool.formats import metadata as keys
    from llmtool.formats.container import Container
    from llmtool.pipelines.resolve import default_model_path
    from llmtool.spec import ModelSpec, role_name

    out.mkdir(parents=True, exist_ok=True)
    with Container.open(default_model_path()) as c:
        spec = ModelSpec.from_json(c.metadata[keys.MODEL_SPEC])
        arch = get_architecture(spec.model_type)
        tensors = {}
        for rule in arch.rules:
            if rule.transform or len(rule.roles) != 1 or (rule.when and not rule.when(spec)):
                continue
            layers = range(spec.num_layers) if "{i}" in rule.hf else [None]
            for i in layers:
                name = role_name(rule.roles[0], i)
                if name in c:
                    hf = rule.hf.format(i=i) if i is not None else rule.hf
                    tensors[hf] = np.ascontiguousarray(c.float(name), dtype=np.float32)
        if len(tensors) != len(c):
            raise SystemExit(f"mapped {len(tensors)} of {len(c)} tensors back to HF names")
        files = keys.unpack_tokenizer(c.metadata)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), {"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tied_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": list(spec.eos_token_ids)[0] if spec.eos_token_ids else None,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, data in files.items():
        (out / name).write_bytes(data)


def write_stand_in(out: Path, model_type: str, options: dict) -> None:
    """A tiny random checkpoint of the family, with its tokenizer: the test suite's fixture."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.conftest import VOCAB, add_tokenizer
    from tests.tiny_models import build_checkpoint

    build_checkpoint(model_type, out, VOCAB, **options)
    add_tokenizer(model_type, out)


def write_peft_adapter(base: Path, out: Path, seed: int) -> None:
    """A random, non-zero PEFT LoRA adapter (attention and MLP) of the checkpoint in `base`."""
    import torch
    from peft import LoraConfig, get_peft_model

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.tiny_models import load_reference

    torch.manual_seed(seed)
    model = get_peft_model(
        load_reference(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=".", help="where to write (default: here)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_austen_hf(folder / "austen-hf")
    heldout = (REPO / "tests" / "data" / "heldout_excerpt.txt").read_text(encoding="utf-8")
    (folder / "heldout.txt").write_text(heldout, encoding="utf-8")
    (folder / "prompt.txt").write_text(PROMPT + "\n", encoding="utf-8")
    for name, (model_type, options) in STAND_INS.items():
        write_stand_in(folder / name, model_type, options)
    for seed, name in enumerate(ADAPTERS, start=1):
        write_peft_adapter(folder / "phi-2", folder / name, seed)
    made = ", ".join([*STAND_INS, *ADAPTERS])
    print(f"wrote austen-hf/, heldout.txt, prompt.txt, {made} in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
