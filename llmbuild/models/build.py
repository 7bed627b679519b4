"""Source → decoder graph: the registered architecture's graph with lazy weights."""

from __future__ import annotations

import onnx_ir as ir

from llmbuild.graph.builder import GraphBuilder
from llmbuild.models import architecture_of, spec_for
from llmbuild.models.shapes import check_shapes


def build_model(source, precision: str, max_seq_len: int) -> ir.Model:
    """The decoder graph for `source` with lazy weights (nothing read yet). Every tensor
    the graph reads is checked against the spec's table first (one error listing all)."""
    config = source.config
    spec = spec_for(config)
    check_shapes(source)
    gb = GraphBuilder(precision)
    spec.build(gb, config, source, max_seq_len)
    return gb.model(
        architecture_of(config),
        metadata={"llmbuild.precision": precision, "llmbuild.max_seq_len": str(max_seq_len)},
    )
