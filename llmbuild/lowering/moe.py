"""CPU lowering of the routed-expert blocks (llmbuild/graph/moe.py) to ONNX Runtime's
fused `com.microsoft.MoE` (its CPU kernel, float32, ONNX Runtime 1.32: softmax over the
router logits, top-k, optional renormalisation, SwiGLU experts — HF's routing exactly;
checked against the standard graph and HF in tests/test_moe.py and the conformance suite):

    router_logits [B,S,E] ─Reshape [B·S, E]─Concat ×S (axis 1)───────────────┐
    x [B,S,H] (what the router reads) ────────────────────────────────────────┤
    fc1 [S·E, 2I/S, H] = gate/up rows interleaved (g0, u0, g1, u1, ...) ──────┤  (swiglu_fusion=1, the
    fc2 [S·E, H, I/S]  = down · S ────────────────────────────────────────────┴─► MoE(k·S) ─► y [B,S,H]
                                                                                  CPU kernel's only layout)

replacing TopK ─► Gather(stacked experts) ─► MatMul ... ReduceSum. fc1/fc2 are computed
from the stacked initializers by nodes that ONNX Runtime folds once at session creation
(the artifact's weights are not duplicated on disk): one Transpose for fc1 and a Mul and a
Transpose for fc2 (`_sharded_experts`), over views of the stacked weights (second
initializers over the same bytes of model.onnx.data, gate and up as one), their final
Reshapes left to run each step on a run-time shape (no copy: the output aliases the
folded initializer). Each folded node writes its output twice (ONNX Runtime 1.32: kernel
buffer, then initializer), in fresh pages, so session creation costs about the folded
bytes; the earlier Transpose/Unsqueeze/Concat/Reshape chain wrote 4x more (2-layer
benchmark model, loaded machine: 1.07 M -> 0.28 M page faults, 8.5 -> 4.1 s, peak RSS
2.2 -> 0.66 GB; fc1/fc2 bit for bit as before, tests/test_moe.py).

**Each expert is split in S = EXPERT_SHARDS slices of its width** (slice s of expert e is
kernel expert s·E + e, slice-major). The kernel hands each intra-op thread a contiguous
range of experts and runs one expert's GEMMs on one thread; a decode step (1 token, top-2)
whose two experts fall in the same half of the range ran on one of two threads. Sliced,
thread t of S gets slice t of every expert: both threads stream half of each picked expert,
whatever the routing. The router's logits are repeated S times, so the softmax gives every
slice p/S and top-(k·S) picks exactly the S slices of the k experts HF picks (the kernel
breaks ties by index, as before); the routing weight of a slice is w/S (renormalised or
not), which fc2 · S undoes (exact for S a power of 2); the kernel sums the slices' partial
down projections. Bytes read and FLOPs are those of whole experts. (Two experts whose
probabilities tie exactly at the k-th place could have their slices split; HF's topk and
the unsliced kernel already break such ties differently.) Measured on the 4-layer model of
benchmarks/moe, 2 threads: decode +6 % over whole experts; at 1 thread no loss
(benchmarks/moe/RESULTS.md, run f).
Quantized experts: llmbuild/lowering/moe_quantized.py (`com.microsoft.QMoE`), which runs first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llmbuild.graph.annotations import MOE, nodes_with
from llmbuild.lowering.rewrite import MS_DOMAIN, float32_initializer, insert_in_order


EXPERT_SHARDS = 2  # slices per expert (module docstring); 2 threads share every expert


class MoELoweringError(ValueError):
    """A routed-expert block that does not have the shape llmbuild.graph.moe builds."""


def _float_weight(graph: ir.Graph, name: str) -> ir.Value:
    """Stacked initializer `name` as the float32 graph reads it."""
    weight = float32_initializer(graph, name)
    if weight is None:
        raise MoELoweringError(f"stacked expert weight {name} not found, or not float32 after promotion")
    return weight


def lower_moe_blocks(graph: ir.Graph, shards: int | None = None) -> int:
    """Replace every `llmbuild.moe` block with one com.microsoft.MoE; returns how many.
    Run after the float32 promotion and before dead-code removal. `shards`: each expert
    split in that many slices of its width (module docstring; 1 = whole experts; default
    EXPERT_SHARDS; an expert width it does not divide stays whole)."""
    shards = EXPERT_SHARDS if shards is None else shards
    blocks = nodes_with(list(graph), MOE)
    if not blocks:
        return 0
    values = {v.name: v for n in graph for v in n.outputs if v.name}
    values.update({v.name: v for v in graph.inputs})
    tape = ir.tape.Tape()

    def const(array: np.ndarray, name: str) -> ir.Value:
        return tape.initializer(ir.tensor(array, name=name), name=name)

    zero = None
    for node, meta in blocks:
        layer, experts, hidden, inter = meta["layer"], meta["experts"], meta["hidden"], meta["intermediate"]
        x, logits = values.get(meta["input"]), values.get(meta["logits"])
        if x is None or logits is None:
            raise MoELoweringError(f"layer {layer}: the MoE annotation names {meta['input']} / {meta['logits']}, "
                                   "which the graph does not have")
        gate, up, down = (_float_weight(graph, meta["stacked"][p]) for p in ("gate", "up", "down"))
        s = shards if shards > 1 and inter % shards == 0 else 1
        if zero is None:  # int64 [1] 0 computed at run time (_sharded_experts' Reshapes)
            dim = tape.op("Shape", [x], {"start": 0, "end": 1})
            zero = tape.op("Sub", [dim, dim])
        fc1, fc2 = _sharded_experts(tape, const, gate, up, down, layer=layer, experts=experts, hidden=hidden,
                                    inter=inter, shards=s, zero=zero)
        rows = tape.op("Reshape", [logits, const(np.array([-1, experts], np.int64), f"moe.{layer}.rows")])
        if s > 1:  # every expert's logit once per slice, slice-major: [T, S·E]
            rows = tape.op("Concat", [rows] * s, {"axis": 1})
        y = tape.op("MoE", [x, rows, fc1, None, fc2, None], {
            "k": int(meta["top_k"]) * s, "activation_type": "swiglu", "swiglu_fusion": 1,
            "normalize_routing_weights": int(bool(meta["normalize"])), "activation_alpha": 1.0,
            "activation_beta": 0.0}, domain=MS_DOMAIN)
        y.name = f"moe.{layer}.fused"
        old = node.outputs[0]
        y.shape, y.type = old.shape, ir.TensorType(ir.DataType.FLOAT)
        ir.convenience.replace_all_uses_with(old, y)
    for value in tape.initializers:
        graph.register_initializer(value)
    insert_in_order(graph, tape.nodes)
    return len(blocks)


def _sharded_experts(tape: ir.tape.Tape, const, gate: ir.Value, up: ir.Value, down: ir.Value, *, layer: int,
                     experts: int, hidden: int, inter: int, shards: int,
                     zero: ir.Value) -> tuple[ir.Value, ir.Value]:
    """
    gate, up [E,H,I] as one view [2,E,H,S,I/S] ─Transpose(3,1,4,0,2)─► [S,E,I/S,2,H] ─Reshape─► fc1 [S·E, 2I/S, H]
    down [E,I,H] as a view [E,S,I/S,H] ─Mul(S)─Transpose(1,0,3,2)─► [S,E,H,I/S] ─Reshape─► fc2 [S·E, H, I/S]

    Slice s of expert e is "expert" s·E + e of width I/S, its fc1 rows g0, u0, g1, u1, ...
    (S = 1: fc1 [E,2I,H] the same way, fc2 = Transpose(0,2,1) of down [E,H,I]). ONNX Runtime
    folds the Transpose and Mul nodes at session creation, each costing its output's size
    written twice (the kernel's buffer, then the initializer's); the views cost nothing
    (`_view`), and the Reshapes take a shape computed at run time (`+ zero`), so they are
    not folded but run each step as Reshape of an initializer: no copy, the output
    aliases it.
    """
    name = f"moe.{layer}"
    s, part = shards, inter // shards
    pair = _view_pair(tape, gate, up, [experts, hidden, s, part], f"{name}.gate_up")
    fc1 = tape.op("Transpose", [pair], {"perm": [3, 1, 4, 0, 2]})  # [S, E, I/S, 2, H]
    fc1 = tape.op("Reshape", [fc1, tape.op("Add", [const(np.array([s * experts, 2 * part, hidden], np.int64),
                                                         f"{name}.fc1_shape"), zero])])
    if s == 1:
        return fc1, tape.op("Transpose", [down], {"perm": [0, 2, 1]})  # [E, I, H] -> [E, H, I]
    fc2 = tape.op("Mul", [_view(tape, down, [experts, s, part, hidden], f"{name}.down_slices"),
                          const(np.array(float(s), np.float32), f"{name}.slices")])
    fc2 = tape.op("Transpose", [fc2], {"perm": [1, 0, 3, 2]})  # [S, E, H, I/S]
    return fc1, tape.op("Reshape", [fc2, tape.op("Add", [const(np.array([s * experts, hidden, part], np.int64),
                                                               f"{name}.fc2_shape"), zero])])


def _external(value: ir.Value) -> tuple[ir.ExternalTensor, bool] | None:
    """The external-data tensor `value` reads, and whether it goes through the float32
    promotion's Cast; None for an in-memory tensor or a computed value."""
    cast = value.producer() is not None
    if cast:
        node = value.producer()
        if node.op_type != "Cast" or node.inputs[0] is None:
            return None
        value = node.inputs[0]
    tensor = value.const_value if value.is_initializer() else None
    return (tensor, cast) if isinstance(tensor, ir.ExternalTensor) else None


