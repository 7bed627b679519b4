"""`llmbuild plan`: what `compile` would do and need, from the recipe and model config only.

    plans = plan_recipe("recipes/smollm2-135m-instruct.yaml")   # one dict per matrix variant
    print(format_plan(plans[0]))

No weights are read and nothing heavy is imported (no torch, onnx or TensorRT), so a
70B-class config plans in well under a second. The figures, per tensor-parallel rank:

    parameters      every tensor of the architecture's table (llmbuild.models spec): the layers'
                    linears (split by tensor parallelism) + embeddings, lm_head and norms
    quantization    with `quantization:` each linear weight is counted at its scheme
                    (llmbuild.quantize.plan resolves the overrides): int8 = 1 byte + a 2-byte scale per
                    output channel or per group x output channel, int4 = 1/2 byte + 2-byte scales
                    (and offsets) per group x output channel, fp8 = 1 byte + one scale; embeddings
                    and norms stay at the precision
    bits/weight     of the linear weights (those kept unquantized at the precision's bits):
                    codes + scales + offsets, as llama.cpp counts them (int4 g32 = 4.5, Q4_0's)
    weight bytes    each rank's share of the sharded linears (the spec's hints) + replicated
                    embeddings, lm_head, norms, at the precision
    KV cache        2 (K and V) x layers x kv_heads/tp x head_dim x bytes, per token; the engine
                    allocates max_batch_size x max_seq_len tokens of it
    activations     the largest forward pass of the engine's profiles (llmbuild.engine.profiles):
                    T tokens x (3 hidden + (q + k + v)/tp + 3 intermediate/tp) x bytes for one
                    layer's intermediates (TensorRT reuses them across layers), plus the logits of
                    L rows x vocab in the compute dtype and as float32; mixture of experts: plus each
                    token's k gathered gate/up expert matrices (2 k hidden moe_intermediate)
    experts         (MoE) total and active parameters, weight bytes a decoded token reads
    GPU memory      weights + KV cache + activations + RUNTIME_RESERVE (CUDA context, TensorRT
                    runtime and kernels)

For each GPU of a short table: which engine of the recipe runs there, whether it fits,
the largest batch at max_seq_len and the longest sequence at max_batch_size that fit,
and, for engines with weight streaming, the weight budget (bytes of weights the GPU can
keep resident) when the weights do not fit whole.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

from llmbuild.quantize.expert_plan import expert_stored_bytes, resolve_expert_plan, stacked_expert_shapes
from llmbuild.quantize.plan import ModuleSpec, mean_bits_per_weight, resolve_plan, stored_bytes, tied_lm_head_spec

GiB = 1 << 30
# CUDA context, TensorRT runtime, kernels and allocator slack: an allowance, not a measurement.
RUNTIME_RESERVE = GiB
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: int  # nominal memory
    cc: str  # compute capability


# Common GPUs, nominal memory; RTX-class first, then datacenter.
GPUS = (
    GPU("GeForce RTX 3060", 12, "sm86"),
    GPU("GeForce RTX 4080", 16, "sm89"),
    GPU("GeForce RTX 4090", 24, "sm89"),
    GPU("GeForce RTX 5090", 32, "sm120"),
    GPU("RTX 6000 Ada", 48, "sm89"),
    GPU("A100 80GB", 80, "sm80"),
    GPU("H100 80GB", 80, "sm90"),
    GPU("H200", 141, "sm90"),
    GPU("B200", 180, "sm100"),
)


def _spec_dims(config: dict):
    from llmbuild.models import spec_for

    spec = spec_for(config, check=False)
    return spec, spec.dims(config)


def parameter_groups(config: dict) -> dict[str, int]:
    """Parameter counts from the architecture's tensor table: `layer_matrices` (the layers'
    linears, split by tensor parallelism) and `replicated` (embeddings, lm_head, norms)."""
    spec, d = _spec_dims(config)
    return spec.parameter_count(d)


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """KV heads one rank holds: split when tp divides them, else replicated (one each)."""
    return kv_heads // tp if kv_heads % tp == 0 else 1


def _rank_bytes(stored: int, shard, d, tp: int) -> int:
    """Bytes of a weight one rank holds under its sharding hint (None: replicated whole).
    Blocks that may be replicated (KV heads) count one rank's blocks: n/tp, or one when
    tp > n."""
    if shard is None:
        return stored
    if shard.replicate:
        n = d.sizes()[shard.count]
        return round(stored * kv_heads_per_rank(n, tp) / n)
    return stored // tp


def linear_weights(config: dict) -> dict[str, tuple[int, int]]:
    """HF name -> (in, out) of every linear (MatMul) weight of the graph (the spec's table)."""
    from llmbuild.quantize.allocate import linear_shapes

    return linear_shapes(config)


def _linear_specs(config: dict, recipe: dict):
    """(spec, dims, linear weight name -> (in, out), name -> ModuleSpec of the quantized ones)."""
    spec, d = _spec_dims(config)
    b = DTYPE_BYTES[recipe["precision"]]
    shapes = {name: (w.in_features, w.out_features) for name, w in spec.linear_weights(d).items()}
    specs = {}
    target = (recipe.get("quantization") or {}).get("target")
    if target:  # chosen at compile from measured sensitivities: the bound the target sets
        bits = target.get("bits_per_weight") or 8 * b  # max_perplexity_increase: up to unquantized
        specs = {name: bits for name in shapes}
    elif recipe.get("quantization"):
        specs = resolve_plan(recipe["quantization"], list(shapes), d.layers)
        named = tied_lm_head_spec(recipe["quantization"], d.layers, spec.lm_head) if d.tied else None
        if named is not None:  # a tied lm_head an override names gets its own quantized copy
            shapes[spec.lm_head], specs[spec.lm_head] = (d.hidden, d.vocab), named[0]
    return spec, d, shapes, specs


def linear_bits_per_weight(config: dict, recipe: dict) -> float:
    """Bits per weight of the graph's linear weights at the recipe's quantization."""
    _, _, shapes, specs = _linear_specs(config, recipe)
    b = DTYPE_BYTES[recipe["precision"]]
    if any(isinstance(v, float | int) for v in specs.values()):  # a target: the bound it sets
        weights = sum(k * n for k, n in shapes.values())
        return sum(k * n * specs.get(name, 8 * b) for name, (k, n) in shapes.items()) / weights
    plan = {name: specs.get(name, ModuleSpec("none")) for name in shapes}
    return mean_bits_per_weight(plan, shapes, b)


def weight_bytes(config: dict, recipe: dict, tp: int = 1) -> tuple[int, int]:
    """(all weights, one rank's weights) in bytes at the recipe's precision and quantization.
    A rank holds its share of every sharded linear (the spec's hints: 1/tp, or one whole
    KV head when KV heads are replicated) and the embeddings, lm_head and norms whole."""
    spec, d, shapes, specs = _linear_specs(config, recipe)
    b = DTYPE_BYTES[recipe["precision"]]
    linears = spec.linear_weights(d)
    others = sum(math.prod(shape) for name, shape in spec.tensors(d).items() if name not in linears)
    total = per_rank = others * b  # embeddings, norms (replicated)
    if hasattr(d, "top_k"):  # routed experts at their stored size; each rank holds 1/tp of every expert
        stored = sum(_expert_bytes(spec, d, recipe).values())
        unquantized = sum(math.prod(s) for s in stacked_expert_shapes(spec, d).values()) * b
        total += stored - unquantized
        per_rank += stored // tp - unquantized
    for name, shape in shapes.items():
        if name not in specs:
            stored = shape[0] * shape[1] * b
        elif isinstance(specs[name], float | int):  # a target's bits per weight
            stored = math.floor(shape[0] * shape[1] * specs[name] / 8)
        else:
            stored = stored_bytes(specs[name], shape, b)
        total += stored
        per_rank += _rank_bytes(stored, linears[name].shard if name in linears else None, d, tp)
    return total, per_rank


def activation_bytes(config: dict, *, tokens: int, logit_rows: int, precision: str, tp: int = 1) -> int:
    """Estimate of one forward pass's activation memory (see the module docstring)."""
    _, d = _spec_dims(config)
    b = DTYPE_BYTES[precision]
    qkv = (d.heads + 2 * d.kv_heads) * d.head_dim // tp
    per_token = 3 * d.hidden + qkv + 3 * d.intermediate // tp
    if hasattr(d, "top_k"):  # routed experts: each token's k gathered gate/up [H, I] copies (llmbuild.graph.moe)
        per_token += 2 * d.top_k * d.hidden * d.moe_intermediate
    return b * tokens * per_token + logit_rows * d.vocab * (b + 4)


def _profile_passes(limits: dict) -> dict[str, dict]:
    from llmbuild.engine.profiles import check_limits, prefill_batch

    batch, input_len, _, num_tokens = check_limits(limits)
    pbatch = prefill_batch(limits)
    return {
        "prefill": {"batch": pbatch, "tokens_per_sequence": input_len, "tokens": pbatch * input_len,
                    "logit_rows": pbatch * input_len},
        "decode": {"batch": batch, "tokens_per_sequence": 1, "tokens": batch, "logit_rows": batch},
        "max_num_tokens": num_tokens,
    }


def _engine_runs_on(entry: dict, cc: str) -> bool:
    from llmbuild.engine.compat import sm_tuple
    from llmbuild.engine.options import (
        NOT_RTX,
        RTX_DEFAULT_TARGETS,
        normalize_compute_capabilities,
    )

    device = sm_tuple(cc)
    if entry["backend"] == "tensorrt-rtx":
        ccs = entry.get("compute_capabilities")
        if ccs:
            return cc in normalize_compute_capabilities(ccs)
        return cc in RTX_DEFAULT_TARGETS or (device is not None and device >= (12, 0) and cc not in NOT_RTX)
    if (entry.get("hardware_compatibility") or "none") == "ampere+":
        return device is not None and device >= (8, 0)
    return device is not None and device >= (7, 5)  # built on that GPU (TensorRT 10.15+: Turing and later)


def plan_config(config: dict, recipe: dict) -> dict:
    """The plan of one resolved recipe (`Recipe.to_dict()`) for a model config (pure)."""
    from llmbuild.artifact.layout import engine_file_name
    from llmbuild.engine.options import target_label

    _, d = _spec_dims(config)
    precision = recipe["precision"]
    limits = dict(recipe["limits"])
    tp = int((recipe.get("parallel") or {}).get("tp", 1))
    b = DTYPE_BYTES[precision]
    groups = parameter_groups(config)
    params = groups["layer_matrices"] + groups["replicated"] + groups.get("experts", 0)
    weights_total, weights_per_rank = weight_bytes(config, recipe, tp)
    moe = moe_figures(config, recipe, groups, weights_total) if "experts" in groups else None

    kv_per_token = 2 * d.layers * kv_heads_per_rank(d.kv_heads, tp) * d.head_dim * b
    passes = _profile_passes(limits)
    act = max(
        activation_bytes(config, tokens=p["tokens"], logit_rows=p["logit_rows"], precision=precision, tp=tp)
        for p in (passes["prefill"], passes["decode"])
    )
    batch, seq_len = limits["max_batch_size"], limits["max_seq_len"]
    kv_at_limits = kv_per_token * batch * seq_len
    need = weights_per_rank + kv_at_limits + act + RUNTIME_RESERVE

    engines = recipe.get("engines") or []
    files = [engine_file_name(e["backend"], target_label(e["backend"], e), rank) for e in engines for rank in range(tp)]
    max_positions = config.get("max_position_embeddings")

    gpus = []
    for gpu in GPUS:
        memory = gpu.memory_gib * GiB
        runnable = [e for e in engines if _engine_runs_on(e, gpu.cc)]
        free_for_kv = memory - RUNTIME_RESERVE - weights_per_rank - act
        row = {
            "name": gpu.name,
            "memory_bytes": memory,
            "compute_capability": gpu.cc,
            "engine": (f"{runnable[0]['backend']} ({target_label(runnable[0]['backend'], runnable[0])})"
                       if runnable else None),
            "fits": need <= memory,
            "max_cache_tokens": max(0, free_for_kv // kv_per_token),
            "max_batch_at_max_seq_len": max(0, free_for_kv // (kv_per_token * seq_len)),
            "max_seq_len_at_max_batch": max(0, free_for_kv // (kv_per_token * batch)),
            "weight_streaming_budget_bytes": None,
        }
        if max_positions:
            row["max_seq_len_at_max_batch"] = min(row["max_seq_len_at_max_batch"], int(max_positions))
        streaming = [e for e in runnable if e.get("weight_streaming")]
        if streaming and not row["fits"]:
            # Weights the GPU can keep resident beside the cache and activations at the limits.
            budget = memory - RUNTIME_RESERVE - kv_at_limits - act
            wanted = streaming[0].get("weight_streaming_budget_mib")
            row["weight_streaming_budget_bytes"] = max(0, min(budget, weights_per_rank))
            row["fits_with_weight_streaming"] = budget > 0 and (wanted is None or wanted * (1 << 20) <= budget)
        gpus.append(row)

    return {
        "name": recipe["name"],
        "model": {"architecture": (config.get("architectures") or ["?"])[0], "num_layers": d.layers,
                  "hidden_size": d.hidden, "intermediate_size": d.intermediate,
                  "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads,
                  "head_dim": d.head_dim, "vocab_size": d.vocab, "tie_word_embeddings": d.tied,
                  "max_position_embeddings": max_positions},
        "precision": precision,
        "tensor_parallel": tp,
        "limits": limits,
        "quantization": _quantization_label(recipe.get("quantization")),
        "quantization_target": _target_plan(config, recipe),
        "parameters": params,
        **({"moe": moe} if moe else {}),
        "weight_bytes": weights_total,
        "linear_bits_per_weight": round(linear_bits_per_weight(config, recipe), 4),
        "weight_bytes_per_rank": weights_per_rank,
        "kv_cache": {"bytes_per_token": kv_per_token, "bytes_at_limits": kv_at_limits,
                     "tokens_at_limits": batch * seq_len},
        "activations": {"bytes": act, "profiles": passes},
        "runtime_reserve_bytes": RUNTIME_RESERVE,
        "gpu_memory_per_rank_bytes": need,
        "engines": {"count": len(files), "files": files},
        "weight_streaming": any(e.get("weight_streaming") for e in engines),
        # ONNX weights (every rank's) plus one engine per rank per entry, each about its weights.
        "disk_bytes_estimate": weights_total + weights_per_rank * len(files),
        "gpus": gpus,
    }


def _target_plan(config: dict, recipe: dict) -> dict | None:
    """What `plan` can say about a `quantization.target` without the weights: the linears'
    bytes are bounded by the target (bits_per_weight) or lie between the smallest
    allocation and the unquantized linears (max_perplexity_increase); the allocation itself
    needs the measured sensitivities (compile)."""
    target = (recipe.get("quantization") or {}).get("target")
    if not target:
        return None
    from llmbuild.quantize.allocate import bits_range

    shapes = linear_weights(config)
    b = DTYPE_BYTES[recipe["precision"]]
    params = sum(k * n for k, n in shapes.values())
    lo, hi = bits_range(shapes, b)
    bits = target.get("bits_per_weight")
    return {
        "target": {k: v for k, v in target.items() if v is not None},
        "linear_parameters": params,
        "bits_per_weight_range": [round(lo, 4), round(hi, 4)],
        "linear_bytes_min": math.ceil(lo * params / 8),
        "linear_bytes_max": math.floor((bits if bits is not None else hi) * params / 8),
        "estimate": ("at most the budget (the allocation fills it from measured sensitivities at compile)"
                     if bits is not None else "between the smallest allocation and the unquantized linears "
                     "(measured at compile); the weight and GPU figures use the upper bound"),
    }


def _expert_bytes(spec, d, recipe: dict) -> dict[str, int]:
    """Stacked expert weight name -> stored bytes: quantized per expert as the recipe's
    `weights` / `overrides` say (llmbuild.quantize.expert_plan); in the graph dtype with a
    quantization target (chosen at compile: the upper bound)."""
    b = DTYPE_BYTES[recipe["precision"]]
    shapes = stacked_expert_shapes(spec, d)
    q = recipe.get("quantization")
    plan = resolve_expert_plan(q, list(shapes), d.layers) if q and not q.get("target") else {}
    return {n: expert_stored_bytes(plan.get(n, ModuleSpec("none")), shape, b) for n, shape in shapes.items()}


def moe_figures(config: dict, recipe: dict, groups: dict, weights_total: int) -> dict:
    """A mixture-of-experts model's total and active parameters (the spec's
    `parameter_count`) and the weight bytes one decoded token reads: every weight but the
    E - k experts it does not pick in each sparse layer (routed experts at their stored
    size: quantized per expert when the recipe quantizes them), and of an untied embedding
    one row; `expert_weight_bytes` is every routed expert's stored bytes."""
    spec, d = _spec_dims(config)
    b = DTYPE_BYTES[recipe["precision"]]
    stacked = _expert_bytes(spec, d, recipe)
    expert_bytes = sum(stacked.values())
    unpicked = expert_bytes * (d.experts - d.top_k) // d.experts  # every expert stores the same bytes
    embedding = 0 if d.tied else (d.vocab - 1) * d.hidden * b
    return {"experts": d.experts, "top_k": d.top_k, "sparse_layers": len(d.sparse_layers),
            "expert_parameters": groups["experts"], "active_parameters": groups["active"],
            "expert_weight_bytes": expert_bytes,
            "bytes_read_per_decoded_token": weights_total - unpicked - embedding}


def _quantization_label(quantization: dict | None) -> str | None:
    if not quantization:
        return None
    if quantization.get("target"):
        t = quantization["target"]
        if t.get("bits_per_weight") is not None:
            return f"auto ≤ {t['bits_per_weight']:g} bits per weight"
        return f"auto, perplexity ≤ +{t['max_perplexity_increase']:.1%}"
    w = quantization["weights"]
    group = (w.get("group_size") or 128) if w["scheme"] == "int4" else w.get("group_size")
    label = w["scheme"] + (f" g{group}" if group else "") + (" asym" if w.get("symmetric") is False else "")
    if w["scheme"] == "int4" and w.get("scale_bits") == 8:
        label += " s8"
    n = len(quantization.get("overrides") or [])
    return label + (f" ({n} override{'s' if n > 1 else ''})" if n else "")


def plan_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> list[dict]:
    """The plan of every variant of the recipe (one, without a matrix)."""
    from llmbuild.recipe.matrix import load_variants
    from llmbuild.source import read_config

    plans = []
    for recipe in load_variants(path, overrides):
        plan = plan_config(read_config(recipe.source_path), recipe.to_dict())
        if recipe.variant:
            plan["variant"] = recipe.variant
        plans.append(plan)
    return plans


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(p: dict) -> str:
    m, lim, act = p["model"], p["limits"], p["activations"]
    pre, dec = act["profiles"]["prefill"], act["profiles"]["decode"]
    tp = p["tensor_parallel"]
    lines = [
        f"{p['name']}  {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"heads {m['num_attention_heads']}/{m['num_key_value_heads']}, vocab {m['vocab_size']}",
        f"  parameters    {_count(p['parameters'])}; {p['precision']}"
        f"{' + ' + p['quantization'] if p.get('quantization') else ''} weights {_size(p['weight_bytes_per_rank'])}"
        f" per rank ({tp} rank{'s' if tp > 1 else ''}); linears {p['linear_bits_per_weight']:.2f} bits/weight",
        *([f"  allocation    linears {_size(t['linear_bytes_min'])}..{_size(t['linear_bytes_max'])}"
           f" ({t['bits_per_weight_range'][0]:.2f}..{t['bits_per_weight_range'][1]:.2f} bits per weight possible);"
           f" {t['estimate']}"] if (t := p.get("quantization_target")) else []),
        *([f"  experts       {p['moe']['top_k']} of {p['moe']['experts']} in {p['moe']['sparse_layers']} layers: "
            f"{_count(p['moe']['active_parameters'])} active parameters per token; a decoded token reads "
            f"{_size(p['moe']['bytes_read_per_decoded_token'])} of weights; routed experts stored in "
            f"{_size(p['moe']['expert_weight_bytes'])}"] if p.get("moe") else []),
        f"  KV cache      {_size(p['kv_cache']['bytes_per_token'])} per token; "
        f"{_size(p['kv_cache']['bytes_at_limits'])} at batch {lim['max_batch_size']} x {lim['max_seq_len']}",
        f"  activations   ~{_size(act['bytes'])} (prefill {pre['batch']} x {pre['tokens_per_sequence']} tokens "
        f"per pass, decode {dec['batch']} x 1)",
        f"  GPU memory    ~{_size(p['gpu_memory_per_rank_bytes'])} per rank "
        f"(incl. {_size(p['runtime_reserve_bytes'])} runtime reserve)",
        f"  engines       {p['engines']['count']}: {', '.join(p['engines']['files']) or 'none (ONNX only)'}",
        f"  disk          ~{_size(p['disk_bytes_estimate'])} (ONNX weights + engines)",
        "",
        f"  {'GPU':<18} {'memory':>8}  {'engine':<26} {'fits':<5} {'batch@' + str(lim['max_seq_len']):>11} "
        f"{'seq@' + str(lim['max_batch_size']):>9}",
    ]
    for g in p["gpus"]:
        fits = "yes" if g["fits"] else "no"
        if not g["fits"] and g.get("fits_with_weight_streaming"):
            fits = f"stream ({_size(g['weight_streaming_budget_bytes'])} resident)"
        engine = g["engine"] or "none targets " + g["compute_capability"]
        lines.append(
            f"  {g['name']:<18} {g['memory_bytes'] // GiB:>4} GiB  {engine:<26} {fits:<5} "
            f"{g['max_batch_at_max_seq_len']:>11} {g['max_seq_len_at_max_batch']:>9}"
        )
    return "\n".join(lines)
