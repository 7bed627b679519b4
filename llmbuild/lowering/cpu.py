"""CPU lowering: the artifact's standard decoder graph rewritten for ONNX Runtime's CPU
executor, at load time, in memory (the artifact is not changed; float weights are read
from its file, quantized ones repacked in memory).

The standard graph (llmbuild.graph) is what TensorRT parses. ONNX Runtime's CPU kernels
for two of its parts are slow: the opset-24 `Attention` reads the whole cache
(`cache_len` rows) whatever the sequences' lengths, and 16-bit graphs run through Cast
nodes around fp32 kernels; and at batch 1 a decode step costs per node as much as per
FLOP. The lowering keeps the I/O contract (llmbuild.graph.io) except for the cache
dtype, and

1. lowers quantized linears to `com.microsoft.MatMulNBits` (llmbuild.lowering.quantized:
   int4 without the Pad to whole blocks; siblings reading one activation fused; int8
   blocks at level 4 with the activation residual, level 1 above 64 rows, after step 2);
2. promotes float16/bfloat16 graphs to float32 (every 16-bit initializer gets a Cast
   that ONNX Runtime folds once at session creation; the KV cache becomes float32).
   CPU kernels compute in float32 anyway, so this only removes per-step casts;
3. fuses float sibling MatMuls (q/k/v, gate/up) into one MatMul and a Split;
4. rewrites each layer's attention core (found by its `llmbuild.attention` annotation,
   which names the q/k/v values and rotary inputs; llmbuild.graph.blocks.attention)
   into ONNX Runtime's fused contrib operator,
   which reads only each sequence's own rows of a shared past/present buffer and
   applies the rotary embedding itself, at the graph's position_ids:

       qkv [B,S,(Hq+2Hkv)*D] (the fused projection; else q, k, v apart) ─────┐
       past_key.i, past_value.i, rope.cos, rope.sin, position_ids ─────────────┤
       seqlens_k = kv_len-1, total = max(kv_len), query_seqlens = S ───────────┴─►
           com.microsoft.GroupQueryAttention(do_rotary=1) ─► attn [B,S,Hq*D], present_key.i, present_value.i

   replacing Split ─► Reshape/Transpose ─► RotaryEmbedding ─► TensorScatter ─►
   Attention ─► Transpose/Reshape. Rows are never padded (query_seqlens = S), so new
   row s of sequence b is written at write_indices[b] + s and attends causally to the
   rows before it, exactly the standard graph's semantics; its rotary embedding reads
   position_ids as given (the same cos/sin rows and arithmetic as RotaryEmbedding:
   bit-identical, checked in tests/test_cpu_lowering.py);
5. fuses each residual Add with the RMSNormalization that reads it into
   `com.microsoft.SkipSimplifiedLayerNormalization`;
6. replaces each routed-expert block (`llmbuild.moe`) with one `com.microsoft.MoE`
   (llmbuild.lowering.moe).

Sliding windows and attention soft-capping are carried into the operator
(`local_window_size`, `softcap`); per-head q/k norms stay before it (their output,
reshaped to [B,S,H*D], is its input); partial rotary is passed as the cos/sin caches'
width. A layer whose attention breaks the fused operator's constraints
(`gqa_constraint_problem`: head size % 16, dtype, partial rotary width % 16) keeps the
standard Attention, with a WARNING naming the reason. Anything else the rewrite does not recognise raises `LoweringError`;
the executor then runs the standard graph instead and says so in a WARNING. Both graphs
are checked against HF transformers in the tests.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from llmbuild.graph import io
from llmbuild.graph.annotations import ATTENTION, annotation
from llmbuild.lowering.moe import MoELoweringError, lower_moe_blocks
from llmbuild.lowering.moe_quantized import lower_quantized_moe_blocks
from llmbuild.lowering.quantized import (INT8_BLOCK_ACCURACY_LEVEL, add_activation_residuals, fold_decoded_tables,
                                        fuse_sibling_matmulnbits, lower_quantized_matmuls)
from llmbuild.lowering.rewrite import (MS_DOMAIN, float32_initializer, insert_in_order, remove_unused,
                                       replace_with_split)

_SIXTEEN_BIT = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_log = logging.getLogger("llmbuild.cpu_lowering")


def gqa_constraint_problem(*, head_dim: int, num_heads: int, kv_heads: int, dtype, softcap: float = 0.0,
                           window: int | None = None, rotary_dim: int | None = None) -> str | None:
    """Why ONNX Runtime's com.microsoft.GroupQueryAttention CPU kernel cannot run one
    layer's attention as the lowering emits it, or None. The layer then keeps the
    standard graph's Attention (a per-layer fallback, with a WARNING). Soft-capping
    (`softcap`) and sliding windows (`local_window_size`, `gqa_local_window_size`) are
    carried into the operator."""
    if head_dim % 16:
        return f"head_size {head_dim} is not a multiple of 16 (GroupQueryAttention's CPU kernel requires it)"
    if rotary_dim is not None and (rotary_dim > head_dim or rotary_dim % 16):
        return (f"partial rotary dim {rotary_dim} of head_size {head_dim} is not a multiple of 16 "
                "(GroupQueryAttention's CPU kernel: cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8)")
    if kv_heads < 1 or num_heads % kv_heads:
        return f"{num_heads} query heads are not a multiple of {kv_heads} KV heads"
    if dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return f"dtype {dtype} (the CPU kernel takes float32 or float16)"
    if softcap < 0:
        return f"negative softcap {softcap}"
    if window is not None and window < 1:
        return f"sliding window {window} is not positive"
    return None


def gqa_local_window_size(window: int | None) -> int:
    """GroupQueryAttention's `local_window_size` for HF's `sliding_window` (-1: none).
    HF lets new row r see `window` rows, itself included (kv_idx > q_idx - window). ONNX
    Runtime's CPU kernel (the pinned version; older ones saw one row more) lets it see
    local_window_size rows, itself included, in prefill and decode alike: the two are
    equal. Checked against HF token for token past the window in
    tests/test_family_mistral.py; an off-by-one there shows as a logit difference."""
    return -1 if window is None else window


class LoweringError(ValueError):
    """The graph does not have the shape the lowering expects."""


def _producer(value: ir.Value | None, op_type: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        found = "a graph input/initializer" if node is None else node.op_type
        raise LoweringError(f"expected {op_type} producing {value.name if value else None}, found {found}")
    return node


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node:
    users = [u for u, _ in value.uses()]
    if len(users) != 1 or users[0].op_type != op_type:
        raise LoweringError(f"expected {value.name} to feed one {op_type}, found {[u.op_type for u in users]}")
    return users[0]


def _float_table(graph: ir.Graph, name: str) -> ir.Value:
    """Initializer `name` as the float32 graph reads it (the Cast that `_promote_to_float32`
    put after a 16-bit initializer)."""
    table = float32_initializer(graph, name)
    if table is None:
        raise LoweringError(f"rotary table {name} not found, or not float32 after promotion")
    return table


def _unheaded(x_heads: ir.Value | None, name: str, tape: ir.tape.Tape) -> ir.Value:
    """The [B,S,H*D] value that the attention block's Reshape to [B,S,H,D] reads, or (q/k
    normed per head after that Reshape) a Reshape of the normed heads back to [B,S,H*D]."""
    if x_heads is None:
        raise LoweringError(f"the attention annotation names {name}, which the graph does not have")
    node = x_heads.producer()
    if node is not None and node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
        return node.inputs[0]
    flat = tape.initializer(ir.tensor(np.array([0, 0, -1], np.int64), name=f"{name}.flat_shape"),
                            name=f"{name}.flat_shape")
    return tape.op("Reshape", [x_heads, flat])


def lower_for_cpu(model: ir.Model, *, int4_accuracy_level: int = 4, int8_accuracy_level: int = 4,
                  int8_block_accuracy_level: int = INT8_BLOCK_ACCURACY_LEVEL, int8_block_residual: bool = True,
                  int4_float_zero_points: bool = False) -> ir.Model:
    """Rewrite `model` in place (see the module docstring) and return it. The accuracy
    levels are MatMulNBits' (4: int8 activations, 1: float32; tests compare both):
    int8 per channel, int8 in blocks (`group_size`) and int4 each have their own; int8
    blocks at level 4 get the activation residual (lowering.quantized
    `add_activation_residuals`: float32-level products) unless `int8_block_residual` is
    false."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    for name in (io.INPUT_IDS, io.POSITION_IDS, io.WRITE_INDICES):
        if name not in inputs:
            raise LoweringError(f"graph has no input {name}")
    attentions = [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not attentions:
        raise LoweringError("graph has no Attention node")
    # Quantized weights first: MatMulNBits with int8 packed in blocks of at most 128, so
    # ONNX Runtime's int8-activation kernels keep per-block activation scales; siblings
    # reading one activation (q/k/v, gate/up) as one MatMulNBits (no-op for unquantized
    # graphs).
    fold_decoded_tables(model)  # int4 scale_bits 8: float scales/offsets for MatMulNBits (lowering.quantized)
    lower_quantized_matmuls(model, int4_accuracy_level=int4_accuracy_level, int8_accuracy_level=int8_accuracy_level,
                            int8_block_accuracy_level=int8_block_accuracy_level, int8_block_residual=int8_block_residual,
                            int4_float_zero_points=int4_float_zero_points)
    fuse_sibling_matmulnbits(model)
    _promote_to_float32(graph)
    add_activation_residuals(model)  # int8 blocks at level 4: float32-level activations (lowering.quantized)
    _fuse_sibling_matmuls(graph)
    lower_quantized_moe_blocks(graph)  # quantized routed experts -> com.microsoft.QMoE (lowering.moe_quantized)
    try:  # routed experts -> com.microsoft.MoE (llmbuild.lowering.moe)
        lower_moe_blocks(graph)
    except MoELoweringError as e:
        raise LoweringError(str(e)) from None

    tape = ir.tape.Tape()
    kv_len = attentions[0].inputs[6]
    if kv_len is None or any(a.inputs[6] is not kv_len for a in attentions):
        raise LoweringError("Attention nodes do not share one nonpad_kv_seqlen input")
    one = tape.initializer(ir.tensor(np.array(1, np.int64), name="cpu.one"), name="cpu.one")
    seqlens_k = tape.op("Cast", [tape.op("Sub", [kv_len, one])], {"to": ir.DataType.INT32})
    total = tape.op("Cast", [tape.op("ReduceMax", [kv_len], {"keepdims": 0})], {"to": ir.DataType.INT32})
    query_lens = tape.op("Cast", [tape.op("Sub", [kv_len, inputs[io.WRITE_INDICES]])], {"to": ir.DataType.INT32})
    position_ids = inputs[io.POSITION_IDS]

    rewired: list[tuple[ir.Value, ir.Value]] = []  # (old value, new value)
    dead: list[ir.Node] = []
    values = {v.name: v for n in graph for v in n.outputs if v.name}
    for attn in attentions:
        meta = annotation(attn, ATTENTION)
        if meta is None:
            raise LoweringError(f"{attn.name}: Attention node without an {ATTENTION} annotation (not built by "
                                "llmbuild.graph.blocks.attention)")
        _, present_k, present_v = attn.inputs[:3]
        if any(attn.inputs[i] is not None for i in (4, 5)):
            raise LoweringError(f"{attn.name}: attention past inputs are not supported")
        mask = attn.inputs[3]
        if mask is not None and (meta.get("window") is None or mask.name != f"window_mask.{meta['window']}"):
            raise LoweringError(f"{attn.name}: only the sliding-window mask of llmbuild.graph.blocks is supported")
        attrs = {k: v.value for k, v in attn.attributes.items()}
        if attrs.get("is_causal", 0) != (1 if mask is None else 0) or attrs.get("qk_matmul_output_mode", 0):
            raise LoweringError(f"{attn.name}: only plain causal attention is supported ({attrs})")
        scatter_k = _producer(present_k, "TensorScatter")
        scatter_v = _producer(present_v, "TensorScatter")
        past_k, past_v = scatter_k.inputs[0], scatter_v.inputs[0]
        rotary = meta.get("rotary")
        if rotary is None:
            raise LoweringError(f"layer {meta['layer']}: attention without rotary embedding is not lowered")
        if rotary["position_ids"] != position_ids.name:
            raise LoweringError(f"layer {meta['layer']}: rotary reads {rotary['position_ids']}, not the graph's "
                                f"{position_ids.name}")
        # Partial rotary (rotary["dim"] < head_dim, Phi-4-mini): GroupQueryAttention takes the
        # rotated dims from its cos/sin caches' width ([max_seq, rotary_dim/2]) and passes the
        # rest of each head through, as RotaryEmbedding's rotary_embedding_dim does.
        cos, sin = (_float_table(graph, rotary[t]) for t in ("cos", "sin"))
        out_t = _only_consumer(attn.outputs[0], "Transpose")
        merged = _only_consumer(out_t.outputs[0], "Reshape").outputs[0]
        heads, kv_heads, head_dim = int(meta["heads"]), int(meta["kv_heads"]), int(meta["head_dim"])
        problem = gqa_constraint_problem(head_dim=head_dim, num_heads=heads, kv_heads=kv_heads, dtype=past_k.dtype,
                                         softcap=float(meta.get("softcap") or attrs.get("softcap", 0.0)),
                                         window=meta.get("window"), rotary_dim=int(rotary["dim"]))
        if problem is not None:  # this layer keeps the standard Attention
            _log.warning("CPU lowering: %s keeps the standard Attention, not GroupQueryAttention: %s",
                         attn.name, problem)
            continue
        q_lin, k_lin, v_lin = (_unheaded(values.get(meta[x]), meta[x], tape) for x in ("q", "k", "v"))
        packed = _packed_qkv(q_lin, k_lin, v_lin)
        qkv = [packed, None, None] if packed is not None else [q_lin, k_lin, v_lin]
        gqa_attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1, "rotary_interleaved": 0,
                     "scale": float(meta["scale"])}
        if meta.get("softcap"):
            gqa_attrs["softcap"] = float(meta["softcap"])
        if meta.get("window") is not None:
            gqa_attrs["local_window_size"] = gqa_local_window_size(meta["window"])
        out, new_k, new_v = tape.op_multi_out(
            "GroupQueryAttention",
            [*qkv, past_k, past_v, seqlens_k, total, cos, sin, position_ids, None, None, None, None, None, None,
             query_lens],
            gqa_attrs, domain=MS_DOMAIN, num_outputs=3,
        )
        rewired += [(merged, out), (present_k, new_k), (present_v, new_v)]
        dead += [merged.producer(), out_t, attn, scatter_k, scatter_v]

    # Insert the new nodes before the first attention's consumers need them: the tape's
    # nodes go right after the node producing the last value they read.
    for value in tape.initializers:
        graph.register_initializer(value)
    insert_in_order(graph, tape.nodes)
    for old, new in rewired:
        for i, out in enumerate(graph.outputs):
            if out is old:
                new.name, new.shape, new.type = old.name, old.shape, old.type
                old.name = f"{old.name}.standard"
                graph.outputs[i] = new
        ir.convenience.replace_all_uses_with(old, new)
    for node in dead:
        graph.remove(node, safe=True)
    remove_unused(graph)
    _fuse_skip_norms(graph)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    return model


