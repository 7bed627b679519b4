"""Automatic bit allocation: `quantization: {target: ...}` chooses every linear's scheme.

    quantization:
      target: {bits_per_weight: 4.5}            # or {max_perplexity_increase: 0.05}

1. **Candidates**: every setting of the scheme registry that needs no calibration
   (round to nearest; fp8 quantizes activations and is left out): `none` (the graph
   dtype), int8 per channel and per block, int4 at each of its group sizes, blocks
   symmetric or not, scales in the graph dtype or as 8-bit codes (`scale_bits`) — enumerated from `schemes.SCHEMES` (a scheme's `GROUP_SIZES` and whether it takes
   `symmetric`), so a scheme or group size registered there is a candidate too. Their
   sizes are `plan.stored_bytes` (what the graph stores).
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

This module imports nothing heavy at import time; `plan` and `validate` of a recipe with
a `target` use its size arithmetic, which imports the scheme registry (numpy).
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
# The proxy's scale per linear: KL measured on the linears of this many layers per role,
# over the first GAIN_TOKENS tokens of this many calibration sequences.
GAIN_LAYERS = 3
GAIN_SEQUENCES = 1
GAIN_TOKENS = 128


def candidate_specs(algorithm: str = "rtn") -> list[ModuleSpec]:
    """Every distinct setting of the scheme registry (llmbuild.quantize.schemes.SCHEMES, and
    `none`) that needs no calibration: each scheme at each of its `GROUP_SIZES` and, if its
    constructor takes `symmetric`, both ways (and each of its `SCALE_BITS`); normalised as
    an override would resolve. `algorithm` (target.algorithm): the settings its int4
    linears will be quantized with can take (GPTQ: no 8-bit scale codes, quantize.plan)."""
    import inspect

    from llmbuild.quantize.schemes import SCHEMES  # numpy: only for a recipe with a target

    found: list[ModuleSpec] = []
    for name, cls in SCHEMES.items():
        params = inspect.signature(cls.__init__).parameters
        groups = (*getattr(cls, "GROUP_SIZES", ()), None) if "group_size" in params else (None,)
        if "group_size" in params and params["group_size"].default is not None:
            groups = groups[:-1]  # no per-channel setting (int4: blocks of 128 by default)
        for group in groups:
            for sym in (True, False) if "symmetric" in params else (True,):
                for bits in getattr(cls, "SCALE_BITS", (None,)) if "scale_bits" in params else (None,):
                    ov = {"match": "x", "scheme": name, "group_size": group, "symmetric": sym, "scale_bits": bits}
                    spec = resolve_plan({"weights": {"scheme": "none"}, "overrides": [ov]}, ["x.weight"], 1)["x.weight"]
                    if algorithm == "gptq" and spec.scale_bits is not None:
                        continue
                    if not spec.calibrated and spec not in found:
                        found.append(spec)
    return [*found, ModuleSpec("none")]


def spec_override(spec: ModuleSpec) -> dict:
    """The override keys that give a module `spec`."""
    ov = {"scheme": spec.scheme}
    if spec.scheme == "int4":
        ov |= {"group_size": spec.group_size, "symmetric": spec.symmetric, "scale_bits": spec.scale_bits or 16}
    elif spec.scheme == "int8" and spec.group_size is not None:
        ov |= {"group_size": spec.group_size, "symmetric": spec.symmetric}
    return ov


def spec_key(spec: ModuleSpec) -> str:
    """A short stable name: none, int8 (per channel), int8-g32, int8-g32-asym, int4-g32-sym …"""
    if spec.scheme == "int4":
        return f"int4-g{spec.group_size}-{'sym' if spec.symmetric else 'asym'}" + ("-s8" if spec.scale_bits else "")
    if spec.scheme == "int8" and spec.group_size is not None:
        return f"int8-g{spec.group_size}" + ("" if spec.symmetric else "-asym")
    return spec.scheme


def candidate_bytes(shapes: dict[str, tuple[int, int]], dtype_bytes: int,
                    candidates: list[ModuleSpec]) -> dict[str, dict[ModuleSpec, int]]:
    return {n: {c: stored_bytes(c, shape, dtype_bytes) for c in candidates} for n, shape in shapes.items()}


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """HF name -> (in, out) of every linear (MatMul) weight of the graph, from the
    architecture spec's table (no weights read)."""
    from llmbuild.models import spec_for

    spec = spec_for(config, check=False)
    return {name: (w.in_features, w.out_features) for name, w in spec.linear_weights(spec.dims(config)).items()}


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


