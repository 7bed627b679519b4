"""Content-addressed engine cache: an unchanged build reuses its engine.

    cache = EngineCache(default_cache_dir())
    key = engine_key(recipe=rd, source=fingerprint, graph=graph_hash, toolchain=tc,
                     engine=entry, trt_module="tensorrt_rtx", trt_version="1.7.1.116")
    info, hit = cache.get_or_build(key, engine_path, build)   # build(path) -> manifest entry

The key is a sha256 over everything that decides the engine: the resolved recipe (less
its name, the engine list, the verify settings and the model's location, which do not),
the source weights' fingerprint (headers plus sampled content; no mtimes or absolute paths), the ONNX graph's
hash, the toolchain (llmbuild, onnx, onnx-ir), the TensorRT flavour and version, and the
engine entry (backend, targets, builder options) and rank. Change any of them and the key
changes.

Layout: `<dir>/engines/<key[:2]>/<key>/{engine, entry.json}`, written into a temporary
sibling and renamed, so a reader never sees half an entry. A per-key lock file
(`<dir>/locks/<key>.lock`, `filelock`) makes concurrent compiles of the same engine
build it once: the second waits, then reuses it.

A hit costs milliseconds, not a pass over the engine: the engine is hard-linked into the
artifact (copied across file systems) and checked by its size and a sampled digest
(16 blocks of 64 KiB, `sampled_digest`); an entry that fails the check is a miss and is
rebuilt. (A full sha256 of a 2 GB engine takes seconds on a small CPU; the manifest's
sha256 is the one computed from the engine bytes when it was built.) llmbuild never
writes an engine file in place (always a new file, renamed), and cached engines are
read-only, so the inode a hard link shares is not modified by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

KEY_VERSION = 1  # bump when the key's composition or the entry layout changes
ENGINE_FILE = "engine"
ENTRY_FILE = "entry.json"
ENV_VAR = "LLMBUILD_CACHE_DIR"
# Recipe keys that do not change an engine (the engine list: each engine has its own key).
_NOT_ENGINE_INPUTS = ("name", "engines", "verify", "runtime", "matrix")


def default_cache_dir() -> Path:
    """$LLMBUILD_CACHE_DIR, else $XDG_CACHE_HOME/llmbuild, else ~/.cache/llmbuild."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmbuild"


def cache_directory(cache) -> Path | None:
    """compile's `cache` argument (True = the default directory, a path, None/False = off)
    as a directory that exists and is writable; a `UserError` naming it if it cannot be
    one (a path under a file, a read-only file system), before any stage runs."""
    import tempfile

    from llmbuild.errors import UserError

    if cache is None or cache is False:
        return None
    if isinstance(cache, str) and not cache.strip():
        raise UserError("--cache-dir '': expected a directory (an empty path would put the cache in the current "
                        "directory); pass a directory, or --no-cache")
    path = default_cache_dir() if cache is True else Path(cache).expanduser()
    how = f"the cache directory {path} (${ENV_VAR}, else ~/.cache/llmbuild)" if cache is True else f"--cache-dir {path}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        if isinstance(e, FileExistsError):
            reason = "it exists and is not a directory"
        raise UserError(f"{how}: cannot use it as a cache ({reason}); pass another --cache-dir, or --no-cache "
                        "to build without one") from None
    return path


def engine_key(
    *,
    recipe: dict,
    source: str,
    graph: str,
    toolchain: dict,
    engine: dict,
    trt_module: str,
    trt_version: str,
    rank: int = 0,
) -> str:
    """sha256 over every input that decides one engine (see the module docstring)."""
    recipe = {k: v for k, v in recipe.items() if k not in _NOT_ENGINE_INPUTS}
    if isinstance(recipe.get("model"), dict):  # where the weights are is not what they are
        recipe["model"] = {k: v for k, v in recipe["model"].items() if k != "source"}
    data = {
        "key_version": KEY_VERSION,
        "recipe": recipe,
        "source": source,
        "graph": graph,
        "toolchain": {k: toolchain.get(k) for k in ("llmbuild", "onnx", "onnx_ir")},
        "engine": engine,
        "trt": [trt_module, trt_version],
        "rank": rank,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


_BLOCK, _SAMPLES = 1 << 16, 16


def sampled_digest(path: Path) -> str:
    """sha256 of a file's size and 16 evenly spaced 64 KiB blocks (all of a small file)."""
    size = Path(path).stat().st_size
    digest = hashlib.sha256(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _BLOCK * _SAMPLES:
            digest.update(f.read())
        else:
            for i in range(_SAMPLES):
                f.seek(i * (size - _BLOCK) // (_SAMPLES - 1))
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def _place(src: Path, dst: Path) -> None:
    """dst becomes src's content: a hard link, or a copy across file systems (atomic)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


class EngineCache:
    """Engines by key in one directory; safe for concurrent processes."""

    def __init__(self, directory: Path, *, lock_timeout: float = -1):
        self.dir = Path(directory)
        self.lock_timeout = lock_timeout  # seconds; -1 waits as long as the other build takes

    def entry_dir(self, key: str) -> Path:
        return self.dir / "engines" / key[:2] / key

    def lock(self, key: str):
        from filelock import FileLock

        path = self.dir / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), timeout=self.lock_timeout, thread_local=False)

    def _load(self, key: str, engine_path: Path) -> dict | None:
        """Copy a cached engine to engine_path; its manifest entry, or None (miss)."""
        entry_dir = self.entry_dir(key)
        try:
            info = json.loads((entry_dir / ENTRY_FILE).read_text())
        except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
            return None
        if not isinstance(info, dict):  # an edited entry: rebuilt
            shutil.rmtree(entry_dir, ignore_errors=True)
            return None
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _place(entry_dir / ENGINE_FILE, engine_path)
            digest = sampled_digest(engine_path)
        except OSError:
            return None
        if digest != info.get("sampled_digest") or engine_path.stat().st_size != info.get("bytes"):
            engine_path.unlink(missing_ok=True)  # damaged entry: rebuild and replace it
            shutil.rmtree(entry_dir, ignore_errors=True)
            return None
        os.utime(entry_dir)  # last use, for whoever prunes the cache
        return info

    def _store(self, key: str, engine_path: Path, info: dict) -> None:
        final = self.entry_dir(key)
        tmp = final.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _place(engine_path, tmp / ENGINE_FILE)
            os.chmod(tmp / ENGINE_FILE, 0o444)  # shared with artifacts by hard link: read-only
            entry = {**info, "cache_key": key, "sampled_digest": sampled_digest(tmp / ENGINE_FILE),
                     "stored": time.time()}
            (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def get_or_build(self, key: str, engine_path: Path, build: Callable[[Path], dict]) -> tuple[dict, bool]:
        """(manifest entry, hit). On a miss `build(engine_path)` writes the engine and
        returns its entry, which is stored under `key`. Holds the key's lock throughout."""
        engine_path = Path(engine_path)
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock(key):
            info = self._load(key, engine_path)
            if info is not None:
                for k in ("stored", "sampled_digest"):
                    info.pop(k, None)
                return info, True
            info = build(engine_path)
            self._store(key, engine_path, info)
            return info, False
