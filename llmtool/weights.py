"""Which container tensor comes from which checkpoint tensor: the table's rules, applied.

`plan_weights` checks that the checkpoint has exactly the tensors the architecture expects, with
the shapes config.json implies, before anything is written; `WeightLoader` then produces each
planned tensor as float32 [out, in] on demand (one checkpoint tensor in memory at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmtool.architectures import TRANSPOSED, Architecture, Transform
from llmtool.checkpoint import Checkpoint
from llmtool.errors import LlmToolError
from llmtool.spec import ROLE_KIND, ROLE_NAMES, ModelSpec, role_name, role_shape

_ROLE_ORDER = {role: i for i, role in enumerate(ROLE_NAMES)}


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # container name
    role: str
    layer: int | None
    shape: tuple[int, ...]
    kind: str  # "embedding" | "attention" | "feedforward" | "float" (norms, biases, positions)
    source: str  # checkpoint tensor name
    piece: int  # which part of a fused tensor
    transform: Transform | None  # the table's transform of the source tensor


def _source_shape(
    spec: ModelSpec, rule_roles: tuple[str, ...], transform: Transform | None
) -> tuple:
    """The shape the checkpoint tensor must have for this rule."""
    shapes = [role_shape(spec, r) for r in rule_roles]
    if len(shapes) > 1:  # fused rows
        rows = sum(s[0] for s in shapes)
        shape = (rows, *shapes[0][1:])
    else:
        shape = shapes[0]
    if transform in TRANSPOSED:
        shape = tuple(reversed(shape))
    return shape


def plan_weights(
    arch: Architecture, spec: ModelSpec, ckpt: Checkpoint
) -> tuple[list[PlannedTensor], list[str]]:
    """The container tensors in write order, and the checkpoint tensors deliberately ignored."""
    names = set(ckpt.names)
    aliases = _aliases(arch, names)
    used: set[str] = set()
    planned: list[PlannedTensor] = []
    tied_copies: set[str] = set()
    for rule in arch.rules:
        if rule.when is not None and not rule.when(spec):
            if rule.copy_when_skipped and "{i}" not in rule.hf and rule.hf in aliases:
                tied_copies.add(aliases[rule.hf])
            continue
        per_layer = "{i}" in rule.hf
        for layer in range(spec.num_layers) if per_layer else [None]:
            hf = rule.hf.format(i=layer) if per_layer else rule.hf
            actual = aliases.get(hf)
            if actual is None:
                raise LlmToolError(
                    f"checkpoint lacks tensor {hf!r} that {arch.model_type} needs "
                    "(is --model-type right?)",
                    ckpt.directory,
                )
            expected = _source_shape(spec, rule.roles, rule.transform)
            got = ckpt.meta(actual).shape
            if tuple(got) != tuple(expected):
                raise LlmToolError(
                    f"tensor {actual!r} has shape {list(got)} but config.json implies "
                    f"{list(expected)}",
                    ckpt.meta(actual).file,
                )
            used.add(actual)
            for piece, role in enumerate(rule.roles):
                kind = ROLE_KIND.get(role, "float")
                planned.append(
                    PlannedTensor(
                        name=role_name(role, layer),
                        role=role,
                        layer=layer,
                        shape=role_shape(spec, role),
                        kind=kind,
                        source=actual,
                        piece=piece,
                        transform=rule.transform,
                    )
                )
    unused = sorted(names - used)
    ignored = [n for n in unused if n in tied_copies or any(s in n for s in arch.ignored)]
    unexpected = [n for n in unused if n not in ignored]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise LlmToolError(
            f"unexpected tensor {unexpected[0]!r}{more} for {arch.model_type} "
            "(is --model-type right?)",
            ckpt.directory,
        )
    planned.sort(key=_write_order)
    return planned, ignored


def _write_order(t: PlannedTensor) -> tuple:
    """Embeddings, then layer by layer, then the final norm and output layer."""
    if t.layer is not None:
        group = 1
    elif t.role in ("embed", "pos_embed"):
        group = 0
    else:
        group = 2
    return (group, t.layer or 0, _ROLE_ORDER[t.role])


def _aliases(arch: Architecture, names: set[str]) -> dict[str, str]:
    """Map the table's names to the checkpoint's (some files drop a prefix, e.g. GPT-2; a
    multimodal file adds one before its language model's names)."""
    out = {n: n for n in names}
    for prefix in arch.strip_prefixes:
        for n in names:
            if n.startswith(prefix):
                out.setdefault(n[len(prefix) :], n)
    for prefix in arch.optional_prefixes:
        for n in names:
            if not n.startswith(prefix):
                out.setdefault(prefix + n, n)
    return out


class WeightLoader:
    """Produces planned tensors as float32 arrays, reading each checkpoint tensor once."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec):
        self.ckpt = ckpt
        self.spec = spec
        self._cached_name: str | None = None
        self._cached: list[np.ndarray] = []

    def load(self, t: PlannedTensor) -> np.ndarray:
        if self._cached_name != t.source:
            self._cached = []  # drop the previous tensor before reading the next
            self._cached = self._pieces(self.ckpt.load(t.source), t.transform)
            self._cached_name = t.source
        out = self._cached[t.piece]
        if tuple(out.shape) != t.shape:  # guarded by plan_weights; a bug if it happens
            raise AssertionError(f"{t.name}: produced {out.shape}, planned {t.shape}")
        return out

    def _pieces(self, x: np.ndarray, transform: Transform | None) -> list[np.ndarray]:
        return [x] if transform is None else transform(x, self.spec)
