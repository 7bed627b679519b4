"""Profile of compile's verification stage on a compiled artifact: where its seconds go
(HF load from the source, HF forward and greedy, ONNX Runtime sessions and runs on the
standard and the CPU-ready graph). The same call compile makes (`_maybe_verify`:
reference outputs through `CachedReference`, here with no cache directory, so every HF
output is computed), under pyinstrument.

    .venv/bin/pip install pyinstrument==5.1.3      # a profiler, not a dependency of llmbuild
    .venv/bin/llmbuild compile recipes/smollm2-135m-instruct.yaml -o OUT --no-verify
    .venv/bin/python benchmarks/verify_profile.py OUT/smollm2-135m-instruct [--threads N] > profile.txt

Prints the verification's wall and CPU seconds and pyinstrument's call tree (frames of
more than 1 % of the time). Figures and reading: benchmarks/compile_smollm2.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    from pyinstrument import Profiler

    from llmbuild.artifact import read_manifest
    from llmbuild.compile import verify_in_compile

    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="verification threads (default: compile's)")
    args = parser.parse_args()
    manifest = read_manifest(args.artifact)
    profiler = Profiler(interval=0.005)
    start, cpu = time.perf_counter(), time.process_time()
    profiler.start()
    report = verify_in_compile(args.artifact, Path(manifest["source"]["path"]), manifest["hashes"]["source"],
                               manifest["recipe"], cache_dir=None, threads=args.threads)
    profiler.stop()
    print(f"verification: {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU, "
          f"passed={report['passed']}")
    print(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main()
