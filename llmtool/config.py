"""Run configurations that mirror MediaPipe's ConversionConfig, and YAML loading.

A YAML file's keys are the dataclass field names; command-line flags override the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from llmtool.errors import LlmToolError

QUANTIZATION_BITS = {"float32": 32, "float16": 16, "int8": 8, "int4": 4}
VALID_BITS = (32, 16, 8, 4)
BLOCK_SIZES = (32, 64, 128)  # XNNPACK's blockwise int4 kernels need multiples of 32
DEFAULT_BLOCK_SIZE = 32  # llama.cpp's Q4_0 block


@dataclass
class ConversionConfig:
    """What `llmtool convert` does; field names follow MediaPipe's ConversionConfig."""

    input_ckpt: str | None = None
    model_type: str | None = None
    ckpt_format: str | None = None  # inferred from the file names when None
    backend: str = "cpu"
    output_dir: str | None = None  # also write one file per tensor + layer_info.txt here
    output_tflite_file: str | None = None
    combine_file_only: bool = False
    vocab_model_file: str | None = None  # defaults to the checkpoint folder
    quantization: str | None = None  # shorthand setting all three *_quant_bits
    attention_quant_bits: int | None = None
    feedforward_quant_bits: int | None = None
    embedding_quant_bits: int | None = None
    is_symmetric: bool = True
    # int4 weights: blockwise scales every block_size values of a row (0 = one per row); None =
    # DEFAULT_BLOCK_SIZE where it divides the row, else int8 per row
    block_size: int | None = None
    lora_ckpt: str | None = None
    lora_rank: int | None = None
    lora_output_tflite_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def bits(self) -> dict[str, int]:
        """Bits per weight kind after applying the shorthand (default int8, as the reference).

        `int4` keeps the embedding (and untied output layer) at 8 bits unless
        embedding_quant_bits says otherwise: at 4 bits they cost most of the quality.
        """
        if self.quantization is not None and self.quantization not in QUANTIZATION_BITS:
            raise LlmToolError(
                f"unknown quantization {self.quantization!r} (use {', '.join(QUANTIZATION_BITS)})"
            )
        base = QUANTIZATION_BITS[self.quantization or "int8"]
        out = {}
        for kind in ("attention", "feedforward", "embedding"):
            value = getattr(self, f"{kind}_quant_bits")
            if value is None and kind == "embedding" and base == 4:
                value = 8
            value = base if value is None else int(value)
            if value not in VALID_BITS:
                raise LlmToolError(f"{kind}_quant_bits must be one of 32, 16, 8, 4 (got {value})")
            out[kind] = value
        return out

    def validate(self) -> None:
        check_types(self)
        if self.backend not in ("cpu", "gpu"):
            raise LlmToolError(f"backend must be cpu or gpu (got {self.backend!r})")
        if not self.output_tflite_file:
            raise LlmToolError("no output file: give --output-tflite-file")
        if self.combine_file_only:
            if not self.output_dir:
                raise LlmToolError("--combine-file-only needs --output-dir")
        else:
            if not self.input_ckpt:
                raise LlmToolError("no checkpoint: give --input-ckpt")
            if not self.model_type:
                raise LlmToolError("no model type: give --model-type")
        if self.lora_ckpt and not self.lora_output_tflite_file:
            raise LlmToolError("--lora-ckpt needs --lora-output-tflite-file")
        if not self.lora_ckpt and (self.lora_output_tflite_file or self.lora_rank is not None):
            raise LlmToolError("--lora-rank / --lora-output-tflite-file need --lora-ckpt")
        self.bits()
        check_block_size_option(self.block_size, self.is_symmetric)


def check_block_size_option(block_size: int | None, symmetric: bool = True) -> None:
    if block_size is None:
        return
    if block_size != 0 and block_size not in BLOCK_SIZES:
        sizes = ", ".join(map(str, BLOCK_SIZES))
        raise LlmToolError(f"block size must be {sizes} or 0 for per-channel (got {block_size})")
    if block_size and not symmetric:
        raise LlmToolError("blockwise quantization is symmetric: drop --no-is-symmetric")


