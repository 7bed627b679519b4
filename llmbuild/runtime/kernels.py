"""llmbuild's own CPU kernels for the ONNX Runtime executor (cpp/kernels, a custom-op library).

`ai.llmbuild::MatMulNBits` computes what `com.microsoft.MatMulNBits` computes at accuracy
level 4 (int8 activations per block, the same rounding; tests/test_cpu_kernels.py compares
them to float32 rounding) for the layouts the CPU lowering writes (`LAYOUTS`: 4 or 8 bits,
blocks of 32, 64 or 128, no zero points). It reads each weight column in order with software
prefetch and streams a decode step's weights faster than MLAS does on the machine measured
(benchmarks/quantization/kernel_speed.py). It is a matrix-vector kernel: with many rows
(prefill) MLAS's tiled GEMM is faster, so the executor runs passes of at most
`MAX_ROWS` rows (decode steps) on a second session whose MatMulNBits nodes are swapped to
ours, and everything else on the unchanged graph; both sessions share the weights
(`shared_initializers`: memory maps of the artifact's files; `share_casts`: the float32 copies
of 16-bit weights, made once instead of once per session) and the KV cache buffers. The
quantized weights are still held twice: as stored (ours read them in place) and as MLAS
packs them for the other session.

Where the library comes from: `$LLMBUILD_CPU_KERNELS` (a path; `0` turns the kernels off),
else `cpp/build/libllmbuild_cpu_kernels.so` of this checkout (built by cpp/build.sh). It is
used only when the CPU has AVX-512 F/BW/VL/DQ and VNNI (the library's own check).
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENV = "LLMBUILD_CPU_KERNELS"
OFF = ("0", "off", "false", "no")  # values of ENV that turn the kernels off
DOMAIN = "ai.llmbuild"
LIBRARY = "libllmbuild_cpu_kernels.so"
MAX_ROWS = 4  # rows per pass (batch x tokens) run on llmbuild's kernels; more go to MLAS
# (kernel_speed.py --rows N, 2026-12-03: ahead or level at 1-4 rows, see LAYOUTS; 0.75-1.08x at 8)
# (bits, block size) swapped: every layout the kernel takes (kernel_speed.py, 2026-12-03, median
# pass of a SmolLM2 step's 121 nodes against MLAS, 1 row / 4 rows: 4:32 1.43 / 0.90-0.98x, 4:64
# 1.27-1.28 / 0.96-1.29x, 4:128 1.16-1.25 / 0.85-1.03x, 8:32 1.43-1.49 / 1.04-1.48x, 8:64 1.25 /
# 1.25x, 8:128 1.54 / 1.05x: ahead at one row, about level at 2-4 within this machine's noise).
LAYOUTS = frozenset({(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)})
_CHECKOUT_LIBRARY = Path(__file__).resolve().parents[2] / "cpp" / "build" / LIBRARY


class KernelsUnavailable(RuntimeError):
    """The kernels were asked for but cannot run here (no library, or a CPU without AVX-512 VNNI)."""


@lru_cache(maxsize=None)
def _supported(path: str) -> bool:
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise KernelsUnavailable(f"cannot load {path}: {e}") from None
    return bool(lib.llmbuild_cpu_kernels_supported())


def library() -> Path:
    """The kernel library this process can use; KernelsUnavailable says why there is none."""
    setting = os.environ.get(ENV, "")
    if setting.lower() in OFF:
        raise KernelsUnavailable(f"turned off by {ENV}={setting}")
    path = Path(setting) if setting else _CHECKOUT_LIBRARY
    if not path.is_file():
        hint = f"{ENV}={setting} is not a file" if setting else f"{path} is not built (cpp/build.sh builds it)"
        raise KernelsUnavailable(hint)
    if not _supported(str(path)):
        raise KernelsUnavailable("this CPU lacks AVX-512 (F, BW, VL, DQ) or VNNI, which the kernels need")
    return path


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def swap_matmulnbits(model) -> int:
    """Point every MatMulNBits node of `model` (an onnx.ModelProto, changed in place) in one
    of `LAYOUTS` to `ai.llmbuild`; the number swapped. Kept: nodes with zero points, g_idx or
    bias, other bit widths or block sizes, accuracy levels other than 4."""
    swapped = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        a = _attrs(node)
        if (len(node.input) == 3 and all(node.input) and (a.get("bits", 4), a.get("block_size")) in LAYOUTS
                and a.get("accuracy_level", 0) == 4):
            node.domain = DOMAIN
            swapped += 1
    if swapped and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=1)
    return swapped


def shared_initializers(model, folder: Path) -> dict[str, np.ndarray]:
    """The external-data initializers of `model` as read-only views of their files
    (relative to `folder`; one memory map per file), for SessionOptions.add_initializer:
    sessions given the same arrays read one copy of the weights (the page cache's)."""
    from onnx import TensorProto, helper

    files: dict[str, np.ndarray] = {}
    arrays = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        nbytes = int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
        offset, length = int(info.get("offset", 0)), info.get("length")
        if length is not None and int(length) != nbytes:
            raise ValueError(f"initializer {t.name}: external length {length} does not match its shape")
        location = info["location"]
        if location not in files:  # a plain ndarray over the map: its views skip memmap's Python hooks
            files[location] = np.asarray(np.memmap(folder / location, dtype=np.uint8, mode="r"))
        data = files[location]
        if offset + nbytes > data.size:
            raise ValueError(f"initializer {t.name}: bytes {offset}..{offset + nbytes} lie past the end of {location}")
        arrays[t.name] = data[offset:offset + nbytes].view(dtype).reshape(tuple(t.dims))
    return arrays


def share_casts(model, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace every Cast to float32 of a float16 initializer in `model` (changed in place) by
    a float32 initializer of the Cast's output, made here once: ONNX Runtime would fold each
    Cast into a float32 copy per session. Returns those arrays (for add_initializer); the
    float16 initializers only those Casts read are dropped from `model` and from `arrays`.
    The new initializers are declared external, located in an existing weights file of the
    model, which ONNX Runtime never reads for them (add_initializer supplies the data); it
    only checks that the file exists."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    location = next((e.value for t in inits.values() if t.data_location == TensorProto.EXTERNAL
                     for e in t.external_data if e.key == "location"), None)
    if location is None:
        return {}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    made, keep, dropped = {}, [], set()
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Cast" and node.domain in ("", "ai.onnx") else None
        if t is None or t.data_type != TensorProto.FLOAT16 or next(
                helper.get_attribute_value(a) for a in node.attribute if a.name == "to") != TensorProto.FLOAT:
            keep.append(node)
            continue
        source = node.input[0]
        half = arrays[source] if source in arrays else numpy_helper.to_array(t)
        made[node.output[0]] = np.asarray(half, np.float32)
        readers[source] -= 1
        if readers[source] == 0 and not any(o.name == source for o in model.graph.output):
            dropped.add(source)
    if not made:
        return {}
    del model.graph.node[:]
    model.graph.node.extend(keep)
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name in dropped:
        arrays.pop(name, None)
    for name, array in made.items():
        t = model.graph.initializer.add()
        t.name, t.data_type, t.data_location = name, TensorProto.FLOAT, TensorProto.EXTERNAL
        t.dims.extend(array.shape)
        for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return made
