"""The one generic decoder: a converted container's weights written as a TFLite graph.

The graph follows the AI Edge / LiteRT-LM convention: signatures `prefill_<T>` (T tokens at a
time) and `decode` (one token), inputs `tokens` [1,T] int32, `input_pos` [T] int32, `mask`
[1,1,T,S] float32 (additive: 0 = attend, large negative = masked), and per layer
`kv_cache_k_<i>` [1,KVH,S,D] and `kv_cache_v_<i>` [1,KVH,D,S]; outputs `logits` [1,T,V] and the
updated caches under the input names. Builtin ops only. Weights keep the container's dtype
(float32; float16 through DEQUANTIZE; int8/int4 per-channel or int4 blockwise dynamic range),
and all signatures share one copy of every weight buffer.

Attention cost follows the tokens in the cache, not its size: besides the full-cache
signatures LiteRT-LM runs, a graph may carry `kv<L>_decode` and `kv<L>_prefill_<T>` ("KV
buckets"). They take and return the same full caches (so a runtime binds one set of buffers to
every signature) but attend over cache positions [0, L) only, with a `mask` of [1,1,T,L]. A
runtime uses the smallest bucket that holds its positions. (Names start with neither `decode`
nor `prefill`, so LiteRT-LM, which picks signatures by those names, ignores them.)

Dynamic-range kernels (XNNPACK's, what LiteRT runs for int8/int4 weights) quantize each row
of a layer's input to int8 with its own scale and zero point before the product: on a model
with activation outliers that costs far more than the int8 weights do. With split
activations, a layer is fed [x; r] (two rows per token) with r = x - q(x), q being exactly
that per-row quantization: the kernel returns W q(x) and W q(r), whose sum carries about 16
bits of the input. The weights are read once for both rows, so decode costs little more (a
second row and a dozen small ops per layer input: 0.86-0.96x measured); prefill does twice the
arithmetic (about 0.5x). `ACTIVATION_MODES` names the choices.

With a LoRA rank R > 0, the adapted projections (roles in `lora_targets`) also take the
LiteRT-LM LoRA inputs `lora_atten_q_a_prime_weight_<i>` [in, R] / `..._b_prime_weight_<i>`
[R, out] (formats/lora_file.py) and add (x A') B' to their output: switching adapters writes
those inputs, never the base weights.

Everything model-specific comes from the ModelSpec: the builder below only asks it questions.
`pipelines/export.py` drives it (options, files, progress); `build_graph` is the whole entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from llmtool.formats.container import Container
from llmtool.formats.lora_file import lora_input_name
from llmtool.formats.tflite_model import (
    ModelWriter,
    Operator,
    Quantization,
    Signature,
    Subgraph,
    Tensor,
)
from llmtool.quantization import pack_int4, unpack_int4
from llmtool.spec import ModelSpec, role_name, role_shape

MASKED = -1e9  # additive mask value of hidden keys (what runtimes feed in `mask`)

# Which quantized layers get split activations (module docstring): "auto" = int8-weight
# layers (free at decode; XNNPACK's blockwise int4 kernels slow down with two rows),
# "split" = every quantized layer, "single" = none (LiteRT's default, fastest prefill).
ACTIVATION_MODES = ("auto", "split", "single")


class _Weights:
    """Container tensors as graph constants; one buffer per constant, shared by all subgraphs."""

    def __init__(self, container: Container, writer: ModelWriter):
        self.c = container
        self.writer = writer
        self._buffers: dict[str, tuple[int, tuple[int, ...], str]] = {}
        self._lazy: dict[str, int] = {}

    def buffer(self, key: str, make: Callable[[], np.ndarray]) -> tuple[int, tuple[int, ...], str]:
        """(buffer index, shape, dtype) of a constant; `make` runs once per model."""
        if key not in self._buffers:
            arr = np.ascontiguousarray(make())
            index = self.writer.add_lazy_buffer(arr.nbytes, lambda: arr, _alignment(arr.nbytes))
            self._buffers[key] = (index, arr.shape, str(arr.dtype))
        return self._buffers[key]

    def lazy(
        self,
        key: str,
        nbytes: int,
        make: Callable[[], np.ndarray],
        alignment: int | None = None,
    ) -> int:
        """A weight buffer filled only while the file is written (one weight in memory)."""
        if key not in self._lazy:
            self._lazy[key] = self.writer.add_lazy_buffer(
                nbytes, make, alignment or _alignment(nbytes)
            )
        return self._lazy[key]


def _alignment(nbytes: int) -> int | None:
    """Small constants (shapes, scalars, tables under 64 KiB) sit 64-byte aligned (what XNNPACK
    needs) instead of on their own 64 KiB page: tens of them would otherwise pad a small
    model's graph to several times its container."""
    return 64 if nbytes < 65536 else None