def _packed_qkv(q: ir.Value, k: ir.Value, v: ir.Value) -> ir.Value | None:
    """The [B,S,(Hq+2Hkv)*D] value that q, k and v were split from (the fused projection), or None."""
    split = q.producer()
    if (split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx")
            or list(split.outputs) != [q, k, v] or split.attributes.get_int("axis", 0) not in (-1, 2)):
        return None
    return split.inputs[0]


def _promote_to_float32(graph: ir.Graph) -> None:
    """16-bit graph -> float32: Cast after 16-bit initializers (folded by ONNX Runtime at
    session creation), float32 cache inputs/outputs."""
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.INT and node.op_type == "Cast" and attr.value in _SIXTEEN_BIT:
                raise LoweringError(f"{node.name}: casts to a 16-bit type")
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in _SIXTEEN_BIT:
                raise LoweringError(f"{node.name}: has a 16-bit tensor attribute")
    for value in [*graph.inputs, *graph.outputs]:
        if value.dtype in _SIXTEEN_BIT:
            value.type = ir.TensorType(ir.DataType.FLOAT)
    casts = []
    for name, init in list(graph.initializers.items()):
        if init.dtype not in _SIXTEEN_BIT or not init.uses():
            continue
        cast = ir.node("Cast", [init], {"to": ir.DataType.FLOAT}, name=f"cpu.cast.{name}")
        cast.outputs[0].name = f"{name}.float32"
        cast.outputs[0].dtype = ir.DataType.FLOAT
        cast.outputs[0].shape = init.shape
        for user, index in list(init.uses()):
            if user is not cast:
                user.replace_input_with(index, cast.outputs[0])
        casts.append(cast)
    graph.insert_before(next(iter(graph)), casts) if casts else None
    for node in graph:
        for out in node.outputs:
            if out.dtype in _SIXTEEN_BIT:
                out.type = ir.TensorType(ir.DataType.FLOAT)


