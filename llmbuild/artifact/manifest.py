"""manifest.json: built as a typed `Manifest` (compile), written atomically, read back
with schema checks (`read_manifest` returns the JSON object; integrity.py checks it).

The JSON layout — keys and their order — is part of the artifact format (README "Artifacts");
`Manifest.to_json` is the only place that spells it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmbuild.artifact.integrity import file_sha256  # noqa: F401 - the artifact's one file digest
from llmbuild.artifact.layout import MANIFEST, SCHEMA_VERSION
from llmbuild.errors import UserError

REQUIRED_KEYS = ("schema_version", "name", "model", "limits", "graph", "tokenizer", "engines")


@dataclass
class Hashes:
    recipe: str  # sha256 of the resolved recipe
    source: str  # the source's fingerprint
    graph: str  # sha256 over every rank's graph and weights files


@dataclass
class Tokenizer:
    dir: str
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool
    chat_template: str | None


@dataclass
class Manifest:
    """Everything an artifact records. Sections that other stages produce as JSON objects
    (the model dims from the architecture spec, the graph contract, the parallel and
    quantization sections, engine entries, the verification report, stage timings) are
    kept as they are produced; optional sections are None when absent and left out of
    the JSON."""

    name: str
    recipe: dict
    hashes: Hashes
    source: dict  # {path, format, kind, ...: llmbuild.recipe.model_source.source_record}
    toolchain: dict[str, str]
    model: dict  # ArchitectureSpec.manifest_dims
    limits: dict[str, int]
    graph: dict  # {file, weights, opset, inputs, outputs, [ranks], [cpu]}
    tokenizer: Tokenizer
    variant: str | None = None
    parallel: dict | None = None
    quantization: dict | None = None
    engines: list[dict] = field(default_factory=list)
    verification: dict | None = None
    timings: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def record_engines(self, engines: list[dict]) -> None:
        """The built engines, and each TensorRT flavour's version in the toolchain record."""
        self.engines = engines
        for info in engines:
            self.toolchain[info["trt_module"]] = info["trt_version"]

    def to_json(self) -> dict:
        out = {"schema_version": self.schema_version, "name": self.name, "recipe": self.recipe,
               "hashes": asdict(self.hashes), "source": self.source}
        if self.variant:
            out["variant"] = self.variant
        out.update(toolchain=self.toolchain, model=self.model, limits=self.limits, graph=self.graph)
        for optional in ("parallel", "quantization"):
            if getattr(self, optional):
                out[optional] = getattr(self, optional)
        out.update(tokenizer=asdict(self.tokenizer), engines=self.engines, verification=self.verification,
                   timings=self.timings)
        return out


def write_manifest(directory: Path, manifest: Manifest | dict) -> Path:
    if isinstance(manifest, Manifest):
        manifest = manifest.to_json()
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
