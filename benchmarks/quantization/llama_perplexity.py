"""llama.cpp's own `llama-perplexity` on the quantization benchmark's text and context, and
run.py's harness on exactly the positions it scores.

    python benchmarks/quantization/llama_perplexity.py --work /tmp/qfull [--binary PATH]
        [--chunks 8] [--rows int4-rtn-g32,auto-4.5bpw,...] [--results llama-perplexity.json] [--table-only]

run.py measures llama.cpp's GGUFs through llama-cpp-python's logits on run.py's token ids,
every position of each 512-token chunk. Issue #17 asks for `llama-perplexity` on the same
text and context; this script runs that binary and checks the harness against it:

  - text: the bundled `kjv` corpus's evaluation split, as a file (llama-perplexity
    tokenizes it itself, with the GGUF's tokenizer; the script checks those ids against
    run.py's, which come from the artifact's tokenizer.json);
  - `llama-perplexity -c 512 -b 512 --chunks N` on the F16 GGUF with
    `--kl-divergence-base` (its logits saved), then `--kl-divergence` on every quantized
    GGUF of WORK (run.py's `llama_cpp_ggufs`): perplexity, mean KL to F16 and "same top p"
    over what llama-perplexity scores, the second half of each chunk (logits at positions
    256..510 → tokens 257..511: 255 per chunk);
  - run.py's harness (`measure(..., start=256)`) on the same positions: the same GGUFs
    through llama-cpp-python, and llmbuild's artifacts in WORK/artifacts (ONNX Runtime),
    each against the fp16 artifact's cached logits.

If the two llama.cpp measurements agree, run.py's llama.cpp rows (every position) stand for
llama-perplexity's; the llmbuild rows then compare with llama.cpp on llama-perplexity's own
positions. `--binary`: a llama-perplexity already built (else it is built from the sdist of
the installed llama-cpp-python, the one that wrote the GGUFs: tests/llama_cpp.py's
`build_tool`, Release, this CPU's instructions; about 10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (benchmarks/quantization/run.py: rows, GGUFs, the harness)

from llmbuild.eval import dataset_tokens  # noqa: E402
from llmbuild.eval.corpus import read_text, token_chunks  # noqa: E402
from llmbuild.eval.runners import OrtGraphRunner, artifact_graph  # noqa: E402

GGUFS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q4_0-pure")
ROWS = ("int8", "int8-g32", "int8-asym-g32", "fp8", "int4-rtn-g32", "int4-asym-rtn-g32", "int4-awq-g32", "int4-gptq-g32",
        "int4-rtn-g128", "int4-awq-g128", "int4-gptq-g128", "auto-4.5bpw", "int4-awq-g64-head4", "int4-awq-g64-head8")
FIRST = run.SEQ_LEN // 2  # llama-perplexity scores from n_ctx/2 on


def build_binary(work: Path) -> Path:
    from importlib.metadata import version

    from tests.llama_cpp import build_tool

    sdist = work / "llama-cpp-sdist"
    sdist.mkdir(parents=True, exist_ok=True)
    spec = f"llama-cpp-python=={version('llama-cpp-python')}"
    if not list(sdist.glob("llama_cpp_python-*.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "--no-binary",
                        "llama-cpp-python", "-q", "-d", str(sdist)], check=True)
    return build_tool(sdist, work / "llama-perplexity-build", "llama-perplexity", optimized=True)


def _number(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def llama_perplexity(binary: Path, args: list[str]) -> tuple[dict, str]:
    cmd = [str(binary), "-c", str(run.SEQ_LEN), "-b", str(run.SEQ_LEN), "-t", "2", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
    num = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
    row = {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 1),
           "perplexity": _number(rf"Final estimate: PPL = {num}", out) or _number(rf"Mean PPL\(Q\)\s*:\s*{num}", out),
           "base_perplexity": _number(rf"Mean PPL\(base\)\s*:\s*{num}", out),
           "kl_divergence": _number(rf"Mean\s+KLD:\s*{num}", out),
           "same_top_p": _number(rf"Same top p:\s*{num}", out)}
    ratio = re.search(rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{num}\s*±\s*{num}", out)
    if ratio:  # llama-perplexity's own standard error of the ratio
        row["ratio"], row["ratio_stderr"] = float(ratio.group(1)), float(ratio.group(2))
    chunks = re.search(r"calculating perplexity over ([0-9]+) chunks", out)
    row["chunks"] = int(chunks.group(1)) if chunks else None
    if row["same_top_p"] is not None:
        row["same_top_p"] /= 100.0
    return row, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/llmbuild-quant-bench", help="run.py's WORK (GGUFs, artifacts)")
    ap.add_argument("--binary", default=None, help="llama-perplexity (default: build it in WORK)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rows", default=",".join(ROWS), help="llmbuild rows of run.py (artifacts in WORK)")
    ap.add_argument("--results", default="llama-perplexity.json")
    ap.add_argument("--table-only", action="store_true", help="print the table of WORK/RESULTS (no run)")
    args = ap.parse_args()
    work = Path(args.work)
    if args.table_only:
        if not (work / args.results).is_file():
            raise SystemExit(f"{work / args.results} not found: run this script without --table-only first")
        print(table(json.loads((work / args.results).read_text()), work))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in run.ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; expected some of {sorted(run.ROWS)}")
    if args.binary and not Path(args.binary).is_file():
        raise SystemExit(f"--binary {args.binary}: no such file")
    binary = Path(args.binary) if args.binary else build_binary(work)
    results: dict = {"binary": str(binary), "chunks": args.chunks, "seq_len": run.SEQ_LEN, "first": FIRST,
                     "llama_perplexity": {}, "harness": {}}

    # the text, and the ids llama.cpp makes of it against run.py's
    fp16 = run.compile_row("fp16", None, work)
    ids = dataset_tokens(fp16 / "tokenizer" / "tokenizer.json", "kjv", "evaluation")
    chunks = token_chunks(ids, run.SEQ_LEN, args.chunks)
    text = read_text("kjv", "evaluation").encode("utf-8")
    text_path = work / "kjv-evaluation.txt"
    text_path.write_bytes(text)
    ggufs = run.llama_cpp_ggufs(work)
    from llama_cpp import Llama

    vocab = Llama(str(ggufs["F16"]), vocab_only=True, verbose=False)
    theirs = vocab.tokenize(text, add_bos=True, special=False)
    n = chunks.size
    same = np.asarray(theirs[:n]) == chunks.reshape(-1)
    results["token_check"] = {"compared": int(n), "identical": int(same.sum()),
                              "first_difference": None if same.all() else int(np.argmin(same)),
                              "llama_cpp_tokens": len(theirs), "harness_tokens": len(ids)}
    print(json.dumps({"token_check": results["token_check"]}), flush=True)
    del vocab

    # llama-perplexity: F16 (the base logits), then every quantized GGUF against it
    base = work / f"F16-{args.chunks}x{run.SEQ_LEN}.kld"
    row, log = llama_perplexity(binary, ["-m", str(ggufs["F16"]), "-f", str(text_path), "--chunks", str(args.chunks),
                                         "--kl-divergence-base", str(base)])
    results["llama_perplexity"]["F16"] = row
    (work / "llama-perplexity-F16.log").write_text(log)
    print(json.dumps({"F16": row}), flush=True)
    for name in GGUFS:
        row, log = llama_perplexity(binary, ["-m", str(ggufs[name]), "--kl-divergence-base", str(base),
                                             "--kl-divergence"])
        results["llama_perplexity"][name] = row
        (work / f"llama-perplexity-{name}.log").write_text(log)
        print(json.dumps({name: row}), flush=True)

    # run.py's harness on llama-perplexity's positions
    ref_runner = OrtGraphRunner(artifact_graph(fp16), threads=2)
    ref = run.reference_logits(ref_runner, chunks, work)
    results["harness"]["fp16"] = run.measure(ref_runner.logits, chunks, ref, start=FIRST)
    ref_runner.close()
    for name in ("F16", *GGUFS):
        fn, llm = run.llama_cpp_logits_fn(ggufs[name])
        results["harness"][f"llama.cpp {name}"] = run.measure(fn, chunks, ref, start=FIRST)
        del llm
        print(json.dumps({f"llama.cpp {name}": results["harness"][f"llama.cpp {name}"]}), flush=True)
    for name in rows:
        art = work / "artifacts" / f"smollm2-{name}"
        if not (art / "manifest.json").is_file():
            art = run.compile_row(name, run.ROWS[name], work)
        runner = OrtGraphRunner(artifact_graph(art), threads=2)
        results["harness"][name] = run.measure(runner.logits, chunks, ref, start=FIRST)
        runner.close()
        print(json.dumps({name: results["harness"][name]}), flush=True)
    (work / args.results).write_text(json.dumps(results, indent=2))
    print(table(results, work))


def table(results: dict, work: Path) -> str:
    full = {}
    for path in (work / "full.json", work / "results.json"):
        if path.is_file():
            full = json.loads(path.read_text())
            break
    lp, h = results["llama_perplexity"], results["harness"]
    f16 = lp["F16"]["perplexity"]
    lines = ["| row | bits/w (linears) | llama-perplexity: PPL | Δ vs its F16 | KLD | same top | harness, same positions: PPL | "
             "Δ vs fp16 artifact | KL | top-1 | harness, every position: Δ ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in h.items():
        key = name.removeprefix("llama.cpp ")
        b = lp.get(key) if name.startswith("llama.cpp ") else None
        every = full.get(name, {}).get("perplexity_increase")
        bits = full.get(name, {}).get("linear_bits_per_weight")
        cells = ["", "", "", ""]
        if b:
            cells = [f"{b['perplexity']:.3f}",
                     f"{b['perplexity'] / f16 - 1:+.2%}" + (f" ± {b['ratio_stderr']:.1%}" if "ratio_stderr" in b else ""),
                     "—" if b["kl_divergence"] is None else f"{b['kl_divergence']:.4f}",
                     "—" if b["same_top_p"] is None else f"{b['same_top_p']:.4f}"]
        inc = r.get("perplexity_increase")
        lines.append(f"| {name} | {'' if bits is None else f'{bits:.2f}'} | " + " | ".join(cells) + f" | {r['perplexity']:.3f} | "
                     f"{'' if inc is None else f'{inc:+.2%}'} | {r.get('kl_divergence', float('nan')):.4f} | "
                     f"{r.get('top1_agreement', float('nan')):.4f} | {'' if every is None else f'{every:+.2%}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