def _fuse_sibling_matmuls(graph: ir.Graph) -> None:
    """
    x ─┬─MatMul(W1)─► y1          x ─MatMul(Concat(W1, W2, W3, axis=1))─Split(-1)─► y1, y2, y3
       ├─MatMul(W2)─► y2    ==>
       └─MatMul(W3)─► y3
    For float weights stored as initializers (q/k/v, gate/up): one GEMM instead of
    three; ONNX Runtime folds the Concat once at session creation. Quantized weights
    (computed by DequantizeLinear) are left alone.
    """
    def constant(w: ir.Value | None) -> bool:  # an initializer, or a Cast of one (promoted weights)
        if w is None:
            return False
        p = w.producer()
        return w.is_initializer() or (p is not None and p.op_type == "Cast" and p.inputs[0].is_initializer())

    position = {id(n): i for i, n in enumerate(graph)}
    for x in [v for n in list(graph) for v in n.outputs] + list(graph.inputs):
        group = []
        for user, index in x.uses():
            w = user.inputs[1] if len(user.inputs) > 1 else None
            if (user.op_type == "MatMul" and user.domain in ("", "ai.onnx") and index == 0 and constant(w)
                    and w.shape is not None and len(w.shape) == 2 and w.dtype == ir.DataType.FLOAT):
                group.append((user, w))
        group.sort(key=lambda g: position.get(id(g[0]), 0))
        if len(group) < 2 or len({int(w.shape[0]) for _, w in group}) != 1:
            continue
        name = "+".join(w.name for _, w in group)
        concat = ir.node("Concat", [w for _, w in group], {"axis": 1}, name=f"cpu.concat.{name}")
        matmul = ir.node("MatMul", [x, concat.outputs[0]], name=f"cpu.matmul.{name}")
        matmul.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(group[0][0], concat)
        replace_with_split(graph, [user for user, _ in group], matmul, [int(w.shape[1]) for _, w in group],
                           f"cpu.{name}")


