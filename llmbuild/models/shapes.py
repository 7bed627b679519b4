"""The weights an architecture reads, checked against what a source holds (names and
shapes only; nothing is loaded)."""

from __future__ import annotations

from llmbuild.errors import UserError
from llmbuild.models import spec_for


def check_shapes(source) -> None:
    """Raise one UserError listing every missing or mis-shaped tensor the model's
    architecture reads. `source` is a ModelSource (llmbuild.source): its config, names()
    and info(name).shape are all that is read."""
    cfg = source.config
    required = ("hidden_size", "vocab_size", "num_attention_heads", "num_hidden_layers")
    absent = [k for k in required if not cfg.get(k)]
    if absent:
        raise UserError(f"{source.path}: model config lacks {', '.join(absent)}")
    spec = spec_for(cfg)  # the architecture's own table of tensors and shapes
    have = set(source.names())
    problems = []
    for name, shape in spec.tensors(spec.dims(cfg)).items():
        if name not in have:
            problems.append(f"tensor {name!r} is missing (expected shape {list(shape)})")
            continue
        found = tuple(source.info(name).shape)
        if found != shape:
            problems.append(f"tensor {name!r} has shape {list(found)}, expected {list(shape)} from the config")
    if problems:
        head = f"{source.path}: {len(problems)} weight problem(s):"
        raise UserError("\n  ".join([head, *problems]))