def _runtime_layout(c: Container, names: tuple[str, ...]) -> np.ndarray:
    """Stored weights as LiteRT reads them, stacked along rows when several (fused QKV,
    gate+up). INT4 is packed over the flattened tensor in LiteRT, so rows of odd length
    (packed row by row in the container) and stacks are repacked."""
    infos = [c.info(n) for n in names]
    if len(names) == 1 and not (infos[0].dtype == "int4" and infos[0].shape[-1] % 2):
        return c.raw(names[0])
    if infos[0].dtype == "int4":
        rows = [unpack_int4(c.raw(n), i.shape) for n, i in zip(names, infos, strict=True)]
        return pack_int4(np.concatenate(rows, axis=0).reshape(-1))
    return np.concatenate([c.raw(n) for n in names], axis=0)


def _stacked_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    count = int(np.prod(shape))
    return {"int4": (count + 1) // 2, "int8": count, "float16": 2 * count}.get(dtype, 4 * count)


class _Subgraph:
    """A small SSA-style builder over the generic writer's dataclasses."""

    def __init__(self, weights: _Weights, activations: str = "single"):
        self.w = weights
        self.split_dtypes = {"auto": ("int8",), "split": ("int8", "int4"), "single": ()}[
            activations
        ]
        self._split: dict[int, int] = {}  # layer input -> its [x; r] (shared by the layers)
        self.tensors: list[Tensor] = []
        self.ops: list[Operator] = []
        self.inputs: dict[str, int] = {}
        self.outputs: dict[str, int] = {}
        self._consts: dict[str, int] = {}
        self._stored: dict[str, int] = {}  # weight key -> its constant in the stored dtype
        # (weight names, input tensor) of every FULLY_CONNECTED: what smoothing.py measures
        self.fc_inputs: list[tuple[tuple[str, ...], int]] = []

    # -- tensors ----------------------------------------------------------------------------

    def tensor(
        self,
        shape: tuple[int, ...],
        dtype: str = "float32",
        name: str | None = None,
        buffer: int = 0,
        quant: Quantization | None = None,
    ) -> int:
        self.tensors.append(
            Tensor(
                name=name or f"t{len(self.tensors)}",
                shape=tuple(int(s) for s in shape),
                dtype=dtype,
                buffer=buffer,
                quantization=quant,
            )
        )
        return len(self.tensors) - 1

    def input(self, name: str, shape: tuple[int, ...], dtype: str = "float32") -> int:
        idx = self.tensor(shape, dtype, name)
        self.inputs[name] = idx
        return idx

    def shape(self, t: int) -> tuple[int, ...]:
        return self.tensors[t].shape

    def const(self, key: str, make: Callable[[], np.ndarray]) -> int:
        """A constant tensor; `make` is called once per model and the buffer is shared."""
        if key not in self._consts:
            buf, shape, dtype = self.w.buffer(key, make)
            self._consts[key] = self.tensor(shape, dtype, key, buf)
        return self._consts[key]

    def ints(self, values: list[int] | tuple[int, ...]) -> int:
        key = "i32:" + ",".join(map(str, values))
        return self.const(key, lambda: np.asarray(values, dtype=np.int32))

    def scalar(self, value: float) -> int:
        key = f"f32:{float(value)!r}"
        return self.const(key, lambda: np.asarray([value], dtype=np.float32))

    def weight(self, *names: str) -> int:
        """Container tensors as one float-producing constant, stacked along rows when several
        (per-output-channel scales stack exactly). float16 goes through DEQUANTIZE."""
        key = "w:" + "+".join(names)
        if key in self._consts:
            return self._consts[key]
        c = self.w.c
        infos = [c.info(n) for n in names]
        dtype = infos[0].dtype
        shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])
        quantized = dtype in ("int8", "int4")
        block = infos[0].block_size
        if any(i.dtype != dtype or i.block_size != block for i in infos) or (
            quantized and any(np.any(i.zero_point != 0) for i in infos)
        ):
            # Mixed dtypes or block sizes, or asymmetric weights (dynamic-range kernels need
            # symmetric ones): widen to float32 at export.
            t = self.const("wf:" + key, lambda: np.concatenate([c.float(n) for n in names]))
        else:
            buf = self.w.lazy(key, _stacked_nbytes(shape, dtype), lambda: _runtime_layout(c, names))
            q = None
            if block:
                # LiteRT's blockwise int4 (XNNPACK's blockwise kernels): BlockwiseQuantization
                # details naming a float16 scales constant [rows, columns / block], stacked
                # along rows like the weights.
                nb = shape[1] // block
                sbuf = self.w.lazy(
                    "s:" + key,
                    2 * shape[0] * nb,
                    lambda: np.concatenate([np.asarray(c.block_scales(n)) for n in names]),
                    alignment=64,
                )
                scales = self.tensor((shape[0], nb), "float16", key[2:] + ".scales", sbuf)
                q = Quantization.blockwise(scales, block)
            elif quantized:
                scale = np.concatenate([np.asarray(i.scale, np.float32) for i in infos])
                q = Quantization(scale=scale, zero_point=np.zeros(len(scale), np.int64), axis=0)
            t = self.tensor(shape, dtype, key[2:], buf, q)
            self._stored[key] = t
            if dtype == "float16":
                t = self.op("DEQUANTIZE", [t], shape)
        self._consts[key] = t
        return t

    def stored(self, *names: str) -> int | None:
        """The constant holding weight(*names) in its stored dtype (before any DEQUANTIZE);
        None when it was widened to float32 at export."""
        self.weight(*names)
        return self._stored.get("w:" + "+".join(names))

    # -- ops --------------------------------------------------------------------------------

    def op(
        self,
        op: str,
        inputs: list[int],
        shape: tuple[int, ...],
        dtype: str = "float32",
        options: dict[str, Any] | None = None,
    ) -> int:
        out = self.tensor(shape, dtype)
        self.ops.append(Operator(op=op, inputs=list(inputs), outputs=[out], options=options or {}))
        return out

    def binary(self, op: str, a: int, b: int) -> int:
        shape = np.broadcast_shapes(self.shape(a), self.shape(b))
        dtype = self.tensors[a].dtype
        return self.op(op, [a, b], shape, dtype, options={"fused_activation_function": "NONE"})

    def add(self, a: int, b: int) -> int:
        return self.binary("ADD", a, b)

    def mul(self, a: int, b: int) -> int:
        return self.binary("MUL", a, b)

    def sub(self, a: int, b: int) -> int:
        return self.binary("SUB", a, b)

    def reshape(self, x: int, shape: tuple[int, ...]) -> int:
        if self.shape(x) == tuple(shape):
            return x
        return self.op(
            "RESHAPE",
            [x, self.ints(shape)],
            shape,
            self.tensors[x].dtype,
            {"new_shape": list(shape)},
        )

    def transpose(self, x: int, perm: tuple[int, ...]) -> int:
        shape = tuple(self.shape(x)[p] for p in perm)
        return self.op("TRANSPOSE", [x, self.ints(perm)], shape, self.tensors[x].dtype)

    def slice(self, x: int, begin: tuple[int, ...], size: tuple[int, ...]) -> int:
        return self.op("SLICE", [x, self.ints(begin), self.ints(size)], size, self.tensors[x].dtype)

    def concat(self, xs: list[int], axis: int) -> int:
        shape = list(self.shape(xs[0]))
        shape[axis] = sum(self.shape(x)[axis] for x in xs)
        return self.op(
            "CONCATENATION",
            xs,
            tuple(shape),
            self.tensors[xs[0]].dtype,
            {"axis": axis, "fused_activation_function": "NONE"},
        )

    def mean_last(self, x: int) -> int:
        shape = (*self.shape(x)[:-1], 1)
        return self.op(
            "MEAN", [x, self.ints([len(self.shape(x)) - 1])], shape, options={"keep_dims": True}
        )

    def fc(self, x: int, weights: list[str], biases: list[str] | None = None) -> int:
        """x @ W.T + b with the named weights stacked along their output rows."""
        w = self.weight(*weights)
        self.fc_inputs.append((tuple(weights), x))
        bias = self.weight(*biases) if biases else -1
        out = (*self.shape(x)[:-1], self.shape(w)[0])
        options = {
            "fused_activation_function": "NONE",
            "keep_num_dims": True,
            "asymmetric_quantize_inputs": True,
        }
        if self.tensors[w].dtype not in self.split_dtypes:
            return self.op("FULLY_CONNECTED", [x, w, bias], out, options=options)
        rows = out[0]
        both = self.op(
            "FULLY_CONNECTED", [self.split(x), w, -1], (2 * rows, *out[1:]), options=options
        )
        rest = [0] * (len(out) - 1)
        y = self.add(self.slice(both, (0, *rest), out), self.slice(both, (rows, *rest), out))
        return self.add(y, bias) if bias >= 0 else y

    def split(self, x: int) -> int:
        """[x; x - q(x)] along the first axis, q(x) being the per-row int8 quantization of
        XNNPACK's dynamic-range kernels (xnn_f32_qd8_asymmetric_quantization_params): the
        range [min(0, min x), max(0, max x)] in 255 steps, rounded half to even. The zero
        point only moves the clamp, which a row's own extremes never reach, so it is left out."""
        if x not in self._split:
            shape = self.shape(x)
            row = (*shape[:-1], 1)
            axis = self.ints([len(shape) - 1])
            keep = {"keep_dims": True}
            zero = self.scalar(0.0)
            hi = self.op(
                "MAXIMUM", [self.op("REDUCE_MAX", [x, axis], row, options=keep), zero], row
            )
            lo = self.op(
                "MINIMUM", [self.op("REDUCE_MIN", [x, axis], row, options=keep), zero], row
            )
            # an all-zero row: any finite scale (q(x) = 0 = x)
            span = self.op("MAXIMUM", [self.sub(hi, lo), self.scalar(1e-30)], row)
            scale = self.binary("DIV", self.scalar(255.0), span)
            q = self.binary("DIV", self.op("ROUND", [self.mul(x, scale)], shape), scale)
            self._split[x] = self.concat([x, self.sub(x, q)], axis=0)
        return self._split[x]

    def split_last(self, x: int, sizes: list[int]) -> list[int]:
        """SLICE x into consecutive parts along its last axis."""
        *lead, _ = self.shape(x)
        parts, start = [], 0
        for n in sizes:
            parts.append(self.slice(x, (*[0] * len(lead), start), (*lead, n)))
            start += n
        return parts

    def batch_matmul(self, a: int, b: int, adj_y: bool) -> int:
        sa, sb = self.shape(a), self.shape(b)
        n = sb[-2] if adj_y else sb[-1]
        return self.op(
            "BATCH_MATMUL", [a, b], (*sa[:-1], n), options={"adj_x": False, "adj_y": adj_y}
        )


