"""A source whose fused tensors are served as their row blocks (Phi-3's `qkv_proj` as
q_proj / k_proj / v_proj, `gate_up_proj` as gate_proj / up_proj), as the architecture's
spec names them (`ArchitectureSpec.fused_tensors`). Splitting at the source keeps every
later stage (shape checks, graph, quantization, tensor-parallel sharding) on per-role
linears; the reasons are in llmbuild/models/phi3/spec.py.

    model.layers.<i>.self_attn.qkv_proj.weight [q + k + v, H]
        └─► ...q_proj.weight [q, H] = rows [0, q)   ...k_proj.weight = rows [q, q+k)   ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmbuild.models.spec import LAYER_PREFIX, layer_index
from llmbuild.source.base import ModelSource, TensorInfo, missing_tensor


class SplitSource(ModelSource):
    def __init__(self, inner: ModelSource, spec):
        self.inner, self.format, self.path, self.config = inner, inner.format, inner.path, inner.config
        sizes = spec.dims(inner.config).sizes()
        self._parts: dict[str, tuple[str, int, int]] = {}  # block name -> (fused name, start, stop)
        fused_names = set()
        for name in inner.names():
            if not name.startswith(LAYER_PREFIX):
                continue
            layer, _, rest = name[len(LAYER_PREFIX):].partition(".")
            module, _, kind = rest.rpartition(".")
            if module not in spec.fused_tensors:
                continue
            fused_names.add(name)
            start = 0
            for part, size in spec.fused_tensors[module]:
                stop = start + sizes[size]
                self._parts[f"{LAYER_PREFIX}{layer}.{part}.{kind}"] = (name, start, stop)
                start = stop
        self._names = [n for n in inner.names() if n not in fused_names] + list(self._parts)

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        if name not in self._parts:
            return self.inner.info(name)
        fused, start, stop = self._parts[name]
        info = self.inner.info(fused)
        # a fused tensor with too few rows gives a short block: the shape check names it
        rows = max(0, min(stop, info.shape[0]) - start) if info.shape else 0
        return TensorInfo((rows, *info.shape[1:]), info.dtype)

    def load(self, name: str) -> np.ndarray:
        if name not in self._parts:
            if name not in self._names:
                raise missing_tensor(name, self.path)
            return self.inner.load(name)
        fused, start, stop = self._parts[name]
        return np.ascontiguousarray(self.inner.load(fused)[start:stop])

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def export_tokenizer(self, dst_dir: Path) -> dict:
        return self.inner.export_tokenizer(dst_dir)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr):  # format-specific extras (e.g. a GGUF source's header)
        return getattr(self.inner, attr)


class StackedExpertsSource(SplitSource):
    """A source holding a mixture of experts' projections stacked (GGUF: `ffn_<proj>_exps`,
    [E, out, in], named by the spec as `<layer>.<experts>.<proj>.weight`), served as the
    per-expert HF tensors the spec reads (`<layer>.<experts>.<e>.<proj>.weight` = row e).
    The last stacked tensor read is kept, so building the graph's stacked initializer
    (expert 0, 1, ... in order) decodes each stacked tensor once."""

    def __init__(self, inner: ModelSource, spec):
        self.inner, self.format, self.path, self.config = inner, inner.format, inner.path, inner.config
        t = spec.experts
        stacked = {f"{t.stacked(proj)}.weight": proj for proj in ("gate", "up", "down")}
        self._experts: dict[str, tuple[str, int]] = {}  # per-expert name -> (stacked name, e)
        hidden = set()
        for name in inner.names():
            layer = layer_index(name)
            rest = name[len(spec.layer_prefix(layer)):] if layer is not None else None
            if rest not in stacked:
                continue
            hidden.add(name)
            for e in range(inner.info(name).shape[0]):
                self._experts[f"{spec.layer_prefix(layer)}{t.expert(e, stacked[rest])}.weight"] = (name, e)
        self._names = [n for n in inner.names() if n not in hidden] + list(self._experts)
        self._cached: tuple[str, np.ndarray] | None = None

    def info(self, name: str) -> TensorInfo:
        if name not in self._experts:
            return self.inner.info(name)
        stacked, _ = self._experts[name]
        info = self.inner.info(stacked)
        return TensorInfo(tuple(info.shape[1:]), info.dtype)

    def load(self, name: str) -> np.ndarray:
        if name not in self._experts:
            if name not in self._names:
                raise missing_tensor(name, self.path)
            return self.inner.load(name)
        stacked, e = self._experts[name]
        if self._cached is None or self._cached[0] != stacked:
            self._cached = (stacked, self.inner.load(stacked))
        return np.ascontiguousarray(self._cached[1][e])
