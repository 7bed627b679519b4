"""`model.source: hf:ORG/NAME[@REVISION][/FILE.gguf]` through huggingface_hub, offline
(HF_HUB_OFFLINE=1) against a cache laid out as huggingface_hub lays it out:

    $HF_HOME/hub/models--ORG--NAME/blobs/<sha256>                  the file contents
                                  /refs/main, refs/v1              a commit hash per ref
                                  /snapshots/<commit>/<file> -> ../../blobs/<sha256>

Each case runs the real CLI in a subprocess with HF_HOME set (huggingface_hub reads its
environment at import); nothing goes to the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_tiny_gguf, make_tiny_hf

LLMBUILD = [sys.executable, "-m", "llmbuild.cli"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def lay_out_repo(hub: Path, repo: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> None:
    storage = hub / ("models--" + repo.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = make_tiny_hf(root / "tiny-hf", tie=True, layers=2, hidden=64, vocab=128, seed=3)
    files = {p.name: p for p in model.iterdir() if p.is_file()}
    files["README.md"] = root / "README.md"  # a file a build does not need
    files["README.md"].write_text("# tiny\n")
    hf_home = root / "hf_home"
    lay_out_repo(hf_home / "hub", "llmbuild-test/tiny", COMMIT, files, refs=("main", "v1"))
    lay_out_repo(hf_home / "hub", "llmbuild-test/tiny-gguf", OLD_COMMIT,
                 {"tiny-q8.gguf": make_tiny_gguf(model, root / "tiny-q8.gguf")})
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return {"root": root, "model": model, "env": env}


def recipe(dir: Path, source: str, name: str = "hub-tiny") -> Path:
    path = dir / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {{source: '{source}'}}\nprecision: float32\n"
                    "limits: {max_batch_size: 1, max_input_len: 16, max_seq_len: 64}\nengines: []\n")
    return path


def run(args, env, cwd):
    return subprocess.run(LLMBUILD + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_hf_source_compiles_offline_and_records_the_commit(hub, tmp_path):
    out = run(["compile", str(recipe(tmp_path, "hf:llmbuild-test/tiny")), "-o", str(tmp_path / "out"),
               "--no-verify", "--quiet"], hub["env"], tmp_path)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "out" / "hub-tiny" / "manifest.json").read_text())
    assert manifest["source"]["hub"] == {"repo": "llmbuild-test/tiny", "revision": None, "file": None,
                                         "commit": COMMIT}
    assert manifest["source"]["spec"] == "hf:llmbuild-test/tiny"
    assert Path(manifest["source"]["path"]).name == COMMIT
    # the same weights as the checkpoint directory itself: the same source fingerprint and graph
    direct = run(["compile", str(recipe(tmp_path, str(hub["model"]), "direct-tiny")), "-o",
                  str(tmp_path / "out"), "--no-verify", "--quiet"], hub["env"], tmp_path)
    assert direct.returncode == 0, direct.stderr
    ref = json.loads((tmp_path / "out" / "direct-tiny" / "manifest.json").read_text())
    assert manifest["hashes"]["source"] == ref["hashes"]["source"]
    assert manifest["hashes"]["graph"] == ref["hashes"]["graph"]


@pytest.mark.parametrize("source,commit", [
    ("hf:llmbuild-test/tiny@v1", COMMIT), (f"hf:llmbuild-test/tiny@{COMMIT}", COMMIT),
    ("hf:llmbuild-test/tiny-gguf/tiny-q8.gguf", OLD_COMMIT),
])
def test_hf_source_forms_resolve_offline(hub, tmp_path, source, commit):
    out = run(["validate", str(recipe(tmp_path, source)), "--json"], hub["env"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    resolved = Path(json.loads(out.stdout)["source"])
    assert commit in resolved.parts


@pytest.mark.parametrize("source,message", [
    ("hf:llmbuild-test/absent", "not in the Hugging Face cache"),
    ("hf:llmbuild-test/tiny@v2", "not in the Hugging Face cache"),
    ("hf:llmbuild-test/tiny-gguf/other.gguf", "has no file 'other.gguf'"),
    ("hf:not-a-repo-id", "expected 'hf:<org>/<name>"),
])
def test_hf_source_absent_offline_is_a_clear_error(hub, tmp_path, source, message):
    out = run(["validate", str(recipe(tmp_path, source))], hub["env"], tmp_path)
    assert out.returncode == 2
    assert message in out.stdout + out.stderr
    assert "HF_HUB_OFFLINE is set" in out.stdout + out.stderr or "not in the" not in message
    assert "Traceback" not in out.stderr
