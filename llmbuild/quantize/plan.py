"""Which linear weight gets which scheme: the recipe's `quantization:` section resolved
against the graph's linear weights, and a readable summary of the result.

    quantization:
      weights: {scheme: int4, algorithm: awq, group_size: 128}
      overrides:
        - {match: "lm_head", scheme: none}            # glob on the module name
        - {layers: [0, -1], scheme: int8}             # first and last decoder layer
        - {match: "*.mlp.down_proj", group_size: 64}  # unset keys inherit

A module name is the weight's HF name without `.weight` (`model.layers.3.mlp.down_proj`).
Overrides apply in order; a later one wins. Only linear (MatMul) weights are
quantized: embeddings always keep the graph dtype. An lm_head tied to the embedding
does too, unless an override's `match` names it (`{match: lm_head, scheme: int8}`):
it then gets its own transposed copy of the embedding, quantized round-to-nearest
(llmbuild.quantize.graph.untie_lm_head), while the embedding lookup keeps the
unquantized table.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace

from llmbuild.models.spec import layer_index

ALGORITHMS = ("rtn", "awq", "gptq")


@dataclass(frozen=True)
class ModuleSpec:
    scheme: str  # a SCHEMES name or "none"
    algorithm: str = "rtn"
    group_size: int | None = None
    symmetric: bool = True
    scale_bits: int | None = None  # int4: 8 = scales (+ offsets) as 8-bit codes (schemes.coded_params)

    def make(self):
        from llmbuild.quantize.schemes import make_scheme  # numpy: not needed to plan or validate

        return make_scheme(self.scheme, group_size=self.group_size, symmetric=self.symmetric,
                           scale_bits=self.scale_bits)

    @property
    def label(self) -> str:
        if self.scheme == "none":
            return "none (graph dtype)"
        s = self.make().describe()
        return s if self.algorithm == "rtn" else f"{s} {self.algorithm}"

    @property
    def calibrated(self) -> bool:
        return self.scheme == "fp8" or self.algorithm in ("awq", "gptq")


def stored_bytes(spec: ModuleSpec, shape: tuple[int, int], dtype_bytes: int) -> int:
    """Bytes the weight takes in the graph: codes (padded to whole blocks) + scales
    (+ asymmetric int4/int8's offsets and the [G, 1, G] identity its block indicator is
    made from, counted per weight though the linears reading the same input share one)."""
    k, n = shape
    if spec.scheme == "none":
        return k * n * dtype_bytes
    if spec.scheme == "fp8":
        return k * n + dtype_bytes
    if spec.group_size is None:  # int8 per channel
        return k * n + n * dtype_bytes
    g = -(-k // spec.group_size)
    kp = g * spec.group_size  # stored padded to whole blocks
    codes = kp * n if spec.scheme == "int8" else (kp * n + 1) // 2
    # per block: a scale (+ an offset) in the graph dtype, or 8-bit codes + a float32 step per column
    per_block = g * n * dtype_bytes if spec.scale_bits is None else g * n + 4 * n
    extra = per_block + g * g * dtype_bytes if not spec.symmetric else 0  # offsets + the indicator's identity
    return codes + per_block + extra


def bits_per_weight(spec: ModuleSpec, shape: tuple[int, int], dtype_bytes: int) -> float:
    """The scheme's bits per weight as llama.cpp counts them: codes + scales (+ offsets),
    scales and offsets in the graph dtype, no padding (int4 g32 sym = 4.5 at 16 bits, like
    Q4_0; asym 5.0, like Q4_1; int8 g32 = 8.5, like Q8_0; int8 g32 asym 9.0)."""
    k, n = shape
    scale_bits = 8 * dtype_bytes
    if spec.scheme == "none":
        return float(scale_bits)
    if spec.scheme == "fp8":
        return 8 + scale_bits / (k * n)
    if spec.group_size is None:
        return 8 + scale_bits / k
    code_bits = 8 if spec.scheme == "int8" else 4
    tables = 1 if spec.symmetric else 2  # scales (+ offsets)
    if spec.scale_bits is not None:  # 8-bit codes per block + a float32 step per column
        return code_bits + tables * (8 * (-(-k // spec.group_size)) + 32) / k
    return code_bits + tables * scale_bits * (-(-k // spec.group_size)) / k


def module_name(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def resolved_symmetric(scheme: str, group_size: int | None, symmetric: bool) -> bool:
    """The `symmetric` a module resolves to: int8 per output channel (no group_size) is
    symmetric only, so an asymmetric request there resolves symmetric (the recipe schema
    refuses it in `weights:`, and `schemes.Int8` refuses to be built so; an override may
    inherit the missing group_size). Any other setting keeps `symmetric`."""
    return symmetric or (scheme == "int8" and group_size is None)


def resolved_scale_bits(scheme: str, scale_bits: int | None) -> int | None:
    """The `scale_bits` a module resolves to: 8 (int4's scales as 8-bit codes) or None,
    the graph dtype, which a recipe writes as 16 (or leaves out); other schemes have none."""
    return scale_bits if scheme == "int4" and scale_bits not in (None, 16) else None


def default_spec(weights: dict) -> ModuleSpec:
    scheme = weights["scheme"]
    group_size = (weights.get("group_size") or 128) if scheme == "int4" else (
        weights.get("group_size") if scheme == "int8" else None)
    return ModuleSpec(
        scheme=scheme,
        algorithm=weights.get("algorithm") or "rtn",
        group_size=group_size,
        symmetric=resolved_symmetric(scheme, group_size, weights.get("symmetric") is not False),
        scale_bits=resolved_scale_bits(scheme, weights.get("scale_bits")),
    )


def resolve_plan(quantization: dict, weight_names: list[str], num_layers: int) -> dict[str, ModuleSpec]:
    """weight name -> ModuleSpec for every linear weight of the graph."""
    base = default_spec(quantization["weights"])
    plan = {}
    for name in weight_names:
        spec = base
        module, layer = module_name(name), layer_index(name)
        for ov in quantization.get("overrides") or []:
            if not _matches(ov, module, layer, num_layers):
                continue
            changes = {k: ov[k] for k in ("scheme", "algorithm", "group_size", "symmetric", "scale_bits")
                       if ov.get(k) is not None}
            if "scheme" in changes and changes["scheme"] != spec.scheme:
                # A new scheme starts from its own defaults, not the other scheme's settings.
                spec = ModuleSpec(scheme=changes["scheme"], algorithm="rtn",
                                  group_size=128 if changes["scheme"] == "int4" else None)
            spec = replace(spec, **changes)
            spec = replace(spec, scale_bits=resolved_scale_bits(spec.scheme, spec.scale_bits))
            if spec.scheme == "int4" and spec.group_size is None:
                spec = replace(spec, group_size=128)
            if spec.scheme not in ("int4", "int8"):  # schemes without these settings
                spec = replace(spec, group_size=None, symmetric=True)
            spec = replace(spec, symmetric=resolved_symmetric(spec.scheme, spec.group_size, spec.symmetric))
            if spec.scheme in ("none", "fp8", "int8") and spec.algorithm != "rtn":
                spec = replace(spec, algorithm="rtn")
        if spec.algorithm == "gptq" and spec.scale_bits is not None:
            from llmbuild.errors import UserError

            raise UserError(f"quantization: {module}: scale_bits 8 does not apply to algorithm gptq (GPTQ fixes each"
                            " block's scale as it quantizes, before a column's 8-bit scale step is known); use rtn or"
                            " awq, or set scale_bits: 16 in that override")
        plan[name] = spec
    return plan


def tied_lm_head_spec(quantization: dict, num_layers: int, weight_name: str) -> tuple[ModuleSpec, int] | None:
    """For a model whose lm_head is tied to the embedding: (its spec, index of the last
    override naming it) when an override's `match` selects the lm_head's module name
    (`weight_name`, the architecture's untied lm_head weight: `ArchitectureSpec.lm_head`)
    with a scheme, else None (the tied lm_head stays in the graph dtype)."""
    module = module_name(weight_name)
    named = [i for i, ov in enumerate(quantization.get("overrides") or [])
             if ov.get("match") is not None and ov.get("layers") is None
             and fnmatch.fnmatchcase(module, ov["match"])]
    if not named:
        return None
    spec = resolve_plan(quantization, [weight_name], num_layers)[weight_name]
    return None if spec.scheme == "none" else (spec, named[-1])


def tied_lm_head_refusal(spec: ModuleSpec) -> str | None:
    """Why a tied lm_head cannot be quantized as `spec` (None when it can): its copy is
    quantized without calibration, which runs on the tied reference graph."""
    if not spec.calibrated:
        return None
    return ("this model's lm_head is tied to its embedding; it can be quantized round-to-nearest only "
            f"(scheme int8, or int4 with algorithm: rtn), not {spec.label}")


def unmatched_overrides(quantization: dict, weight_names: list[str], num_layers: int) -> list[int]:
    """Indices of overrides that select no linear weight (e.g. `{match: lm_head, scheme:
    none}` on a model whose lm_head is the tied embedding)."""
    return [i for i, ov in enumerate(quantization.get("overrides") or [])
            if not any(_matches(ov, module_name(n), layer_index(n), num_layers) for n in weight_names)]


def _matches(override: dict, module: str, layer: int | None, num_layers: int) -> bool:
    pattern = override.get("match")
    if pattern is not None and not fnmatch.fnmatchcase(module, pattern):
        return False
    layers = override.get("layers")
    if layers is not None:
        wanted = {i % num_layers for i in layers}
        if layer is None or layer not in wanted:
            return False
    return True


def mean_bits_per_weight(plan: dict[str, ModuleSpec], shapes: dict[str, tuple[int, int]], dtype_bytes: int) -> float:
    """Bits per weight over the linear weights of `plan` (`bits_per_weight`, weighted by size)."""
    bits = sum(bits_per_weight(spec, shapes[n], dtype_bytes) * shapes[n][0] * shapes[n][1] for n, spec in plan.items())
    return bits / max(1, sum(shapes[n][0] * shapes[n][1] for n in plan))


def summarize(plan: dict[str, ModuleSpec], shapes: dict[str, tuple[int, ...]], stored: dict[str, int],
              dtype_bytes: int = 2) -> dict:
    """JSON-able summary: per distinct setting, how many weights / parameters / bytes and
    its bits per weight (`bits_per_weight`), the linears' mean bits per weight, and the
    per-module list (compact: module name → label)."""
    groups: dict[str, dict] = {}
    for name, spec in plan.items():
        g = groups.setdefault(spec.label, {"setting": spec.label, "weights": 0, "parameters": 0, "bytes": 0,
                                           "bits": 0.0})
        n = 1
        for d in shapes[name]:
            n *= int(d)
        g["weights"] += 1
        g["parameters"] += n
        g["bytes"] += int(stored.get(name, 0))
        g["bits"] += bits_per_weight(spec, shapes[name], dtype_bytes) * n
    for g in groups.values():
        g["bits_per_weight"] = round(g.pop("bits") / max(1, g["parameters"]), 4)
    return {
        "groups": sorted(groups.values(), key=lambda g: -g["parameters"]),
        "bits_per_weight": round(mean_bits_per_weight(plan, shapes, dtype_bytes), 4),
        "modules": {module_name(n): spec.label for n, spec in plan.items()},
    }


def format_summary(summary: dict) -> str:
    """The summary as a small text table (compile's log, `llmbuild inspect`)."""
    lines = [f"{'setting':<34} {'weights':>7} {'params':>12} {'bytes':>12} {'bits/w':>7}"]
    for g in summary["groups"]:
        bpw = f"{g['bits_per_weight']:.2f}" if "bits_per_weight" in g else "-"
        lines.append(f"{g['setting']:<34} {g['weights']:>7} {g['parameters']:>12,} {g['bytes']:>12,} {bpw:>7}")
    return "\n".join(lines)