def as_quantization(alloc: dict[str, ModuleSpec], calibration: dict, algorithm: str = "rtn") -> dict:
    """The allocation as a `quantization:` section: `weights` = the most common setting,
    one exact-name override per module that differs. `algorithm` (target.algorithm): how
    the int4 modules are quantized (rtn, or calibrated awq / gptq on the allocated
    settings; int8 and `none` are round-to-nearest whatever it says, as in any plan)."""
    base, _ = Counter(alloc.values()).most_common(1)[0]
    alg = {"algorithm": algorithm}
    overrides = [{"match": module_name(n), **spec_override(s), **alg} for n, s in alloc.items() if s != base]
    weights = {k: v for k, v in spec_override(base).items() if (k, v) != ("scale_bits", 16)}  # 16: the default
    return {"weights": {**weights, **alg}, "overrides": overrides, "calibration": calibration}


# -- sensitivity -------------------------------------------------------------------------


def graph_slices(model_path):
    """The float32 graph's linears as the graph blocks annotated them (weight, role, layer)."""
    from llmbuild.quantize.calibration import GraphSlices

    return GraphSlices(model_path, lambda name: True)


def input_moments(slices, tokens, weight_names, *, kv_heads: int, head_dim: int, work_dir,
                  threads: int | None = None) -> dict[str, "np.ndarray"]:  # noqa: F821
    """weight name -> E[x²] per input channel of its linear, over `tokens` [N, S] run
    through the float32 graph of `slices` (every linear input in one pass)."""
    import numpy as np

    from llmbuild.quantize.calibration import decoder_feeds, ort_session

    act_of = {}
    for layer in [*range(slices.num_layers), None]:
        act_of |= {w: a for w, a in slices.linear_inputs(layer).items() if w in weight_names}
    missing = sorted(set(weight_names) - set(act_of))
    if missing:
        raise ValueError(f"no annotated linear reads {missing[:3]}")
    acts = sorted(set(act_of.values()))
    path, _ = slices.slice(acts, None, work_dir / "moments.onnx")
    sess = ort_session(path, threads)
    n, s = tokens.shape
    sums: dict[str, np.ndarray] = {}
    c0, chunk = 0, 1  # one sequence first, then chunks sized to the memory allowance
    while c0 < n:
        outs = sess.run(acts, decoder_feeds(sess, tokens[c0:c0 + chunk], kv_heads, head_dim))
        for a, x in zip(acts, outs):
            x = x.reshape(-1, x.shape[-1])
            sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
            sums[a] = sq if a not in sums else sums[a] + sq
        c0 += chunk
        chunk = max(1, MOMENT_CHUNK_BYTES // max(1, sum(o.nbytes for o in outs) // chunk))
        del outs
    rows = n * s
    return {w: (sums[a] / rows).astype(np.float32) for w, a in act_of.items()}


def proxy_costs(weights: Callable[[str], "np.ndarray"], moments: dict, candidates: list[ModuleSpec],  # noqa: F821
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


def single_linear_kl(slices, tokens, weights: Callable[[str], "np.ndarray"], names: list[str],  # noqa: F821
                     trials: dict[str, list[ModuleSpec]], scale_dtype, threads: int | None = None) -> dict:
    """weight name -> candidate -> mean KL(p_float ‖ p) per token of the logits over
    `tokens` [N, S] when that linear alone is quantized as the candidate (`trials`: which
    candidates of which linears; one forward pass each). `names`: every linear weight."""
    import numpy as np

    from llmbuild.eval import log_softmax

    runner = FedWeightsRunner(slices, names, threads)
    floats = {n: np.asarray(weights(n), np.float32) for n in names}
    try:
        runner.set_weights(floats)
        ref = [log_softmax(runner.logits(ids)) for ids in tokens]
        out = {}
        for n, cands in trials.items():
            out[n] = {}
            for c in cands:
                if c.scheme == "none":
                    out[n][c] = 0.0
                    continue
                runner.set_weights({**floats, n: c.make().quantize(floats[n], scale_dtype).dequantize()})
                kl = 0.0
                for ids, lp_ref in zip(tokens, ref):
                    lp = log_softmax(runner.logits(ids))
                    kl += float((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1).mean())
                out[n][c] = max(kl / len(tokens), 0.0)
    finally:
        runner.close()
    return out


def gain_probes(slices, names: list[str], layers: int = GAIN_LAYERS) -> list[str]:
    """The linears whose KL is measured to scale the proxy: per role the graph blocks
    annotated (q, o, down, …), those of `layers` layers spread over the depth (first and
    last included); linears outside the layers (an lm_head) always."""
    import numpy as np

    by_role: dict[str, dict[int, list[str]]] = {}
    probes = []
    for n in names:
        role, layer = slices.role_of.get(n), slices.weight_layer(n)
        if role is None or layer is None:
            probes.append(n)
        else:
            by_role.setdefault(role, {}).setdefault(layer, []).append(n)
    for per_layer in by_role.values():
        present = sorted(per_layer)
        picks = {present[int(i)] for i in np.unique(np.round(np.linspace(0, len(present) - 1, layers)))}
        probes += [n for layer in sorted(picks) for n in per_layer[layer]]
    return probes


def calibrated_costs(proxy: dict, probe_kl: dict, slices) -> tuple[dict, dict[str, float]]:
    """Scale each linear's proxy costs by its gain KL / proxy, measured on the probe linears
    (`probe_kl`: name -> {candidate: KL}) and interpolated in log over the layers of the same
    role for the others. Returns (costs, gain per linear)."""
    import numpy as np

    gains = {}
    for n, kl in probe_kl.items():
        [(c, v)] = kl.items()
        gains[n] = v / proxy[n][c] if proxy[n][c] > 0 else 0.0
    for n in proxy:
        if n in gains:
            continue
        role, layer = slices.role_of.get(n), slices.weight_layer(n)
        known = sorted((slices.weight_layer(m), g) for m, g in gains.items()
                       if slices.role_of.get(m) == role and slices.weight_layer(m) is not None)
        xs, ys = [k[0] for k in known], [np.log(max(k[1], 1e-30)) for k in known]
        gains[n] = float(np.exp(np.interp(layer, xs, ys)))
    return {n: {c: v * gains[n] for c, v in costs.items()} for n, costs in proxy.items()}, gains


def sensitivities(slices, tokens, weights: Callable[[str], "np.ndarray"], names: list[str],  # noqa: F821
                  candidates: list[ModuleSpec], scale_dtype, *, kv_heads: int, head_dim: int, work_dir,
                  gain_sequences: int = GAIN_SEQUENCES, gain_tokens: int = GAIN_TOKENS,
                  threads: int | None = None) -> tuple[dict, dict]:
    """weight name -> candidate -> estimated KL of quantizing that linear alone: the proxy
    (E[x²]-weighted rounding error, over every sequence of `tokens`) times the linear's gain
    (its measured KL / proxy for its coarsest candidate on the probe linears, over the first
    `gain_tokens` tokens of the first `gain_sequences` sequences). Returns (costs, report)."""
    t0 = time.perf_counter()
    moments = input_moments(slices, tokens, names, kv_heads=kv_heads, head_dim=head_dim, work_dir=work_dir,
                            threads=threads)
    t1 = time.perf_counter()
    proxy = proxy_costs(weights, moments, candidates, scale_dtype)
    t2 = time.perf_counter()
    probes = gain_probes(slices, names)
    coarsest = {n: [max((c for c in candidates if c.scheme != "none"), key=lambda c: proxy[n][c])]
                for n in probes}
    probe_tokens = tokens[:gain_sequences, :gain_tokens]
    probe_kl = single_linear_kl(slices, probe_tokens, weights, names, coarsest, scale_dtype, threads)
    costs, gains = calibrated_costs(proxy, probe_kl, slices)
    t3 = time.perf_counter()
    by_role: dict[str, list[float]] = {}
    for n, g in gains.items():
        by_role.setdefault(slices.role_of.get(n) or module_name(n), []).append(g)
    report = {"seconds": {"input_moments": round(t1 - t0, 2), "rounding_errors": round(t2 - t1, 2),
                          "gains": round(t3 - t2, 2)},
              "gain_probes": len(probes), "gain_tokens": [int(d) for d in probe_tokens.shape],
              "median_gain_by_role": {r: float(sorted(v)[len(v) // 2]) for r, v in by_role.items()}}
    return costs, report


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


def allocate_target(job, target: dict, calibration: dict, prepare: Callable, eval_chunks: Callable, stage,
                    rep=None, threads: int | None = None) -> Allocation:
    """Measure the sensitivities of the quantize job's linears and allocate to `target`.
    `prepare()` -> (calibration tokens [target.samples, seq_len], the float32 reference
    graph's path); `eval_chunks()` -> the accuracy gate's token chunks; `stage`: the
    progress stage to report in (the quantize stage provides all three)."""
    cal = dict(calibration)
    t0 = time.perf_counter()
    with stage as update:
        tokens, ref = prepare()
        t_ref = time.perf_counter() - t0
        update(0, 1, "sensitivities")
        slices = graph_slices(ref)
        candidates = candidate_specs(target.get("algorithm") or "rtn")
        costs, report = sensitivities(slices, tokens, lambda n: job.loaders[n](), list(job.shapes), candidates,
                                      job.scale_dtype, kv_heads=job.dims.kv_heads, head_dim=job.dims.head_dim,
                                      work_dir=ref.parent, threads=threads)
        update(1, 1, "done")
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
        alloc, measured = _bisect(job, target["max_perplexity_increase"], eval_chunks(), costs, sizes, params,
                                  slices, ref, rep, threads)
    record = allocation_record(target, alloc, costs, sizes, job.shapes)
    record["seconds"] = {"reference_graph": round(t_ref, 2), **report.pop("seconds"),
                         "sensitivity": round(t_sens - t_ref, 2), "total": round(time.perf_counter() - t0, 2)}
    record["sensitivity_model"] = report
    record["calibration"] = {"dataset": cal["dataset"], "samples": int(tokens.shape[0]),
                             "seq_len": int(tokens.shape[1])}
    record["candidates"] = [spec_key(c) for c in candidates]
    if measured is not None:
        record["search"] = measured
    return Allocation(as_quantization(alloc, cal, target.get("algorithm") or "rtn"), record)


def bisect_budget(lo: float, hi: float, passes: Callable[[float], bool], steps: int = BISECT_STEPS,
                  resolution: float = BISECT_RESOLUTION) -> float:
    """The smallest budget in [lo, hi] found to pass, by bisection (`hi` is taken to pass:
    the unquantized linears; `passes` is assumed monotone). `lo` is tried first."""
    if passes(lo):
        return lo
    a, b = lo, hi
    for _ in range(steps):
        if b - a <= resolution:
            break
        mid = (a + b) / 2
        if passes(mid):
            b = mid
        else:
            a = mid
    return b


def _bisect(job, limit, chunks, costs, sizes, params, slices, ref, rep, threads):
    """max_perplexity_increase: bisect the bits-per-weight budget between the smallest
    allocation and the unquantized linears (which meet any limit); each allocation's
    perplexity increase is measured on the accuracy gate's evaluation text with its
    dequantized weights fed to the float32 graph. Returns (the cheapest allocation that
    meets the limit, the search record)."""
    from llmbuild.eval import evaluate_runners
    from llmbuild.eval.runners import OrtGraphRunner
    lo, hi = bits_range(job.shapes, job.itemsize)
    runner, reference = FedWeightsRunner(slices, list(job.shapes), threads), OrtGraphRunner(ref, threads)
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
        bits = bisect_budget(lo, hi, lambda b: measure(b)[1])
    finally:
        runner.close()
        reference.close()
    return allocate(costs, sizes, bits * params / 8), {"max_perplexity_increase": limit, "positions": int(chunks.shape[0] * (chunks.shape[1] - 1)),
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

    def __init__(self, slices, weight_names: list[str], threads: int | None = None):
        from llmbuild.graph import io
        from llmbuild.quantize.calibration import ort_session

        names = set(weight_names)
        path, self.inputs = slices.slice([io.LOGITS], None, slices.path.parent / "fed-weights.onnx",
                                         lambda v: v in names)
        self.session = ort_session(path, threads)
        self.path = path
        self.weights: dict = {}

    def set_weights(self, weights: dict) -> None:
        self.weights = weights

    def logits(self, ids):
        import numpy as np

        from llmbuild.graph import io
        from llmbuild.quantize.calibration import decoder_feeds

        past = next(i for i in self.session.get_inputs() if i.name.startswith("past_key"))
        feeds = decoder_feeds(self.session, np.asarray(ids, np.int64)[None], int(past.shape[1]), int(past.shape[3]))
        feeds |= {name: self.weights[name] for name in self.inputs}
        return self.session.run([io.LOGITS], feeds)[0][0]

    def close(self) -> None:
        self.session = None
