"""ONNX → disk: stream a graph's weights to its external-data file (the graph itself is
built by llmbuild.models.build)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx_ir as ir


MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
# Bound on weight bytes held in memory while saving: weights stream from the
# source (memory-mapped / dequantized one at a time) to the external-data file.
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024


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
