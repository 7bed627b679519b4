"""Incremental compile: every stage of `compile` keyed by what it depends on, and reused
when that is unchanged (the engines have their own cache, `llmbuild.engine.cache`).

    store = StageStore.for_cache(cache)                      # None: every stage runs
    key = stage_key("tokenizer", source=fingerprint, tools=tool_versions("tokenizers"))
    meta = store.run(rep, "tokenizer", key, stage_dir, ["tokenizer"], build)   # build() -> meta

A stage's key is a sha256 over its inputs: the recipe sections it reads, the source's
fingerprint, the versions of the tools it runs, and the keys (or content hashes) of the
stages before it. Its entry holds the files it wrote into the staging directory (hard-
copied back on reuse — onnx refuses hard-linked external data — and checked by size and
sampled digest like engines) and a JSON `meta`
(what the manifest records of it) with its sha256: an entry whose record is truncated,
edited or names paths outside it is a miss (rebuilt and replaced), never an error. `compile` reports per stage whether it was reused
(`rep.stages[name]["reused"]`, in the manifest's timings).

| stage     | key inputs                                                                     |
|-----------|--------------------------------------------------------------------------------|
| source    | the files' paths, sizes and mtimes (→ fingerprint, config; no tensor read)      |
| onnx      | source fingerprint, model/precision/limits.max_seq_len/quantization/parallel, tools |
| cpu_graph | graph hash, tools (recipe runtime.cpu_graph: whether the stage runs at all)      |
| tokenizer | source fingerprint, tools                                                      |
| verify    | graph hash, CPU-ready graph's sha256s, tokenizer key, precision, verify/quantization sections, tools |
| engines   | `engine.cache.engine_key` (recipe less name/verify, graph hash, TensorRT, …)     |

Reference outputs for verification (HF's teacher-forced logits over prompt + greedy
continuation) are cached by source fingerprint and token ids (`CachedReference`), so a
graph change that keeps the continuations re-runs only our side; compile starts loading
the HF model ahead of time only when none of the source's outputs is cached
(`CachedReference.holds_outputs`).

Layout: `<cache>/stages/<stage>/<key[:2]>/<key>/{meta.json, files/...}`, written into a
temporary sibling and renamed; `<cache>/reference/<fingerprint[:2]>/<fingerprint>/<hash>.npz`;
`<cache>/digests.json`: sha256 of llmbuild's own sources (`code_digest`, part of every
stage key) memoised by each file's (path, inode, size, mtime_ns), as make and ninja trust
a file's stat (`file_digests`).
`llmbuild cache ls|du|prune` lists, sums and removes entries of all three kinds
(`cache_entries`, `select_prune`, `remove_entries`; last use = the entry's mtime, set on
every reuse).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

KEY_VERSION = 2  # bump when a key's composition or the entry layout changes (2: cpu_graph stage, verify report names its graph)
META_FILE = "meta.json"
FILES_DIR = "files"


DIGESTS_FILE = "digests.json"
_digest_memo: list = [None]  # the memo file code_digest uses (StageStore sets it; a memo only saves reading)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over llmbuild's own Python sources (each file's sha256, memoised by its stat
    in the cache: `file_digests`): a stage built by other code (a development checkout
    between releases, a patched install) is never reused."""
    root = Path(__file__).resolve().parent
    paths = sorted(root.rglob("*.py"))
    digests = file_digests(paths, _digest_memo[0])
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + digests[str(path)].encode() + b"\0")
    return digest.hexdigest()


def file_digests(paths: Iterable[Path], memo: Path | None = None) -> dict[str, str]:
    """{str(path): sha256 of its bytes}, read only for files whose (path, inode, size,
    mtime_ns) is not the one recorded in the JSON file `memo` (then recorded): what make
    and ninja trust — a file rewritten in place to the same size within the clock's
    granularity (a few ms) keeps a stale digest. The memo is rewritten atomically when it
    changed; a damaged one is ignored."""
    memo_data: dict = {}
    if memo is not None:
        try:
            memo_data = json.loads(Path(memo).read_text())
        except (OSError, ValueError):
            memo_data = {}
        if not isinstance(memo_data, dict):
            memo_data = {}
    out, changed = {}, False
    for path in paths:
        key = str(path)
        st = os.stat(path)
        stat = [st.st_ino, st.st_size, st.st_mtime_ns]
        entry = memo_data.get(key)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stat and isinstance(entry[1], str):
            out[key] = entry[1]
            continue
        out[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        memo_data[key] = [stat, out[key]]
        changed = True
    if memo is not None and changed:
        memo = Path(memo)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(memo_data))  # (into an existing directory only)
            os.replace(tmp, memo)
        except OSError:  # a read-only cache: digests are computed again next time
            tmp.unlink(missing_ok=True)
    return out


