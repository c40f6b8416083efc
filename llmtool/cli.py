"""The `llmtool` command line: parse flags, merge YAML, call a pipeline, print with Rich.

No work happens here. A user mistake (LlmToolError) becomes one line on stderr and exit code 2.

Conventions every verb follows (add new verbs the same way):
- the model a verb reads is `--model PATH` (inspect and export also take it positionally, the
  older spelling, kept as an alias); the file it writes is `-o/--output PATH`. Verbs that mirror
  a MediaPipe config keep that config's field names as flags (convert's
  `--output-tflite-file`, bundle's `--output-filename`), with `-o` as their short alias.
- outputs are written with llmtool.files.atomic_output (the pipelines do it).
- `--json` prints a machine-readable summary; `--help` shows no type tags.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from llmtool.architectures import ARCHITECTURES
from llmtool.entry import DECIMAL, INTEGER, print_json, run_verb
from llmtool.errors import LlmToolError

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

app = typer.Typer(
    name="llmtool",
    help="Convert Hugging Face language models to on-device TFLite artifacts and run them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def _plain_type_label(self: Any, ctx: Any) -> str | None:
    """--help shows INTEGER / PATH / TEXT after an option (nothing after a flag), not Typer's
    <int> / <path> / <bool> tags."""
    if getattr(self, "metavar", None) is not None and not isinstance(
        self, typer.core.TyperArgument
    ):
        return self.metavar
    if getattr(self, "is_flag", False):
        return None
    label = str(self.display_type(ctx)).strip("<>")
    label = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "bool": None}.get(label, label)
    if label is None:
        return None
    label = label.upper()
    return label + "..." if getattr(self, "nargs", 1) != 1 else label


def _usage_name(self: Any) -> str:
    """Arguments in the usage line as [NAME] / NAME, not Typer's {name}."""
    name = (self.metavar or self.name).upper()
    return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


typer.core.TyperOption.display_type_rich = _plain_type_label  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = _plain_type_label  # type: ignore[method-assign]
typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]


# Typer 0.2x coerces every option through a pydantic TypeAdapter: importing pydantic and
# building the adapters costs ~0.1 s of a `run` that is otherwise ready in a few tenths. Plain
# values of the types our options use (text, whole numbers, decimals, paths without checks) are
# converted here exactly as Typer would; anything else (lists, "3.0" for an integer, a bad
# number, file options) goes through Typer's own coercion, so results and errors are unchanged.
_NOT_PLAIN = object()


def _plain_value(param: Any, value: Any, ctx: Any) -> Any:
    """`value` converted for `param` as Typer would, or _NOT_PLAIN when Typer must do it."""
    info, annotation = param.type_descriptor.parameter_info, param.type_descriptor.annotation
    if param.multiple or param.nargs != 1 or info.parser is not None:
        return _NOT_PLAIN
    if value is None:
        return None
    if info.min is not None or info.max is not None:
        return _NOT_PLAIN
    if annotation in (str, int, float) and type(value) is annotation:  # e.g. a default
        return value
    if annotation is Path and isinstance(value, (str, Path)) and info.path_type is None:
        from typer._param_types import coerce_cli_path  # Typer's checks (exists=...) included

        return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
    if isinstance(value, str):
        if annotation is int and INTEGER.fullmatch(value):
            return int(value)
        if annotation is float and DECIMAL.fullmatch(value):
            return float(value)
    return _NOT_PLAIN


class _PlainCoercion:
    """A parameter's coercion: plain values here, the rest by Typer (built on first need)."""

    def __init__(self) -> None:
        self.typer: Any = None

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        plain = _plain_value(param, value, ctx)
        if plain is not _NOT_PLAIN:
            return plain
        if self.typer is None:
            self.typer = typer._coercion.build_runtime_param(param.type_descriptor)
        return self.typer.coerce(value, param=param, ctx=ctx)


def _runtime_param(self: Any) -> Any:
    if self._runtime_param is None:
        self._runtime_param = _PlainCoercion()
    return self._runtime_param


