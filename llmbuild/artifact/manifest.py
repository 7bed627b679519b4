"""manifest.json: read with schema checks, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llmbuild.artifact.layout import MANIFEST, SCHEMA_VERSION
from llmbuild.errors import UserError

REQUIRED_KEYS = ("schema_version", "name", "model", "limits", "graph", "tokenizer", "engines")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(artifact: str | Path) -> dict:
    """The manifest of a complete artifact; UserError for anything else."""
    directory = Path(artifact)
    if not directory.exists():
        raise UserError(f"artifact {directory} does not exist")
    if directory.is_file() and directory.name == MANIFEST:
        directory = directory.parent
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{directory} is not a complete llmbuild artifact (no {MANIFEST}); "
            "an interrupted compile leaves no manifest — run `llmbuild compile` again"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: cannot read the manifest: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: cannot read the manifest: nested too deeply") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # true == 1 in Python; not a version
        raise UserError(
            f"{path}: manifest schema version {version!r} is not supported by this llmbuild "
            f"(expected {SCHEMA_VERSION}); rebuild the artifact with this version"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path}: manifest lacks {', '.join(missing)}")
    from llmbuild.artifact.integrity import manifest_problems

    problems = manifest_problems(manifest)
    if problems:
        raise UserError(f"{path}: damaged manifest: " + "; ".join(problems))
    return manifest
