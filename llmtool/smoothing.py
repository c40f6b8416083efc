"""Outlier smoothing before dynamic-range int8: exact rebalancing folded into the weights.

XNNPACK's dynamic-range fully-connected kernels quantize each token's activations to int8
with one scale per token, so one large input channel (trained LLMs have a few, up to
hundreds of times the others) coarsens the grid of every other channel of that token.
SmoothQuant (Xiao et al., 2023) moves that range into the weights, which are quantized per
output channel: for an FC whose input comes from a producer that is linear per channel,
divide the producer's output channel j by s_j and multiply the FC's input column j by s_j.
The float model computes the same function (up to float32 rounding); nothing is added to
the graph, so decode speed is unchanged.

The folds (`plan_folds`), all exact:
- a norm -> the FCs it feeds: the norm's gain (and bias) / s, their input columns * s
  (q/k/v share one s; with a parallel residual the MLP's first layers share it too; Gemma's
  RMSNorm gain is (offset + w), so w becomes (offset + w) / s - offset);
- v -> o, per kv-head channel (attention output is a probability-weighted sum of V rows):
  v's rows (and bias) / t, o's columns of every query head of that kv group * t;
- up -> down when the MLP is gated (act(gate) * up is linear in up): up's rows / t,
  down's columns * t. A non-gated MLP's activation is not linear: down is left alone;
- the final norm -> an untied output layer (a tied one is the embedding table: left alone).

s_j = a_j^alpha / w_j^(1 - alpha), a_j the largest |activation| of channel j over sample
sequences run through the float graph itself, w_j the largest |weight| of input column j,
rounded to a power of two (then the rescaled weights and gains are exact in float32).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmtool.formats.container import Container
from llmtool.spec import ModelSpec, role_name

DEFAULT_ALPHA = 0.5
METADATA_KEY = "llmtool.smoothing"  # JSON: how the container was smoothed, and its scales
SAMPLE_SEQUENCES = 16
SAMPLE_LENGTH = 128
# Measuring runs the whole float model in LiteRT (XNNPACK keeps a packed float copy): above
# this many bytes of float weights quantize skips smoothing (its summary's smoothing: null).
MAX_PROBE_BYTES = 6 << 30
_SEED = 20231


@dataclass(frozen=True)
class Fold:
    """One exact rebalancing by a vector s: the producer's output channels / s, the input
    columns of the consumers * s (o: the s of each column's kv head)."""

    kind: str  # "norm" | "v_o" | "up_down"
    layer: int | None
    producer: str  # role: a norm ("attn_norm"), "v" or "up"
    consumers: tuple[str, ...]  # roles whose input columns are scaled


def plan_folds(spec: ModelSpec) -> list[Fold]:
    """The exact folds of this architecture, in order."""
    folds: list[Fold] = []
    mlp_in = ("gate", "up") if spec.gated_mlp else ("up",)
    for i in range(spec.num_layers):
        if spec.parallel_residual:
            folds.append(Fold("norm", i, "attn_norm", ("q", "k", "v", *mlp_in)))
        else:
            folds.append(Fold("norm", i, "attn_norm", ("q", "k", "v")))
            folds.append(Fold("norm", i, "mlp_norm", mlp_in))
        folds.append(Fold("v_o", i, "v", ("o",)))
        if spec.gated_mlp:
            folds.append(Fold("up_down", i, "up", ("down",)))
    if not spec.tied_embeddings:
        folds.append(Fold("norm", None, "final_norm", ("lm_head",)))
    return folds


def _columns(spec: ModelSpec, fold: Fold, s: np.ndarray) -> np.ndarray:
    """A fold's vector per input column of its consumers: for v -> o, o's column h*D + d
    belongs to kv head h // G, so each kv head's D values repeat for its G query heads."""
    if fold.kind != "v_o":
        return s
    G = spec.num_heads // spec.num_kv_heads
    return np.repeat(s.reshape(spec.num_kv_heads, 1, -1), G, axis=1).reshape(-1)


def _pow2(x: np.ndarray) -> np.ndarray:
    return np.exp2(np.rint(np.log2(x))).astype(np.float32)


def fold_scales(
    spec: ModelSpec,
    weights: Callable[[str], np.ndarray],
    maxima: dict[str, np.ndarray],
    alpha: float = DEFAULT_ALPHA,
) -> list[tuple[Fold, np.ndarray]]:
    """The vector of every fold: [hidden] for norms, [kv_dim] for v -> o, [intermediate] for
    up -> down. `weights(name)` gives a container tensor in float32, `maxima[name]` the largest
    |input| per column of the FC whose (first) weight is `name`."""
    out = []
    KVH, D = spec.num_kv_heads, spec.head_dim
    G = spec.num_heads // KVH
    for fold in plan_folds(spec):
        names = [role_name(r + ".w", fold.layer) for r in fold.consumers]
        a = np.asarray(maxima[names[0]], np.float32)
        w = np.max(np.stack([np.max(np.abs(weights(n)), axis=0) for n in names]), axis=0)
        if fold.kind == "v_o":  # one scale per kv-head channel, shared by its query heads
            a = a.reshape(KVH, G, D).max(axis=1).reshape(-1)
            w = w.reshape(KVH, G, D).max(axis=1).reshape(-1)
        s = np.ones(a.shape, np.float32)
        ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
        s[ok] = _pow2(a[ok].astype(np.float64) ** alpha / w[ok].astype(np.float64) ** (1 - alpha))
        out.append((fold, s))
    return out


class Smoother:
    """Applies folds to container tensors as they are written (one tensor at a time)."""

    def __init__(self, spec: ModelSpec, scales: list[tuple[Fold, np.ndarray]], info: dict):
        self.spec = spec
        self.scales = scales
        self.info = info
        self._ops: dict[str, list[tuple[str, np.ndarray]]] = {}
        for fold, s in scales:
            if fold.kind == "norm":
                self._add(role_name(fold.producer + ".w", fold.layer), "norm", s)
                if spec.norm_bias:
                    self._add(role_name(fold.producer + ".b", fold.layer), "div", s)
                for r in fold.consumers:
                    self._add(role_name(r + ".w", fold.layer), "cols", s)
                continue
            bias = {"v": spec.qkv_bias, "up": spec.mlp_bias}[fold.producer]
            self._add(role_name(fold.producer + ".w", fold.layer), "rows", s)
            if bias:
                self._add(role_name(fold.producer + ".b", fold.layer), "div", s)
            for r in fold.consumers:
                self._add(role_name(r + ".w", fold.layer), "cols", _columns(spec, fold, s))

    def _add(self, name: str, op: str, s: np.ndarray) -> None:
        self._ops.setdefault(name, []).append((op, s))

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    def column_scale(self, name: str) -> np.ndarray | None:
        """The factor of each input column of the matrix `name` (its input is divided by
        it), or None when its columns are not rescaled."""
        cols = [s for op, s in self._ops.get(name, []) if op == "cols"]
        return np.prod(cols, axis=0).astype(np.float32) if cols else None

    def apply(self, name: str, x: np.ndarray) -> np.ndarray:
        """The tensor `name` (float32) after every fold that touches it."""
        ops = self._ops.get(name)
        if not ops:
            return x
        y = np.array(x, dtype=np.float32, copy=True)
        for op, s in ops:
            if op == "cols":
                y *= s[None, :]
            elif op == "rows":
                y /= s[:, None]
            elif op == "div":
                y /= s
            elif self.spec.norm_offset:  # Gemma's RMSNorm gain is (offset + w)
                off = np.float32(self.spec.norm_offset)
                y = (y + off) / s - off
            else:
                y /= s
        return y.astype(np.float32)

    def metadata(self) -> bytes:
        """JSON for the container: settings and every fold's vector (what a LoRA adapter
        converted for this base needs to fold in too)."""
        folds = [
            {
                "kind": f.kind,
                "layer": f.layer,
                "producer": f.producer,
                "consumers": list(f.consumers),
                "scales": [float(v) for v in s],
            }
            for f, s in self.scales
        ]
        return json.dumps({**self.info, "folds": folds}, sort_keys=True).encode()


def read_folds(metadata: dict[str, bytes]) -> list[tuple[Fold, np.ndarray]]:
    """The folds a smoothed container records (none for others)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return []
    data = json.loads(raw)
    return [
        (
            Fold(f["kind"], f["layer"], f["producer"], tuple(f["consumers"])),
            np.asarray(f["scales"], np.float32),
        )
        for f in data["folds"]
    ]


def lora_fold(
    folds: list[tuple[Fold, np.ndarray]],
    spec: ModelSpec,
    role: str,
    layer: int,
    a_prime: np.ndarray,
    b_prime: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """A LoRA pair (A' [in, R], B' [R, out]) of `role` for the smoothed base: inputs that
    the base sees divided by s get A' rows * s; outputs divided by t get B' columns / t."""
    for fold, s in folds:
        if fold.layer != layer:
            continue
        if role in fold.consumers:
            a_prime = a_prime * _columns(spec, fold, s)[:, None]
        if fold.kind != "norm" and role == fold.producer:
            b_prime = b_prime / s[None, :]
    return a_prime.astype(np.float32), b_prime.astype(np.float32)


def consumer_names(spec: ModelSpec, folds: list[Fold]) -> list[str]:
    """The weight matrices the folds rescale (consumers' columns, v's and up's rows)."""
    names = []
    for f in folds:
        names += [role_name(r + ".w", f.layer) for r in f.consumers]
        if f.kind != "norm":
            names.append(role_name(f.producer + ".w", f.layer))
    return names


# -- activation statistics -------------------------------------------------------------------


def text_sequences(
    c: Container, spec: ModelSpec, path: Path, count: int = 32, length: int = SAMPLE_LENGTH
) -> list[list[int]]:
    """Calibration text, one sample a line: BOS + the line's first tokens."""
    from llmtool.errors import LlmToolError
    from llmtool.formats import metadata as keys
    from llmtool.tokenizer import Tokenizer

    files = keys.unpack_tokenizer(c.metadata)
    if not files:
        raise LlmToolError("the model carries no tokenizer to read calibration text", c.path)
    tok = Tokenizer.from_files(files)
    start = [] if tok.bos_id is None else [tok.bos_id]
    out = [(start + tok.encode(line))[:length] for line in calibration_lines(path, count)]
    out = [s for s in out if len(s) > len(start)]
    if not out:
        raise LlmToolError("calibration data has no non-empty line", path)
    return out


def calibration_lines(path: Path, limit: int) -> list[str]:
    """The first `limit` non-empty lines of a calibration text (one sample a line)."""
    from llmtool.errors import LlmToolError

    try:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmToolError(f"cannot read calibration text ({exc})", path) from None
    if not lines:
        raise LlmToolError("calibration data has no non-empty line", path)
    return lines[:limit]


def sample_sequences(
    vocab_size: int, bos: int | None, count: int = SAMPLE_SEQUENCES, length: int = SAMPLE_LENGTH
) -> list[list[int]]:
    """Data-free samples: BOS then token ids drawn uniformly from the vocabulary (seeded)."""
    rng = np.random.default_rng(_SEED)
    start = [] if bos is None else [int(bos)]
    n = length - len(start)
    return [start + rng.integers(0, vocab_size, n).tolist() for _ in range(count)]


def activation_maxima(
    c: Container, spec: ModelSpec, sequences: list[list[int]], work_dir: Path
) -> dict[str, np.ndarray]:
    """Largest |input| per column of every fully-connected layer over `sequences`, run
    through the container's own float graph (one prefill signature, XNNPACK), keyed by the
    FC's first weight name."""
    return {names[0]: hi for names, (hi, _) in activation_statistics(c, spec, sequences, work_dir)}


def activation_statistics(
    c: Container, spec: ModelSpec, sequences: list[list[int]], work_dir: Path
) -> list[tuple[tuple[str, ...], tuple[np.ndarray, np.ndarray]]]:
    """(weight names, (largest |input|, mean input^2) per column) of every fully-connected
    layer's input over `sequences`, run through the container's own float graph."""
    maxima: dict[tuple[str, ...], np.ndarray] = {}
    squares: dict[tuple[str, ...], np.ndarray] = {}
    order: list[tuple[str, ...]] = []
    rows = 0

    def start(shapes: dict[tuple[str, ...], int], total: int) -> set[tuple[str, ...]]:
        order.extend(shapes)
        return set(shapes)

    def visit(inputs: dict[tuple[str, ...], np.ndarray]) -> None:
        nonlocal rows
        for name, x in inputs.items():
            hi = np.abs(x).max(axis=0)
            sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
            maxima[name] = np.maximum(maxima[name], hi) if name in maxima else hi
            squares[name] = squares[name] + sq if name in squares else sq
        rows += len(next(iter(inputs.values()), ()))

    run_probe(c, spec, sequences, work_dir, start, visit)
    return [(k, (maxima[k], (squares[k] / max(rows, 1)).astype(np.float32))) for k in order]


def run_probe(
    c: Container,
    spec: ModelSpec,
    sequences: list[list[int]],
    work_dir: Path,
    start: Callable[[dict[tuple[str, ...], int], int], set[tuple[str, ...]]],
    visit: Callable[[dict[tuple[str, ...], np.ndarray]], None],
) -> None:
    """Run the container's float graph (one prefill signature over the longest sequence,
    XNNPACK) on each of `sequences` from scratch, with every fully-connected layer's input
    as an output. `start(columns, tokens)` gets each FC input's width (keyed by the weight
    names that share it) and the total token count, and names the inputs to record;
    `visit(inputs)` then gets those inputs ([n, columns] float32) for each sequence."""
    from ai_edge_litert.interpreter import Interpreter

    from llmtool.decoder import MASKED, _Decoder, _Subgraph, _Weights
    from llmtool.formats.tflite_model import ModelWriter, Signature, Subgraph
    from llmtool.pipelines.quiet import quiet
    from llmtool.runtime.engine import native_stderr_captured

    T = min(max(len(s) for s in sequences), spec.max_positions)
    writer = ModelWriter("llmtool activation probe")
    g = _Subgraph(_Weights(c, writer))
    _Decoder(spec, T).build(g, T, T)
    probes: dict[tuple[str, ...], int] = {}
    for names, x in g.fc_inputs:
        probes.setdefault(names, x)
    total = sum(min(len(s), T) for s in sequences)
    wanted = start({k: g.shape(x)[-1] for k, x in probes.items()}, total)
    probes = {k: x for k, x in probes.items() if k in wanted}
    outputs = {f"act{i}": x for i, x in enumerate(probes.values())}
    g.outputs = {**outputs, "logits": g.outputs["logits"]}
    index = writer.add_subgraph(
        Subgraph("probe", g.tensors, list(g.inputs.values()), list(g.outputs.values()), g.ops)
    )
    writer.add_signature(Signature("probe", index, dict(g.inputs), dict(g.outputs)))
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".llmtool-probe-") as tmp:
        path = Path(tmp) / "probe.tflite"
        writer.write(path)
        with quiet():
            interp = Interpreter(model_path=str(path))
            run = interp.get_signature_runner("probe")
        pos = np.arange(T, dtype=np.int32)
        mask = np.where(pos[None, :] > pos[:, None], np.float32(MASKED), np.float32(0))
        feed = {
            k: np.zeros(g.tensors[i].shape, np.float32)
            for k, i in g.inputs.items()
            if k.startswith("kv_cache_")
        }
        feed |= {"input_pos": pos, "mask": mask.reshape(1, 1, T, T)}
        with native_stderr_captured():  # LiteRT logs its delegate at the first call
            for seq in sequences:
                seq = list(seq)[:T]
                n = len(seq)
                tokens = np.zeros((1, T), np.int32)
                tokens[0, :n] = seq
                result = run(tokens=tokens, **feed)
                visit(
                    {
                        name: np.asarray(result[key], np.float32).reshape(T, -1)[:n]
                        for name, key in zip(probes, outputs, strict=True)
                    }
                )
