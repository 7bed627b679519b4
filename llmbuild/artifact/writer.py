"""Atomic artifact writing: build in a hidden sibling, rename into place at the end.

An interrupted compile (exception, Ctrl-C, SIGTERM, kill -9) never leaves a directory
that looks complete: work happens in `<out>/.<name>.partial-<pid>`, the manifest is
written last, and only then is the directory renamed to `<out>/<name>`. Leftovers of
killed runs are removed by the next compile of the same name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path
from typing import Iterator

import psutil


def _partials(out_dir: Path, name: str) -> list[Path]:
    return sorted(out_dir.glob(f".{name}.partial-*")) + sorted(out_dir.glob(f".{name}.old-*"))


def _owner_alive(path: Path) -> bool:
    try:
        pid = int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False
    return pid != os.getpid() and psutil.pid_exists(pid)


def clean_stale(out_dir: Path, name: str) -> None:
    for path in _partials(out_dir, name):
        if not _owner_alive(path):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so cleanup runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged_artifact(out_dir: Path, name: str) -> Iterator[Path]:
    """Yield a staging directory; on normal exit it becomes `out_dir/name`. An output
    directory that cannot be created or written is a UserError before any work."""
    stage = out_dir / f".{name}.partial-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(out_dir, name)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
    except OSError as e:
        from llmbuild.errors import UserError

        reason = "it exists and is not a directory" if isinstance(e, FileExistsError) else (e.strerror or str(e))
        raise UserError(f"--out {out_dir}: cannot write the artifact there ({reason}); pass another -o/--out") from None
    final = out_dir / name
    try:
        with _sigterm_as_interrupt():
            yield stage
            old = out_dir / f".{name}.old-{os.getpid()}"
            if final.exists():
                os.replace(final, old)
            os.replace(stage, final)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
