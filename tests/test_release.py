"""`llmtool release`: a matrix of artifacts with a deterministic manifest, incremental re-runs,
resume after a killed run, split runs merged, and the shipped GitHub workflow."""

from __future__ import annotations

import glob
import hashlib
import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmtool.cli import app
from llmtool.config import load_release_config
from llmtool.errors import LlmToolError
from llmtool.formats.task_bundle import read_task_bundle
from llmtool.pipelines import release as rel

REPO = Path(__file__).resolve().parent.parent
WORDS = "the of and to a in that it was her she he his had you for as with not be".split()


@pytest.fixture(scope="module")
def spm_model(tiny_model) -> Path:
    """A tiny Gemma checkpoint: SentencePiece tokenizer, so every output kind applies."""
    return tiny_model("GEMMA_2B")


def write_config(folder: Path, ckpt: Path, **sections) -> Path:
    """A release YAML in `folder`; `sections` override the defaults below."""
    text = folder / "eval.txt"
    if not text.exists():
        text.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(200)))
    config = {
        "name": "tiny",
        "model_type": "GEMMA_2B",
        "input_ckpt": str(ckpt),
        "output_dir": "dist",
        "matrix": {
            "backends": ["cpu"],
            "precisions": ["float32", "int8"],
            "outputs": ["container"],
        },
        "export": {"max_seq_len": 64, "prefill_len": 16},
        "evaluation": {"window": 32, "max_windows": 2},
        "smoke": {"prompt": "the of and", "max_tokens": 16},
    }
    config.update(sections)
    path = folder / "release.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def plan(path: Path, **flags) -> rel.ReleasePlan:
    return rel.plan_release(load_release_config(path, **flags))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every published file (artifacts and manifest; not timings or the state folder)."""
    return {
        p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != rel.TIMINGS
    }


def test_matrix_2x3_manifest_and_determinism(spm_model, tmp_path):
    """2 backends x 3 precisions, three outputs each: every artifact recorded with its digest;
    a re-run reuses everything; a forced rebuild gives the same bytes."""
    path = write_config(
        tmp_path,
        spm_model,
        matrix={
            "backends": ["cpu", "gpu"],
            "precisions": ["float32", "int8", "int4"],
            "outputs": ["container", "graph", "task", "litertlm"],
        },
    )
    p = plan(path, eval_text=str(tmp_path / "eval.txt"))
    summary = rel.release(p)
    out = tmp_path / "dist"
    assert summary["failures"] == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["items"] == [
        "cpu-float32", "cpu-int4", "cpu-int8", "gpu-float32", "gpu-int4", "gpu-int8"
    ]  # fmt: skip
    assert len(manifest["artifacts"]) == 24
    ckpt_digest = manifest["source"]["checkpoint_sha256"]
    for a in manifest["artifacts"]:
        f = out / a["path"]
        assert f.stat().st_size == a["bytes"] and sha(f) == a["sha256"]
        assert a["source_checkpoint_sha256"] == ckpt_digest
        assert a["model_type"] == "GEMMA_2B" and a["llmtool_version"]
        assert a["path"] == f"tiny-{a['backend']}-{a['precision']}{rel.OUTPUTS[a['kind']]}"
    by_path = {a["path"]: a for a in manifest["artifacts"]}
    int4 = by_path["tiny-gpu-int4.bin"]["settings"]
    assert int4["quant_bits"]["attention"] == 4 and int4["int4_block_sizes"] == [32]
    graph = by_path["tiny-cpu-int8.tflite"]
    assert graph["settings"]["max_seq_len"] == 64
    assert graph["settings"]["built_from_sha256"] == by_path["tiny-cpu-int8.bin"]["sha256"]
    assert by_path["tiny-cpu-int8.task"]["settings"]["built_from_sha256"] == graph["sha256"]
    bundle = read_task_bundle(out / "tiny-cpu-int8.task")
    assert bundle["TF_LITE_PREFILL_DECODE"] == (out / "tiny-cpu-int8.tflite").read_bytes()
    assert by_path["tiny-cpu-int8.litertlm"]["settings"]["stop_tokens"] == ["<eos>"]
    # Quality per model (the same weights give the same perplexity on either backend), and a
    # smoke-run speed per model in timings.json, never in the manifest.
    ppl = {k: m["quality"]["perplexity"] for k, m in manifest["models"].items()}
    assert ppl["cpu-int8"] == ppl["gpu-int8"] and ppl["cpu-int4"] != ppl["cpu-float32"]
    assert all(1 < v < 10 * 320 for v in ppl.values())
    # KL against the float checkpoint run by transformers: ~0 for float32, larger for int4.
    kl = {k: m["quality"]["float_reference"]["mean_kl"] for k, m in manifest["models"].items()}
    assert kl["cpu-float32"] < 1e-5 < kl["cpu-int8"] < kl["cpu-int4"]
    timings = json.loads((out / "timings.json").read_text())
    assert all(t["smoke"]["decode_tokens_per_second"] > 0 for t in timings["items"].values())
    assert "tokens_per_second" not in (out / "manifest.json").read_text()

    first = folder_bytes(out)
    again = rel.release(p)
    assert {s for t in again["items"].values() for s in t["status"].values()} == {"reused"}
    assert folder_bytes(out) == first
    forced = rel.release(p, force=True)
    assert {s for t in forced["items"].values() for s in t["status"].values()} == {"built"}
    assert folder_bytes(out) == first


def test_changed_input_rebuilds_only_dependents(spm_model, tmp_path):
    def statuses(summary):
        return {k: t["status"] for k, t in summary["items"].items()}["cpu-int8"]

    matrix = {"backends": ["cpu"], "precisions": ["int8"], "outputs": ["container", "graph"]}
    path = write_config(tmp_path, spm_model, matrix=matrix)
    text = str(tmp_path / "eval.txt")
    rel.release(plan(path, eval_text=text))
    before = json.loads((tmp_path / "dist" / "manifest.json").read_text())

    path = write_config(tmp_path, spm_model, matrix=matrix, export={"max_seq_len": 48})
    s = statuses(rel.release(plan(path, eval_text=text)))
    assert s == {"container": "reused", "graph": "built", "quality": "built", "smoke": "built"}
    after = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert after["artifacts"][0] == before["artifacts"][0]  # the container, unchanged
    assert after["artifacts"][1]["sha256"] != before["artifacts"][1]["sha256"]

    (tmp_path / "eval.txt").write_text("she was not in the of and to " * 20)
    s = statuses(rel.release(plan(path, eval_text=text)))
    assert s == {"container": "reused", "graph": "reused", "quality": "built", "smoke": "reused"}
    s = statuses(rel.release(plan(path, eval_text=text), force=True))
    assert set(s.values()) == {"built"}
    # the graph's activations are an export setting: only the graph and what uses it rebuild
    path = write_config(
        tmp_path, spm_model, matrix=matrix, export={"max_seq_len": 48, "activations": "single"}
    )
    s = statuses(rel.release(plan(path, eval_text=text)))
    assert s == {"container": "reused", "graph": "built", "quality": "built", "smoke": "built"}


def test_failed_item_is_listed_and_successes_kept(spm_model, tmp_path, monkeypatch):
    """One item's export fails: exit 1, the failure on stderr, everything else recorded."""
    import llmtool.pipelines.export as export

    real = export.export_graph

    def failing(container, output, *args, **kwargs):
        if "int4" in Path(container).name:
            raise LlmToolError("simulated export failure", container)
        return real(container, output, *args, **kwargs)

    monkeypatch.setattr(export, "export_graph", failing)
    matrix = {"backends": ["cpu"], "precisions": ["int4", "int8"], "outputs": ["container", "task"]}
    path = write_config(tmp_path, spm_model, matrix=matrix, smoke={"max_tokens": 0})
    result = CliRunner().invoke(app, ["release", "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert "cpu-int4: task: " in result.output and "simulated export failure" in result.output
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert [a["path"] for a in manifest["artifacts"]] == [
        "tiny-cpu-int4.bin", "tiny-cpu-int8.bin", "tiny-cpu-int8.task"
    ]  # fmt: skip
    assert not (tmp_path / "dist" / "tiny-cpu-int4.task").exists()


def test_resume_after_killed_run(spm_model, tmp_path):
    """Kill the process (no cleanup at all) halfway through writing the second item's
    container: nothing partial is recorded, and the resumed run reuses the first item and
    ends with exactly what an uninterrupted run gives."""
    matrix = {"backends": ["cpu"], "precisions": ["float32", "int8"], "outputs": ["container"]}
    path = write_config(tmp_path, spm_model, matrix=matrix, smoke={"max_tokens": 0})
    killer = textwrap.dedent(
        f"""
        import os
        from llmtool.config import load_release_config
        from llmtool.pipelines.release import plan_release, release
        calls = []
        def progress(done, total, what):
            if what.startswith("cpu-int8: container params."):
                calls.append(what)
                if len(calls) == 6:
                    os._exit(9)
        release(plan_release(load_release_config({str(path)!r})), progress=progress)
        """
    )
    proc = subprocess.run([sys.executable, "-c", killer], cwd=REPO, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    out = tmp_path / "dist"
    state = out / rel.STATE_DIR / "items"
    assert not (out / "manifest.json").exists()  # no manifest claims a half-built release
    assert json.loads((state / "cpu-float32.json").read_text())["steps"]["container"]
    unfinished = state / "cpu-int8.json"
    assert not unfinished.exists() or not json.loads(unfinished.read_text())["steps"]
    partial = list((out / rel.STATE_DIR / "staging" / "cpu-int8").iterdir())
    assert partial and not (out / "tiny-cpu-int8.bin").exists()

    summary = rel.release(plan(path))
    assert summary["items"]["cpu-float32"]["status"] == {"container": "reused"}
    assert summary["items"]["cpu-int8"]["status"] == {"container": "built"}
    (tmp_path / "clean").mkdir()
    rel.release(
        plan(write_config(tmp_path / "clean", spm_model, matrix=matrix, smoke={"max_tokens": 0}))
    )
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean" / "dist")
    assert not (out / rel.STATE_DIR / "staging" / "cpu-int8").exists()


def workflow_commands() -> list[str]:
    """Every `llmtool ...` line of the shipped workflow, in order."""
    workflow = yaml.safe_load((REPO / "examples" / "github-release.yml").read_text())
    lines = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            for line in step.get("run", "").splitlines():
                if line.strip().startswith("llmtool "):
                    lines.append(line.strip())
    return lines


def test_github_workflow_commands_run_and_merge_equals_single_run(spm_model, tmp_path, monkeypatch):
    """Run the workflow's own commands (one --only run per emitted item, then the merge) on a
    tiny checkpoint: the merged folder equals a single-machine run (in 2 worker processes),
    byte for byte."""
    commands = workflow_commands()
    assert [c.split()[:3] for c in commands] == [
        ["llmtool", "release", "--config"],
        ["llmtool", "release", "--config"],
        ["llmtool", "release", "--merge-manifests"],
    ]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    matrix = {"backends": ["cpu"], "precisions": ["int8", "int4"], "outputs": ["container", "task"]}
    config = write_config(tmp_path / "configs", spm_model, matrix=matrix, output_dir="../single")
    config.rename(tmp_path / "configs" / "release-example.yaml")
    runner = CliRunner()

    def llmtool(line: str, **subs: str) -> str:
        for key, value in subs.items():
            line = line.replace("${{ " + key + " }}", value)
        args = []
        for word in shlex.split(line.split(" > ")[0])[1:]:
            args.extend(sorted(glob.glob(word)) if "*" in word else [word])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        return result.stdout

    emitted = json.loads(llmtool(commands[0]))
    assert emitted == {"item": ["cpu-int8", "cpu-int4"]}
    for item in emitted["item"]:
        llmtool(commands[1], **{"matrix.item": item})
        Path("parts", item, "timings.json").unlink()  # as if each ran on another machine
    llmtool(commands[2])
    single = ["release", "--config", "configs/release-example.yaml", "--jobs", "2", "--json"]
    result = runner.invoke(app, single)  # 2 worker processes
    assert result.exit_code == 0, result.output
    peak = json.loads(result.stdout)["peak_rss_mib"]
    assert peak["workers_bound"] >= peak["largest_item"] > 0
    assert folder_bytes(tmp_path / "dist") == folder_bytes(tmp_path / "single")
    assert (tmp_path / "dist" / "manifest.json").exists()


def test_merge_refuses_disagreeing_digests(spm_model, tmp_path):
    path = write_config(tmp_path, spm_model, smoke={"max_tokens": 0})
    p = plan(path)
    rel.release(p, only="cpu-int8")
    other = tmp_path / "other"
    rel.release(plan(path, output_dir=str(other)), only="cpu-int8")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["artifacts"][0]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LlmToolError, match="tiny-cpu-int8.bin has sha256 0000"):
        rel.merge_manifests([tmp_path / "dist", other], tmp_path / "merged")


def test_config_errors_are_one_line(spm_model, tmp_path):
    runner = CliRunner()
    cases = [
        ({"matrix": {"outputs": ["lora"]}}, "'lora' but no lora_ckpt"),
        ({"matrix": {"outputs": ["gguf"]}}, "unknown output 'gguf'"),
        ({"matrix": {"precisions": ["int3"]}}, "unknown precision 'int3'"),
        ({"lora_ckpt": "adapter"}, "lora_ckpt is given: add 'lora' to matrix.outputs"),
        ({"smoke": {"tokens": 3}}, "smoke: unknown key 'tokens'"),
        ({"export": {"activations": "half"}}, "export.activations: unknown mode 'half'"),
    ]
    for sections, message in cases:
        path = write_config(tmp_path, spm_model, **sections)
        result = runner.invoke(app, ["release", "--config", str(path)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    path = write_config(tmp_path, spm_model)
    result = runner.invoke(app, ["release", "--config", str(path), "--only", "gpu-int8"])
    assert result.exit_code == 2 and "no item 'gpu-int8'" in result.output


def test_lora_adapter_per_item(spm_model, tmp_path):
    """An adapter gives each item a LoRA file (lora-convert over that item's container) and a
    graph with LoRA inputs that the smoke run drives; a changed adapter rebuilds only those."""
    from llmtool.pipelines.lora_convert import lora_convert
    from tests.test_lora import peft_adapter

    peft_adapter(spm_model, tmp_path / "adapter", 1, r=4, lora_alpha=8, target_modules="all-linear")
    matrix = {
        "backends": ["cpu"],
        "precisions": ["int8"],
        "outputs": ["container", "lora", "graph"],
    }
    path = write_config(
        tmp_path, spm_model, matrix=matrix, lora_ckpt=str(tmp_path / "adapter"), lora_rank=4
    )
    summary = rel.release(plan(path))
    assert summary["failures"] == [] and summary["items"]["cpu-int8"]["smoke"]["generated_tokens"]
    out = tmp_path / "dist"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["lora_sha256"]
    by_kind = {a["kind"]: a for a in manifest["artifacts"]}
    assert by_kind["lora"]["path"] == "tiny-cpu-int8.lora.bin"
    assert by_kind["graph"]["settings"]["lora_rank"] == by_kind["lora"]["settings"]["stored_rank"]
    lora_convert(tmp_path / "adapter", out / "tiny-cpu-int8.bin", tmp_path / "direct.lora.bin")
    assert (tmp_path / "direct.lora.bin").read_bytes() == (
        out / "tiny-cpu-int8.lora.bin"
    ).read_bytes()

    peft_adapter(spm_model, tmp_path / "adapter", 2, r=4, lora_alpha=8, target_modules="all-linear")
    status = rel.release(plan(path))["items"]["cpu-int8"]["status"]
    assert status == {"container": "reused", "lora": "built", "graph": "built", "smoke": "built"}
