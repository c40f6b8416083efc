"""`llmtool release`: one checkpoint through a backends x precisions matrix into every artifact
and a `manifest.json`, for CI pipelines.

Each matrix item is one model (a backend and a precision). Its artifacts are produced by the
pipelines that own them: `convert` (container .bin), `export` (graph .tflite), `bundle`
(.task and .litertlm); its quality line by `evaluate` and its speed by a greedy
smoke run through `LlmInference`. This module only plans, skips what is up to date, and
records.

Files in the output folder:
- the artifacts, `<name>-<backend>-<precision>.<ext>`;
- `manifest.json`: per artifact its path, size, sha256, model type, backend, precision, the
  source checkpoint's digest, llmtool's version and the exact settings; per model its quality
  line. Deterministic: the same inputs give the same bytes, so it holds no times;
- `timings.json`: what this run built or reused, seconds, smoke-run tokens/s, peak memory and
  failures (it changes from run to run);
- `.llmtool-release/`: the per-item state that makes re-runs incremental, and the staging area.
  An artifact is built under a temporary name, renamed into place when complete, and only then
  recorded in the item's state: a killed run never leaves a partial artifact marked as done.

Every step has a key: a hash of everything it depends on (the checkpoint's digest, llmtool's
version, the settings, and the keys of the steps it is built from). A step whose key and file
digest match its recorded state is reused; a changed input rebuilds only the steps downstream
of it; `force` rebuilds everything.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtool._version import __version__
from llmtool.config import ConversionConfig, ReleaseConfig, check_types
from llmtool.decoder import ACTIVATION_MODES
from llmtool.errors import LlmToolError
from llmtool.files import atomic_output, write_bytes
from llmtool.pipelines.quiet import quiet_native_exit_at_exit

Progress = Callable[[int, int, str], None]

MANIFEST = "manifest.json"
TIMINGS = "timings.json"
STATE_DIR = ".llmtool-release"
MANIFEST_FORMAT = "llmtool-release/1"

BACKENDS = ("cpu", "gpu")
# Precision name -> the convert settings that produce it.
PRECISIONS: dict[str, dict[str, Any]] = {
    "float32": {"quantization": "float32"},
    "float16": {"quantization": "float16"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},  # blockwise (convert's default block size)
    "int4-channel": {"quantization": "int4", "block_size": 0},  # one scale per row
}
# Output kind -> file extension. Kinds are built in this order (each from the one before).
OUTPUTS = {
    "container": ".bin",
    "lora": ".lora.bin",  # the adapter (lora_ckpt) converted for this item's container
    "graph": ".tflite",  # with LoRA inputs when the release has an adapter
    "task": ".task",
    "litertlm": ".litertlm",
}


# ------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class Item:
    backend: str
    precision: str

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.precision}"


@dataclass(frozen=True)
class ReleasePlan:
    """A checked config plus the digests of its inputs: everything an item build needs."""

    config: ReleaseConfig
    output_dir: str
    source: dict[str, Any]  # checkpoint digest and the digest of each file
    eval_text_sha256: str | None
    tokenizer_path: str  # what convert reads the tokenizer from (for the bundles too)
    checkpoint_dir: str  # the Hugging Face folder: the float reference of the KL line

    @property
    def items(self) -> list[Item]:
        return [Item(b, p) for b in self.config.backends for p in self.config.precisions]

    def settings(self) -> dict[str, Any]:
        """The config as recorded in the manifest: no local paths, digests instead."""
        c = self.config
        return {
            "name": c.name,
            "model_type": c.model_type,
            "matrix": {
                "backends": list(c.backends),
                "precisions": list(c.precisions),
                "outputs": list(c.outputs),
            },
            "export": {
                "max_seq_len": c.max_seq_len,
                "prefill_len": c.prefill_len,
                "kv_buckets": None if c.kv_buckets is None else list(c.kv_buckets),
                "activations": c.activations,
            },
            "evaluation": None
            if c.eval_text is None
            else {
                "metric": "perplexity",
                "kl_against": "checkpoint (float32, transformers)" if c.eval_kl else None,
                "text_sha256": self.eval_text_sha256,
                "window": c.eval_window,
                "max_windows": c.eval_max_windows,
            },
            "smoke": {"prompt": c.smoke_prompt, "max_tokens": c.smoke_max_tokens},
        }


def check_config(config: ReleaseConfig) -> None:
    """Refuse what this llmtool cannot build, with one line naming the config file."""
    where = config.source
    check_types(config, where)

    def fail(message: str) -> LlmToolError:
        return LlmToolError(message, where)

    for b in config.backends:
        if b not in BACKENDS:
            raise fail(f"matrix.backends: unknown backend {b!r} (use {', '.join(BACKENDS)})")
    for p in config.precisions:
        if p not in PRECISIONS:
            raise fail(f"matrix.precisions: unknown precision {p!r} (use {', '.join(PRECISIONS)})")
    for o in config.outputs:
        if o not in OUTPUTS:
            raise fail(f"matrix.outputs: unknown output {o!r} (use {', '.join(OUTPUTS)})")
    if "lora" in config.outputs and config.lora_ckpt is None:
        raise fail("matrix.outputs has 'lora' but no lora_ckpt (the PEFT adapter) is given")
    if config.lora_ckpt is not None and "lora" not in config.outputs:
        raise fail("lora_ckpt is given: add 'lora' to matrix.outputs")
    limit = config.max_seq_len
    if (limit is not None and limit < 2) or config.prefill_len < 1:
        raise fail("export: max_seq_len must be at least 2 and prefill_len at least 1")
    if config.activations not in ACTIVATION_MODES:
        raise fail(
            f"export.activations: unknown mode {config.activations!r} "
            f"(use {', '.join(ACTIVATION_MODES)})"
        )
    if config.eval_text is not None and not 2 <= config.eval_window <= (limit or 1 << 30):
        raise fail(f"evaluation.window must be between 2 and export.max_seq_len ({limit})")
    if config.eval_max_windows is not None and config.eval_max_windows < 1:
        raise fail("evaluation.max_windows must be at least 1")
    if not 0 <= config.smoke_max_tokens <= (limit or 1 << 30):
        raise fail(f"smoke.max_tokens must be between 0 and export.max_seq_len ({limit})")


def matrix(config: ReleaseConfig) -> dict[str, list[str]]:
    """The items as a GitHub Actions `strategy.matrix` (one job per item, `--only ITEM`)."""
    check_config(config)
    return {"item": [Item(b, p).id for b in config.backends for p in config.precisions]}


def plan_release(config: ReleaseConfig) -> ReleasePlan:
    """Check the config and digest its inputs (the checkpoint, its tokenizer, the eval text)."""
    check_config(config)
    out = Path(config.output_dir)
    source = checkpoint_digest(config, out / STATE_DIR / "digests.json")
    text_digest = None
    if config.eval_text is not None:
        text = Path(config.eval_text)
        if not text.is_file():
            raise LlmToolError("evaluation text not found", text)
        text_digest = _file_sha256(text)
    from llmtool.checkpoint import resolve_files

    folder = resolve_files(config.input_ckpt, config.ckpt_format)[0][0].parent
    vocab = config.vocab_model_file or str(folder)  # as convert does
    if config.lora_ckpt is not None:
        source = {**source, **lora_digest(config.lora_ckpt)}
    return ReleasePlan(config, str(out), source, text_digest, vocab, str(folder))


def lora_digest(lora_ckpt: str) -> dict[str, Any]:
    """sha256 of the adapter's files (weights and adapter_config.json), and one of all."""
    path = Path(lora_ckpt)
    folder = path if path.is_dir() else path.parent
    names = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
    files = [folder / n for n in names if (folder / n).is_file()]
    if path.is_file() and path not in files:
        files.append(path)
    if not any(f.name != "adapter_config.json" for f in files):
        raise LlmToolError("no LoRA adapter here (adapter_model.safetensors or .bin)", path)
    digests = {f"lora/{f.name}": _file_sha256(f) for f in sorted(files)}
    return {"lora_sha256": _digest(digests), "lora_files": digests}


