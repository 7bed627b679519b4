"""Automatic bit allocation: `quantization: {target: ...}` chooses every linear's scheme.

    quantization:
      target: {bits_per_weight: 4.5}            # or {max_perplexity_increase: 0.05}

1. **Candidates**: every setting an override could name that needs no calibration
   (round to nearest; fp8 quantizes activations and is left out): `none` (the graph
   dtype), int8, int4 at each group size, symmetric or not — enumerated from the
   recipe schema's override fields, so a scheme or group size added there is a
   candidate too. Their sizes are `plan.stored_bytes` (what the graph stores).
2. **Sensitivity** of linear `W` [in, out] under candidate `c`: the output error its
   rounding alone causes, weighted by the input's second moment (the diagonal of the
   layer Hessian XᵀX, as GPTQ's objective with off-diagonals dropped):

       cost(W, c) = Σᵢ E[xᵢ²] · ‖Q_c(W)ᵢ − Wᵢ‖²      (i: input channel, row of W)

   E[xᵢ²] comes from one pass of the unquantized float32 graph over `target.samples`
   calibration sequences (all linear inputs read at once). The proxy's rank correlation
   with the KL divergence of the logits when that linear alone is quantized is measured
   on a tiny model in `benchmarks/quantization/allocate_proxy.py`.
3. **Allocation** (`bits_per_weight`): a multiple-choice knapsack solved greedily:
   every linear starts at its smallest candidate, then upgrades along the lower convex
   hull of its (bytes, cost) candidates are taken in order of cost removed per byte
   added while they fit the budget — the result never exceeds it. `max_perplexity_increase`:
   a bisection over the budget, each allocation measured on the evaluation text (the
   accuracy gate's text and metrics) with the dequantized weights fed to the float32
   graph; the cheapest allocation that meets it is kept.

The result is a plain `weights` + `overrides` quantization section (one override per
module that differs from the most common setting), so the graph, lowering and engines
see nothing new. The embedding, and an lm_head tied to it, keep the graph dtype and are
outside the budget; an untied lm_head is a linear like the others.

This module imports nothing heavy at import time (`plan` and `validate` use the size
arithmetic).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from llmbuild.errors import UserError
from llmbuild.quantize.plan import ModuleSpec, module_name, resolve_plan, stored_bytes

# Bisection over the budget (max_perplexity_increase): steps, and the resolution it stops at.
BISECT_STEPS = 6
BISECT_RESOLUTION = 0.05  # bits per weight
# Memory for one chunk of linear inputs in the sensitivity pass.
MOMENT_CHUNK_BYTES = 256 << 20


def candidate_specs() -> list[ModuleSpec]:
    """Every distinct uncalibrated setting a `quantization.overrides` entry can name."""
    import itertools
    import typing

    from pydantic import ValidationError

    from llmbuild.recipe.schema import QuantOverride

    fields = QuantOverride.model_fields
    schemes = typing.get_args(typing.get_args(fields["scheme"].annotation)[0])
    groups = (None, *typing.get_args(typing.get_args(fields["group_size"].annotation)[0]))
    found: list[ModuleSpec] = []
    for scheme, group, sym in itertools.product(schemes, groups, (True, False)):
        try:
            ov = QuantOverride(match="x", scheme=scheme, group_size=group, symmetric=sym).model_dump()
        except ValidationError:
            continue
        spec = resolve_plan({"weights": {"scheme": "none"}, "overrides": [ov]}, ["x.weight"], 1)["x.weight"]
        if not spec.calibrated and spec not in found:
            found.append(spec)
    return found


def spec_override(spec: ModuleSpec) -> dict:
    """The override keys that give a module `spec`."""
    ov = {"scheme": spec.scheme}
    if spec.scheme == "int4":
        ov |= {"group_size": spec.group_size, "symmetric": spec.symmetric}
    return ov


def spec_key(spec: ModuleSpec) -> str:
    """A short stable name: none, int8, int4-g32-sym …"""
    if spec.scheme == "int4":
        return f"int4-g{spec.group_size}-{'sym' if spec.symmetric else 'asym'}"
    return spec.scheme


def candidate_bytes(shapes: dict[str, tuple[int, int]], dtype_bytes: int,
                    candidates: list[ModuleSpec]) -> dict[str, dict[ModuleSpec, int]]:
    return {n: {c: stored_bytes(c, shape, dtype_bytes) for c in candidates} for n, shape in shapes.items()}


def bits_range(shapes: dict[str, tuple[int, int]], dtype_bytes: int) -> tuple[float, float]:
    """(smallest, largest) bits per weight an allocation over these linears can have."""
    sizes = candidate_bytes(shapes, dtype_bytes, candidate_specs())
    params = sum(k * n for k, n in shapes.values())
    lo = sum(min(s.values()) for s in sizes.values())
    hi = sum(max(s.values()) for s in sizes.values())
    return 8 * lo / params, 8 * hi / params


def bits_problem(bits: float, shapes: dict[str, tuple[int, int]], dtype_bytes: int) -> str | None:
    """Why `bits_per_weight: bits` cannot be met for these linears (None when it can)."""
    lo, _ = bits_range(shapes, dtype_bytes)
    if bits + 1e-9 < lo:
        return (f"bits_per_weight {bits:g} is below the smallest allocation of this model's linears, "
                f"{lo:.3f} bits per weight (every linear at its smallest setting, codes + scales); "
                f"expected at least {lo:.3f}")
    return None


# -- the allocation ----------------------------------------------------------------------


def _hull(options: list[tuple[int, float, ModuleSpec]]) -> list[tuple[int, float, ModuleSpec]]:
    """The lower convex hull of (bytes, cost) options, by increasing bytes: the candidates
    a greedy by cost removed per byte can reach."""
    options = sorted(options, key=lambda o: (o[0], o[1]))
    pts: list[tuple[int, float, ModuleSpec]] = []
    for o in options:
        if pts and o[1] >= pts[-1][1]:
            continue  # dominated: no cheaper than a smaller option
        while len(pts) >= 2:
            (b1, c1, _), (b2, c2, _) = pts[-2], pts[-1]
            # drop pts[-1] if it lies on or above the segment pts[-2] → o
            if (c2 - c1) * (o[0] - b1) >= (o[1] - c1) * (b2 - b1):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def allocate(costs: dict[str, dict[ModuleSpec, float]], sizes: dict[str, dict[ModuleSpec, int]],
             budget_bytes: float) -> dict[str, ModuleSpec]:
    """Per linear the candidate minimising the total cost with total bytes ≤ budget
    (greedy over the convex hulls). Raises ValueError when even the smallest does not fit."""
    hulls = {n: _hull([(sizes[n][c], float(costs[n][c]), c) for c in costs[n]]) for n in costs}
    at = {n: 0 for n in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget_bytes:
        raise ValueError(f"the smallest allocation takes {used} bytes, over the budget of {int(budget_bytes)}")
    heap = []

    def push(n):
        h, i = hulls[n], at[n]
        if i + 1 < len(h):
            db, dc = h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1]
            heapq.heappush(heap, (-dc / db, n, i))

    for n in hulls:
        push(n)
    while heap:
        _, n, i = heapq.heappop(heap)
        h = hulls[n]
        step = h[i + 1][0] - h[i][0]
        if used + step > budget_bytes:
            continue  # this linear's later upgrades are larger still
        used += step
        at[n] = i + 1
        push(n)
    return {n: hulls[n][at[n]][2] for n in hulls}


def as_quantization(alloc: dict[str, ModuleSpec], calibration: dict) -> dict:
    """The allocation as a `quantization:` section: `weights` = the most common setting,
    one exact-name override per module that differs."""
    base, _ = Counter(alloc.values()).most_common(1)[0]
    overrides = [{"match": module_name(n), **spec_override(s)} for n, s in alloc.items() if s != base]
    return {"weights": {**spec_override(base), "algorithm": "rtn"}, "overrides": overrides,
            "calibration": calibration}


# -- sensitivity -------------------------------------------------------------------------


def input_moments(model_path, tokens, weight_names, *, kv_heads: int, head_dim: int, work_dir,
                  threads: int | None = None) -> dict[str, "np.ndarray"]:  # noqa: F821
    """weight name -> E[x²] per input channel of its linear, over `tokens` [N, S] run
    through the float32 graph at `model_path` (every linear input in one pass)."""
    import numpy as np

    from llmbuild.quantize.calibration import GraphSlices, _feeds, _session

    slices = GraphSlices(model_path, lambda name: False)
    act_of = {}
    for layer in [*range(slices.num_layers), None]:
        act_of |= {w: a for w, a in slices.linear_inputs(layer).items() if w in weight_names}
    missing = sorted(set(weight_names) - set(act_of))
    if missing:
        raise ValueError(f"no annotated linear reads {missing[:3]}")
    acts = sorted(set(act_of.values()))
    path, _ = slices.slice(acts, None, work_dir / "moments.onnx")
    sess = _session(path, threads)
    n, s = tokens.shape
    sums: dict[str, np.ndarray] = {}
    c0, chunk = 0, 1  # one sequence first, then chunks sized to the memory allowance
    while c0 < n:
        outs = sess.run(acts, _feeds(sess, tokens[c0:c0 + chunk], kv_heads, head_dim))
        for a, x in zip(acts, outs):
            x = x.reshape(-1, x.shape[-1])
            sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
            sums[a] = sq if a not in sums else sums[a] + sq
        c0 += chunk
        chunk = max(1, MOMENT_CHUNK_BYTES // max(1, sum(o.nbytes for o in outs) // chunk))
        del outs
    rows = n * s
    return {w: (sums[a] / rows).astype(np.float32) for w, a in act_of.items()}


def sensitivities(weights: Callable[[str], "np.ndarray"], moments: dict, candidates: list[ModuleSpec],  # noqa: F821
                  scale_dtype) -> dict[str, dict[ModuleSpec, float]]:
    """weight name -> candidate -> Σᵢ E[xᵢ²]·‖ΔWᵢ‖² (ΔW: the candidate's rounding error)."""
    import numpy as np

    out = {}
    for name, d in moments.items():
        w = np.asarray(weights(name), np.float32)
        costs = {}
        for c in candidates:
            if c.scheme == "none":
                costs[c] = 0.0
                continue
            err = c.make().quantize(w, scale_dtype).dequantize() - w
            costs[c] = float(np.dot(d.astype(np.float64), np.einsum("ij,ij->i", err, err, dtype=np.float64)))
        out[name] = costs
    return out


# -- the quantize stage's use ------------------------------------------------------------


@dataclass
class Allocation:
    quantization: dict  # weights + overrides + calibration: what the rest of the stage applies
    record: dict  # the manifest's quantization.allocation


def allocation_record(target: dict, alloc: dict[str, ModuleSpec], costs, sizes, shapes) -> dict:
    params = sum(k * n for k, n in (shapes[x] for x in alloc))
    total = sum(sizes[n][s] for n, s in alloc.items())
    return {
        "target": {k: v for k, v in target.items() if v is not None},
        "bits_per_weight": round(8 * total / params, 4),
        "linear_weight_bytes": int(total),
        "linear_parameters": int(params),
        "sensitivity": float(sum(costs[n][s] for n, s in alloc.items())),
        "schemes": dict(Counter(spec_key(s) for s in alloc.values())),
        "modules": {module_name(n): spec_key(s) for n, s in alloc.items()},
        "outside_budget": "the embedding (and an lm_head tied to it) keep the graph dtype",
    }


def allocate_target(job, source, recipe, work_dir, rep=None, threads: int | None = None) -> Allocation:
    """Measure the sensitivities of the job's linears and allocate to `quantization.target`."""
    from llmbuild.quantize.stage import _base_dir, _null_stage, calibration_tokens, reference_graph

    rd = recipe.to_dict()
    q = rd["quantization"]
    target, cal = q["target"], dict(q["calibration"])
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stage = rep.stage("sensitivity") if rep is not None else _null_stage()
    with stage as update:
        tokens = calibration_tokens(source, {**cal, "samples": target["samples"]}, _base_dir(recipe), work_dir)
        ref = reference_graph(source, work_dir, max(rd["limits"]["max_seq_len"], cal["seq_len"]))
        names = list(job.shapes)
        update(0, 2, "input moments")
        moments = input_moments(ref, tokens, names, kv_heads=job.dims.kv_heads, head_dim=job.dims.head_dim,
                                work_dir=ref.parent, threads=threads)
        t_moments = time.perf_counter() - t0
        update(1, 2, "rounding errors")
        candidates = candidate_specs()
        costs = sensitivities(lambda n: job.loaders[n](), moments, candidates, job.scale_dtype)
        update(2, 2, "done")
    t_sens = time.perf_counter() - t0
    sizes = candidate_bytes(job.shapes, job.itemsize, candidates)
    params = sum(k * n for k, n in job.shapes.values())
    measured = None
    if target.get("bits_per_weight") is not None:
        problem = bits_problem(target["bits_per_weight"], job.shapes, job.itemsize)
        if problem:
            raise UserError(f"quantization.target.bits_per_weight: {problem}")
        alloc = allocate(costs, sizes, target["bits_per_weight"] * params / 8)
    else:
        alloc, measured = _bisect(job, source, recipe, work_dir, costs, sizes, params, ref, rep, threads)
    record = allocation_record(target, alloc, costs, sizes, job.shapes)
    record["seconds"] = {"input_moments": round(t_moments, 2), "sensitivity": round(t_sens, 2),
                         "total": round(time.perf_counter() - t0, 2)}
    record["calibration"] = {"dataset": cal["dataset"], "samples": int(tokens.shape[0]),
                             "seq_len": int(tokens.shape[1])}
    record["candidates"] = [spec_key(c) for c in candidates]
    if measured is not None:
        record["search"] = measured
    return Allocation(as_quantization(alloc, cal), record)


def _bisect(job, source, recipe, work_dir, costs, sizes, params, ref, rep, threads):
    """max_perplexity_increase: bisect the bits-per-weight budget between the smallest
    allocation and the unquantized linears (which meet any limit); each allocation's
    perplexity increase is measured on the accuracy gate's evaluation text with its
    dequantized weights fed to the float32 graph. Returns (the cheapest allocation that
    meets the limit, the search record)."""
    from llmbuild.eval import evaluate_runners
    from llmbuild.eval.runners import OrtGraphRunner
    from llmbuild.quantize.stage import gate_chunks

    rd = recipe.to_dict()
    limit = rd["quantization"]["target"]["max_perplexity_increase"]
    lo, hi = bits_range(job.shapes, job.itemsize)
    chunks = gate_chunks(recipe, work_dir / "tokenizer")
    runner, reference = FedWeightsRunner(ref, list(job.shapes), threads), OrtGraphRunner(ref, threads)
    trials, seen = [], {}

    def measure(bits):
        alloc = allocate(costs, sizes, bits * params / 8)
        key = tuple(sorted((n, spec_key(s)) for n, s in alloc.items()))
        if key not in seen:
            runner.set_weights({n: _dequantized(job, n, s) for n, s in alloc.items()})
            m = evaluate_runners(runner, reference, chunks)
            total = sum(sizes[n][s] for n, s in alloc.items())
            seen[key] = m["perplexity_increase"] <= limit
            trials.append({"budget_bits_per_weight": round(bits, 4), "bits_per_weight": round(8 * total / params, 4),
                           "perplexity_increase": m["perplexity_increase"], "kl_divergence": m["kl_divergence"],
                           "top1_agreement": m["top1_agreement"], "passed": seen[key]})
            if rep is not None:
                rep.log(f"allocation at {8 * total / params:.3f} bits per weight: perplexity"
                        f" {m['perplexity_increase']:+.2%}, KL {m['kl_divergence']:.4f}")
        return alloc, seen[key]

    try:
        best = allocate(costs, sizes, hi * params / 8)
        alloc, ok = measure(lo)
        if ok:
            best = alloc
        else:
            a, b = lo, hi
            for _ in range(BISECT_STEPS):
                if b - a <= BISECT_RESOLUTION:
                    break
                mid = (a + b) / 2
                alloc, ok = measure(mid)
                if ok:
                    best, b = alloc, mid
                else:
                    a = mid
    finally:
        runner.close()
        reference.close()
    return best, {"max_perplexity_increase": limit, "positions": int(chunks.shape[0] * (chunks.shape[1] - 1)),
                  "trials": trials}


def _dequantized(job, name, spec):
    import numpy as np

    w = np.asarray(job.loaders[name](), np.float32)
    if spec.scheme == "none":
        return w
    return spec.make().quantize(w, job.scale_dtype).dequantize()


class FedWeightsRunner:
    """The float32 graph on ONNX Runtime with the named linear weights as inputs: the
    logits of any allocation's dequantized weights from one session."""

    def __init__(self, model_path, weight_names: list[str], threads: int | None = None):
        from llmbuild.graph import io
        from llmbuild.quantize.calibration import GraphSlices, _session

        names = set(weight_names)
        slices = GraphSlices(model_path, lambda v: v in names)
        path, self.inputs = slices.slice([io.LOGITS], None, model_path.parent / "fed-weights.onnx",
                                         lambda v: v in names)
        self.session = _session(path, threads)
        self.path = path
        self.weights: dict = {}

    def set_weights(self, weights: dict) -> None:
        self.weights = weights

    def logits(self, ids):
        import numpy as np

        from llmbuild.graph import io

        s = len(ids)
        pos = np.arange(s, dtype=np.int64)[None]
        feeds = {}
        for inp in self.session.get_inputs():
            if inp.name in self.inputs:
                feeds[inp.name] = self.weights[inp.name]
            elif inp.name == io.INPUT_IDS:
                feeds[inp.name] = np.asarray(ids, np.int64)[None]
            elif inp.name in (io.POSITION_IDS, io.LOGITS_INDICES):
                feeds[inp.name] = pos
            elif inp.name == io.WRITE_INDICES:
                feeds[inp.name] = np.zeros(1, np.int64)
            else:  # a KV cache
                feeds[inp.name] = np.zeros((1, int(inp.shape[1]), s, int(inp.shape[3])), np.float32)
        return self.session.run([io.LOGITS], feeds)[0][0]

    def close(self) -> None:
        self.session = None
