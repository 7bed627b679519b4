"""Wall time of the architecture conformance suite per architecture.

    .venv/bin/python benchmarks/conformance_time.py [--out benchmarks/conformance_time.md]

Runs `pytest tests/test_conformance.py --durations=0` once and sums the setup, call and
teardown time of every test per architecture (the id in brackets). The first architecture
also pays the one-time imports of torch and transformers (in its first test); the session
build of the C++ runtime (tests/conftest.py `cpp_build`, shared with tests/test_cpp.py) is
counted too, incremental after the first build. The suite's target: at most ~2-3 minutes
per architecture on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+tests/test_conformance\.py::(\w+)(?:\[([^\]-]+)[^\]]*\])?")


def arches() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from llmbuild.models import ARCHITECTURES

    return set(ARCHITECTURES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table to this markdown file")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "pytest", "tests/test_conformance.py", "-q", "-p", "no:cacheprovider",
           "--durations=0", "-vv"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    per_arch: dict[str, float] = defaultdict(float)
    tests: dict[str, int] = defaultdict(int)
    for line in result.stdout.splitlines():
        m = LINE.match(line)
        if m:
            arch = m.group(4) or "(no architecture)"
            per_arch[arch] += float(m.group(1))
            tests[arch] += m.group(2) == "call"
    summary = next((ln.strip("= ") for ln in reversed(result.stdout.splitlines()) if " in " in ln), "")
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    first = min((a for a in per_arch if a in arches()), default=None)  # pytest runs them sorted
    rows = [f"| {a}{' (+ one-time imports)' if a == first else ''} | {tests[a]} | {s:.1f} |"
            for a, s in sorted(per_arch.items()) if tests[a]]
    text = "\n".join([
        "# Conformance suite: seconds per architecture", "",
        f"Recorded with `.venv/bin/python benchmarks/conformance_time.py --out benchmarks/conformance_time.md`"
        f" (method: the script's docstring). pytest: {summary}; wall {wall:.0f} s including interpreter"
        f" start-up; load average at the end {load} on 2 cores.", "",
        "| architecture | tests | seconds (setup + call + teardown) |", "| --- | --- | --- |", *rows, ""])
    print(text)
    if args.out:
        args.out.write_text(text)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
