"""The `llmtool` command's entry point, and the body of `llmtool run`.

`llmtool run` is the verb whose start-up a user waits for: a warm run is ready to print in a
few tenths of a second, of which importing Typer, Click and Rich and building the Typer app of
every verb would take about a tenth. So a plain `run` command line (each option at most once, as
`--name value` or a flag, with values cli.py's plain coercion takes) is parsed here, into the
same values Typer would pass, and run without importing them. Anything else (another verb,
--help, `--name=value`, an unknown or repeated option, a value needing Typer's own coercion or
error message) goes to cli.py's Typer app unchanged. Errors are printed by cli.py (imported only
then), so they read the same on both paths.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from pathlib import Path
from typing import Any

# The values cli.py converts without pydantic (and this parser too): decimal whole numbers and
# decimals, with optional sign and surrounding spaces, exactly as Typer converts them.
INTEGER = re.compile(r"\s*[+-]?\d+\s*")
DECIMAL = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")

# `llmtool run`'s options (cli.run's parameters): flag -> (parameter, type or a flag's value).
RUN_OPTIONS: dict[str, tuple[str, Any]] = {
    "--prompt": ("prompt", str),
    "--model": ("model", Path),
    "--max-tokens": ("max_tokens", int),
    "--top-k": ("top_k", int),
    "--temperature": ("temperature", float),
    "--random-seed": ("random_seed", int),
    "--context-window": ("context_window", int),
    "--num-threads": ("num_threads", int),
    "--safety-filter": ("safety_filter", Path),
    "--lora-path": ("lora_path", Path),
    "--system": ("system", str),
    "--stream": ("stream", True),
    "--no-stream": ("stream", False),
    "--json": ("json_out", True),
    "--chat": ("chat", True),
}
RUN_DEFAULTS: dict[str, Any] = {
    "model": None, "max_tokens": None, "top_k": 40, "temperature": 0.8, "random_seed": 0,
    "context_window": None, "num_threads": None, "safety_filter": None, "lora_path": None,
    "stream": True, "json_out": False, "chat": False, "system": None,
}  # fmt: skip


def parse_run(args: list[str]) -> dict[str, Any] | None:
    """cli.run's keyword arguments for these `run` arguments, or None when only Typer may parse
    them (see the module docstring)."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        option = RUN_OPTIONS.get(args[i])
        if option is None:
            return None
        name, kind = option
        if name in values:
            return None
        if isinstance(kind, bool):
            values[name] = kind
            i += 1
            continue
        if i + 1 == len(args):
            return None
        raw = args[i + 1]  # taken whatever it looks like, as Click does (`--prompt -`)
        if kind is int:
            if not INTEGER.fullmatch(raw):
                return None
            values[name] = int(raw)
        elif kind is float:
            if not DECIMAL.fullmatch(raw):
                return None
            values[name] = float(raw)
        else:
            values[name] = kind(raw)
        i += 2
    if "prompt" not in values:
        return None
    return RUN_DEFAULTS | values


def print_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def run_verb(
    prompt: str,
    model: Path | None,
    max_tokens: int | None,
    top_k: int,
    temperature: float,
    random_seed: int,
    context_window: int | None,
    num_threads: int | None,
    safety_filter: Path | None,
    lora_path: Path | None,
    stream: bool,
    json_out: bool,
    chat: bool,
    system: str | None,
) -> None:
    """The body of `llmtool run` (cli.run and the fast path): generate and print."""
    collecting = gc.isenabled()
    gc.disable()  # importing numpy and LiteRT makes many objects but no garbage (~5% faster)
    try:
        from llmtool.pipelines.run import run as run_prompt
        from llmtool.runtime.inference import LlmInferenceOptions, SafetyFilter
    finally:
        if collecting:
            gc.enable()

    if prompt == "-":
        # Bytes that are not UTF-8 become U+FFFD (argv's do too, in the runtime).
        prompt = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    options = LlmInferenceOptions(
        model_path=str(model) if model else None,
        max_tokens=max_tokens,
        top_k=top_k,
        temperature=temperature,
        random_seed=random_seed,
        context_window=context_window,
        num_threads=num_threads,
        safety_filter=SafetyFilter.from_file(safety_filter).words if safety_filter else [],
        lora_path=str(lora_path) if lora_path else None,
    )
    streaming = stream and not json_out

    def show(piece: str, done: bool) -> None:
        sys.stdout.write(piece + ("\n" if done else ""))
        sys.stdout.flush()

    chat = chat or system is not None
    if streaming and sys.stdout.isatty() and not chat:
        from rich.console import Console  # only on a terminal

        Console().print(prompt, style="dim", end="", highlight=False, markup=False)
    result = run_prompt(
        options, prompt, listener=show if streaming else None, chat=chat, system=system
    )
    if json_out:
        print_json(result.as_dict())
        return
    if not streaming:
        sys.stdout.write(result.text + "\n")
    if result.stop_reason == "safety_filter":
        from rich.console import Console

        Console(stderr=True).print("[yellow]output stopped by the safety filter[/]")


def main() -> None:
    """`llmtool`: a plain `run` here, everything else through cli.py's Typer app."""
    args = sys.argv[1:]
    if args[:1] == ["run"]:
        # The run path does no linear algebra in numpy: do not start OpenBLAS's thread pool
        # (tens of milliseconds when numpy is imported, more on a busy machine).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        values = parse_run(args[1:])
        if values is not None:
            from llmtool.files import exit_on_sigterm
            from llmtool.pipelines.quiet import quiet_native_exit_at_exit

            quiet_native_exit_at_exit()
            exit_on_sigterm()
            try:
                run_verb(**values)
            except (Exception, KeyboardInterrupt) as exc:
                from llmtool.cli import report_error

                code = report_error(exc)
                if code is None:
                    raise
                sys.exit(code)
            return
    from llmtool.cli import main as typer_main

    typer_main()