def _fuse_skip_norms(graph: ir.Graph) -> None:
    """
    h ─┬──────────────────(+)─► h' ─┬─► (next residual Add)            h ─┐
    y ─┴───────────────────┘        └─RMSNormalization(γ)─► n   ==>    y ─┴─SkipSimplifiedLayerNormalization(γ)─► n, h'

    The residual Add and the RMSNormalization that reads its sum (axis -1, statistics in
    float32) as ONNX Runtime's fused kernel, whose fourth output is the sum itself (the
    residual stream). Norms without such an Add (the first layer's; the final norm, which
    reads the gathered rows) stay as they are. Runs on the float32 graph.
    """
    position = {id(n): i for i, n in enumerate(graph)}
    for norm in list(graph):
        if norm.op_type != "RMSNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        x, gamma = norm.inputs[0], norm.inputs[1]
        if norm.attributes.get_int("axis", -1) != -1 or norm.attributes.get_int("stash_type", 1) != 1:
            continue
        if gamma is None or gamma.shape is None or len(gamma.shape) != 1 or gamma.dtype != ir.DataType.FLOAT:
            continue
        add = x.producer() if x is not None else None
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or x.is_graph_output():
            continue
        a, b = add.inputs
        # Both operands are activations of one shape (the residual stream and a sublayer's
        # output); an Add with a constant (a bias) may broadcast.
        if any(v is None or v.is_initializer() or v.const_value is not None or v.producer() is None
               or v.producer().op_type == "Constant" for v in (a, b)):
            continue
        g = gamma.producer()
        if g is not None and position.get(id(g), len(position)) > position[id(add)]:
            continue  # the fused node takes the Add's place (the sum may have readers before the norm)
        eps = norm.attributes.get_float("epsilon", 1e-5)
        fused = ir.node("SkipSimplifiedLayerNormalization", [b, a, gamma], {"epsilon": eps}, domain=MS_DOMAIN,
                        num_outputs=4, name=f"cpu.skip_norm.{norm.name or gamma.name}")
        out, _, _, total = fused.outputs
        graph.insert_before(add, fused)
        for old, new in ((norm.outputs[0], out), (x, total)):
            name = old.name
            old.replace_all_uses_with(new)
            old.name = f"{name}.unfused"
            new.name, new.type, new.shape = name, ir.TensorType(ir.DataType.FLOAT), old.shape
        graph.remove(norm, safe=True)
        graph.remove(add, safe=True)
        for unused in fused.outputs[1:]:
            if not unused.uses():
                unused.name = ""  # omitted output: not computed


