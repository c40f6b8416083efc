"""A LiteRT interpreter session over an exported graph: prefill, decode and the KV cache.

The caches live in the interpreter's own input tensors. After each call only the rows the call
wrote (T positions per layer) are copied from the output tensors into the inputs, through
zero-copy numpy views, so Python never copies the whole cache per token (only when switching
between the prefill and decode signatures, once per prompt).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmtool.errors import LlmToolError
from llmtool.formats.lora_file import LORA_ROLES, graph_lora_rank, parse_lora_name

MASK_VALUE = np.float32(-1e9)


def load_interpreter_class():
    """ai-edge-litert's Interpreter, or tflite_runtime's when only that is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - depends on the environment
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise LlmToolError("no TFLite interpreter: pip install ai-edge-litert") from None
    return Interpreter


class _Captured:
    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()

    def text(self) -> str:
        self.file.seek(0)
        return self.file.read().decode(errors="replace")


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[_Captured]:
    """Keep the native library's start-up chatter ("INFO: Created TensorFlow Lite XNNPACK
    delegate") off the user's terminal; the text stays available for error messages."""
    captured = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(captured.file.fileno(), 2)
    try:
        yield captured
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class _Signature:
    key: str
    length: int  # tokens per call
    subgraph: int
    inputs: dict[str, int]  # name -> tensor index
    outputs: dict[str, int]


STEP_INPUTS = ("tokens", "input_pos", "mask")
REQUIRED_INPUTS = ("tokens", "input_pos")
_SIGNATURE = re.compile(r"(?:kv(\d+)_)?(decode|prefill_(\d+))")


def parse_signature(key: str) -> tuple[str, int, int | None] | None:
    """(plain key, tokens per call, attended cache length) of a runnable signature name:
    `decode` / `prefill_<T>` attend over the whole cache (None), their KV-bucket variants
    `kv<L>_decode` / `kv<L>_prefill_<T>` over cache positions [0, L). None for other names."""
    m = _SIGNATURE.fullmatch(key)
    if not m:
        return None
    return m.group(2), int(m.group(3) or 1), int(m.group(1)) if m.group(1) else None


def discover_signatures(
    path: Path, io: dict[str, tuple[Iterable[str], Iterable[str]]], buckets: bool = True
) -> tuple[dict[str, int], list[str]]:
    """The runnable signatures of a graph (key -> tokens per call) and its KV-cache names.

    `io` maps every signature key to its (input names, output names). Runnable are `decode`
    (one token) and `prefill_<T>` (T tokens), and with `buckets` their KV-bucket variants
    (parse_signature); each must take the step inputs and the caches and return `logits` and
    the caches. Other signatures are ignored.
    """
    if "decode" not in io:
        raise LlmToolError("graph has no 'decode' signature", path)
    cache_names = sorted(n for n in io["decode"][0] if n.startswith("kv_cache_"))
    if "kv_cache_k_0" not in cache_names:
        raise LlmToolError("graph has no KV cache inputs", path)
    lengths: dict[str, int] = {}
    for key, (inputs, outputs) in io.items():
        parsed = parse_signature(key)
        if parsed is None or (parsed[2] is not None and not buckets):
            continue
        # A mask input is optional (graphs that build it from input_pos); so are a prefill's
        # logits (litert-torch's prefill returns only the caches: see EngineBase.prefill).
        required_out = {*cache_names, *(["logits"] if parsed[0] == "decode" else [])}
        missing = ({*REQUIRED_INPUTS, *cache_names} - set(inputs)) | (
            required_out - set(outputs)
        )
        if missing:
            raise LlmToolError(f"signature {key!r} lacks {', '.join(sorted(missing))}", path)
        lengths[key] = parsed[1]
    return lengths, cache_names