class _Decoder:
    """The generic decoder: every architecture is this graph with other ModelSpec values."""

    def __init__(
        self, spec: ModelSpec, seq_len: int, lora_rank: int = 0, lora_targets: tuple[str, ...] = ()
    ):
        self.spec = spec
        self.S = seq_len
        self.lora_rank = lora_rank
        self.lora_targets = frozenset(lora_targets) if lora_rank else frozenset()

    # -- constants derived from the spec ----------------------------------------------------

    def rope_tables(self, sliding: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """cos and sign-folded sin tables [S, rotary_dims], as transformers computes them
        (for the sliding-window layers' own rotary base when `sliding`)."""
        spec = self.spec
        theta, scaling = spec.rope_theta, spec.rope_scaling
        if sliding:
            theta = spec.sliding_rope_theta or theta
            scaling = spec.sliding_rope_scaling
        inv_freq, attention_scaling = rope_inv_freq(spec.rotary_dims, theta, scaling, self.S)
        freqs = np.arange(self.S, dtype=np.float32)[:, None] * inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float32)
        cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
        if attention_scaling != 1.0:
            cos = (cos * np.float32(attention_scaling)).astype(np.float32)
            sin = (sin * np.float32(attention_scaling)).astype(np.float32)
        half = spec.rotary_dims // 2
        sin[:, :half] *= -1.0  # rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin)
        return cos, sin

    def alibi_table(self) -> np.ndarray:
        """[heads, 1, S] biases, rounded through bfloat16 as transformers' Falcon does
        (slopes and positions in bfloat16, their product rounded again)."""
        n = self.spec.num_heads
        closest = 2 ** math.floor(math.log2(n))
        base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
        slopes = [base**p for p in range(1, closest + 1)]
        if closest != n:
            extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
            slopes += [extra**p for p in range(1, 1 + 2 * min(closest, n - closest), 2)]
        s = _bfloat16(np.asarray(slopes, np.float32))[:, None]
        pos = _bfloat16(np.arange(self.S, dtype=np.float32))[None, :]
        table = _bfloat16(s * pos) / np.float32(math.sqrt(self.spec.head_dim))
        return table[:, None, :].astype(np.float32)

    # -- building blocks ----------------------------------------------------------------------

    def norm(self, g: _Subgraph, x: int, role: str, layer: int | None) -> int:
        spec = self.spec
        w_name = role_name(role + ".w", layer)
        if spec.norm == "rms":
            return self.rms_norm(g, x, w_name)
        mean = g.mean_last(x)
        d = g.sub(x, mean)
        var = g.mean_last(g.mul(d, d))
        r = g.op("RSQRT", [g.add(var, g.scalar(spec.norm_eps))], g.shape(var))
        y = g.mul(g.mul(d, r), g.weight(w_name))
        if spec.norm_bias:
            y = g.add(y, g.weight(role_name(role + ".b", layer)))
        return y

    def rms_norm(self, g: _Subgraph, x: int, w_name: str) -> int:
        """RMSNorm over the last axis with the container's weight (plus the spec's offset)."""
        spec = self.spec
        ms = g.mean_last(g.mul(x, x))
        r = g.op("RSQRT", [g.add(ms, g.scalar(spec.norm_eps))], g.shape(ms))
        y = g.mul(x, r)
        if spec.norm_offset:
            scale = g.const(
                "wo:" + w_name, lambda: g.w.c.float(w_name) + np.float32(spec.norm_offset)
            )
        else:
            scale = g.weight(w_name)
        return g.mul(y, scale)

    def softcap(self, g: _Subgraph, x: int, cap: float) -> int:
        """cap * tanh(x / cap): Gemma 2's soft limit on attention scores and logits."""
        y = g.op("TANH", [g.mul(x, g.scalar(1.0 / cap))], g.shape(x))
        return g.mul(y, g.scalar(cap))

    def windowed(self, layer: int) -> bool:
        """True if this layer's sliding window hides keys this graph's cache can hold."""
        spec = self.spec
        return spec.is_sliding(layer) and spec.sliding_window < self.S

    def window_mask(self, g: _Subgraph, mask: int, input_pos: int) -> int:
        """The causal `mask` [1,T,S] with keys at or before query_pos - window masked too.

        Computed from `input_pos` inside the graph, so a runtime that feeds only the causal
        mask (LiteRT-LM) gets the sliding window right."""
        _, T, S = g.shape(mask)
        window = int(self.spec.sliding_window)
        keys = g.const(f"key_pos{S}", lambda: np.arange(S, dtype=np.int32).reshape(1, 1, S))
        limit = g.reshape(g.sub(input_pos, g.ints([window])), (1, T, 1))
        hidden = g.op("LESS_EQUAL", [keys, limit], (1, T, S), "bool")
        neg = g.scalar(MASKED)
        return g.op("SELECT_V2", [hidden, neg, mask], (1, T, S))

    def window_rows(self, g: _Subgraph, ctx: dict[str, int], T: int, S: int) -> int:
        """Indices [n] of the cache rows a sliding layer's T queries can see, n = window + T - 1
        rows starting at clamp(input_pos[0] - window + 1, 0, S - n); shared by the layers."""
        n = int(self.spec.sliding_window) + T - 1
        key = f"window_rows{S}"
        if key not in ctx:
            first = g.sub(ctx["pos0"], g.ints([n - T]))
            first = g.op("MAXIMUM", [first, g.ints([0])], (1,), "int32")
            first = g.op("MINIMUM", [first, g.ints([S - n])], (1,), "int32")
            ctx[key] = g.add(g.ints(list(range(n))), first)
        return ctx[key]

    def linear(
        self, g: _Subgraph, x: int, roles: list[str], layer: int | None, bias: bool
    ) -> list[int]:
        """One FULLY_CONNECTED for several roles sharing an input (Q/K/V, gate/up)."""
        weights = [role_name(r + ".w", layer) for r in roles]
        biases = [role_name(r + ".b", layer) for r in roles] if bias else None
        y = g.fc(x, weights, biases)
        outs = [y]
        if len(roles) > 1:
            outs = g.split_last(y, [role_shape(self.spec, r + ".w")[0] for r in roles])
        if layer is None or not self.lora_targets.intersection(roles):
            return outs
        return [
            self.lora(g, x, y, role, layer) if role in self.lora_targets else y
            for role, y in zip(roles, outs, strict=True)
        ]

    def lora(self, g: _Subgraph, x: int, y: int, role: str, layer: int) -> int:
        """y + (x A') B' with A' [in, R] and B' [R, out] taken as signature inputs."""
        out_dim, in_dim = role_shape(self.spec, role + ".w")
        a = g.input(lora_input_name(role, "a", layer), (in_dim, self.lora_rank))
        b = g.input(lora_input_name(role, "b", layer), (self.lora_rank, out_dim))
        return g.add(y, g.batch_matmul(g.batch_matmul(x, a, adj_y=False), b, adj_y=False))

    def activation(self, g: _Subgraph, x: int) -> int:
        act = self.spec.activation
        if act in ("gelu", "gelu_tanh"):
            return g.op("GELU", [x], g.shape(x), options={"approximate": act == "gelu_tanh"})
        if act == "silu":
            return g.mul(x, g.op("LOGISTIC", [x], g.shape(x)))
        return g.op("RELU", [x], g.shape(x))

    def rotary(self, g: _Subgraph, x: int, cos: int, sin: int) -> int:
        """Rotate the first rotary_dims of every head (x: [T, heads, D])."""
        T, H, D = g.shape(x)
        rd = self.spec.rotary_dims
        rot = x if rd == D else g.slice(x, (0, 0, 0), (T, H, rd))
        half = rd // 2
        x1 = g.slice(rot, (0, 0, 0), (T, H, half))
        x2 = g.slice(rot, (0, 0, half), (T, H, half))
        out = g.add(g.mul(rot, cos), g.mul(g.concat([x2, x1], axis=2), sin))
        if rd == D:
            return out
        return g.concat([out, g.slice(x, (0, 0, rd), (T, H, D - rd))], axis=2)

    def attended_range(self, layer: int, ctx: dict[str, int]) -> tuple[int, int]:
        """Cache positions [start, end) this layer's queries read: the signature's KV bucket.
        The `mask` columns cover exactly this range."""
        return 0, ctx["kv_len"]

    def attention(self, g: _Subgraph, x: int, layer: int, ctx: dict[str, int]) -> int:
        spec = self.spec
        T = g.shape(x)[0]
        NH, KVH, D, S = spec.num_heads, spec.num_kv_heads, spec.head_dim, self.S
        G = NH // KVH
        start, end = self.attended_range(layer, ctx)
        q, k, v = self.linear(g, x, ["q", "k", "v"], layer, spec.qkv_bias)
        q = g.reshape(q, (T, NH, D))
        k = g.reshape(k, (T, KVH, D))
        v = g.reshape(v, (T, KVH, D))
        if spec.qk_norm:
            q = self.rms_norm(g, q, role_name("q_norm.w", layer))
            k = self.rms_norm(g, k, role_name("k_norm.w", layer))
        sliding = self.windowed(layer)
        if spec.rotary_dims:
            kind = "_sliding" if spec.is_sliding(layer) else ""
            cos, sin = ctx["cos" + kind], ctx["sin" + kind]
            q = self.rotary(g, q, cos, sin)
            k = self.rotary(g, k, cos, sin)
        scale = spec.attn_scale if spec.attn_scale is not None else 1.0 / math.sqrt(D)
        q = g.mul(q, g.scalar(scale))

        # Write this call's keys/values into the caches at input_pos[0].
        k_cache = g.input(f"kv_cache_k_{layer}", (1, KVH, S, D))
        v_cache = g.input(f"kv_cache_v_{layer}", (1, KVH, D, S))
        k_new = g.reshape(g.transpose(k, (1, 0, 2)), (1, KVH, T, D))
        v_new = g.reshape(g.transpose(v, (1, 2, 0)), (1, KVH, D, T))
        k_all = g.op("DYNAMIC_UPDATE_SLICE", [k_cache, k_new, ctx["k_start"]], (1, KVH, S, D))
        v_all = g.op("DYNAMIC_UPDATE_SLICE", [v_cache, v_new, ctx["v_start"]], (1, KVH, D, S))
        g.outputs[f"kv_cache_k_{layer}"] = k_all
        g.outputs[f"kv_cache_v_{layer}"] = v_all
        if (start, end) != (0, S):  # attend over cache positions [start, end) only
            k_all = g.slice(k_all, (0, 0, start, 0), (1, KVH, end - start, D))
            v_all = g.slice(v_all, (0, 0, 0, start), (1, KVH, D, end - start))
            S = end - start
        mask = ctx["mask_sliding"] if sliding else ctx["mask"]
        if sliding and not spec.alibi and spec.sliding_window + T - 1 < S:
            # A sliding layer reads only the cache rows its window can see, so its cost follows
            # the window, not the cache: rows [b, b + n) gathered at a position-dependent b.
            idx = self.window_rows(g, ctx, T, S)
            n = g.shape(idx)[0]
            gather = {"batch_dims": 0}
            k_all = g.op("GATHER", [k_all, idx], (1, KVH, n, D), options={"axis": 2, **gather})
            v_all = g.op("GATHER", [v_all, idx], (1, KVH, D, n), options={"axis": 3, **gather})
            if f"mask_window{S}" not in ctx:  # one gather of the mask for all sliding layers
                ctx[f"mask_window{S}"] = g.op(
                    "GATHER", [mask, idx], (1, T, n), options={"axis": 2, **gather}
                )
            mask = ctx[f"mask_window{S}"]
            S = n

        # Scores for the query heads of each kv head at once: [KVH, G*T, S].
        qg = g.reshape(g.transpose(q, (1, 0, 2)), (KVH, G * T, D))
        scores = g.batch_matmul(qg, g.reshape(k_all, (KVH, S, D)), adj_y=True)
        scores = g.reshape(scores, (NH, T, S))
        if spec.attn_softcap:
            scores = self.softcap(g, scores, spec.attn_softcap)
        scores = g.add(scores, mask)
        if spec.alibi:
            scores = g.add(scores, ctx["alibi"])
        probs = g.op("SOFTMAX", [scores], (NH, T, S), options={"beta": 1.0})
        probs = g.reshape(probs, (KVH, G * T, S))
        ctx_v = g.batch_matmul(probs, g.reshape(v_all, (KVH, D, S)), adj_y=True)
        heads = g.transpose(g.reshape(ctx_v, (NH, T, D)), (1, 0, 2))
        return self.linear(g, g.reshape(heads, (T, NH * D)), ["o"], layer, spec.attn_out_bias)[0]

    def mlp(self, g: _Subgraph, x: int, layer: int) -> int:
        spec = self.spec
        if spec.gated_mlp:
            gate, up = self.linear(g, x, ["gate", "up"], layer, spec.mlp_bias)
            h = g.mul(self.activation(g, gate), up)
        else:
            h = self.activation(g, self.linear(g, x, ["up"], layer, spec.mlp_bias)[0])
        return self.linear(g, h, ["down"], layer, spec.mlp_bias)[0]

    # -- the whole model ----------------------------------------------------------------------

    def build(self, g: _Subgraph, T: int, kv_len: int | None = None) -> None:
        """One signature: T tokens per call, attending over cache positions [0, kv_len)."""
        spec = self.spec
        L = kv_len or self.S
        tokens = g.input("tokens", (1, T), "int32")
        input_pos = g.input("input_pos", (T,), "int32")
        mask_in = g.input("mask", (1, 1, T, L))

        ctx: dict[str, int] = {"mask": g.reshape(mask_in, (1, T, L)), "kv_len": L}
        pos0 = ctx["pos0"] = g.slice(input_pos, (0,), (1,))
        ctx["k_start"] = g.concat([g.ints([0, 0]), pos0, g.ints([0])], axis=0)
        ctx["v_start"] = g.concat([g.ints([0, 0, 0]), pos0], axis=0)
        if spec.rotary_dims:
            cos_t, sin_t = (
                g.const(f"rope_{n}", (lambda i=i: self.rope_tables()[i]))
                for i, n in enumerate(("cos", "sin"))
            )
            rd = spec.rotary_dims
            gather = {"axis": 0, "batch_dims": 0}
            ctx["cos"] = g.reshape(
                g.op("GATHER", [cos_t, input_pos], (T, rd), options=gather), (T, 1, rd)
            )
            ctx["sin"] = g.reshape(
                g.op("GATHER", [sin_t, input_pos], (T, rd), options=gather), (T, 1, rd)
            )
            ctx["cos_sliding"], ctx["sin_sliding"] = ctx["cos"], ctx["sin"]
            if spec.sliding_layers and (spec.sliding_rope_theta or spec.sliding_rope_scaling):
                for i, n in enumerate(("cos", "sin")):
                    table = g.const(f"rope_sliding_{n}", (lambda i=i: self.rope_tables(True)[i]))
                    ctx[f"{n}_sliding"] = g.reshape(
                        g.op("GATHER", [table, input_pos], (T, rd), options=gather), (T, 1, rd)
                    )
        if spec.alibi:
            ctx["alibi"] = g.const(f"alibi{L}", lambda: self.alibi_table()[:, :, :L])
        if any(self.windowed(i) for i in range(spec.num_layers)):
            ctx["mask_sliding"] = self.window_mask(g, ctx["mask"], input_pos)

        x = self.embed(g, g.reshape(tokens, (T,)), input_pos)
        for layer in range(spec.num_layers):
            n1 = self.norm(g, x, "attn_norm", layer)
            attn = self.attention(g, n1, layer, ctx)
            if spec.parallel_residual:
                x = g.add(g.add(x, attn), self.mlp(g, n1, layer))
                continue
            if spec.post_norms:
                attn = self.norm(g, attn, "post_attn_norm", layer)
            x = g.add(x, attn)
            h = self.mlp(g, self.norm(g, x, "mlp_norm", layer), layer)
            if spec.post_norms:
                h = self.norm(g, h, "post_mlp_norm", layer)
            x = g.add(x, h)
        x = self.norm(g, x, "final_norm", None)
        if spec.tied_embeddings:
            logits = g.fc(x, [role_name("embed")])
        else:
            head = self.linear(g, x, ["lm_head"], None, spec.lm_head_bias)
            logits = head[0]
        if spec.final_softcap:
            logits = self.softcap(g, logits, spec.final_softcap)
        g.outputs["logits"] = g.reshape(logits, (1, T, spec.vocab_size))

    def embed(self, g: _Subgraph, ids: int, input_pos: int) -> int:
        """Token embeddings, gathered from the table in its stored dtype: only the T rows a
        call needs are widened to float32, and a tied output layer reads the same constant,
        so the graph holds the table once, as small as the container does.

        LiteRT's kernels (checked with ai-edge-litert 2.3 and LiteRT-LM 0.18): EMBEDDING_LOOKUP
        dequantizes int8 and int4 per-row tables itself; float16 rows are GATHERed and then
        DEQUANTIZEd; blockwise int4 rows are GATHERed as bytes and their nibbles unpacked."""
        spec = self.spec
        name = role_name("embed")
        info = g.w.c.info(name)
        T, H = g.shape(ids)[0], spec.hidden_size
        gather = {"axis": 0, "batch_dims": 0}
        table = g.weight(name)  # the constant the tied output layer also uses
        stored = g.stored(name)
        if stored is None:  # widened to float32 (asymmetric): look the rows up in that copy
            x = g.op("EMBEDDING_LOOKUP", [ids, table], (T, H))
        elif g.tensors[stored].dtype == "float16":
            rows = g.op("GATHER", [stored, ids], (T, H), "float16", options=gather)
            x = g.op("DEQUANTIZE", [rows], (T, H))
        elif info.dtype == "int4" and H % 2:  # rows do not start on whole bytes: widen
            copy = g.const("ef:" + name, lambda: g.w.c.float(name))
            x = g.op("GATHER", [copy, ids], (T, H), options=gather)
        elif info.dtype == "int4" and info.block_size:
            x = self.gather_int4_rows(g, stored, ids)
        else:  # float32, int8 and int4 with one scale per row
            x = g.op("EMBEDDING_LOOKUP", [ids, table], (T, H))
        if spec.embedding_scale != 1.0:
            x = g.mul(x, g.scalar(np.float32(spec.embedding_scale)))
        if spec.learned_positions:
            pos = g.const("pos", lambda: g.w.c.float(role_name("pos_embed"))[: self.S])
            x = g.add(
                x,
                g.op(
                    "GATHER",
                    [pos, input_pos],
                    (T, spec.hidden_size),
                    options={"axis": 0, "batch_dims": 0},
                ),
            )
        return x

    def gather_int4_rows(self, g: _Subgraph, table: int, ids: int) -> int:
        """Rows of a blockwise int4 table: GATHER the packed bytes (the same buffer viewed as
        int8 [rows, columns / 2]), split each byte into its two signed nibbles (low first), and
        scale each block of a row by its gathered float16 scale."""
        t = g.tensors[table]
        V, H = t.shape
        T = g.shape(ids)[0]
        q = t.quantization
        assert q is not None and q.block_size, "blockwise int4 only"
        block = q.block_size
        half = (T, H // 2)
        packed = g.tensor((V, H // 2), "int8", t.name + ".bytes", t.buffer)
        gather = {"axis": 0, "batch_dims": 0}
        rows = g.op(
            "CAST", [g.op("GATHER", [packed, ids], half, "int8", options=gather)], half, "int32"
        )
        sixteen = g.const("i32:16", lambda: np.asarray([16], np.int32))
        low = g.op("CAST", [g.op("FLOOR_MOD", [rows, sixteen], half, "int32")], half)
        high = g.op("CAST", [g.op("FLOOR_DIV", [rows, sixteen], half, "int32")], half)
        eight = g.scalar(8.0)
        low = g.sub(g.op("FLOOR_MOD", [g.add(low, eight), g.scalar(16.0)], half), eight)
        values = g.op("PACK", [low, high], (T, H // 2, 2), options={"values_count": 2, "axis": 2})
        nb = H // block
        values = g.reshape(values, (T, nb, block))
        scales = g.op("GATHER", [q.scales, ids], (T, nb), "float16", options=gather)
        scales = g.op("DEQUANTIZE", [scales], (T, nb))
        return g.reshape(g.mul(values, g.reshape(scales, (T, nb, 1))), (T, H))


def rope_inv_freq(
    dims: int, theta: float, scaling: dict[str, Any] | None, seq_len: int
) -> tuple[np.ndarray, float]:
    """Rotary inverse frequencies [dims / 2] and the cos/sin scale, as transformers' rope
    functions compute them for `rope_type` default, linear, llama3 and longrope.

    longrope uses its short factors when the graph's cache fits in the original context and
    its long factors otherwise (transformers switches per call on the sequence length)."""
    exponent = np.arange(0, dims, 2, dtype=np.int64).astype(np.float32) / np.float32(dims)
    base = (np.float32(theta) ** exponent).astype(np.float32)
    inv_freq = (np.float32(1.0) / base).astype(np.float32)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        factor = np.float32(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)).astype(
            np.float32
        )
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "longrope":
        long = seq_len > int(scaling["original_max_position_embeddings"])
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], np.float32)
        inv = (np.float32(1.0) / (ext * base)).astype(np.float32)
        return inv, float(scaling.get("attention_factor", 1.0))
    raise ValueError(f"unsupported rope_type {kind!r}")  # architectures.py refuses these


def _bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def build_graph(
    container: Container,
    spec: ModelSpec,
    writer: ModelWriter,
    signatures: list[tuple[str, int, int]],
    seq_len: int,
    progress: Callable[[int, int, str], None],
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = (),
    activations: str = "auto",
) -> None:
    """Add one subgraph + signature per (name, tokens per call, attended cache length) to
    `writer`; weight buffers are shared by all of them. lora_rank > 0 adds LoRA inputs to the
    `lora_targets` roles; `activations` is one of ACTIVATION_MODES."""
    weights = _Weights(container, writer)
    decoder = _Decoder(spec, seq_len, lora_rank, lora_targets)
    for i, (key, length, kv_len) in enumerate(signatures):
        progress(i, len(signatures) + 1, f"building {key}")
        g = _Subgraph(weights, activations)
        decoder.build(g, length, kv_len)
        index = writer.add_subgraph(
            Subgraph(
                name=key,
                tensors=g.tensors,
                inputs=list(g.inputs.values()),
                outputs=list(g.outputs.values()),
                operators=g.ops,
            )
        )
        writer.add_signature(Signature(key, index, dict(g.inputs), dict(g.outputs)))
