"""Which scheme each stacked routed-expert weight gets (pure Python, like quantize.plan):
the recipe's `weights` and `overrides` resolved on the stacked tensors' module names
(`model.layers.<i>.mlp.experts.gate_proj`, `...block_sparse_moe.experts.w1`), so that
`{match: "*.experts.*", scheme: none}` keeps them in the graph dtype. fp8 keeps them
unquantized (no per-expert activation scales); the router is never quantized. int4's
8-bit scale codes (`scale_bits: 8`) are for dense linears only: refused here."""

from __future__ import annotations

from llmbuild.quantize.plan import ModuleSpec, resolve_plan, stored_bytes

PROJECTIONS = ("gate", "up", "down")


def resolve_expert_plan(quantization: dict, names: list[str], num_layers: int) -> dict[str, ModuleSpec]:
    plan = resolve_plan(quantization, names, num_layers)
    coded = sorted(n for n, s in plan.items() if s.scale_bits is not None)
    if coded:
        from llmbuild.errors import UserError

        raise UserError(f"quantization: scale_bits 8 applies to dense linears only, not to the routed experts"
                        f" ({coded[0]}{' …' if len(coded) > 1 else ''}); add an override"
                        " {match: '*.experts.*', scale_bits: 16}")
    return {n: (ModuleSpec("none") if s.scheme == "fp8" else s) for n, s in plan.items()}


def expert_stored_bytes(spec: ModuleSpec, shape: tuple[int, int, int], itemsize: int) -> int:
    """Bytes of a stacked [E, in, out] expert weight as stored: E times one expert's."""
    e, k, n = shape
    return e * stored_bytes(spec, (k, n), itemsize)


def stacked_expert_shapes(spec, d) -> dict[str, tuple[int, int, int]]:
    """Stacked expert weight name -> [E, in, out] for every sparse layer of an MoE spec."""
    shapes = {}
    for layer in d.sparse_layers:
        for proj in PROJECTIONS:
            k, n = (d.moe_intermediate, d.hidden) if proj == "down" else (d.hidden, d.moe_intermediate)
            shapes[f"{spec.layer_prefix(layer)}{spec.experts.stacked(proj)}.weight"] = (d.experts, k, n)
    return shapes