def lora_inputs(
    path: Path, shapes: dict[str, dict[str, tuple[int, ...]]]
) -> dict[str, tuple[int, ...]]:
    """The LoRA inputs (name -> shape) every runnable signature takes (`shapes`: signature
    key -> its input shapes); empty for a graph without adapters."""
    found = {
        key: {n: tuple(map(int, s)) for n, s in ins.items() if parse_lora_name(n)}
        for key, ins in shapes.items()
    }
    first = found["decode"]
    for key, names in found.items():
        if names != first:
            raise LlmToolError(f"signatures decode and {key} take different LoRA inputs", path)
    graph_lora_rank(first)  # raises when the inputs disagree on the rank
    return first


class EngineBase:
    """Prefill chunking and decoding over a graph's `prefill_<T>` / `decode` signatures.

    The contract every engine fulfils: `path`, `vocab_size`, `max_seq_len` (the KV cache
    length), `pos` (tokens in the cache), `reset()`, `close()`, and `_run(key, tokens, pos,
    want_logits)` for one call of one signature, whose lengths are in `_lengths`. Engines are
    context managers (closed on exit).

    Each call runs on the smallest KV-bucket variant of its signature whose attended range
    [0, L) holds the call's positions (`kv_len(key)` is L; the whole cache for plain keys), so
    attention costs what the cache holds, not what it could hold.
    """

    path: Path
    vocab_size: int
    max_seq_len: int
    pos: int
    _lengths: dict[str, int]
    _no_logits: frozenset[str] = frozenset()  # signatures that return only the caches
    lora_shapes: dict[str, tuple[int, ...]] = {}  # LoRA input name -> shape (none: no LoRA)

    @property
    def lora_rank(self) -> int:
        """The rank of the graph's LoRA inputs (0: the graph takes no adapter)."""
        return graph_lora_rank(self.lora_shapes)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The roles (q, k, v, o, gate, up, down) whose projections take an adapter."""
        roles = {p[0] for n in self.lora_shapes if (p := parse_lora_name(n))}
        return tuple(r for r in LORA_ROLES if r in roles)

    def set_lora_inputs(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Write the adapter's tensors into the LoRA inputs; missing ones (and all, for None)
        become zeros, which is the base model. Base weights are never touched."""
        arrays = arrays or {}
        unknown = sorted(set(arrays) - set(self.lora_shapes))
        if unknown:
            raise LlmToolError(f"the graph has no LoRA input {unknown[0]!r}", self.path)
        for name, shape in self.lora_shapes.items():
            value = arrays.get(name)
            if value is None:
                value = np.zeros(shape, np.float32)
            elif tuple(value.shape) != shape:
                raise LlmToolError(
                    f"LoRA tensor {name!r} is {list(value.shape)}, the graph takes {list(shape)}",
                    self.path,
                )
            self._write_lora(name, np.ascontiguousarray(value, np.float32))

    def _write_lora(self, name: str, value: np.ndarray) -> None:
        raise NotImplementedError

    def _run(self, key: str, tokens: list[int], pos: int, want_logits: bool) -> np.ndarray | None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the conversation: the next prefill starts at position 0."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the runtime's model and buffers now (also done when collected)."""
        raise NotImplementedError

    def __enter__(self) -> EngineBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def causal_rows(self, pos: int, length: int, kv_len: int | None = None) -> np.ndarray:
        """Additive mask rows [length, kv_len] for queries at pos..: 0 where a key is visible.

        Built per call: a precomputed S x S mask would take 4*S*S bytes (1 GiB at S = 16384).
        """
        rows = np.arange(pos, pos + length)[:, None]
        keys = np.arange(kv_len or self.max_seq_len)[None, :]
        return np.where(keys > rows, MASK_VALUE, np.float32(0))

    def kv_len(self, key: str) -> int:
        """Cache positions [0, L) the signature attends over."""
        parsed = parse_signature(key)
        return (parsed[2] if parsed else None) or self.max_seq_len

    @functools.cached_property
    def _variants(self) -> dict[str, list[tuple[int, str]]]:
        """Plain name (`decode`, `prefill_<T>`) -> the signatures running it, as (attended
        length, key), shortest first. A graph may carry some variants without the plain one
        (e.g. a short prefill for the first bucket only)."""
        table: dict[str, list[tuple[int, str]]] = {}
        for key in self._lengths:
            parsed = parse_signature(key)
            if parsed is not None:
                table.setdefault(parsed[0], []).append((self.kv_len(key), key))
        return {k: sorted(v) for k, v in table.items()}

    def _variant(self, name: str, pos: int) -> str | None:
        """The cheapest signature running `name` at pos: the shortest attended range holding
        the call's positions (None when none holds them)."""
        for length, key in self._variants.get(name, ()):
            if pos + self._lengths[key] <= length:
                return key
        return None

    @property
    def prefill_keys(self) -> list[str]:
        """The prefill sizes (plain names), shortest first."""
        names = (k for k in self._variants if k != "decode")
        return sorted(names, key=lambda k: self._lengths[self._variants[k][0][1]])

    def prefill(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed tokens at the current position; logits of the last (or every) position."""
        if not tokens:
            raise LlmToolError("nothing to prefill: the prompt is empty")
        if self.pos + len(tokens) > self.max_seq_len:
            raise LlmToolError(
                f"{self.pos + len(tokens)} tokens exceed the graph's KV cache of {self.max_seq_len}"
            )
        outs = []
        i = 0
        while i < len(tokens):
            rest = len(tokens) - i
            key = self._pick(rest)
            n = min(rest, self._lengths[key])
            last = i + n == len(tokens)
            if key in self._no_logits and (all_logits or last):
                # A prefill without logits: the token whose logits are wanted goes through
                # decode (every token, when all positions' logits are wanted).
                key, n = (self._decode_key(), 1) if all_logits or n == 1 else (key, n - 1)
                last = i + n == len(tokens)
            logits = self._run(key, tokens[i : i + n], self.pos, all_logits or last)
            if logits is not None:
                outs.append(logits if all_logits else logits[-1:])
            self.pos += n
            i += n
        return np.concatenate(outs, axis=0) if all_logits else outs[-1][0]

    def _pick(self, rest: int) -> str:
        """The signature for the next chunk of `rest` tokens, among the prefills that fit in
        the cache: the longest while the rest is at least that long; else the shortest that
        takes the whole rest in one call and is not mostly padding; else the longest full
        chunk; else one decode step."""
        fits = [
            (self._lengths[k], k) for n in self.prefill_keys if (k := self._variant(n, self.pos))
        ]
        if fits and rest >= max(fits)[0]:
            return max(fits)[1]
        whole = [(length, k) for length, k in fits if rest <= length <= 4 * rest]
        if whole:
            return min(whole)[1]
        full = [(length, k) for length, k in fits if length <= rest]
        return max(full)[1] if full else self._decode_key()

    def _decode_key(self) -> str:
        key = self._variant("decode", self.pos)
        assert key is not None, "the plain decode signature holds every position"
        return key

    def decode(self, token: int) -> np.ndarray:
        if self.pos >= self.max_seq_len:
            raise LlmToolError(f"the KV cache of {self.max_seq_len} tokens is full")
        logits = self._run(self._decode_key(), [token], self.pos, True)
        assert logits is not None
        self.pos += 1
        return logits[0]


class Engine(EngineBase):
    """The classic Interpreter API (kept for tflite_runtime installs without CompiledModel)."""

    def __init__(self, graph_path: str | Path, num_threads: int | None = None):
        Interpreter = load_interpreter_class()
        self.path = Path(graph_path)
        threads = num_threads or min(4, os.cpu_count() or 1)
        try:
            with native_stderr_captured() as captured:
                self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            detail = (str(exc) or captured.text()).strip().splitlines()
            reason = detail[0] if detail else type(exc).__name__
            raise LlmToolError(f"LiteRT cannot load this graph ({reason})", self.path) from None
        self._wrapper = self.interpreter._interpreter  # the pybind wrapper: zero-copy views
        runners = {
            key: self.interpreter.get_signature_runner(key)
            for key in self.interpreter.get_signature_list()
        }
        io = {key: (r.get_input_details(), r.get_output_details()) for key, r in runners.items()}
        # Plain signatures only: each has its own cache tensors here (copied on every switch).
        self._lengths, self.cache_names = discover_signatures(self.path, io, buckets=False)
        self._no_logits = frozenset(k for k in self._lengths if "logits" not in io[k][1])
        self._sigs: dict[str, _Signature] = {}
        for key, length in self._lengths.items():
            ins = {n: d["index"] for n, d in io[key][0].items()}
            outs = {n: d["index"] for n, d in io[key][1].items()}
            sub = self._wrapper.GetSubgraphIndexFromSignature(key)
            self._sigs[key] = _Signature(key, length, sub, ins, outs)
        details = io["decode"][0]
        self.lora_shapes = lora_inputs(
            self.path,
            {k: {n: d["shape"] for n, d in io[k][0].items()} for k in self._lengths},
        )
        self.cache_shapes = {n: tuple(details[n]["shape"]) for n in self.cache_names}
        self.max_seq_len = int(self.cache_shapes["kv_cache_k_0"][2])
        self.vocab_size = int(io["decode"][1]["logits"]["shape"][-1])
        with native_stderr_captured():  # the delegate announces itself here
            for sig in self._sigs.values():
                self._wrapper.AllocateTensors(sig.subgraph)
        self._holder: str | None = None  # which signature's input tensors hold the cache
        self.pos = 0
        self.set_lora_inputs(None)

    def _write_lora(self, name: str, value: np.ndarray) -> None:
        for sig in self._sigs.values():  # each signature has its own input tensors
            self._view(sig, name)[...] = value

    def reset(self) -> None:
        """Forget the conversation (the cache is zeroed lazily on next use)."""
        self._holder = None
        self.pos = 0

    def close(self) -> None:
        self._sigs.clear()
        self.interpreter = self._wrapper = None  # type: ignore[assignment]

    def _view(self, sig: _Signature, name: str, output: bool = False) -> np.ndarray:
        index = (sig.outputs if output else sig.inputs)[name]
        return self._wrapper.tensor(self._wrapper, index, sig.subgraph)

    def _take_cache(self, sig: _Signature) -> None:
        """Move the cache into this signature's input tensors (once per switch of signature)."""
        if self._holder is sig.key:
            return
        for name in self.cache_names:
            dst = self._view(sig, name)
            if self._holder is None:
                dst.fill(0)
            else:
                dst[...] = self._view(self._sigs[self._holder], name)
        self._holder = sig.key

    def _run(self, key: str, tokens: list[int], pos: int, want_logits: bool) -> np.ndarray | None:
        """One call at positions pos.. (tokens padded to the signature's length)."""
        sig = self._sigs[key]
        T, S = sig.length, self.max_seq_len
        if pos + T > S:
            raise AssertionError("caller must keep calls inside the cache")
        self._take_cache(sig)
        ids = self._view(sig, "tokens")
        ids.fill(0)
        ids[0, : len(tokens)] = tokens
        self._view(sig, "input_pos")[:] = np.arange(pos, pos + T, dtype=np.int32)
        if "mask" in sig.inputs:
            self._view(sig, "mask")[0, 0] = self.causal_rows(pos, T)
        self._wrapper.Invoke(sig.subgraph)
        # Copy back only the rows this call wrote: the rest of each cache is unchanged.
        n = len(tokens)
        for name in self.cache_names:
            new, old = self._view(sig, name, output=True), self._view(sig, name)
            if name.startswith("kv_cache_k_"):
                old[:, :, pos : pos + n, :] = new[:, :, pos : pos + n, :]
            else:
                old[:, :, :, pos : pos + n] = new[:, :, :, pos : pos + n]
        return np.array(self._view(sig, "logits", output=True)[0, :n]) if want_logits else None