if hasattr(typer.core, "_TyperParameter") and hasattr(typer, "_coercion"):  # Typer >= 0.2x
    typer.core._TyperParameter.get_runtime_param = _runtime_param  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        from llmtool._version import __version__

        out.print(f"llmtool {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Convert Hugging Face language models to on-device TFLite artifacts and run them."""


def one_model(option: Path | None, positional: Path | None, required: bool = True) -> Path | None:
    """The model named by --model or positionally (the alias); both must agree."""
    if option is not None and positional is not None and option != positional:
        raise LlmToolError(f"two models given: {positional} and --model {option}")
    model = option if option is not None else positional
    if model is None and required:
        raise LlmToolError("give the model with --model FILE")
    return model


F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn user errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (LlmToolError, OSError, KeyboardInterrupt) as exc:
            raise typer.Exit(report_error(exc)) from None

    return wrapper  # type: ignore[return-value]


def report_error(exc: BaseException) -> int | None:
    """Print a user error as one line on stderr and return its exit code; None (nothing
    printed) for an exception that is a bug, whose traceback must show."""
    if isinstance(exc, LlmToolError):
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, OSError):  # disk full, permission denied, ...
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err.print(f"[bold red]error:[/] {where}{exc.strerror or exc}", soft_wrap=True)
        return 2
    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    return None


class ProgressBar:
    """A Rich progress bar driven by the pipelines' (done, total, what) callback."""

    def __init__(self, title: str, enabled: bool):
        # Only on a terminal: piped, a bar is noise (and leaves a blank line before errors).
        self.enabled = enabled and err.is_terminal
        self.title = title
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.progress import (  # not at import: `run` shows no bar
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[what]}"),
                console=err,
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=None, what="")
        return self

    def __call__(self, done: int, total: int, what: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total, what=what[-60:])

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def _table(*columns: str, **options: Any) -> Table:
    from rich.table import Table  # not at import: `run` prints no table

    return Table(*columns, **options)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="YAML file whose keys are the config's field names; flags win."),
]


# ------------------------------------------------------------------------------------------
# convert


