"""Source → ONNX: build the architecture's graph and stream its weights to disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from llmbuild.graph.builder import GraphBuilder
from llmbuild.models import architecture_of, get_architecture
from llmbuild.source.base import check_shapes

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
# Bound on weight bytes held in memory while saving: weights stream from the
# source (memory-mapped / dequantized one at a time) to the external-data file.
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024


def build_model(source, precision: str, max_seq_len: int) -> ir.Model:
    """The decoder graph for `source` with lazy weights (nothing read yet)."""
    config = source.config
    arch = get_architecture(config)
    check_shapes(source)  # every tensor the graph reads, before any work
    gb = GraphBuilder(precision)
    arch.build(gb, config, source, max_seq_len)
    return gb.model(
        architecture_of(config),
        metadata={"llmbuild.precision": precision, "llmbuild.max_seq_len": str(max_seq_len)},
    )


def save_model(
    model: ir.Model, out_dir: Path, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write model.onnx + model.onnx.data (all weights external) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE

    done = 0

    def callback(tensor, info) -> None:
        nonlocal done
        done += 1  # callbacks arrive out of index order with several workers
        if progress is not None:
            progress(done, info.total)

    ir.save(
        model,
        path,
        external_data=WEIGHTS_FILE,
        size_threshold_bytes=1024,
        max_in_flight_bytes=MAX_IN_FLIGHT_BYTES,
        max_workers=min(2, os.cpu_count() or 1),
        callback=callback,
    )
    return path
