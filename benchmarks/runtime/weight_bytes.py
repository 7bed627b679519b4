"""Bytes of weights a batch-1 decode step reads, per runtime: what bounds decode speed on
a CPU whose cores stream weights from memory (every matrix is read once per token).

    python benchmarks/runtime/weight_bytes.py [--quantized DIR] [--models DIR] [PATH ...]

PATH: an llmbuild artifact directory (its CPU-ready graph), an ONNX file or an
onnxruntime-genai model directory (its model.onnx), or a GGUF file. Without PATHs, the
rows of `interleaved.py` that exist.

ONNX Runtime does not run MatMulNBits on the stored layout: it repacks B at session load.
With int8 activations (accuracy_level 4, MLAS's CompInt8) the packed B holds, per block
of `block_size` weights of one column, the codes plus a float32 scale and a float32
block sum (the zero point times the scale, for the activations' block sums), the block
sums padded to 16 columns; with float activations (levels 0-3) the codes, float32 scales
and the stored zero points. So int4 at g32 reads 6.0 bits per weight in memory (4 + 32/32
+ 32/32), at g64 5.0, at g128 4.5; int8 per channel (lowered to blocks of 64 when K = 576,
128 when K = 1536) 9.0 and 8.5. A plain MatMul reads its float initializer. llama.cpp
reads its tensors as stored (Q4_0: 18 bytes per 32 weights = 4.5 bits; Q8_0: 34 bytes = 8.5).
The token embedding is one row per token (not counted) unless it is also the output matrix.

Prints one markdown table: MB per decode step, and bits per weight of the matrices read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def onnx_bytes(path: Path) -> tuple[int, int]:
    """(bytes read per decode step, weights) of the MatMulNBits / MatMul / Gemm nodes of an
    ONNX graph as ONNX Runtime's CPU kernels hold them after pre-packing (module doc)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    elem = {t.name: t.data_type for t in model.graph.initializer}
    total = weights = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = _attrs(node)
            k, n, bits, blk = a["K"], a["N"], a.get("bits", 4), a["block_size"]
            level = a.get("accuracy_level", 0)
            blocks = -(-k // blk)
            codes = n * blocks * blk * bits // 8
            if level == 4:  # CompInt8: float32 scale + float32 block sum per block (sums padded to 16 columns)
                extra = n * blocks * 4 + (-(-n // 16) * 16) * blocks * 4
            else:  # scales as stored (float32 beside float32 activations) + zero points if any
                extra = n * blocks * 4
                if len(node.input) > 3 and node.input[3]:
                    zp = node.input[3]
                    extra += int(np.prod(shapes.get(zp, (0,)))) * (4 if elem.get(zp) == onnx.TensorProto.FLOAT else 1)
            total += codes + extra
            weights += k * n
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in shapes:
            dims = shapes[node.input[1]]
            size = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}.get(elem[node.input[1]], 4)
            total += int(np.prod(dims)) * size
            weights += int(np.prod(dims))
    return total, weights


def gguf_bytes(path: Path) -> tuple[int, int]:
    """(bytes, weights) of a GGUF's matrices a decode step reads: every 2-D tensor but the
    token embedding, which counts only when there is no separate output tensor."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    total = weights = 0
    for t in tensors:
        if len(t.shape) != 2:
            continue  # norms
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # one row per token
        total += int(t.n_bytes)
        weights += int(t.n_elements)
    return total, weights


def measure(path: Path) -> tuple[int, int]:
    if path.suffix == ".gguf":
        return gguf_bytes(path)
    if path.suffix == ".onnx":
        return onnx_bytes(path)
    if (path / "manifest.json").is_file():
        from llmbuild.artifact import read_manifest
        from llmbuild.lowering.cpu_graph import cpu_graph_file

        m = read_manifest(path)
        graph = cpu_graph_file(path, m)
        if graph is None:
            raise SystemExit(f"{path}: no CPU-ready graph in the artifact")
        return onnx_bytes(graph)
    if (path / "model.onnx").is_file():
        return onnx_bytes(path / "model.onnx")
    raise SystemExit(f"{path}: not an artifact, ONNX file, genai model or GGUF")


def main():
    import sys

    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--models", type=Path, default=Path("/tmp/llmbuild-bench"))
    ap.add_argument("--quantized", type=Path, default=Path("/tmp/llmbuild-quant-bench/artifacts"))
    args = ap.parse_args()
    paths = args.paths or [p for p in (*sorted(args.quantized.glob("smollm2-*")),
                                      args.models / "genai-int4", *sorted((args.models / "gguf").glob("*.gguf")),
                                      *sorted(args.quantized.parent.glob("smollm2-*.gguf"))) if p.exists()]
    print("| weights | MB read per decode step | bits per weight read | weights (M) |")
    print("|---|---:|---:|---:|")
    for p in paths:
        total, weights = measure(p)
        print(f"| {p.name} | {total / 1e6:.1f} | {8 * total / weights:.2f} | {weights / 1e6:.1f} |")


if __name__ == "__main__":
    main()
