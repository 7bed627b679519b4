"""The artifact's CPU-ready graph (recipe `runtime: {cpu_graph: true}`): the standard
graph lowered for ONNX Runtime's CPU kernels once, at compile time, so that neither
runtime lowers at load.

    model/model.onnx           the standard graph (what TensorRT parses)
    model/model.onnx.data      its weights, also read by the CPU graph (float weights)
    model/model.cpu.onnx       the lowered graph (llmbuild.lowering.cpu.lower_for_cpu)
    model/model.cpu.onnx.data  only the tensors the lowering made (quantized weights packed
                               for MatMulNBits); absent when it made none worth a file

Both graphs live in one folder, so the CPU graph's untouched initializers keep pointing
into model.onnx.data (no second copy of the float weights) and ONNX Runtime resolves
both data files relative to the graph's folder, from Python and from C++. The manifest
records it as `graph.cpu = {file, sha256, data?, data_sha256?}`
(llmbuild.artifact.integrity checks them).
"""

from __future__ import annotations

from pathlib import Path

CPU_GRAPH_FILE = "model.cpu.onnx"
CPU_DATA_FILE = "model.cpu.onnx.data"
INLINE_BYTES = 1024  # smaller new tensors (constants of the rewrite) stay in the proto


def write_cpu_graph(model_path: Path, **options) -> dict:
    """Lower `model_path` (an artifact's model/model.onnx) and write the CPU graph beside
    it; its manifest entry, paths relative to the artifact (model_path's grandparent).
    Raises llmbuild.lowering.cpu.LoweringError when the graph cannot be lowered.
    `options` go to lower_for_cpu."""
    import onnx_ir as ir

    from llmbuild.artifact.manifest import file_sha256
    from llmbuild.lowering.cpu import lower_for_cpu

    model_path = Path(model_path)
    folder = model_path.parent
    model = ir.load(str(model_path))
    lower_for_cpu(model, **options)
    new = [v for v in model.graph.initializers.values()
           if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
           and v.const_value.nbytes > INLINE_BYTES]
    data = folder / CPU_DATA_FILE
    data.unlink(missing_ok=True)
    if new:
        tensors = ir.external_data.convert_tensors_to_external(
            [v.const_value for v in new], base_dir=str(folder), relative_path=CPU_DATA_FILE)
        for value, tensor in zip(new, tensors):
            value.const_value = tensor
    graph = folder / CPU_GRAPH_FILE
    ir.save(model, str(graph))
    rel = folder.name
    entry = {"file": f"{rel}/{CPU_GRAPH_FILE}", "sha256": file_sha256(graph)}
    if data.is_file():
        entry.update(data=f"{rel}/{CPU_DATA_FILE}", data_sha256=file_sha256(data))
    return entry


def cpu_graph_file(directory: Path, manifest: dict) -> Path | None:
    """The artifact's CPU-ready graph, or None if it has none."""
    entry = (manifest.get("graph") or {}).get("cpu")
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return None
    return Path(directory) / entry["file"]