def _length(tensor: ir.ExternalTensor) -> int:
    return tensor.length if tensor.length is not None else tensor.nbytes


def _external_view(tape: ir.tape.Tape, tensor: ir.ExternalTensor, cast: bool, offset: int, length: int,
                   shape: list[int], name: str) -> ir.Value:
    view = tape.initializer(ir.ExternalTensor(tensor.location, offset, length, tensor.dtype, shape=ir.Shape(shape),
                                              name=name, base_dir=tensor.base_dir), name=name)
    return tape.op("Cast", [view], {"to": ir.DataType.FLOAT}) if cast else view


def _view(tape: ir.tape.Tape, value: ir.Value, shape: list[int], name: str) -> ir.Value:
    """`value` reshaped: a second initializer over the same bytes of the external data
    file when `value` is one (before the promotion's Cast, if any), else a Reshape."""
    found = _external(value)
    if found is None:
        return tape.op("Reshape", [value, tape.initializer(ir.tensor(np.array(shape, np.int64)), f"{name}.shape")])
    tensor, cast = found
    return _external_view(tape, tensor, cast, tensor.offset or 0, _length(tensor), shape, name)


def _view_pair(tape: ir.tape.Tape, first: ir.Value, second: ir.Value, shape: list[int], name: str) -> ir.Value:
    """[2, *shape]: `first` and `second` stacked; one view when they lie back to back in one
    external data file (the artifact writes a layer's stacked gate and up so), else a Concat."""
    a, b = _external(first), _external(second)
    if a is not None and b is not None:
        (ta, ca), (tb, cb) = a, b
        if (ta.location == tb.location and ta.base_dir == tb.base_dir and ta.dtype == tb.dtype and ca == cb
                and ta.offset is not None and tb.offset == ta.offset + _length(ta) and _length(tb) == _length(ta)):
            return _external_view(tape, ta, ca, ta.offset, 2 * _length(ta), [2, *shape], name)
    return tape.op("Concat", [_view(tape, first, [1, *shape], f"{name}.0"),
                              _view(tape, second, [1, *shape], f"{name}.1")], {"axis": 0})