def checkpoint_digest(config: ReleaseConfig, cache_file: Path | None = None) -> dict[str, Any]:
    """sha256 of every file convert reads (weights, config, tokenizer), and one digest of all.

    Digests are cached by (path, size, mtime) in `cache_file`, so a re-run does not re-read
    gigabytes of unchanged weights.
    """
    from llmtool.checkpoint import resolve_files
    from llmtool.tokenizer import read_tokenizer_files

    files, _ = resolve_files(config.input_ckpt, config.ckpt_format)
    folder = files[0].parent
    paths = {f"checkpoint/{f.name}": f for f in files}
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            paths[f"checkpoint/{name}"] = folder / name
    vocab = Path(config.vocab_model_file) if config.vocab_model_file else folder
    tokenizer = read_tokenizer_files(vocab)  # validates it, as convert will
    cache = _read_json(cache_file) if cache_file else {}
    digests = {}
    for name, path in sorted(paths.items()):
        st = path.stat()
        stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digests[name] = cache.get(stamp) or _file_sha256(path)
        cache[stamp] = digests[name]
    for name, data in sorted(tokenizer.items()):
        digests[f"tokenizer/{name}"] = hashlib.sha256(data).hexdigest()
    if cache_file:
        _write_json(cache_file, cache)
    return {
        "model_type": config.model_type,
        "checkpoint_sha256": _digest(digests),
        "files": digests,
    }


