"""An artifact checked when it is opened: the manifest's structure (every nested key a
runtime reads, with its type) and every file it names (presence, size, and the sha256
the manifest records), so a damaged artifact gives one message naming the file and
what is wrong instead of a traceback from deep inside ONNX Runtime or a tokenizer.

Hashing reads every weight byte once (SmolLM2 fp16: 270 MB, about 0.3 s); skip it
with `llmbuild.load(..., check_hashes=False)` or `LLMBUILD_SKIP_HASH_CHECK=1` (sizes
and structure are still checked).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from llmbuild.errors import UserError

SKIP_HASH_ENV = "LLMBUILD_SKIP_HASH_CHECK"

# (dotted key, expected type(s), what the message calls it); list[...] items checked apart.
_INT = (int,)
NESTED_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("name", (str,)),
    ("model", (dict,)),
    ("model.num_layers", _INT),
    ("model.vocab_size", _INT),
    ("model.precision", (str,)),
    ("limits", (dict,)),
    ("limits.max_batch_size", _INT),
    ("limits.max_input_len", _INT),
    ("limits.max_seq_len", _INT),
    ("graph", (dict,)),
    ("graph.file", (str,)),
    ("tokenizer", (dict,)),
    ("engines", (list,)),
)
# Keys a runtime reads when present: (dotted key, allowed types; type(None) = may be null).
OPTIONAL_KEYS: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("graph.weights", (str,)),
    ("graph.cpu", (dict,)),
    ("graph.cpu.file", (str,)),
    ("graph.cpu.sha256", (str,)),
    ("graph.cpu.data", (str,)),
    ("graph.cpu.data_sha256", (str,)),
    ("hashes", (dict,)),
    ("hashes.graph", (str,)),
    ("parallel", (dict,)),
    ("parallel.tp", _INT),
    ("tokenizer.dir", (str,)),
    ("tokenizer.bos_token_id", (int, type(None))),
    ("tokenizer.eos_token_ids", (list, type(None))),
    ("tokenizer.add_bos_token", (bool, type(None))),
    ("tokenizer.chat_template", (str, type(None))),
    ("model.architecture", (str,)),
    ("model.hidden_size", _INT),
    ("model.num_attention_heads", _INT),
    ("model.num_key_value_heads", _INT),
    ("model.head_dim", _INT),
    ("limits.max_num_tokens", (int, type(None))),
    ("toolchain", (dict,)),
    ("verification", (dict, type(None))),
    ("timings", (dict,)),
)
_TYPE_NAMES = {int: "an integer", str: "a string", dict: "a mapping", list: "a list", bool: "true or false",
               type(None): "null"}


class ArtifactError(UserError):
    """A damaged or incomplete artifact (exit 2)."""


def manifest_problems(manifest: dict) -> list[str]:
    """What is missing or of the wrong type in a manifest, as `key: problem` strings."""
    problems = []
    for key, types in NESTED_KEYS:
        node: object = manifest
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = _MISSING
                break
            node = node[part]
        if node is _MISSING:
            parent = key.rsplit(".", 1)[0] if "." in key else None
            if parent is None or not any(p.startswith(parent + ":") for p in problems):
                problems.append(f"{key}: missing")
            continue
        if isinstance(node, bool) or not isinstance(node, types):
            problems.append(f"{key}: expected {_TYPE_NAMES[types[0]]}, found {type(node).__name__} {node!r:.40}")
        elif types == _INT and node < 1:
            problems.append(f"{key}: expected a positive integer, found {node}")
    for key, types in OPTIONAL_KEYS:
        node = _lookup(manifest, key)
        if node is _MISSING:
            continue
        ok = isinstance(node, types) and (bool in types or not isinstance(node, bool))
        if not ok:
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            problems.append(f"{key}: expected {expected}, found {type(node).__name__} {node!r:.40}")
        elif types == _INT and node < 1:
            problems.append(f"{key}: expected a positive integer, found {node}")
    eos = _lookup(manifest, "tokenizer.eos_token_ids")
    if isinstance(eos, list) and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
        problems.append(f"tokenizer.eos_token_ids: expected a list of token ids, found {eos!r:.40}")
    for i, e in enumerate(manifest.get("engines") if isinstance(manifest.get("engines"), list) else []):
        if (not isinstance(e, dict) or not isinstance(e.get("file"), str)
                or not isinstance(e.get("bytes", 0), int) or not isinstance(e.get("sha256", ""), str)):
            problems.append(f"engines[{i}]: expected a mapping with a 'file' (and its 'bytes' and 'sha256')")
    return problems


def _lookup(manifest: dict, key: str):
    node: object = manifest
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _inside(directory: Path, name: str, what: str) -> Path:
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ArtifactError(f"{directory}: the manifest's {what} {name!r} points outside the artifact")
    return path


def check_artifact_files(directory: str | os.PathLike, manifest: dict, *, hashes: bool | None = None) -> None:
    """Every file the manifest names is present and whole: the graph and its external
    weights (every initializer's bytes inside the data file; the recorded graph hash),
    the tokenizer, each engine (size and sha256). ArtifactError naming the file."""
    directory = Path(directory)
    if hashes is None:
        hashes = os.environ.get(SKIP_HASH_ENV, "") in ("", "0")
    graph = manifest["graph"]
    if manifest.get("parallel", {}).get("tp", 1) == 1:
        model = _inside(directory, graph["file"], "graph file")
        weights = _inside(directory, graph.get("weights") or f"{Path(graph['file']).parent}/model.onnx.data",
                          "weights file")
        _check_graph(directory, model, weights)
        recorded = (manifest.get("hashes") or {}).get("graph")
        if hashes and isinstance(recorded, str):
            actual = hashlib.sha256((file_sha256(model) + file_sha256(weights)).encode()).hexdigest()
            if actual != recorded:
                raise ArtifactError(f"{directory}: {graph['file']} or its weights {weights.name} do not match the "
                                    "sha256 recorded in the manifest (the files were changed or damaged); "
                                    "recompile the artifact")
        if isinstance(graph.get("cpu"), dict):
            _check_cpu_graph(directory, graph["cpu"], hashes)
    tok_dir = _inside(directory, (manifest["tokenizer"].get("dir") or "tokenizer"), "tokenizer directory")
    if not (tok_dir / "tokenizer.json").is_file():
        raise ArtifactError(f"{directory}: {tok_dir.name}/tokenizer.json is missing; recompile the artifact")
    for e in manifest["engines"]:
        path = _inside(directory, e["file"], "engine file")
        if not path.is_file():
            raise ArtifactError(f"{directory}: engine {e['file']} is missing")
        if isinstance(e.get("bytes"), int) and path.stat().st_size != e["bytes"]:
            raise ArtifactError(f"{directory}: engine {e['file']} has {path.stat().st_size} bytes, the manifest "
                                f"records {e['bytes']} (truncated or replaced)")
        if hashes and isinstance(e.get("sha256"), str) and file_sha256(path) != e["sha256"]:
            raise ArtifactError(f"{directory}: engine {e['file']} does not match the sha256 recorded in the manifest")


def _check_cpu_graph(directory: Path, entry: dict, hashes: bool) -> None:
    """The CPU-ready graph (llmbuild.lowering.cpu_graph): present, whole, its data files
    long enough, and (hashes) the recorded sha256 of the graph and of its own data."""
    model = _inside(directory, entry["file"], "CPU graph file")
    _check_graph(directory, model, None)
    pairs = [(model, entry.get("sha256"))]
    if isinstance(entry.get("data"), str):
        pairs.append((_inside(directory, entry["data"], "CPU graph data file"), entry.get("data_sha256")))
    for path, recorded in pairs:
        if not path.is_file():
            raise ArtifactError(f"{directory}: the CPU graph's file {path.relative_to(directory.resolve())} is "
                                "missing; recompile the artifact")
        if hashes and isinstance(recorded, str) and file_sha256(path) != recorded:
            raise ArtifactError(f"{directory}: {path.relative_to(directory.resolve())} does not match the sha256 "
                                "recorded in the manifest (graph.cpu; changed or damaged); recompile the artifact")


def _check_graph(directory: Path, model: Path, weights: Path | None) -> None:
    """The graph is readable and every external data file it names (`weights` if given,
    else each tensor's own location beside the graph) holds the bytes it reads."""
    import onnx

    rel = model.relative_to(directory.resolve())
    if not model.is_file():
        raise ArtifactError(f"{directory}: the graph {rel} is missing; recompile the artifact")
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ArtifactError(f"{directory}: the graph {rel} is not a readable ONNX model ({type(e).__name__}: "
                            f"{str(e)[:120]}); recompile the artifact") from None
    label = "the graph" if weights is not None else f"the graph {rel}"
    ends: dict[Path, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {kv.key: kv.value for kv in tensor.external_data}
            path = weights if weights is not None else _inside(directory, str(Path(rel).parent / info["location"]),
                                                               f"data file of {rel}")
            ends[path] = max(ends.get(path, 0), int(info.get("offset", 0)) + int(info.get("length", 0)))
    for path, end in ends.items():
        if not path.is_file():
            raise ArtifactError(f"{directory}: the weights file {path.relative_to(directory.resolve())} is "
                                "missing; recompile the artifact")
        size = path.stat().st_size
        if size < end:
            raise ArtifactError(f"{directory}: the weights file {path.relative_to(directory.resolve())} has "
                                f"{size} bytes, {label} reads up to byte {end} (truncated); recompile the artifact")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
