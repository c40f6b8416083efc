"""The engine `run` uses: prefill/decode/reset on LiteRT's CompiledModel API.

Differences from the classic-interpreter Engine, and why:

- The KV caches are TensorBuffers created once and bound as both the input and the output of
  every call of every signature. DYNAMIC_UPDATE_SLICE then writes its rows in place: no
  per-call copy of the cache, in the graph or in Python, and none when switching between the
  prefill and decode signatures.
- XNNPACK packs the weights into a file cache (`$LLMTOOL_CACHE_DIR/xnnpack`, default
  ~/.cache/llmtool/xnnpack), keyed by the graph file's identity, the LiteRT version and the
  CPU. The packed weights are then mmapped file pages shared by both signatures (and by every
  process running the same graph) instead of private heap copies, and later loads skip packing.
- The Python API only offers copying reads/writes of TensorBuffers (a host-memory buffer is
  created rank 1, which the runtime refuses for these rank-4 tensors), so tokens, positions,
  mask rows and logits go through small copies; only the logits a caller needs are read.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import platform
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import cache
from llmtool.errors import LlmToolError
from llmtool.runtime.engine import (
    STEP_INPUTS,
    EngineBase,
    discover_signatures,
    lora_inputs,
    native_stderr_captured,
)


def weight_cache_dir() -> Path:
    return cache.xnnpack_dir()


def _cpu_fingerprint() -> str:
    """Packed layouts depend on the micro-kernels XNNPACK picks for this CPU."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return f"{platform.machine()}|{flags}"