def tool_versions(*dists: str) -> dict:
    """Installed versions of these distributions (None if absent), with llmbuild's
    version and the digest of its code."""
    from llmbuild.version import __version__

    out = {"llmbuild": __version__, "llmbuild_code": code_digest()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def stage_key(stage: str, **inputs) -> str:
    data = {"key_version": KEY_VERSION, "stage": stage, **inputs}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def source_stat_key(path: Path) -> list:
    """What decides a source's fingerprint without reading it: every file's relative name,
    size and mtime (ns), and the resolved path."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = [str(path)]
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(path)) if f != path else f.name, st.st_size, st.st_mtime_ns])
    return out


def _place(src: Path, dst: Path) -> None:
    """dst becomes a copy of src (atomic). Not a hard link, unlike engines: onnx refuses
    external data files with several links ("potential hardlink attack")."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _files_under(root: Path, rels: Iterable[str]) -> list[str]:
    out = []
    for rel in rels:
        p = root / rel
        if p.is_file():
            out.append(rel)
        elif p.is_dir():
            out += sorted(str(f.relative_to(root)) for f in p.rglob("*") if f.is_file())
    return out


class StageStore:
    """Stage entries by key in one directory; safe for concurrent processes."""

    def __init__(self, directory: Path, *, lock_timeout: float = -1):
        self.dir = Path(directory)
        self.lock_timeout = lock_timeout
        if _digest_memo[0] is None:
            _digest_memo[0] = self.dir / DIGESTS_FILE

    @classmethod
    def for_cache(cls, cache) -> "StageStore | None":
        """compile's `cache` argument: True = the default cache dir, a path, or off."""
        from llmbuild.engine.cache import cache_directory

        directory = cache_directory(cache)  # a UserError if it cannot be a cache
        return None if directory is None else cls(directory)

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.dir / "stages" / stage / key[:2] / key

    def lock(self, stage: str, key: str):
        from filelock import FileLock

        path = self.dir / "locks" / f"{stage}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), timeout=self.lock_timeout, thread_local=False)

    def load(self, stage: str, key: str, root: Path) -> dict | None:
        """Place a stored entry's files under root; its meta, or None (a miss)."""
        from llmbuild.engine.cache import sampled_digest

        entry = self.entry_dir(stage, key)
        try:
            record = json.loads((entry / META_FILE).read_text())
        except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
            record = None
        if record is None or not _valid_record(record):
            if entry.exists():  # a damaged entry (truncated, edited, from another version): rebuilt
                shutil.rmtree(entry, ignore_errors=True)
            return None
        placed = []
        try:
            for rel, (size, digest) in record["files"].items():
                dst = root / rel
                _place(entry / FILES_DIR / rel, dst)
                placed.append(dst)
                if dst.stat().st_size != size or sampled_digest(dst) != digest:
                    raise OSError(f"damaged cache entry {entry}")
        except (OSError, KeyError):
            for p in placed:
                p.unlink(missing_ok=True)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        os.utime(entry)  # last use, for `llmbuild cache prune`
        return record["meta"]

    def store(self, stage: str, key: str, root: Path, rels: Iterable[str], meta: dict) -> None:
        from llmbuild.engine.cache import sampled_digest

        final = self.entry_dir(stage, key)
        tmp = final.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files = {}
            for rel in _files_under(root, rels):
                dst = tmp / FILES_DIR / rel
                _place(root / rel, dst)
                os.chmod(dst, 0o444)
                files[rel] = [dst.stat().st_size, sampled_digest(dst)]
            meta = json.loads(json.dumps(meta, default=str))  # what a reader gets back
            record = {"stage": stage, "key": key, "files": files, "meta": meta, "meta_sha256": _meta_digest(meta),
                      "stored": time.time()}
            (tmp / META_FILE).write_text(json.dumps(record, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _meta_digest(meta) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _valid_record(record) -> bool:
    """A stage entry's meta.json as `store` writes it: files {relative path inside the
    entry: [size, sampled digest]} and a meta whose sha256 is recorded (an edited or
    truncated meta is a miss, never a KeyError later in compile)."""
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return False
    for rel, value in record["files"].items():
        parts = Path(rel).parts
        if Path(rel).is_absolute() or not parts or ".." in parts:
            return False
        if not (isinstance(value, list) and len(value) == 2 and type(value[0]) is int and isinstance(value[1], str)):
            return False
    meta = record.get("meta")
    return isinstance(meta, dict) and record.get("meta_sha256") == _meta_digest(meta)


def run_stage(store: StageStore | None, rep, name: str, key: str, root: Path, rels: list[str],
              build: Callable[[Callable], dict], *, cacheable: Callable[[dict], bool] = lambda meta: True) -> dict:
    """One stage of compile under `rep.stage(name)`: reused from `store` when its key is
    there, else `build(update)` (writes `rels` under root, returns the meta) and stored.
    Records `reused` in the stage's timings."""
    with rep.stage(name) as update:
        hit = False
        if store is None:
            meta = build(update)
        else:
            with store.lock(name, key):
                meta = store.load(name, key, root)
                hit = meta is not None
                if hit:
                    update(1, 1, "reused")
                else:
                    meta = build(update)
                    if cacheable(meta):
                        store.store(name, key, root, rels, meta)
    rep.stages[name]["reused"] = hit
    return meta


class LazySource:
    """A model source opened only when a stage that reads it runs (on a no-op recompile,
    none does): `fingerprint`, `config` and `format` come from the source stage's meta."""

    def __init__(self, path: Path, fingerprint: str, config: dict, fmt: str, opened=None):
        self.path, self.format, self._fingerprint, self.config = Path(path), fmt, fingerprint, config
        self._source = opened

    def fingerprint(self) -> str:
        return self._fingerprint

    def _open(self):
        if self._source is None:
            from llmbuild.source import open_source

            self._source = open_source(self.path)
        return self._source

    def __getattr__(self, name):
        return getattr(self._open(), name)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


class CachedReference:
    """HF reference outputs (teacher-forced logits) per token sequence, cached on disk by
    source fingerprint and in memory for one compile (both graphs are checked on the same
    sequences); the HF model is loaded (once) only on a miss."""

    def __init__(self, directory: Path | None, fingerprint: str, load: Callable[[], object]):
        self.dir = self.directory(directory, fingerprint) if directory else None
        self._load, self._model = load, None
        self.tools = tool_versions("torch", "transformers")
        self.misses = 0
        self._memo: dict = {}

    @staticmethod
    def directory(cache_dir: Path, fingerprint: str) -> Path:
        return Path(cache_dir) / "reference" / fingerprint[:2] / fingerprint

    @classmethod
    def holds_outputs(cls, cache_dir: Path | None, fingerprint: str) -> bool:
        """Whether any reference output of this source is cached (compile then loads the
        HF model only at a miss, not ahead of time)."""
        if cache_dir is None:
            return False
        return any(cls.directory(cache_dir, fingerprint).glob("logits-*.npz"))

    @property
    def model(self):
        """What `load` returned: an HF model, or an object computing `logits(ids)` itself
        (llmbuild.verify.reference.ReferenceProcess)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def _path(self, digest: str) -> Path | None:
        return None if self.dir is None else self.dir / f"logits-{digest}.npz"

    def logits(self, ids: list[int]):
        import zipfile

        import numpy as np

        from llmbuild.verify.reference import ReferenceProcess, reference_logits

        ids = [int(i) for i in ids]
        digest = hashlib.sha256(json.dumps({"kind": "logits", "tools": self.tools, "ids": ids},
                                           sort_keys=True).encode()).hexdigest()[:32]
        if digest in self._memo:
            return self._memo[digest]
        path = self._path(digest)
        value = None
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    value = z["value"]
                if not (value.ndim == 2 and value.shape[0] == len(ids) and value.dtype.kind == "f"):
                    value = None
                else:
                    os.utime(path)  # last use, for `llmbuild cache prune`
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                value = None  # a damaged entry: computed again and replaced
        if value is None:
            self.misses += 1
            model = self.model
            value = np.asarray(model.logits(ids) if isinstance(model, ReferenceProcess)
                               else reference_logits(model, ids))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
                np.savez(tmp, value=value)
                os.replace(tmp, path)
        self._memo[digest] = value
        return value


# -- `llmbuild cache {ls,du,prune}`: the engine cache, the stage store, reference outputs --

@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "engine", "stage", "reference"
    name: str  # engine: the artifact file name it was built as; stage: the stage; reference: "hf outputs"
    key: str  # the content key (engine, stage) or source fingerprint (reference)
    path: Path
    bytes: int
    last_used: float  # entry directory's mtime: set when stored and at every reuse

    def lock(self, directory: Path):
        """The lock compile holds while it reads or writes this entry (None: reference)."""
        from filelock import FileLock

        if self.kind == "reference":
            return None
        name = f"{self.key}.lock" if self.kind == "engine" else f"{self.name}-{self.key}.lock"
        return FileLock(str(Path(directory) / "locks" / name), timeout=0, thread_local=False)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_entries(directory: Path) -> list[CacheEntry]:
    """Every complete entry under a cache directory (`llmbuild.engine.cache.default_cache_dir`),
    least recently used first. Temporary siblings of entries being written are not listed."""
    directory = Path(directory)
    out = []
    for entry in sorted((directory / "engines").glob("??/*")):
        if entry.name.startswith(".") or not (entry / "entry.json").is_file():
            continue
        try:
            info = json.loads((entry / "entry.json").read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        name = Path(info.get("file") or info.get("engine_file") or "engine").name
        out.append(CacheEntry("engine", f"{info.get('backend', 'engine')} {name}".strip(), entry.name, entry,
                              _tree_bytes(entry), entry.stat().st_mtime))
    for entry in sorted((directory / "stages").glob("*/??/*")):
        if entry.name.startswith(".") or not (entry / META_FILE).is_file():
            continue
        out.append(CacheEntry("stage", entry.parent.parent.name, entry.name, entry, _tree_bytes(entry),
                              entry.stat().st_mtime))
    for entry in sorted((directory / "reference").glob("??/*")):
        files = [f for f in entry.iterdir() if f.is_file() and not f.name.startswith(".")]
        if files:
            out.append(CacheEntry("reference", "hf outputs", entry.name, entry, sum(f.stat().st_size for f in files),
                                  max(f.stat().st_mtime for f in files)))
    return sorted(out, key=lambda e: e.last_used)


def select_prune(entries: list[CacheEntry], *, older_than: float | None = None, max_bytes: int | None = None,
                 now: float | None = None) -> list[CacheEntry]:
    """Entries to remove: those unused for more than `older_than` seconds, then, while the
    rest exceed `max_bytes`, the least recently used."""
    now = time.time() if now is None else now
    entries = sorted(entries, key=lambda e: e.last_used)
    chosen = [e for e in entries if older_than is not None and now - e.last_used > older_than]
    kept = [e for e in entries if e not in chosen]
    if max_bytes is not None:
        total = sum(e.bytes for e in kept)
        for e in list(kept):
            if total <= max_bytes:
                break
            chosen.append(e)
            kept.remove(e)
            total -= e.bytes
    return chosen


def remove_entries(directory: Path, entries: list[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove entries; (removed, skipped: in use by a compile right now). Artifacts keep
    their files (engines are hard-linked or copied into them, stage files copied)."""
    from filelock import Timeout

    removed, skipped = [], []
    for e in entries:
        lock = e.lock(directory)
        try:
            if lock is not None:
                lock.acquire()
        except Timeout:
            skipped.append(e)
            continue
        try:
            doomed = e.path.with_name(f".{e.path.name}.{os.getpid()}.prune")
            os.replace(e.path, doomed)  # readers see the entry whole or not at all
            for p in doomed.rglob("*"):  # cached files are read-only
                if p.is_dir():
                    os.chmod(p, 0o755)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(e)
        except FileNotFoundError:
            pass
        finally:
            if lock is not None:
                lock.release()
    return removed, skipped
