"""The artifact directory: a contract read by CI systems and both runtimes.

    <out>/<name>/
      manifest.json      written last; its presence marks a complete artifact
      model/             model.onnx + model.onnx.data (external weights); model.cpu.onnx
                         (+ .data), the CPU-ready graph (llmbuild.lowering.cpu_graph)
      engines/           <backend>-<target>-rank<N>.engine
      tokenizer/         tokenizer.json, tokenizer_config.json
"""

from llmbuild.artifact.layout import (
    ENGINES_DIR,
    MANIFEST,
    MODEL_DIR,
    SCHEMA_VERSION,
    TOKENIZER_DIR,
    engine_file_name,
)
from llmbuild.artifact.manifest import file_sha256, read_manifest, write_manifest
from llmbuild.artifact.writer import staged_artifact

__all__ = [
    "ENGINES_DIR",
    "MANIFEST",
    "MODEL_DIR",
    "SCHEMA_VERSION",
    "TOKENIZER_DIR",
    "engine_file_name",
    "file_sha256",
    "read_manifest",
    "staged_artifact",
    "write_manifest",
]