def lowered_model_bytes(model_path, **options) -> bytes:
    """The lowered graph of an artifact's model.onnx, serialized; its initializers still
    point into the artifact's external data file (load it with ONNX Runtime's
    `session.model_external_initializers_file_folder_path` set to the model's folder).
    `options` go to lower_for_cpu."""
    model = ir.load(str(model_path))
    lower_for_cpu(model, **options)
    return ir.serde.serialize_model(model).SerializeToString()


def save_lowered_graph(artifact, dst, **options):
    """The lowered graph of an artifact, written as dst/model.onnx beside a copy of the
    artifact's weights; the artifact itself is left unchanged. For runtimes
    that load a graph file rather than lowering at load time (the C++ runtime's --graph).
    `options` go to lower_for_cpu."""
    import shutil
    from pathlib import Path

    from llmbuild.artifact import read_manifest

    artifact, dst = Path(artifact), Path(dst)
    graph = read_manifest(artifact)["graph"]
    dst.mkdir(parents=True, exist_ok=True)
    lowered = lowered_model_bytes(artifact / graph["file"], **options)
    weights = dst / Path(graph["weights"]).name
    if not weights.exists():
        # A copy: ONNX Runtime rejects weights behind a symlink that leads out of the graph's
        # folder, and a hard link would make onnx_ir refuse to read the artifact's weights
        # (a possible hard-link attack) when a quantized graph is lowered again.
        shutil.copyfile(artifact / graph["weights"], weights)
    (dst / "model.onnx").write_bytes(lowered)
    return dst / "model.onnx"
