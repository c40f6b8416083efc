"""`llmtool lora-convert`: a PEFT LoRA adapter -> LoRA file for one converted base model.

Input: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors / .bin), or the
weights file alone (then adapter_config.json is looked for beside it, and without one
`--lora-rank` is required and alpha is taken equal to the rank). The adapted modules are
matched to the base's architecture through the table's tensor rules (architectures.py), so a
fused module (GPT-2 c_attn, Falcon query_key_value) feeds q, k and v, split like the weight.

PEFT's forward pass is y = x W^T + scale * (x A^T) B^T with scale = alpha / r, or
alpha / sqrt(r) with use_rslora (r and alpha per module with rank_pattern / alpha_pattern).
The file stores A' = scale * A^T [in, R] and B' = B^T [R, out] per adapted role and layer
(formats/lora_file.py), the rank padded with zeros to a multiple of 16 (exact; LiteRT-LM's CPU
engine takes ranks 16 and 32), plus the base model's identity.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmtool._version import __version__
from llmtool.architectures import Architecture, TensorRule, get_architecture, lora_rows
from llmtool.checkpoint import Checkpoint, read_json
from llmtool.config import check_arguments
from llmtool.errors import LlmToolError
from llmtool.formats import metadata as keys
from llmtool.formats.container import Container
from llmtool.formats.lora_file import (
    LORA_ROLES,
    LoraInfo,
    base_identity,
    lora_input_name,
    write_lora_file,
)
from llmtool.smoothing import lora_fold, read_folds
from llmtool.spec import ModelSpec, role_shape

Progress = Callable[[int, int, str], None]
RANK_MULTIPLE = 16
_PREFIX = "base_model.model."
_KEY = re.compile(r"(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight")
# PEFT configuration that changes the forward pass in ways a plain LoRA file cannot carry.
_REFUSED = {
    "use_dora": "DoRA adapters (use_dora) are not supported: merge it into the base instead",
    "lora_bias": "adapters with a trained LoRA bias (lora_bias) are not supported",
    "target_parameters": "adapters on nn.Parameter targets (target_parameters) are not supported",
    "trainable_token_indices": "adapters with trainable tokens are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
}


def lora_convert(
    lora_ckpt: str | Path,
    base_model: str | Path,
    output: str | Path,
    lora_rank: int | None = None,
    backend: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Convert one adapter for the converted base `base_model`; returns a JSON-able summary."""
    check_arguments(
        lora_convert,
        lora_ckpt=lora_ckpt,
        base_model=base_model,
        output=output,
        lora_rank=lora_rank,
        backend=backend,
        progress=progress,
    )
    report = progress or (lambda done, total, what: None)
    start = time.perf_counter()
    if backend not in ("cpu", "gpu"):
        raise LlmToolError(f"backend must be cpu or gpu (got {backend!r})")
    if lora_rank is not None and lora_rank < 1:
        raise LlmToolError(f"--lora-rank must be at least 1 (got {lora_rank})")
    weights_file, config, config_path = _find_adapter(Path(lora_ckpt), lora_rank)
    ckpt = Checkpoint.open(weights_file)
    modules, others = _modules(ckpt, weights_file)
    report(0, len(modules) + 1, "reading the base model")
    base_path = Path(base_model)
    with Container.open(base_path) as c:
        if keys.MODEL_SPEC not in c.metadata:
            raise LlmToolError("not a converted model (no llmtool.model_spec)", base_path)
        spec = ModelSpec.from_json(c.metadata[keys.MODEL_SPEC])
        identity = base_identity(c)
        folds = read_folds(c.metadata)  # a smoothed base: its rescaling applies to the adapter
    arch = get_architecture(spec.model_type)
    embedded = [n.split(".lora_embedding")[0] for n in others if ".lora_embedding_" in n]
    matched = _match_modules(arch, modules, embedded, weights_file)
    if others:
        raise LlmToolError(
            f"unexpected tensor {others[0].removeprefix(_PREFIX)!r} in the adapter "
            "(modules_to_save, saved embedding layers and other PEFT methods are not supported)",
            weights_file,
        )

    r_default = int(config.get("r", lora_rank or 0)) if config else int(lora_rank or 0)
    tensors: dict[str, np.ndarray] = {}
    parts: list[tuple[str, int, np.ndarray, np.ndarray]] = []  # role, layer, A', B'
    scales: dict[str, float] = {}
    ranks: set[int] = set()
    for n, (module, (rule, layer)) in enumerate(sorted(matched.items())):
        report(n + 1, len(modules) + 1, module)
        a = ckpt.load(modules[module]["lora_A"])
        b = ckpt.load(modules[module]["lora_B"])
        rank = _check_rank(module, a, b, config, r_default, lora_rank, weights_file, config_path)
        _check_shapes(spec, arch, module, rule, a, b, weights_file)
        alpha = float(_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", rank)))
        if not config:
            alpha = float(rank)  # no adapter_config.json: alpha unknown, scale 1
        rslora = bool(config.get("use_rslora", False))
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        scales[module] = scale
        ranks.add(rank)
        a_prime = (a.T * np.float32(scale)).astype(np.float32)
        for role, b_part in zip(rule.roles, lora_rows(rule.transform, b, spec), strict=True):
            a_role, b_role = a_prime, np.ascontiguousarray(b_part.T)
            if folds:
                a_role, b_role = lora_fold(folds, spec, role.split(".")[0], layer, a_role, b_role)
            parts.append((role.split(".")[0], layer, a_role, b_role))
    stored = RANK_MULTIPLE * math.ceil(max(ranks) / RANK_MULTIPLE)
    for role, layer, a_prime, b_prime in parts:
        r = a_prime.shape[1]
        tensors[lora_input_name(role, "a", layer)] = np.pad(a_prime, ((0, 0), (0, stored - r)))
        tensors[lora_input_name(role, "b", layer)] = np.pad(b_prime, ((0, stored - r), (0, 0)))
    targets = tuple(r for r in LORA_ROLES if any(p[0] == r for p in parts))
    uniform = len(set(scales.values())) == 1
    info = LoraInfo(
        model_type=spec.model_type,
        rank=max(ranks),
        stored_rank=stored,
        alpha=float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None,
        use_rslora=bool(config.get("use_rslora", False)),
        scale=next(iter(scales.values())) if uniform else _leaf_scales(scales),
        targets=targets,
        modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in matched})),
        base_identity=identity,
        base_file=base_path.name,
        backend=backend,
        source=f"{Path(lora_ckpt).name} (llmtool {__version__})",
    )
    out = write_lora_file(output, info, tensors)
    report(len(modules) + 1, len(modules) + 1, "done")
    return {
        "output": str(out),
        "output_bytes": out.stat().st_size,
        "model_type": spec.model_type,
        "rank": info.rank,
        "stored_rank": stored,
        "scale": info.scale,
        "targets": list(targets),
        "modules": list(info.modules),
        "tensors": len(tensors),
        "seconds": round(time.perf_counter() - start, 3),
    }


