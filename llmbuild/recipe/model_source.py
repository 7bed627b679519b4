"""Resolve `model.source`: a path (relative to the recipe that sets it),
`package:<module>/<file>` (a file shipped inside an installed Python package) or
`hf:<org>/<name>[@<revision>][/<file>.gguf]` (a Hugging Face Hub repository, through
huggingface_hub: its cache, HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE; only the
files a build needs are fetched; `hub_commit` gives the resolved commit)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from llmbuild.errors import UserError

PACKAGE_PREFIX = "package:"
_PACKAGE_FORM = re.compile(r"^package:([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)/(.+)$")
HUB_PREFIX = "hf:"
# A revision: a branch, tag or commit (no "/"), or a pull request's ref (refs/pr/N).
_HUB_FORM = re.compile(r"^hf:([\w.-]+/[\w.-]+)(?:@(refs/pr/\d+|[\w.-]+))?(?:/(.+\.gguf))?$", re.IGNORECASE)
# What a build reads from an HF checkpoint repository (the weights, config, tokenizer).
HUB_CHECKPOINT_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json",
]


class SourceError(UserError):
    """The model source cannot be found or is not a model."""


def resolve_source(source: str, base_dir: Path) -> Path:
    """The absolute path of a model source; raises `SourceError` if it is not an
    existing HF checkpoint directory (with config.json) or .gguf file."""
    if "\0" in source:
        raise SourceError("the model source contains a NUL byte; expected a file or directory path")
    try:
        return _resolve(source, base_dir)
    except (OSError, ValueError) as e:  # a name too long for the filesystem, a loop of symlinks
        reason = getattr(e, "strerror", None) or str(e)
        raise SourceError(f"cannot use the model source {source[:80]!r}{'...' if len(source) > 80 else ''}: "
                          f"{reason}") from None


def _resolve(source: str, base_dir: Path) -> Path:
    if source.startswith(PACKAGE_PREFIX):
        path = _package_file(source)
    elif source.startswith(HUB_PREFIX):
        path = _hub_snapshot(source)
    else:
        path = (base_dir / Path(source).expanduser()).resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(
                f"{path} is a directory without config.json; expected a Hugging Face"
                " checkpoint directory or a .gguf file"
            )
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(
                f"{path} is not a .gguf file; expected a Hugging Face checkpoint"
                " directory or a .gguf file"
            )
    else:
        raise SourceError(
            f"{path} does not exist; expected a Hugging Face checkpoint directory"
            " or a .gguf file"
        )
    return path


def _package_file(source: str) -> Path:
    match = _PACKAGE_FORM.match(source)
    if match is None:
        raise SourceError(f"expected 'package:<module>/<file>', found {source!r}")
    module, relative = match.groups()
    top, *subpackages = module.split(".")
    # find_spec of a top-level name does not import it; walk subpackages as directories
    # so that nothing is imported for dotted names either.
    spec = importlib.util.find_spec(top)
    if spec is None:
        dist = top.replace("_", "-")
        raise SourceError(
            f"package {top!r} is not installed (needed for {source!r});"
            f" install it with `pip install --no-deps {dist}`"
        )
    if not spec.submodule_search_locations:
        raise SourceError(f"{top!r} is a module, not a package (needed for {source!r})")
    roots = [Path(loc, *subpackages) for loc in spec.submodule_search_locations]
    for root in roots:
        if (root / relative).exists():
            return (root / relative).resolve()
    looked = ", ".join(str(r) for r in roots)
    raise SourceError(f"{relative!r} not found in package {module!r} (looked in {looked})")


def parse_hub(source: str) -> tuple[str, str | None, str | None]:
    """(repo id, revision or None, GGUF file or None) of an `hf:` source."""
    match = _HUB_FORM.match(source)
    if match is None:
        raise SourceError(f"expected 'hf:<org>/<name>[@<revision>][/<file>.gguf]' (a revision is a branch, tag, "
                          f"commit or refs/pr/N), found {source!r}")
    file = match.group(3)
    if file is not None and (file.startswith("/") or ".." in file.split("/")):
        raise SourceError(f"{source}: the file {file!r} must be a path inside the repository (no '..', not absolute)")
    return match.group(1), match.group(2), file


def hub_commit(path: Path) -> str | None:
    """The commit of a path inside a huggingface_hub cache snapshot (…/snapshots/<commit>/…)."""
    parts = Path(path).parts
    if "snapshots" in parts[:-1]:
        return parts[parts.index("snapshots") + 1]
    return None


def _hub_snapshot(source: str) -> Path:
    """The local snapshot of an `hf:` source, downloaded (only the needed files) unless
    cached; offline (HF_HUB_OFFLINE=1) only the cache is looked at."""
    repo, revision, file = parse_hub(source)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError as e:  # a base-install dependency; only a broken install lacks it
        raise SourceError(f"{source!r} needs huggingface_hub (pip install huggingface_hub)") from e
    from huggingface_hub import constants

    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=[file] if file else HUB_CHECKPOINT_FILES)
    except hub_errors.LocalEntryNotFoundError as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise SourceError(
            f"{source}: not in the Hugging Face cache {constants.HF_HUB_CACHE}{offline} and the Hub cannot be "
            f"reached; download it where the Hub is reachable (`hf download {repo}"
            f"{f' --revision {revision}' if revision else ''}`) or point HF_HOME / HF_HUB_CACHE at a cache that has it"
        ) from None
    except hub_errors.GatedRepoError:
        raise SourceError(f"{source}: the repository is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise SourceError(f"{source}: no such repository on the Hub (or it is private: set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise SourceError(f"{source}: repository {repo} has no revision {revision!r}") from None
    except hub_errors.HfHubHTTPError as e:
        raise SourceError(f"{source}: the Hub refused the download: {e}") from None
    path = Path(folder) / file if file else Path(folder)
    if file and not path.is_file():
        raise SourceError(f"{source}: repository {repo} has no file {file!r}")
    return path


def source_record(source: str, path: Path) -> dict:
    """What the manifest records of a source besides its path: the recipe's spelling
    and, for `hf:`, the repository, requested revision and resolved commit."""
    record = {"spec": source}
    if source.startswith(HUB_PREFIX):
        repo, revision, file = parse_hub(source)
        record["hub"] = {"repo": repo, "revision": revision, "file": file, "commit": hub_commit(path)}
    return record


def resolve_reference(reference: str | None, manifest: dict, base_dir: Path | None = None, *,
                      otherwise: str | None = None) -> Path:
    """The model `verify` / `eval` compare an artifact with: `reference` in any source form
    (a path, `package:…`, `hf:…`; a path may also be an artifact directory), or, when
    None, the source the artifact's manifest records (its path if it still exists, else its
    `package:` / `hf:` spelling resolved again, e.g. on another machine). `otherwise`: what
    else the command accepts, added to the message when the recorded source is gone."""
    base_dir = base_dir or Path.cwd()
    if reference is not None:
        if reference.startswith((PACKAGE_PREFIX, HUB_PREFIX)):
            return resolve_source(reference, base_dir)
        return (base_dir / Path(reference).expanduser()).resolve()
    recorded = manifest.get("source") or {}
    path = recorded.get("path")
    if path and Path(path).exists():
        return Path(path)
    spec = recorded.get("spec") or (manifest.get("recipe") or {}).get("model", {}).get("source")
    if spec and spec.startswith((PACKAGE_PREFIX, HUB_PREFIX)):
        return resolve_source(spec, base_dir)
    raise SourceError(
        f"the artifact's source {path or spec!r} (recorded in its manifest) is not on this machine; "
        f"pass --reference PATH|package:…|hf:…{' ' + otherwise if otherwise else ''}"
    )