def weight_cache_file(graph: Path, directory: Path) -> Path:
    """The XNNPACK cache file of one graph.

    XNNPACK finds packed weights by their position in the graph and never checks the content:
    a stale cache silently gives wrong logits. The key therefore covers the file's identity and
    change time (st_ctime changes on every rewrite and cannot be set back), not a hash of
    gigabytes at every load; plus the LiteRT version and the CPU (packed layouts depend on the
    micro-kernels chosen). Files of older versions of the same graph path are removed.
    """
    import ai_edge_litert

    litert = getattr(ai_edge_litert, "__version__", None)
    if litert is None:  # pragma: no cover - older packages: ask the installer's records
        from importlib.metadata import PackageNotFoundError, version

        try:
            litert = version("ai-edge-litert")
        except PackageNotFoundError:
            litert = "unknown"
    resolved = graph.resolve()
    st = resolved.stat()
    where = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    ident = f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    key = hashlib.sha256(f"{ident}|{litert}|{_cpu_fingerprint()}".encode()).hexdigest()[:20]
    path = directory / f"{graph.stem}-{where}-{key}.xnnpack"
    for old in directory.glob(f"{glob.escape(graph.stem)}-{where}-*.xnnpack"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
                old.with_suffix(".lock").unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """Serialise processes building the same cache file (XNNPACK writes it in place)."""
    if path is None:
        yield
        return
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class _Signature:
    key: str
    length: int  # tokens per call
    inputs: dict[str, Any]  # name -> TensorBuffer (caches included)
    outputs: dict[str, Any]


class _Native:
    """The LiteRT objects, released with stderr captured: their destructors log INFO lines.

    Every dict holding TensorBuffers is registered here so that release() drops the last
    references itself (a finalizer runs before the engine's attributes are cleared)."""

    def __init__(self) -> None:
        self.env: Any = None
        self.model: Any = None
        self.holders: list[dict[str, Any]] = []

    def hold(self, buffers: dict[str, Any]) -> dict[str, Any]:
        self.holders.append(buffers)
        return buffers

    def release(self) -> None:
        with native_stderr_captured():
            for buffers in self.holders:
                buffers.clear()
            self.holders.clear()
            self.model = None
            self.env = None  # the environment goes with the last reference, right here


class CompiledEngine(EngineBase):
    """Run prefill/decode signatures of one graph, keeping the KV cache between calls."""

    def __init__(
        self,
        graph_path: str | Path,
        num_threads: int | None = None,
        *,
        weight_cache: bool = True,
        cache_dir: str | Path | None = None,
    ):
        try:
            from ai_edge_litert.compiled_model import CompiledModel
            from ai_edge_litert.environment import Environment
            from ai_edge_litert.hardware_accelerator import HardwareAccelerator
            from ai_edge_litert.options import CpuOptions, Options
        except ImportError:  # pragma: no cover - depends on the environment
            raise LlmToolError(
                "LiteRT's CompiledModel API is missing: pip install 'ai-edge-litert>=2.1'"
            ) from None
        self.path = Path(graph_path)
        if not self.path.is_file():
            raise LlmToolError("graph file not found", self.path)
        threads = num_threads or min(4, os.cpu_count() or 1)
        self.weight_cache_path: Path | None = None
        if weight_cache:
            directory = Path(cache_dir) if cache_dir is not None else weight_cache_dir()
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self.weight_cache_path = weight_cache_file(self.path, directory)
            except OSError:  # an unusable cache directory only costs load time and memory
                self.weight_cache_path = None
        cpu = CpuOptions(
            num_threads=threads, xnnpack_weight_cache_path=str(self.weight_cache_path or "")
        )
        options = Options(HardwareAccelerator.CPU, cpu_options=cpu)
        self._native = native = _Native()
        weakref.finalize(self, native.release)
        error: str | None = None
        with native_stderr_captured() as captured:  # start-up chatter, and errors to report
            native.env = Environment.create()  # ours, so release() controls when it goes
            try:
                with _locked(self.weight_cache_path):
                    native.model = CompiledModel.from_file(
                        str(self.path), environment=native.env, options=options
                    )
            except (ValueError, RuntimeError, OSError) as exc:
                error = str(exc) or type(exc).__name__  # not exc: its frames hold LiteRT objects
            else:
                self._setup(native.model)
        if error is not None:
            native.release()
            lines = [*captured.text().splitlines(), error]
            reasons = [x for x in lines if x.startswith("ERROR")] or lines
            reason = re.sub(r"^ERROR: (\[[^]]*\] )?", "", reasons[-1]).strip()
            raise LlmToolError(f"LiteRT cannot load this graph ({reason})", self.path)
        self.pos = 0

    def _setup(self, model: Any) -> None:
        """Signatures, shapes, the caches and LoRA inputs (LiteRT logs its set-up on the first
        write); each signature's own buffers come on its first call."""
        sigs = model.get_signature_list()
        io = {key: (v["inputs"], v["outputs"]) for key, v in sigs.items()}
        self._lengths, self.cache_names = discover_signatures(self.path, io)
        self._no_logits = frozenset(k for k in self._lengths if "logits" not in io[k][1])
        details = model.get_input_tensor_details("decode")
        self.cache_shapes = {n: tuple(map(int, details[n]["shape"])) for n in self.cache_names}
        self.max_seq_len = int(self.cache_shapes["kv_cache_k_0"][2])
        # The vocabulary from the logits of the signature attending least: LiteRT prepares a
        # signature when first asked for its output details (~8 ms for the whole-cache decode
        # of the 457M model, ~1 ms for the first bucket's), and a short run uses only that one.
        with_logits = [k for k in self._lengths if k not in self._no_logits]
        key = min(with_logits, key=lambda k: (self.kv_len(k), self._lengths[k]))
        self.vocab_size = int(model.get_output_tensor_details(key)["logits"]["shape"][-1])
        create_in = model.create_input_buffer_by_name
        hold = self._native.hold
        self._caches = hold({n: create_in("decode", n) for n in self.cache_names})
        shapes = {
            key: {n: d["shape"] for n, d in model.get_input_tensor_details(key).items()}
            for key in self._lengths
        }
        self.lora_shapes = lora_inputs(self.path, shapes)
        # One buffer per LoRA input, bound in every signature: a switch writes each once.
        self._lora = hold({n: create_in("decode", n) for n in self.lora_shapes})
        self._step_inputs = {k: [n for n in STEP_INPUTS if n in io[k][0]] for k in self._lengths}
        self._sigs: dict[str, _Signature] = {}  # made on first use (see _signature)
        self._clear_garbage()
        self.set_lora_inputs(None)

    def _signature(self, key: str) -> _Signature:
        """A signature's buffers, created on its first call: a run uses a few of the graph's
        signatures (the first KV bucket's, for a short conversation), and a buffer costs
        set-up time and memory (a long prefill's logits are megabytes)."""
        sig = self._sigs.get(key)
        if sig is not None:
            return sig
        model = self._native.model
        if model is None:
            raise LlmToolError("the engine has been closed", self.path)
        hold = self._native.hold
        ins = hold({n: model.create_input_buffer_by_name(key, n) for n in self._step_inputs[key]})
        logits = [] if key in self._no_logits else ["logits"]
        outs = hold({n: model.create_output_buffer_by_name(key, n) for n in logits})
        ins.update(self._caches)  # the same buffers in and out: updated in place
        ins.update(self._lora)
        outs.update(self._caches)
        sig = self._sigs[key] = _Signature(key, self._lengths[key], ins, outs)
        return sig

    def _write_lora(self, name: str, value: np.ndarray) -> None:
        self._lora[name].write(value)

    def _clear_garbage(self) -> None:
        """Zero the caches unless they already are.

        Positions past the conversation are masked, but a masked NaN or inf still poisons the
        softmax, so the caches must start finite. Fresh large buffers come from the OS as
        untouched zero pages: reading them does not make them resident, and not writing them
        keeps the resident set to the positions a conversation uses. Values left by an earlier
        conversation are finite and masked, so reset() needs nothing.
        """
        for name, buf in self._caches.items():
            count = int(np.prod(self.cache_shapes[name]))
            if buf.read(count, np.float32).view(np.uint32).any():  # any non-zero bits
                buf.write(np.zeros(self.cache_shapes[name], np.float32))

    def close(self) -> None:
        """Release the model and its buffers now (also done when the engine is collected)."""
        self._native.release()

    def reset(self) -> None:
        """Forget the conversation: later calls overwrite the cache from position 0."""
        self.pos = 0

    def _run(self, key: str, tokens: list[int], pos: int, want_logits: bool) -> np.ndarray | None:
        """One call at positions pos.. (tokens padded to the signature's length)."""
        sig = self._signature(key)
        T, S = sig.length, self.max_seq_len
        if pos + T > S:
            raise AssertionError("caller must keep calls inside the cache")
        model = self._native.model
        if model is None:
            raise LlmToolError("the engine has been closed", self.path)
        n = len(tokens)
        ids = np.zeros((1, T), np.int32)
        ids[0, :n] = tokens
        sig.inputs["tokens"].write(ids)
        sig.inputs["input_pos"].write(np.arange(pos, pos + T, dtype=np.int32))
        if "mask" in sig.inputs:
            sig.inputs["mask"].write(self.causal_rows(pos, T, self.kv_len(key)))
        # Padding rows (past n) write junk K/V at positions pos+n.. in place; every later query
        # masks them until the next call, which starts at pos+n, overwrites them.
        model.run_by_name(key, sig.inputs, sig.outputs)
        if not want_logits:
            return None
        V = self.vocab_size
        return sig.outputs["logits"].read(n * V, np.float32).reshape(n, V)