# -- reading the adapter ------------------------------------------------------------------------


def _find_adapter(path: Path, lora_rank: int | None) -> tuple[Path, dict[str, Any], Path | None]:
    """(weights file, adapter_config.json contents or {}, its path)."""
    if path.is_dir():
        folder = path
        candidates = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise LlmToolError(
                "no adapter_model.safetensors or adapter_model.bin in this folder", path
            )
        weights = found[0]
    elif path.is_file():
        folder, weights = path.parent, path
    else:
        raise LlmToolError("LoRA adapter not found", path)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        if lora_rank is None:
            raise LlmToolError(
                "no adapter_config.json beside the adapter: give --lora-rank (alpha is then "
                "taken equal to the rank)",
                path,
            )
        return weights, {}, None
    config = read_json(config_path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LlmToolError(
            f"PEFT type {peft_type} is not supported (only LORA adapters)", config_path
        )
    for key, message in _REFUSED.items():
        if config.get(key):
            raise LlmToolError(message, config_path)
    if config.get("bias", "none") != "none":
        raise LlmToolError(
            f"adapters that train biases (bias={config['bias']!r}) are not supported",
            config_path,
        )
    if config.get("modules_to_save"):
        raise LlmToolError(
            "adapters with fully trained modules (modules_to_save: "
            f"{', '.join(map(str, config['modules_to_save']))}) are not supported",
            config_path,
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise LlmToolError(f"adapter_config.json: {key} must be a positive number", config_path)
    return weights, config, config_path


def _modules(ckpt: Checkpoint, path: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Adapted module path (without PEFT's prefix) -> {"lora_A": tensor, "lora_B": tensor},
    and the adapter's other tensors (embedding adapters, saved modules, ...)."""
    modules: dict[str, dict[str, str]] = {}
    others: list[str] = []
    for name in ckpt.names:
        if "lora_magnitude_vector" in name:
            raise LlmToolError("DoRA adapters are not supported (lora_magnitude_vector)", path)
        m = _KEY.fullmatch(name)
        if m is None:
            others.append(name)
            continue
        module = m.group(1).removeprefix(_PREFIX)
        modules.setdefault(module, {})[m.group(2)] = name
    if not modules:
        raise LlmToolError("the adapter has no lora_A / lora_B tensors", path)
    for module, pair in modules.items():
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise LlmToolError(f"module {module} has no {missing} tensor", path)
    return modules, others


def _match_modules(
    arch: Architecture, modules: dict[str, dict[str, str]], embedded: list[str], path: Path
) -> dict[str, tuple[TensorRule, int]]:
    """Each adapted module's rule in the table and its layer; one error lists the others."""
    patterns = []
    for rule in arch.rules:
        if "{i}" not in rule.hf or not rule.hf.endswith(".weight"):
            continue
        base = rule.roles[0].split(".")[0]
        if base not in LORA_ROLES or not rule.roles[0].endswith(".w"):
            continue
        template = re.escape(rule.hf.removesuffix(".weight")).replace(r"\{i\}", r"(\d+)")
        prefixes = "|".join(re.escape(p) for p in arch.optional_prefixes)
        regex = re.compile(rf"(?:{prefixes})?{template}" if prefixes else template)
        patterns.append((regex, rule))
    matched: dict[str, tuple[TensorRule, int]] = {}
    unsupported = [m.removeprefix(_PREFIX) for m in embedded]  # embedding adapters
    for module in modules:
        leaf = module.rsplit(".", 1)[-1]
        found = [(rule, m) for regex, rule in patterns if (m := regex.fullmatch(module))]
        if not found or leaf not in arch.lora_targets:
            unsupported.append(module)
            continue
        rule, m = found[0]
        matched[module] = (rule, int(m.group(1)))
    if unsupported:
        names = sorted({m.rsplit(".", 1)[-1] for m in unsupported})
        if not matched:
            raise LlmToolError(
                f"none of the adapter's modules ({', '.join(names)}) is a projection of a "
                f"{arch.model_type} model: is the adapter for another architecture?",
                path,
            )
        raise LlmToolError(
            f"unsupported LoRA target modules for {arch.model_type}: {', '.join(names)} "
            f"(supported: {', '.join(arch.lora_targets)})",
            path,
        )
    return matched


def _pattern(patterns: Any, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module path's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_rank(
    module: str,
    a: np.ndarray,
    b: np.ndarray,
    config: dict[str, Any],
    r_default: int,
    lora_rank: int | None,
    path: Path,
    config_path: Path | None,
) -> int:
    rank = int(a.shape[0])
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != rank:
        raise LlmToolError(
            f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form a "
            "low-rank pair",
            path,
        )
    if lora_rank is not None and rank != lora_rank:
        raise LlmToolError(
            f"--lora-rank {lora_rank} disagrees with the adapter's tensors: {module}.lora_A "
            f"has rank {rank}",
            path,
        )
    if config:
        expected = int(_pattern(config.get("rank_pattern"), module, r_default))
        if rank != expected:
            raise LlmToolError(
                f"adapter_config.json says r={expected} but {module}.lora_A has rank {rank}",
                config_path,
            )
    return rank


def _check_shapes(
    spec: ModelSpec,
    arch: Architecture,
    module: str,
    rule: TensorRule,
    a: np.ndarray,
    b: np.ndarray,
    path: Path,
) -> None:
    """An adapter trained on another size of model is refused before anything is written."""
    shapes = [role_shape(spec, role) for role in rule.roles]
    want_in, want_out = shapes[0][1], sum(s[0] for s in shapes)
    if a.shape[1] != want_in or b.shape[0] != want_out:
        raise LlmToolError(
            f"adapter is for another model size: {module} maps {a.shape[1]} -> {b.shape[0]} "
            f"features, this {arch.model_type} base's maps {want_in} -> {want_out}",
            path,
        )


def _leaf_scales(scales: dict[str, float]) -> dict[str, float]:
    return {m: s for m, s in sorted(scales.items())}