# ------------------------------------------------------------------------------------------
# building one item


@dataclass
class ItemResult:
    """What one item's build produced; returned from worker processes."""

    item: str
    backend: str
    precision: str
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # manifest records
    quality: dict[str, Any] | None = None
    smoke: dict[str, Any] | None = None
    status: dict[str, str] = field(default_factory=dict)  # step -> built | reused
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # step -> one-line reason
    peak_rss_mib: float = 0.0


class _ItemBuild:
    """The steps of one item: container -> graph -> task, quality, smoke."""

    def __init__(self, plan: ReleasePlan, item: Item, force: bool, progress: Progress):
        self.plan, self.item, self.force, self.report = plan, item, force, progress
        c = plan.config
        self.out = Path(plan.output_dir)
        self.stem = f"{c.name}-{item.id}"
        self.state_file = self.out / STATE_DIR / "items" / f"{item.id}.json"
        self.stage = self.out / STATE_DIR / "staging" / item.id
        self.state = _read_json(self.state_file) if not force else {}
        self.state.setdefault("steps", {})
        self.files: dict[str, Path] = {}  # kind -> a built or reused file
        self.records: dict[str, dict[str, Any]] = {}  # kind -> its manifest record
        self.failed: dict[str, str] = {}
        self.result = ItemResult(item.id, item.backend, item.precision)
        self.keys = self._keys()

    # -- what each step depends on --------------------------------------------------------

    def _settings(self) -> dict[str, dict[str, Any]]:
        c = self.plan.config
        return {
            "container": {
                "model_type": c.model_type,
                "backend": self.item.backend,
                "precision": self.item.precision,
                **PRECISIONS[self.item.precision],
            },
            "lora": {"lora_rank": c.lora_rank, "backend": self.item.backend},
            "graph": {
                "max_seq_len": c.max_seq_len,
                "prefill_len": c.prefill_len,
                "kv_buckets": None if c.kv_buckets is None else list(c.kv_buckets),
                "activations": c.activations,
            },
            "task": dict(sorted(c.bundle.items())),  # unset: the tokenizer's own tokens
            "litertlm": dict(sorted(c.bundle.items())),
            "quality": self.plan.settings()["evaluation"] or {},
            "smoke": {"prompt": c.smoke_prompt, "max_tokens": c.smoke_max_tokens, "top_k": 1},
        }

    def _keys(self) -> dict[str, str]:
        s = self._settings()
        base = {"llmtool": __version__, "source": self.plan.source["checkpoint_sha256"]}
        keys = {"container": _digest({**base, **s["container"]})}
        keys["lora"] = _digest(
            {"from": keys["container"], "adapter": self.plan.source.get("lora_sha256"), **s["lora"]}
        )
        lora_from = keys["lora"] if self.plan.config.lora_ckpt else None
        keys["graph"] = _digest({"from": keys["container"], "lora": lora_from, **s["graph"]})
        keys["task"] = _digest({"from": keys["graph"], **s["task"]})
        keys["litertlm"] = _digest({"from": keys["graph"], **s["litertlm"]})
        keys["quality"] = _digest({"from": keys["graph"], **s["quality"]})
        keys["smoke"] = _digest({"from": keys["graph"], **s["smoke"]})
        self.settings = s
        return keys

    # -- steps ----------------------------------------------------------------------------

    def run(self) -> ItemResult:
        c = self.plan.config
        steps = [k for k in OUTPUTS if k in c.outputs]
        if c.eval_text is not None:
            steps.append("quality")
        if c.smoke_max_tokens > 0:
            steps.append("smoke")
        try:
            for step in steps:
                self.report(0, 0, f"{self.item.id}: {step}")
                start = time.perf_counter()
                try:
                    if step in OUTPUTS:
                        self._artifact(step)
                    else:
                        self._measure(step)
                except LlmToolError as exc:
                    self.result.failures[step] = str(exc)
                except Exception as exc:  # a bug must not lose the other items' artifacts
                    self.result.failures[step] = f"internal error: {type(exc).__name__}: {exc}"
                self.result.seconds[step] = round(time.perf_counter() - start, 3)
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)  # unpublished intermediates
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.result.peak_rss_mib = round(usage / 1024, 1)
        return self.result

    def _artifact(self, kind: str) -> Path:
        """The file of this kind, reused when up to date, else built from its inputs.

        Published kinds (listed in the matrix outputs) go to the output folder and the item's
        state; others (a container or graph needed by a later step) stay in staging.
        """
        if kind in self.files:
            return self.files[kind]
        if kind in self.failed:
            raise LlmToolError(f"needs the {kind}, which failed")
        published = kind in self.plan.config.outputs
        final = self.out / f"{self.stem}{OUTPUTS[kind]}"
        recorded = self.state["steps"].get(kind)
        if (
            published
            and recorded
            and recorded["key"] == self.keys[kind]
            and final.is_file()
            and final.stat().st_size == recorded["record"]["bytes"]
            and _file_sha256(final) == recorded["record"]["sha256"]
        ):
            self.result.status[kind] = "reused"
            self.result.artifacts.append(recorded["record"])
            self.records[kind] = recorded["record"]
            self.files[kind] = final
            return final
        try:
            built, built_from = self._build(kind)
        except Exception as exc:
            self.failed[kind] = str(exc)
            raise
        if not published:
            self.files[kind] = built
            return built
        record = {
            "path": final.name,
            "kind": kind,
            "item": self.item.id,
            "bytes": built.stat().st_size,
            "sha256": _file_sha256(built),
            "model_type": self.plan.config.model_type,
            "backend": self.item.backend,
            "precision": self.item.precision,
            "source_checkpoint_sha256": self.plan.source["checkpoint_sha256"],
            "llmtool_version": __version__,
            "settings": {**self.settings[kind], **built_from},
        }
        self.state["steps"].pop(kind, None)  # the old file is about to be replaced
        self._save_state()
        os.replace(built, final)
        self.state["steps"][kind] = {"key": self.keys[kind], "record": record}
        self._save_state()
        self.result.status[kind] = "built"
        self.result.artifacts.append(record)
        self.records[kind] = record
        self.files[kind] = final
        return final

    def _build(self, kind: str) -> tuple[Path, dict[str, Any]]:
        """Build one file into staging by calling the pipeline that owns it."""
        c = self.plan.config
        self.stage.mkdir(parents=True, exist_ok=True)
        target = self.stage / f"{self.stem}{OUTPUTS[kind]}"
        target.unlink(missing_ok=True)
        what = f"{self.item.id}: {kind}"

        def forward(done: int, total: int, step: str) -> None:
            self.report(done, total, f"{what} {step}")

        if kind == "container":
            from llmtool.pipelines.convert import convert

            convert(
                ConversionConfig(
                    input_ckpt=c.input_ckpt,
                    model_type=c.model_type,
                    ckpt_format=c.ckpt_format,
                    backend=self.item.backend,
                    vocab_model_file=c.vocab_model_file,
                    output_tflite_file=str(target),
                    **PRECISIONS[self.item.precision],
                ),
                progress=forward,
            )
            from llmtool.formats import metadata as keys
            from llmtool.formats.container import Container

            with Container.open(target) as built:  # what convert did, exactly
                conversion = json.loads(built.metadata[keys.CONVERSION])
            conversion.pop("llmtool_version", None)
            return target, conversion
        if kind == "graph":
            from llmtool.pipelines.export import ExportOptions, export_graph

            source = self._artifact("container")
            lora: dict[str, Any] = {}
            if c.lora_ckpt is not None:  # the graph takes this item's LoRA file
                self._artifact("lora")
                adapter = self.records["lora"]["settings"]
                lora = {
                    "lora_rank": adapter["stored_rank"],
                    "lora_targets": tuple(adapter["targets"]),
                }
            # prefill_len is a ceiling here (the release default 64 with a shorter cache means
            # one prefill of the whole cache); export refuses a prefill longer than the cache.
            prefill = min(c.prefill_len, c.max_seq_len) if c.max_seq_len else c.prefill_len
            options = ExportOptions(
                c.max_seq_len, prefill, c.kv_buckets, activations=c.activations, **lora
            )
            summary = export_graph(source, target, options, forward)
            exact = {
                k: summary.get(k)
                for k in (
                    "max_seq_len", "prefill_len", "kv_buckets", "signatures", "lora_rank",
                    "activations",
                )  # fmt: skip
            }
            return target, {**exact, "built_from_sha256": _file_sha256(source)}
        if kind == "lora":
            from llmtool.pipelines.lora_convert import lora_convert

            source = self._artifact("container")
            summary = lora_convert(
                c.lora_ckpt, source, target, c.lora_rank, self.item.backend, forward
            )
            exact = {k: summary[k] for k in ("rank", "stored_rank", "scale", "targets", "modules")}
            return target, {**exact, "built_from_sha256": _file_sha256(source)}
        if kind in ("task", "litertlm"):
            from llmtool.config import BundleConfig
            from llmtool.pipelines.bundle import bundle

            source = self._artifact("graph")
            config = BundleConfig(
                tflite_model=str(source),
                tokenizer_model=self.plan.tokenizer_path,
                output_filename=str(target),
                **c.bundle,
            )
            summary = bundle(config, forward)
            exact = {
                k: summary[k]
                for k in ("tokenizer", "bytes_to_unicode", "start_token", "stop_tokens")
            }
            return target, {**exact, "built_from_sha256": _file_sha256(source)}
        raise AssertionError(kind)

    def _measure(self, step: str) -> None:
        """The quality line (evaluate) or the smoke run's speed, reused when up to date."""
        recorded = self.state.get(step)
        if recorded and recorded["key"] == self.keys[step]:
            self.result.status[step] = "reused"
            setattr(self.result, step, recorded["record"])
            return
        c = self.plan.config
        graph = self._artifact("graph")
        if step == "quality":
            from llmtool.pipelines.evaluate import evaluate

            reference = self.plan.checkpoint_dir if c.eval_kl else None
            r = evaluate(
                str(graph), c.eval_text, c.eval_window, c.eval_max_windows, reference=reference
            )
            record = {
                "metric": "perplexity",
                "perplexity": r["perplexity"],
                "mean_nll": r["mean_nll"],
                "tokens_scored": r["tokens_scored"],
                "windows": r["windows"],
                "window": r["window"],
                "text_sha256": self.plan.eval_text_sha256,
            }
            if reference is not None:  # the float model, run by transformers
                ref = r["reference"]
                record["float_reference"] = {
                    k: ref[k]
                    for k in (
                        "perplexity",
                        "mean_kl",
                        "max_kl",
                        "top1_agreement",
                        "greedy_tokens",
                        "greedy_agreement",
                        "same_tokenization",
                    )
                }
        else:
            from llmtool.pipelines.run import LlmInference
            from llmtool.runtime.inference import LlmInferenceOptions

            lora = str(self._artifact("lora")) if c.lora_ckpt is not None else None
            options = LlmInferenceOptions(
                model_path=str(graph), max_tokens=c.smoke_max_tokens, top_k=1, lora_path=lora
            )
            with LlmInference.create_from_options(options) as llm:
                result = llm.generate(c.smoke_prompt).as_dict()
            record = {
                "prompt_tokens": len(result["prompt_token_ids"]),
                "generated_tokens": len(result["token_ids"]),
                "stop_reason": result["stop_reason"],
                **result["timings"],
            }
        self.state[step] = {"key": self.keys[step], "record": record}
        self._save_state()
        self.result.status[step] = "built"
        setattr(self.result, step, record)

    def _save_state(self) -> None:
        _write_json(self.state_file, self.state)