@dataclass
class BundleConfig:
    """What `llmtool bundle` does; field names follow MediaPipe's BundleConfig."""

    tflite_model: str | None = None  # an exported graph with prefill_<T>/decode signatures
    tokenizer_model: str | None = None  # tokenizer.model, tokenizer.json, or their folder
    start_token: str | None = None  # default: the tokenizer's BOS when it adds one
    stop_tokens: list[str] | None = None  # default: the tokenizer's stop tokens
    output_filename: str | None = None  # .task or .litertlm, by its extension
    enable_bytes_to_unicode_mapping: bool | None = None  # SentencePiece over GPT-2 byte chars
    system_prompt: str | None = None  # said once at the start of a session
    prompt_prefix: str | None = None  # before each user prompt
    prompt_suffix: str | None = None  # after each user prompt
    model: str | None = None  # shortcut: a converted .bin gives graph, tokenizer and tokens

    def validate(self) -> None:
        if isinstance(self.stop_tokens, str):
            self.stop_tokens = [self.stop_tokens]
        check_types(self)
        if not self.output_filename:
            raise LlmToolError("no output file: give --output-filename (.task or .litertlm)")
        if self.model and self.tflite_model:
            raise LlmToolError("give --model (a converted .bin) or --tflite-model, not both")
        if not self.model and not self.tflite_model:
            raise LlmToolError("no model: give --tflite-model (and --tokenizer-model) or --model")
        if self.tflite_model and not self.tokenizer_model:
            raise LlmToolError("no tokenizer: give --tokenizer-model")
        if self.stop_tokens is not None:
            if not all(self.stop_tokens):
                raise LlmToolError("stop_tokens must be a list of non-empty strings")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LlmToolError("config file not found", p)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmToolError(f"invalid YAML ({first})", p) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlmToolError("expected a mapping of option names to values", p)
    return data


def merge_config(cls: type, yaml_path: str | Path | None, overrides: dict[str, Any]) -> Any:
    """A `cls` instance from a YAML file (optional) with non-None flag values on top.

    Relative paths in the YAML file are taken relative to the file's folder.
    """
    names = {f.name for f in fields(cls)} - {"extra"}
    values: dict[str, Any] = {}
    if yaml_path is not None:
        raw = load_yaml(yaml_path)
        unknown = sorted(str(k) for k in raw if k not in names)
        if unknown:
            known = ", ".join(sorted(names))
            raise LlmToolError(
                f"unknown key {unknown[0]!r} in config file (known keys: {known})", yaml_path
            )
        base = Path(yaml_path).parent
        for key, value in raw.items():
            if isinstance(value, str) and _is_path_field(key) and not Path(value).is_absolute():
                value = str(base / value)
            values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    merged = replace(cls(), **values)
    check_types(merged, yaml_path)
    return merged


