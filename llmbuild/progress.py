"""Stage reporting for long work: a progress bar per stage (rich, on stderr), and the
wall time and peak resident memory of every stage (recorded in the manifest)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

import psutil

# Lingers at the end of every stage: a debugging aid that lets tests deliver a signal in
# the middle of a compile (tests/test_artifact.py). Not for production use.
_STAGE_DELAY = float(os.environ.get("LLMBUILD_TEST_STAGE_DELAY", "0") or 0)


class _PeakRSS:
    """Samples this process's RSS in a background thread; `peak` is the maximum seen."""

    def __init__(self, interval: float = 0.02):
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


class Reporter:
    """`with reporter.stage("onnx") as update: update(done, total, detail)`."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.stages: dict[str, dict] = {}
        self._progress = None

    def __enter__(self):
        if not self.quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[detail]}"), console=Console(stderr=True), transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator:
        task = None
        if self._progress is not None:
            task = self._progress.add_task(name, total=None, detail="")

        last = {"detail": ""}

        def update(done: int | None = None, total: int | None = None, detail: str = "") -> None:
            last["detail"] = detail
            if task is not None:
                self._progress.update(task, completed=done, total=total, detail=detail)

        start = time.perf_counter()
        start_rss = psutil.Process().memory_info().rss
        with _PeakRSS() as rss:
            yield update
            if _STAGE_DELAY:
                time.sleep(_STAGE_DELAY)
        self.stages[name] = {
            "seconds": round(time.perf_counter() - start, 3),
            "start_rss_bytes": start_rss,
            "peak_rss_bytes": rss.peak,
        }
        if task is not None:
            t = self._progress.tasks[task]
            total = t.total if t.total is not None else 1
            seconds = f"{self.stages[name]['seconds']:.1f}s"
            detail = f"reused ({seconds})" if last["detail"] == "reused" else seconds
            self._progress.update(task, total=total, completed=total, detail=detail)



# Environment switches of the third-party libraries compile, verify and eval drive, read
# when each library is imported (so set before that): transformers' tqdm bars ("Converting
# and de-quantizing GGUF tensors…"), huggingface_hub's download bars, transformers'
# warnings.
_QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_third_party() -> None:
    """Silence third-party progress bars and logs in this process (ours, Reporter's, stay):
    the variables above (a value the user set is kept), and ONNX Runtime's process-wide
    logger at ERROR (its coloured WARNING lines about fusions and copies) — set when ONNX
    Runtime is imported, not by importing it here: a compile that reuses every stage never
    needs it (0.9 s of a no-op recompile's imports, benchmarks/compile_smollm2.md). For the
    CLI's compile, verify and eval."""
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    after_import("onnxruntime", lambda ort: ort.set_default_logger_severity(3))


_AWAITED: set[str] = set()  # modules an after_import finder waits for


def after_import(name: str, callback) -> None:
    """`callback(module)` once the top-level module `name` is imported: now if it already
    is, else right after its first import (a finder at the head of sys.meta_path that
    wraps the module's loader, then removes itself)."""
    import importlib.abc
    import importlib.util
    import sys

    if name in sys.modules:
        callback(sys.modules[name])
        return

    class AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)  # the real finders from here on
            _AWAITED.discard(name)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def run(module):
                exec_module(module)
                callback(module)

            spec.loader.exec_module = run
            return spec

    if name not in _AWAITED:  # one finder per module
        _AWAITED.add(name)
        sys.meta_path.insert(0, AfterImport())