def build_item(plan: ReleasePlan, item_id: str, force: bool = False) -> ItemResult:
    """Build one item in this process (also the entry point of `--jobs` worker processes)."""
    item = next(i for i in plan.items if i.id == item_id)
    return _ItemBuild(plan, item, force, lambda done, total, what: None).run()


# ------------------------------------------------------------------------------------------
# the whole release


def release(
    plan: ReleasePlan,
    only: str | None = None,
    jobs: int = 1,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build the plan's items (or only one), write manifest.json and timings.json.

    Returns the run summary (what timings.json holds). Items that fail do not stop the others;
    their failures are listed and every artifact that was completed is kept and recorded.
    """
    report = progress or (lambda done, total, what: None)
    items = plan.items
    if only is not None:
        items = [i for i in items if i.id == only]
        if not items:
            known = ", ".join(i.id for i in plan.items)
            raise LlmToolError(f"--only: no item {only!r} in the matrix (items: {known})")
    if jobs < 1:
        raise LlmToolError(f"--jobs must be at least 1 (got {jobs})")
    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A manifest describes a finished run: while this one builds there is none.
    (out / MANIFEST).unlink(missing_ok=True)
    start = time.perf_counter()
    results: dict[str, ItemResult] = {}
    total = len(items)
    if jobs == 1 or total == 1:
        for n, item in enumerate(items):

            def forward(done: int, _total: int, what: str, n: int = n) -> None:
                report(n, total, what)

            results[item.id] = _ItemBuild(plan, item, force, forward).run()
            report(n + 1, total, f"{item.id}: done")
    else:
        report(0, total, f"{min(jobs, total)} processes")
        context = multiprocessing.get_context("spawn")
        # One fresh process per item (max_tasks_per_child=1): memory an item used is returned to
        # the system when it ends, so at most `jobs` items are ever resident at once.
        with ProcessPoolExecutor(
            max_workers=min(jobs, total),
            mp_context=context,
            max_tasks_per_child=1,
            initializer=quiet_native_exit_at_exit,
        ) as pool:
            futures = {pool.submit(build_item, plan, i.id, force): i for i in items}
            for done, future in enumerate(as_completed(futures), 1):
                item = futures[future]
                try:
                    results[item.id] = future.result()
                except Exception as exc:  # the worker process itself died
                    failed = ItemResult(item.id, item.backend, item.precision)
                    failed.failures["item"] = f"worker failed: {type(exc).__name__}: {exc}"
                    results[item.id] = failed
                report(done, total, f"{item.id}: done")
    ordered = [results[i.id] for i in items]
    manifest = build_manifest(plan, ordered)
    _write_json(out / MANIFEST, manifest)
    summary = run_summary(plan, ordered, jobs, time.perf_counter() - start)
    _write_json(out / TIMINGS, summary)
    return summary


def build_manifest(plan: ReleasePlan, results: list[ItemResult]) -> dict[str, Any]:
    artifacts = sorted((a for r in results for a in r.artifacts), key=lambda a: a["path"])
    models = {}
    for r in results:
        if r.artifacts or r.quality:
            models[r.item] = {
                "backend": r.backend,
                "precision": r.precision,
                "model_type": plan.config.model_type,
                "quality": r.quality,
            }
    return {
        "format": MANIFEST_FORMAT,
        "llmtool_version": __version__,
        "config": plan.settings(),
        "source": plan.source,
        "items": sorted(models),
        "models": models,
        "artifacts": artifacts,
    }


def run_summary(
    plan: ReleasePlan, results: list[ItemResult], jobs: int, seconds: float
) -> dict[str, Any]:
    """What changes from run to run: statuses, times, speed, memory, failures."""
    peaks = sorted((r.peak_rss_mib for r in results), reverse=True)
    parallel = min(jobs, len(results))
    own = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return {
        "output_dir": plan.output_dir,
        "manifest": str(Path(plan.output_dir) / MANIFEST),
        "jobs": jobs,
        "seconds": round(seconds, 2),
        # Each worker process builds one item and exits, so at most `jobs` items are in memory
        # at once: the sum of the largest `jobs` item peaks bounds the workers' total.
        "peak_rss_mib": {
            "largest_item": peaks[0] if peaks else 0.0,
            "workers_bound": round(sum(peaks[:parallel]), 1) if parallel > 1 else None,
            "main_process": own,
        },
        "items": {
            r.item: {
                "status": r.status,
                "seconds": r.seconds,
                "smoke": r.smoke,
                "peak_rss_mib": r.peak_rss_mib,
                "failures": r.failures,
            }
            for r in results
        },
        "failures": [
            f"{r.item}: {step}: {why}" for r in results for step, why in r.failures.items()
        ],
        "artifacts": sum(len(r.artifacts) for r in results),
    }


# ------------------------------------------------------------------------------------------
# merging the manifests of split runs


def merge_manifests(
    folders: list[str | Path], output_dir: str | Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Join the manifests (and artifacts) of runs that each built some items (`--only`).

    The runs must agree on the config and the source checkpoint, and on the digest of any
    artifact two of them hold; every artifact is checked against its digest and copied into
    `output_dir` beside the merged manifest.
    """
    report = progress or (lambda done, total, what: None)
    if not folders:
        raise LlmToolError("--merge-manifests needs at least one folder")
    out = Path(output_dir)
    manifests = []
    for folder in map(Path, folders):
        path = folder / MANIFEST if folder.is_dir() else folder
        if not path.is_file():
            raise LlmToolError("no manifest.json here", folder)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise LlmToolError(f"not a JSON manifest ({exc})", path) from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise LlmToolError(f"not an llmtool release manifest ({MANIFEST_FORMAT})", path)
        manifests.append((path, data))
    first_path, first = manifests[0]
    artifacts: dict[str, tuple[Path, dict[str, Any]]] = {}
    models: dict[str, dict[str, Any]] = {}
    for path, data in manifests:
        for key in ("llmtool_version", "config", "source"):
            if data.get(key) != first.get(key):
                raise LlmToolError(f"{key} differs from {first_path}'s: not the same release", path)
        for a in data.get("artifacts", []):
            seen = artifacts.get(a["path"])
            if seen and seen[1]["sha256"] != a["sha256"]:
                raise LlmToolError(
                    f"artifact {a['path']} has sha256 {a['sha256'][:12]}... here but "
                    f"{seen[1]['sha256'][:12]}... in {seen[0]}",
                    path,
                )
            if seen and seen[1] != a:
                raise LlmToolError(
                    f"artifact {a['path']} is recorded differently in {seen[0]}", path
                )
            artifacts[a["path"]] = (path, a)
        for item, model in data.get("models", {}).items():
            if item in models and models[item] != model:
                raise LlmToolError(
                    f"model {item} is recorded differently in another manifest", path
                )
            models[item] = model
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for n, (name, (path, a)) in enumerate(sorted(artifacts.items())):
        report(n, len(artifacts), name)
        _copy_verified(path.parent / name, out / name, a["sha256"], path)
    merged = {
        **{k: first[k] for k in ("format", "llmtool_version", "config", "source")},
        "items": sorted(models),
        "models": dict(sorted(models.items())),
        "artifacts": [a for _, (_, a) in sorted(artifacts.items())],
    }
    _write_json(out / MANIFEST, merged)
    timings = [_read_json(path.parent / TIMINGS) for path, _ in manifests]
    _write_json(
        out / TIMINGS,
        {"merged_from": [str(p.parent) for p, _ in manifests], "items": _union_items(timings)},
    )
    report(len(artifacts), len(artifacts), "done")
    return {
        "output_dir": str(out),
        "manifest": str(out / MANIFEST),
        "merged": [str(p) for p, _ in manifests],
        "items": merged["items"],
        "artifacts": len(merged["artifacts"]),
    }


def _union_items(timings: list[dict[str, Any]]) -> dict[str, Any]:
    items: dict[str, Any] = {}
    for t in timings:
        items.update(t.get("items") or {})
    return items


def _copy_verified(src: Path, dst: Path, sha256: str, manifest: Path) -> None:
    if not src.is_file() or _file_sha256(src) != sha256:
        raise LlmToolError(f"artifact {src.name} is missing or does not match its sha256", manifest)
    if dst.is_file() and (dst.samefile(src) or _file_sha256(dst) == sha256):
        return
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


# ------------------------------------------------------------------------------------------
# small helpers


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no state (or a damaged one): everything is rebuilt
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (llmtool.files)."""
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