def check_types(config: Any, path: str | Path | None = None) -> None:
    """Every field holds the type its annotation names: YAML's `is_symmetric: "no"` is a str,
    not false, and `attention_quant_bits: eight` is not a number; refuse both, naming the key.

    The one type check of llmtool's options: configs read from YAML, option dataclasses built
    in Python (ExportOptions, QuantizeOptions, ...) and, through check_arguments, the keyword
    arguments of the pipeline functions."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        if f.name != "extra":
            _check_value(f.name, getattr(config, f.name), hints[f.name], path)


def check_arguments(function: Callable[..., Any], **values: Any) -> None:
    """check_types for a function's arguments, from its annotations (one line naming the
    argument, e.g. `window must be a whole number (got str '8')`)."""
    hints = get_type_hints(function)
    for name, value in values.items():
        _check_value(name, value, hints[name], None)


def _check_value(name: str, value: Any, want: Any, path: str | Path | None) -> None:
    if not _matches(value, want):
        raise LlmToolError(
            f"{name} must be {_describe(want)} (got {type(value).__name__} {value!r})"[:200], path
        )


def _matches(value: Any, want: Any) -> bool:
    if want is Any:
        return True
    origin = get_origin(want)
    if origin in (Union, UnionType):
        return any(_matches(value, arg) for arg in get_args(want))
    if want is type(None):
        return value is None
    if want is bool:
        return isinstance(value, bool)
    if want is int:  # numpy integers too, never a bool
        return isinstance(value, Integral) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, Real) and not isinstance(value, bool)
    if want is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = get_args(want)
        return isinstance(value, (list, tuple)) and (
            not args or all(_matches(v, args[0]) for v in value)
        )
    if origin is dict:
        return isinstance(value, dict)
    if origin is Callable:
        return callable(value)
    return isinstance(value, origin or want)


def _describe(want: Any) -> str:
    if get_origin(want) in (Union, UnionType):
        args = get_args(want)
        parts = [_describe(a) for a in args if a is not type(None)]
        if "a path" in parts and "a string" in parts:  # str | os.PathLike: a path
            parts.remove("a string")
        return " or ".join(parts) + (" (or absent)" if type(None) in args else "")
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if want in names:
        return names[want]
    origin = get_origin(want)
    if origin in (list, tuple):
        args = [a for a in get_args(want) if a is not Ellipsis]
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if origin is os.PathLike or (isinstance(want, type) and issubclass(want, os.PathLike)):
        return "a path"
    if origin is Callable:
        return "a function"
    return getattr(want, "__name__", str(want))


def _plural(want: Any) -> str:
    return {int: "whole numbers", str: "strings", float: "numbers"}.get(want, _describe(want))


def _is_path_field(name: str) -> bool:
    return name in {
        "input_ckpt",
        "output_dir",
        "output_tflite_file",
        "vocab_model_file",
        "lora_ckpt",
        "lora_output_tflite_file",
        "tflite_model",
        "tokenizer_model",
        "output_filename",
        "model",
    }


# ------------------------------------------------------------------------------------------
# release


@dataclass(frozen=True)
class ReleaseConfig:
    """What `llmtool release` builds: one checkpoint through a backends x precisions matrix.

    YAML layout (see configs/release-example.yaml): top-level `name`, `model_type`,
    `input_ckpt`, `ckpt_format`, `vocab_model_file`, `lora_ckpt`, `lora_rank`, `output_dir`,
    and the sections `matrix`, `export`, `evaluation`, `smoke`.
    """

    name: str
    model_type: str
    input_ckpt: str
    output_dir: str
    backends: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("int8",)
    outputs: tuple[str, ...] = ("container",)
    ckpt_format: str | None = None
    vocab_model_file: str | None = None
    lora_ckpt: str | None = None
    lora_rank: int | None = None
    max_seq_len: int | None = None  # export: KV cache length (None: export's default)
    prefill_len: int = 64  # export: tokens per prefill call
    kv_buckets: tuple[int, ...] | None = None  # export: attended lengths (None: export's)
    activations: str = "auto"  # export: split activations (auto | split | single, decoder.py)
    eval_text: str | None = None  # evaluation: held-out text; None: no quality line
    eval_window: int = 256
    eval_max_windows: int | None = 16
    eval_kl: bool = True  # evaluation: also KL against the float checkpoint (transformers)
    smoke_prompt: str = "Once upon a time"
    smoke_max_tokens: int = 32  # 0: no smoke run
    # bundle: BundleConfig's token and prompt-template fields for .task / .litertlm outputs
    bundle: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the YAML file it came from (for error messages)


_RELEASE_TOP = {
    "name", "model_type", "input_ckpt", "ckpt_format", "vocab_model_file", "lora_ckpt",
    "lora_rank", "output_dir", "matrix", "export", "evaluation", "smoke", "bundle",
}  # fmt: skip
_RELEASE_BUNDLE_KEYS = (
    "start_token", "stop_tokens", "enable_bytes_to_unicode_mapping", "system_prompt",
    "prompt_prefix", "prompt_suffix",
)  # fmt: skip
_RELEASE_SECTIONS = {
    "matrix": {"backends": "backends", "precisions": "precisions", "outputs": "outputs"},
    "export": {
        "max_seq_len": "max_seq_len",
        "prefill_len": "prefill_len",
        "kv_buckets": "kv_buckets",
        "activations": "activations",
    },
    "evaluation": {
        "text": "eval_text",
        "window": "eval_window",
        "max_windows": "eval_max_windows",
        "kl": "eval_kl",
    },
    "smoke": {"prompt": "smoke_prompt", "max_tokens": "smoke_max_tokens"},
}
_RELEASE_PATHS = {"input_ckpt", "vocab_model_file", "lora_ckpt", "output_dir", "eval_text"}


def load_release_config(
    path: str | Path, output_dir: str | None = None, eval_text: str | None = None
) -> ReleaseConfig:
    """Read and check a release YAML; flags (output_dir, eval_text) win over the file.

    Relative paths in the file are taken from its folder, paths given as flags from the
    current directory.
    """
    raw = load_yaml(path)
    base = Path(path).parent

    def fail(message: str) -> LlmToolError:
        return LlmToolError(message, path)

    unknown = sorted(set(raw) - _RELEASE_TOP)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (expected {', '.join(sorted(_RELEASE_TOP))})")
    values: dict[str, Any] = {
        k: v for k, v in raw.items() if k not in _RELEASE_SECTIONS and k != "bundle"
    }
    bundle = raw.get("bundle") or {}
    if not isinstance(bundle, dict):
        raise fail("bundle: expected a mapping")
    bad = sorted(set(bundle) - set(_RELEASE_BUNDLE_KEYS))
    if bad:
        raise fail(f"bundle: unknown key {bad[0]!r} (expected {', '.join(_RELEASE_BUNDLE_KEYS)})")
    values["bundle"] = dict(bundle)
    for section, names in _RELEASE_SECTIONS.items():
        body = raw.get(section) or {}
        if not isinstance(body, dict):
            raise fail(f"{section}: expected a mapping")
        bad = sorted(set(body) - set(names))
        if bad:
            raise fail(f"{section}: unknown key {bad[0]!r} (expected {', '.join(names)})")
        for key, field_name in names.items():
            if key in body:
                values[field_name] = body[key]
    for key in _RELEASE_PATHS:
        value = values.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise fail(f"{key}: expected a path")
            if not Path(value).is_absolute():
                values[key] = str(base / value)
    if output_dir is not None:
        values["output_dir"] = output_dir
    if eval_text is not None:
        values["eval_text"] = eval_text
    for key in ("name", "model_type", "input_ckpt", "output_dir"):
        if not values.get(key):
            raise fail(f"missing {key!r}")
    buckets = values.get("kv_buckets")
    if buckets is not None:
        if not isinstance(buckets, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) for b in buckets
        ):
            raise fail("export.kv_buckets: expected a list of integers")
        values["kv_buckets"] = tuple(buckets)
    for key in ("backends", "precisions", "outputs"):
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise fail(f"matrix.{key}: expected a non-empty list of names")
        if len(set(value)) != len(value):
            raise fail(f"matrix.{key}: a name is listed twice")
        values[key] = tuple(value)
    ints = ("max_seq_len", "prefill_len", "eval_window", "smoke_max_tokens", "lora_rank")
    for key in (*ints, "eval_max_windows"):
        value = values.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise fail(f"{key}: expected an integer (got {value!r})")
    if not isinstance(values.get("eval_kl", True), bool):
        raise fail("evaluation.kl: expected true or false")
    if not isinstance(values["name"], str) or not all(
        c.isalnum() or c in "._-" for c in values["name"]
    ):
        raise fail(f"name must be letters, digits, '.', '_' or '-' (got {values['name']!r})")
    return ReleaseConfig(**values, source=str(path))
