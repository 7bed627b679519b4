"""The packages of llmbuild/ form a DAG that follows the pipeline's layer order.

Every module of llmbuild/ is parsed with `ast` (nothing is imported). An import anywhere in
a module counts — at module level, inside a function, under `if TYPE_CHECKING:` — and so
does a string constant that names an llmbuild module exactly, or as `module:attribute`
(what `importlib.import_module` registries are written with), because each of them is a
dependency a reader has to follow.

Layers, low to high; a module may import its own top-level package and lower layers only
(two names in one layer are independent of each other):

    errors, progress, version, data   foundations: no llmbuild import at all
    artifact       the artifact contract: layout, manifest, integrity, atomic writer
    graph          the ONNX builder, blocks, annotations, I/O contract, export
    models         architecture specs + registry (pure Python) and their graph code
    source         HF directories and GGUF files read as lazy named tensors
    parallel       shard plans, rank graphs, all ranks merged into one graph (CPU simulation)
    lowering       every graph rewrite for ONNX Runtime on the CPU (fused, quantized)
    engine         TensorRT options, profiles, builds, engine cache, compatibility
    runtime        executors (tensor-parallel ones too), scheduler, generation
    verify         ONNX Runtime against the HF reference
    eval           perplexity / KL on held-out text
    quantize       schemes, calibration on our own graph, the quantization stage
    recipe         the typed recipe schema; validates against the registries below it
    plan           what a recipe will cost, without reading weights
    buildcache     the incremental-compile stage store
    compile        the pipeline
    llmbuild       the package facade `llmbuild/__init__.py` (`llmbuild.load`, `llmbuild.compile`)
    serve          the OpenAI-compatible server
    cli            the command line

Order notes (where the code showed a better place than a naive pipeline order):
- `lowering` sits below `engine` and `runtime` and above `parallel`: the runtime lowers the
  graph it loads; the lowering needs no executor. The quantized-graph rewrites it performs
  know the DequantizeLinear/MatMulNBits encodings only, not the quantization stage.
- `quantize` sits above `runtime`, `verify` and `eval`: calibration runs our own graph on
  ONNX Runtime and the accuracy gate is an eval.
- `recipe` sits above the stages: it validates a recipe against the registries that the
  stages own (architectures in models, schemes in quantize, backends and options in
  engine), and those registries import no stage above them.
- The facade `llmbuild/__init__.py` sits above compile and below its clients serve and
  cli: its `load`/`compile` import runtime and compile; `__version__` lives in
  `llmbuild/version.py` so that compile and buildcache can record it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmbuild"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "progress", "version", "data"),
    ("artifact",),
    ("graph",),
    ("models",),
    ("source",),
    ("parallel",),
    ("lowering",),
    ("engine",),
    ("runtime",),
    ("verify",),
    ("eval",),
    ("quantize",),
    ("recipe",),
    ("plan",),
    ("buildcache",),
    ("compile",),
    ("llmbuild",),
    ("serve",),
    ("cli",),
]


@dataclass(frozen=True)
class Edge:
    source: str      # importing module, dotted
    file: str        # its file, relative to the repository (llmbuild/...)
    line: int
    target: str      # imported module, dotted


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package."""
    root = package.parent
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is an llmbuild module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    root = modules["llmbuild"].parent.parent
    edges: set[Edge] = set()
    for module, path in modules.items():
        file = str(path.relative_to(root))
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")
                    if not is_package:
                        base = base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from a import b` names module a.b when b is one, else a.
                names = [f"{prefix}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = node.value.partition(":")[0]  # "llmbuild.models.llama.spec:LlamaSpec"
                if named.startswith("llmbuild.") and named in modules:
                    names = [named]
            for name in names:
                if name == "llmbuild" or name.startswith("llmbuild."):
                    target = _resolve(name, modules)
                    if target is not None and target != module:
                        edges.add(Edge(module, file, node.lineno, target))
    return sorted(edges, key=lambda e: (e.file, e.line, e.target))


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llmbuild"


def layer_of() -> dict[str, int]:
    return {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _where(edge: Edge) -> str:
    return f"{edge.file}:{edge.line}"


def layer_violations(modules: dict[str, Path], edges: list[Edge]) -> list[str]:
    rank = layer_of()
    problems = []
    for name in sorted({component(m) for m in modules} - set(rank)):
        problems.append(f"llmbuild/{name}: not in LAYERS; declare its layer in tests/test_layering.py")
    for edge in edges:
        src, dst = component(edge.source), component(edge.target)
        if src == dst or src not in rank or dst not in rank:
            continue
        if rank[dst] >= rank[src]:
            kind = "the same layer" if rank[dst] == rank[src] else "a higher layer"
            problems.append(
                f"{_where(edge)}: {src} (layer {rank[src]}) imports {edge.target} — "
                f"{dst} (layer {rank[dst]}) is {kind}"
            )
    return problems


def module_cycles(modules: dict[str, Path], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _cycle_report(cycle: list[str], edges: list[Edge]) -> str:
    members = set(cycle)
    inner = [e for e in edges if e.source in members and e.target in members]
    lines = [f"import cycle among {', '.join(cycle)}:"]
    lines += [f"  {_where(e)}: {e.source} -> {e.target}" for e in inner]
    return "\n".join(lines)


def test_packages_follow_the_layer_order():
    modules = module_files()
    problems = layer_violations(modules, import_edges(modules))
    assert not problems, f"{len(problems)} layering violation(s):\n" + "\n".join(problems)


def test_no_import_cycle_between_modules():
    modules = module_files()
    edges = import_edges(modules)
    cycles = module_cycles(modules, edges)
    assert not cycles, "\n".join(_cycle_report(c, edges) for c in cycles)


# The checker itself, on a small package written here: each rule must be able to fail.


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / "llmbuild" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(root / "llmbuild")


def test_checker_sees_function_level_relative_and_string_imports(tmp_path):
    modules = _write(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "graph/__init__.py": "",
        "graph/io.py": "def f():\n    from ..runtime import engine\n",
        "runtime/__init__.py": "",
        "runtime/engine.py": "import llmbuild.graph.io\n",
        "models/__init__.py": "REGISTRY = {'x': 'llmbuild.runtime.engine:Engine'}\n",
    })
    edges = import_edges(modules)
    found = {(e.source, e.target, e.line) for e in edges}
    assert ("llmbuild.graph.io", "llmbuild.runtime.engine", 2) in found
    assert ("llmbuild.runtime.engine", "llmbuild.graph.io", 1) in found
    assert ("llmbuild.models", "llmbuild.runtime.engine", 1) in found
    problems = layer_violations(modules, edges)
    assert any(p.startswith("llmbuild/graph/io.py:2: graph (layer 2) imports llmbuild.runtime.engine") for p in problems)
    assert any(p.startswith("llmbuild/models/__init__.py:1: models (layer 3)") for p in problems)
    assert module_cycles(modules, edges) == [["llmbuild.graph.io", "llmbuild.runtime.engine"]]


def test_checker_refuses_an_undeclared_package_and_same_layer_imports(tmp_path):
    modules = _write(tmp_path, {
        "__init__.py": "",
        "errors.py": "from llmbuild import progress\n",
        "progress.py": "",
        "newstage/__init__.py": "",
    })
    problems = layer_violations(modules, import_edges(modules))
    assert "llmbuild/newstage: not in LAYERS; declare its layer in tests/test_layering.py" in problems
    assert any(p.startswith("llmbuild/errors.py:1: errors (layer 0) imports llmbuild.progress") and "same layer" in p
               for p in problems)