@app.command()
@friendly_errors
def convert(
    model_type: Annotated[
        str | None,
        typer.Option(help=f"Architecture: {', '.join(ARCHITECTURES)}."),
    ] = None,
    input_ckpt: Annotated[
        str | None,
        typer.Option(help="Checkpoint file, folder, or glob such as 'model*.safetensors'."),
    ] = None,
    ckpt_format: Annotated[
        str | None, typer.Option(help="safetensors or pytorch (default: from file names).")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="Target processor: cpu or gpu.")] = None,
    output_dir: Annotated[
        str | None, typer.Option(help="Also write one file per tensor + layer_info.txt here.")
    ] = None,
    output_tflite_file: Annotated[
        str | None,
        typer.Option(
            "--output-tflite-file",
            "-o",
            help="The converted model file, e.g. model_cpu.bin.",
        ),
    ] = None,
    combine_file_only: Annotated[
        bool | None,
        typer.Option(help="Only combine the per-tensor files of --output-dir into the output."),
    ] = None,
    vocab_model_file: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer folder (tokenizer.json...) or tokenizer.model; "
            "default: the checkpoint folder."
        ),
    ] = None,
    quantization: Annotated[
        str | None,
        typer.Option(
            help="Shorthand for all three *-quant-bits: float32, float16, int8 (default), int4 "
            "(embeddings stay at 8 bits unless --embedding-quant-bits says otherwise)."
        ),
    ] = None,
    attention_quant_bits: Annotated[
        int | None, typer.Option(help="Bits of attention weights: 32, 16, 8 or 4.")
    ] = None,
    feedforward_quant_bits: Annotated[
        int | None, typer.Option(help="Bits of feed-forward weights: 32, 16, 8 or 4.")
    ] = None,
    embedding_quant_bits: Annotated[
        int | None, typer.Option(help="Bits of embedding/output weights: 32, 16, 8 or 4.")
    ] = None,
    is_symmetric: Annotated[
        bool | None,
        typer.Option(
            "--is-symmetric/--no-is-symmetric",
            help="Symmetric per-channel quantization (default) or with zero points.",
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="int4 weights: one scale per 32, 64 or 128 values of a row, or 0 for one per "
            "row. Default 32 where it divides the row, else int8 for that tensor."
        ),
    ] = None,
    lora_ckpt: Annotated[
        str | None,
        typer.Option(help="Also convert this PEFT LoRA adapter (folder or .safetensors)."),
    ] = None,
    lora_rank: Annotated[
        int | None,
        typer.Option(help="The adapter's rank (checked; required without adapter_config.json)."),
    ] = None,
    lora_output_tflite_file: Annotated[
        str | None, typer.Option(help="The LoRA file to write with --lora-ckpt.")
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert a Hugging Face checkpoint into an on-device model file (.bin container)."""
    from llmtool.config import ConversionConfig, merge_config
    from llmtool.pipelines.convert import convert as run_convert

    flags = {k: v for k, v in locals().items() if k not in ("config", "json_out")}
    cfg = merge_config(ConversionConfig, config, flags)
    with ProgressBar("converting", enabled=not json_out) as bar:
        summary = run_convert(cfg, progress=bar)
    if json_out:
        print_json(summary)
        return
    out.print(
        f"[green]wrote[/] {summary['output']} ({human_bytes(summary['output_bytes'])}, "
        f"{summary['tensors']} tensors) in {summary['seconds']:.1f} s",
        highlight=False,
    )
    if "lora" in summary:
        _print_lora(summary["lora"])


def _print_lora(summary: dict[str, Any]) -> None:
    out.print(
        f"[green]wrote[/] {summary['output']} ({human_bytes(summary['output_bytes'])}, LoRA "
        f"rank {summary['rank']} on {', '.join(summary['modules'])}, scale "
        f"{_scale_text(summary['scale'])})",
        highlight=False,
    )


def _scale_text(scale: float | dict[str, float]) -> str:
    if isinstance(scale, dict):
        return "per module " + ", ".join(f"{v:g}" for v in sorted(set(scale.values())))
    return f"{scale:g}"


# ------------------------------------------------------------------------------------------
# lora-convert


@app.command("lora-convert")
@friendly_errors
def lora_convert(
    lora_ckpt: Annotated[
        str | None,
        typer.Option(help="PEFT adapter folder (adapter_config.json + adapter_model.*) or file."),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="The converted base model (.bin) the adapter is for "
            "(default: output_tflite_file of --config)."
        ),
    ] = None,
    backend: Annotated[str | None, typer.Option(help="Target processor: cpu or gpu.")] = None,
    lora_rank: Annotated[
        int | None,
        typer.Option(help="The adapter's rank (checked; required without adapter_config.json)."),
    ] = None,
    lora_output_tflite_file: Annotated[
        str | None, typer.Option(help="The LoRA file to write.")
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert a PEFT LoRA adapter for a converted model (run it with run --lora-path)."""
    from llmtool.config import ConversionConfig, merge_config
    from llmtool.errors import LlmToolError
    from llmtool.pipelines.lora_convert import lora_convert as run_lora_convert

    flags = {
        "lora_ckpt": lora_ckpt,
        "backend": backend,
        "lora_rank": lora_rank,
        "lora_output_tflite_file": lora_output_tflite_file,
    }
    cfg = merge_config(ConversionConfig, config, flags)
    base = base_model or cfg.output_tflite_file
    if not cfg.lora_ckpt:
        raise LlmToolError("no adapter: give --lora-ckpt")
    if not base:
        raise LlmToolError("no base model: give --base-model (a converted .bin)")
    if not cfg.lora_output_tflite_file:
        raise LlmToolError("no output file: give --lora-output-tflite-file")
    with ProgressBar("converting LoRA", enabled=not json_out) as bar:
        summary = run_lora_convert(
            cfg.lora_ckpt, base, cfg.lora_output_tflite_file, cfg.lora_rank, cfg.backend, bar
        )
    if json_out:
        print_json(summary)
        return
    _print_lora(summary)


# ------------------------------------------------------------------------------------------
# inspect


@app.command()
@friendly_errors
def inspect(
    file: Annotated[
        Path | None, typer.Argument(metavar="MODEL", help="Same as --model.", show_default=False)
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="A converted model (.bin), a graph (.tflite) or a bundle (.task, .litertlm).",
        ),
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Inspect the embedded default model.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show what a model file holds: type, parameters, tokenizer, tensors or signatures."""
    from llmtool.pipelines.inspect import describe, describe_default

    file = one_model(model, file, required=False)
    if file is None and not default:
        raise LlmToolError("give a model file (--model FILE), or --default for the embedded model")
    info = describe_default() if default else describe(file)
    if json_out:
        print_json(info)
        return
    out.print(f"[bold]{info['file']}[/]  {human_bytes(info['file_bytes'])}")
    keys_shown = (
        "kind",
        "model_type",
        "backend",
        "parameters",
        "quant_bits",
        "int4_block_sizes",
        "lora",
    )
    for key in (*keys_shown, "metadata"):
        if info.get(key) is not None:
            out.print(f"  {key}: {info[key]}", highlight=False)
    tok = info.get("tokenizer") or {}
    if tok:
        out.print(
            f"  tokenizer: {tok.get('kind')} vocab {tok.get('vocab_size')}, "
            f"bos {tok.get('bos_token')!r}, stop {tok.get('stop_tokens')}",
            highlight=False,
        )
    for key, sig in (info.get("signatures") or {}).items():
        ins = ", ".join(f"{n}{v[0]}" for n, v in list(sig["inputs"].items())[:4])
        out.print(f"  signature {key}: {sig['operators']} ops; inputs {ins}, ...", highlight=False)
    if info.get("entries"):
        table = _table("entry", "offset", "bytes", box=None, pad_edge=False)
        for e in info["entries"]:
            table.add_row(e["name"], str(e["offset"]), str(e["bytes"]))
        out.print(table)
    if info["tensors"]:
        table = _table("name", "shape", "dtype", "bytes", box=None, pad_edge=False)
        for t in info["tensors"]:
            table.add_row(t["name"], "x".join(map(str, t["shape"])), t["dtype"], str(t["bytes"]))
        out.print(table)


@app.command()
@friendly_errors
def models(json_out: JsonOpt = False) -> None:
    """Where the embedded default model is and what it is (used when --model is omitted)."""
    from llmtool.pipelines.inspect import describe_default

    info = describe_default()
    info.pop("tensors")
    if json_out:
        print_json(info)
        return
    card = info.get("card") or {}
    out.print(f"[bold]default model[/]  {info['file']}", highlight=False)
    out.print(
        f"  {info['model_type']}, {info['parameters']:,} parameters, "
        f"{human_bytes(info['file_bytes'])}, weights {info['quant_bits']}",
        highlight=False,
    )
    for key in ("summary", "corpus", "license", "heldout_perplexity", "model_card"):
        if card.get(key) is not None:
            out.print(f"  {key}: {card[key]}", highlight=False)
    out.print(f"  sha256: {info['sha256']}", highlight=False)


# ------------------------------------------------------------------------------------------
# export


@app.command()
@friendly_errors
def export(
    model_arg: Annotated[
        Path | None, typer.Argument(metavar="MODEL", help="Same as --model.", show_default=False)
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="A converted model (.bin container).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The graph file to write.")
    ] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            help="KV cache length: the most tokens (input + output) it runs. "
            "Default: the model's context, at most 8192."
        ),
    ] = None,
    prefill_len: Annotated[
        int | None,
        typer.Option(help="Tokens per prefill call (default 64, at most --max-seq-len)."),
    ] = None,
    kv_buckets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated attended lengths of the extra KV-bucket signatures, or "
            "'none'. Default: 256, 512, ... below the cache length."
        ),
    ] = None,
    lora_rank: Annotated[
        int,
        typer.Option(
            help="Give the graph LoRA inputs of this rank (0: none; LiteRT-LM takes 16 or 32)."
        ),
    ] = 0,
    lora_targets: Annotated[
        str,
        typer.Option(
            help="Projections with LoRA inputs: 'attention' (q,k,v,o; LiteRT-LM's), 'all', "
            "or a list such as q,v."
        ),
    ] = "attention",
    activations: Annotated[
        str,
        typer.Option(
            help="Quantized layers fed each input as two int8 rows (x and what its int8 "
            "rounding lost: ~16-bit activations): 'auto' (int8-weight layers: decode "
            "0.86-0.96x, prefill about 0.5x), 'split' (int4 layers too), 'single' (none)."
        ),
    ] = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Export a converted model as a TFLite graph with prefill/decode signatures."""
    from llmtool.formats.lora_file import ATTENTION_ROLES, LORA_ROLES
    from llmtool.pipelines.export import ExportOptions, export_graph

    model = one_model(model, model_arg)
    if output is None:
        raise LlmToolError("give the graph file to write with -o/--output FILE")
    buckets: tuple[int, ...] | None = None
    if kv_buckets is not None:
        text = kv_buckets.strip().lower()
        try:
            buckets = () if text == "none" else tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise LlmToolError(f"--kv-buckets: not a list of integers ({kv_buckets!r})") from None
    named = {"attention": ATTENTION_ROLES, "all": LORA_ROLES}
    targets = named.get(lora_targets) or tuple(t.strip() for t in lora_targets.split(","))
    options = ExportOptions(
        max_seq_len, prefill_len, buckets, lora_rank, tuple(targets), activations=activations
    )
    with ProgressBar("exporting", enabled=not json_out) as bar:
        summary = export_graph(model, output, options, bar)
    if json_out:
        print_json(summary)
        return
    plain = [k for k in summary["signatures"] if not k.startswith("kv")]
    extra = summary["kv_buckets"]
    more = f" + KV buckets {', '.join(map(str, extra))}" if extra else ""
    out.print(
        f"[green]wrote[/] {summary['output']} ({human_bytes(summary['output_bytes'])}, "
        f"signatures {', '.join(plain)}{more}, KV cache {summary['max_seq_len']})",
        highlight=False,
    )


# ------------------------------------------------------------------------------------------
# quantize


@app.command()
@friendly_errors
def quantize(
    input_file: Annotated[
        Path, typer.Argument(help="A converted model (.bin) or any TFLite graph (.tflite).")
    ],
    output_file: Annotated[Path, typer.Argument(help="The quantized file to write.")],
    mode: Annotated[
        str,
        typer.Option(
            help="dynamic-int8 (int8 weights, float activations), float16, int4 (blockwise; "
            "embeddings at 8 bits), full-int8 or int16x8 (integer activations, calibrated)."
        ),
    ] = "dynamic-int8",
    block_size: Annotated[
        int | None,
        typer.Option(help="int4: one scale per 32, 64 or 128 values of a row; 0 = per row."),
    ] = None,
    calibration_data: Annotated[
        Path | None,
        typer.Option(
            help="full-int8/int16x8: text, one sample per line (or .npz arrays); int4 and "
            "dynamic-int8: text to run the float model on, for GPTQ rounding, weighted int4 "
            "block scales and --smooth (default: random token sequences, and no GPTQ)."
        ),
    ] = None,
    calibration_samples: Annotated[
        int, typer.Option(help="Use at most this many calibration lines (or .npz arrays).")
    ] = 32,
    gptq: Annotated[
        bool | None,
        typer.Option(
            "--gptq/--no-gptq",
            help="dynamic-int8/int4 of a float model: round each layer's weights so their "
            "errors cancel on the layer's inputs in the float model run on "
            "--calibration-data (GPTQ). On whenever calibration data is given; slower.",
            show_default=False,
        ),
    ] = None,
    smooth: Annotated[
        bool,
        typer.Option(
            help="dynamic-int8 of a float model: fold outlier smoothing into the weights "
            "(exact in float). It lowers the error of one-pass int8 activations (export "
            "--activations single) and adds weight error: off by default."
        ),
    ] = False,
    smooth_alpha: Annotated[
        float, typer.Option(help="Smoothing strength, 0-1: how much range moves to weights.")
    ] = 0.5,
    activation_weighted: Annotated[
        bool,
        typer.Option(
            help="int4 blocks of a float model: pick each block's scale for the least error "
            "weighted by the float model's activations; off: Q4_0-style absmax scales."
        ),
    ] = True,
    attention_bits: Annotated[
        int | None, typer.Option(help="Containers: bits of attention weights (32/16/8/4).")
    ] = None,
    feedforward_bits: Annotated[
        int | None, typer.Option(help="Containers: bits of feed-forward weights.")
    ] = None,
    embedding_bits: Annotated[
        int | None, typer.Option(help="Bits of embedding/output weights (int4 default: 8).")
    ] = None,
    float_source: Annotated[
        Path | None,
        typer.Option(help="Float container to take tensors from that INPUT already quantized."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Quantize a converted model or any TFLite graph (dynamic-int8, float16, int4, full-int8)."""
    from llmtool.pipelines.quantize import QuantizeOptions, quantize_model

    options = QuantizeOptions(
        mode=mode,
        block_size=block_size,
        calibration_data=str(calibration_data) if calibration_data else None,
        attention_bits=attention_bits,
        feedforward_bits=feedforward_bits,
        embedding_bits=embedding_bits,
        float_source=str(float_source) if float_source else None,
        smooth=smooth,
        smooth_alpha=smooth_alpha,
        activation_weighted=activation_weighted,
        gptq=gptq,
        calibration_samples=calibration_samples,
    )
    with ProgressBar("quantizing", enabled=not json_out) as bar:
        summary = quantize_model(input_file, output_file, options, bar)
    if json_out:
        print_json(summary)
        return
    how = summary["mode"]
    gptq = summary.get("gptq") or {}
    if "samples" in gptq:
        how += f", GPTQ on {gptq['samples']}"
    if "skipped" in gptq:
        out.print(f"[yellow]note:[/] no GPTQ rounding: {gptq['skipped']}", highlight=False)
    out.print(
        f"[green]wrote[/] {summary['output']} ({human_bytes(summary['output_bytes'])}, "
        f"{summary['ratio']}x smaller, {how}) in {summary['seconds']:.1f} s",
        highlight=False,
    )


# ------------------------------------------------------------------------------------------
# bundle


@app.command()
@friendly_errors
def bundle(
    tflite_model: Annotated[
        str | None, typer.Option(help="Exported graph with prefill_<T>/decode signatures.")
    ] = None,
    tokenizer_model: Annotated[
        str | None,
        typer.Option(help="tokenizer.model, tokenizer.json, or the folder holding them."),
    ] = None,
    start_token: Annotated[
        str | None, typer.Option(help="Token put before every prompt (default: the BOS).")
    ] = None,
    stop_tokens: Annotated[
        list[str] | None,
        typer.Option("--stop-tokens", help="Token that ends generation; repeat for several."),
    ] = None,
    output_filename: Annotated[
        str | None,
        typer.Option(
            "--output-filename",
            "-o",
            help="The bundle to write: NAME.task or NAME.litertlm.",
        ),
    ] = None,
    enable_bytes_to_unicode_mapping: Annotated[
        bool | None,
        typer.Option(
            "--enable-bytes-to-unicode-mapping",
            help="The SentencePiece model works on GPT-2's byte-mapped text (.task).",
        ),
    ] = None,
    system_prompt: Annotated[
        str | None, typer.Option(help="Text said once at the start of a session.")
    ] = None,
    prompt_prefix: Annotated[str | None, typer.Option(help="Text before each prompt.")] = None,
    prompt_suffix: Annotated[str | None, typer.Option(help="Text after each prompt.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Shortcut: a converted .bin; its graph, tokenizer and tokens."),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Bundle a graph and its tokenizer into a ship-ready .task or .litertlm."""
    from llmtool.config import BundleConfig, merge_config
    from llmtool.pipelines.bundle import bundle as run_bundle

    flags = {k: v for k, v in locals().items() if k not in ("config", "json_out")}
    cfg = merge_config(BundleConfig, config, flags)
    with ProgressBar("bundling", enabled=not json_out) as bar:
        summary = run_bundle(cfg, progress=bar)
    if json_out:
        print_json(summary)
        return
    start = summary["start_token"]
    out.print(
        f"[green]wrote[/] {summary['output']} ({human_bytes(summary['output_bytes'])}, "
        f"{summary['tokenizer']} tokenizer, start {start!r}, stop {summary['stop_tokens']})",
        highlight=False,
    )


# ------------------------------------------------------------------------------------------
# run


@app.command()
@friendly_errors
def run(
    prompt: Annotated[str, typer.Option(help="The prompt; '-' reads it from standard input.")],
    model: Annotated[
        Path | None,
        typer.Option(
            help="Converted model (.bin) or exported graph (.tflite); default: the embedded model."
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Most tokens handled, input + output (default 512, capped at the "
            "model's context length)."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens.")] = 40,
    temperature: Annotated[
        float, typer.Option(help="Randomness; 0 (or --top-k 1) is greedy.")
    ] = 0.8,
    random_seed: Annotated[int, typer.Option(help="Sampler seed: same seed, same text.")] = 0,
    context_window: Annotated[
        int | None,
        typer.Option(help="Prompt tokens kept (the last ones); default max-tokens / 2."),
    ] = None,
    num_threads: Annotated[int | None, typer.Option(help="Interpreter threads.")] = None,
    safety_filter: Annotated[
        Path | None,
        typer.Option(help="Word list file: refuse a prompt, or stop the output, containing one."),
    ] = None,
    lora_path: Annotated[
        Path | None, typer.Option(help="LoRA file (llmtool lora-convert) applied to the model.")
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Print text as it is generated.")
    ] = True,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print text, token ids, timings and tokens/s as JSON."),
    ] = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat", help="Frame the prompt as a user turn with the model's chat template."
        ),
    ] = False,
    system: Annotated[
        str | None, typer.Option(help="System prompt before the user turn (implies --chat).")
    ] = None,
) -> None:
    """Generate text from a prompt with a converted model on the LiteRT interpreter."""
    # The body is shared with the fast path of a plain `llmtool run` (llmtool/entry.py).
    run_verb(prompt=prompt, model=model, max_tokens=max_tokens, top_k=top_k,
             temperature=temperature, random_seed=random_seed, context_window=context_window,
             num_threads=num_threads, safety_filter=safety_filter, lora_path=lora_path,
             stream=stream, json_out=json_out, chat=chat, system=system)  # fmt: skip


# ------------------------------------------------------------------------------------------
# evaluate


@app.command()
@friendly_errors
def evaluate(
    text: Annotated[Path, typer.Option(help="UTF-8 text file to score (held-out data).")],
    model: Annotated[
        Path | None,
        typer.Option(help="Converted model or graph; default: the embedded model."),
    ] = None,
    window: Annotated[int, typer.Option(help="Tokens per scored window.")] = 256,
    max_windows: Annotated[int | None, typer.Option(help="Score at most this many.")] = None,
    num_threads: Annotated[int | None, typer.Option(help="Interpreter threads.")] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="Float model (.bin/.tflite) or Hugging Face folder to compare with: KL, top-1 "
            "and greedy agreement, tokenization."
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity of a model on a text (LiteRT runtime); with --reference, how far it is."""
    from llmtool.pipelines.evaluate import evaluate as run_evaluate

    with ProgressBar("evaluating", enabled=not json_out) as bar:
        result = run_evaluate(
            str(model) if model else None,
            text,
            window,
            max_windows,
            num_threads,
            bar,
            reference=str(reference) if reference else None,
        )
    if json_out:
        print_json(result)
        return
    out.print(
        f"perplexity {result['perplexity']:.3f} over {result['tokens_scored']} tokens "
        f"({result['windows']} windows of {result['window']})",
        highlight=False,
    )
    ref = result.get("reference")
    if ref:
        out.print(
            f"reference perplexity {ref['perplexity']:.3f}; KL(reference || model) mean "
            f"{ref['mean_kl']:.5f}, max {ref['max_kl']:.4f}; top-1 agreement "
            f"{100 * ref['top1_agreement']:.2f}%; greedy {ref['greedy_common_prefix']}/"
            f"{ref['greedy_tokens']} tokens identical before the first difference "
            f"({100 * ref['greedy_agreement']:.1f}% of positions); same tokenization: "
            f"{'yes' if ref['same_tokenization'] else 'no'}",
            highlight=False,
        )


# ------------------------------------------------------------------------------------------
# release


@app.command()
@friendly_errors
def release(
    config: Annotated[
        Path | None, typer.Option("--config", help="Release YAML: checkpoint, matrix, settings.")
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Output folder (default: the config's)."),
    ] = None,
    eval_text: Annotated[
        Path | None,
        typer.Option(help="Held-out text: a perplexity line per model in the manifest."),
    ] = None,
    only: Annotated[
        str | None, typer.Option(help="Build only this item (e.g. cpu-int8; see --emit-matrix).")
    ] = None,
    jobs: Annotated[int, typer.Option(help="Items built in parallel processes.")] = 1,
    force: Annotated[
        bool, typer.Option(help="Rebuild everything, even what is up to date.")
    ] = False,
    emit_matrix: Annotated[
        bool,
        typer.Option(help="Print the items as a GitHub Actions strategy.matrix JSON and exit."),
    ] = False,
    merge_manifests: Annotated[
        bool,
        typer.Option(
            help="Join the manifests and artifacts of split runs (FOLDERS) into --output-dir."
        ),
    ] = False,
    folders: Annotated[
        list[Path] | None, typer.Argument(help="With --merge-manifests: the run folders.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build every artifact of a release matrix, with manifest.json, for CI pipelines."""
    from llmtool.config import load_release_config
    from llmtool.pipelines import release as rel

    if merge_manifests:
        if output_dir is None:
            raise LlmToolError("--merge-manifests needs --output-dir")
        with ProgressBar("merging", enabled=not json_out) as bar:
            summary = rel.merge_manifests(list(folders or []), output_dir, bar)
        if json_out:
            print_json(summary)
            return
        out.print(
            f"[green]merged[/] {len(summary['merged'])} manifests: {len(summary['items'])} "
            f"models, {summary['artifacts']} artifacts -> {summary['manifest']}",
            highlight=False,
        )
        return
    if folders:
        raise LlmToolError(
            f"unexpected argument {str(folders[0])!r} (folders go with --merge-manifests)"
        )
    if config is None:
        raise LlmToolError("give --config FILE (or --merge-manifests FOLDER...)")
    cfg = load_release_config(
        config,
        output_dir=str(output_dir) if output_dir else None,
        eval_text=str(eval_text) if eval_text else None,
    )
    if emit_matrix:
        sys.stdout.write(json.dumps(rel.matrix(cfg), separators=(",", ":")) + "\n")
        return
    with ProgressBar("checking inputs", enabled=not json_out) as bar:
        plan = rel.plan_release(cfg)
    with ProgressBar("release", enabled=not json_out) as bar:
        summary = rel.release(plan, only=only, jobs=jobs, force=force, progress=bar)
    if json_out:
        print_json(summary)
    else:
        table = _table(
            "item", "steps", "perplexity", "KL vs float", "decode tok/s", "peak MiB", box=None
        )
        manifest = json.loads(Path(summary["manifest"]).read_text())
        for item, info in summary["items"].items():
            counts = [list(info["status"].values()).count(s) for s in ("built", "reused")]
            quality = (manifest["models"].get(item) or {}).get("quality") or {}
            speed = (info.get("smoke") or {}).get("decode_tokens_per_second")
            table.add_row(
                item,
                f"{counts[0]} built, {counts[1]} reused"
                + (f", [red]{len(info['failures'])} failed[/]" if info["failures"] else ""),
                f"{quality['perplexity']:.3f}" if quality else "-",
                f"{quality['float_reference']['mean_kl']:.2e}"
                if quality.get("float_reference")
                else "-",
                f"{speed:.0f}" if speed else "-",
                f"{info['peak_rss_mib']:.0f}",
            )
        out.print(table)
        peak = summary["peak_rss_mib"]
        bound = f", workers <= {peak['workers_bound']:.0f} MiB" if peak["workers_bound"] else ""
        out.print(
            f"[green]wrote[/] {summary['manifest']} ({summary['artifacts']} artifacts) in "
            f"{summary['seconds']:.1f} s; peak memory {peak['largest_item']:.0f} MiB per item"
            f"{bound}",
            highlight=False,
        )
    if summary["failures"]:
        for line in summary["failures"]:
            err.print(f"[bold red]failed:[/] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------
# cache

cache_app = typer.Typer(
    help="The cache of exported graphs and XNNPACK weights ($LLMTOOL_CACHE_DIR, at most "
    "$LLMTOOL_CACHE_MAX_BYTES, default 8G; least recently used entries go first).",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
@friendly_errors
def cache_list(json_out: JsonOpt = False) -> None:
    """Show what the cache holds, most recently used first."""
    from llmtool import cache

    info = cache.describe()
    if json_out:
        print_json(info)
        return
    out.print(
        f"[bold]{info['cache_dir']}[/]  {human_bytes(info['total_bytes'])} of at most "
        f"{human_bytes(info['max_bytes'])}",
        highlight=False,
    )
    table = _table("last used", "kind", "bytes", "name", box=None, pad_edge=False)
    for e in info["entries"]:
        table.add_row(e["last_used"], e["kind"], human_bytes(e["bytes"]), e["name"])
    if info["entries"]:
        out.print(table)


@cache_app.command("clear")
@friendly_errors
def cache_clear(json_out: JsonOpt = False) -> None:
    """Remove every cached graph and XNNPACK file (they are rebuilt when needed)."""
    from llmtool import cache

    count, freed = cache.clear()
    if json_out:
        print_json({"removed_entries": count, "freed_bytes": freed})
        return
    out.print(f"removed {count} entries ({human_bytes(freed)})", highlight=False)


def main() -> None:
    from llmtool.files import exit_on_sigterm
    from llmtool.pipelines.quiet import quiet_native_exit_at_exit

    quiet_native_exit_at_exit()
    exit_on_sigterm()
    app()


if __name__ == "__main__":
    main()
