"""`llmbuild compile`: recipe → source → ONNX → engines ‖ (CPU-ready graph, tokenizer,
verify) → artifact.

    source ──► onnx ──► engines (main thread) ─────────────────────────┐
      │                  ‖ cpu_graph → tokenizer → manifest → verify ──┴─► publish
      └─► HF reference loading in a child process (verify's HF side) ──┘

Every stage writes into a staging directory that becomes the artifact only when the
manifest is complete (`llmbuild.artifact.writer`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import threading
from importlib import metadata
from pathlib import Path
from typing import Sequence

from llmbuild.version import __version__
from llmbuild.artifact import (
    ENGINES_DIR,
    MODEL_DIR,
    TOKENIZER_DIR,
    engine_file_name,
    file_sha256,
    staged_artifact,
    write_manifest,
)
from llmbuild.artifact.manifest import Hashes, Manifest, Tokenizer
from llmbuild.errors import BuildError
from llmbuild.progress import Reporter
from llmbuild.recipe.model_source import source_record


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def toolchain() -> dict:
    return {
        "llmbuild": __version__,
        "python": platform.python_version(),
        "onnx": _version("onnx"),
        "onnx_ir": _version("onnx-ir"),
        "onnxruntime": _version("onnxruntime"),
        "gguf": _version("gguf"),
    }


def recipe_hash(recipe_dict: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest()


def model_dims(config: dict, precision: str) -> dict:
    """The manifest's `model` entry, from the architecture's spec."""
    from llmbuild.models import spec_for

    return spec_for(config).manifest_dims(config, precision)


def graph_contract(model_path: Path) -> dict:
    """Inputs/outputs of the saved ONNX graph (names, dtypes, symbolic shapes)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)

    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [describe(v) for v in m.graph.input], "outputs": [describe(v) for v in m.graph.output]}


def compile_recipe(
    recipe_path: str | Path, overrides: Sequence[str] = (), out_dir: str | Path = "out", *, quiet: bool = False,
    verify: bool | None = None, cache: bool | str | Path | None = True,
) -> Path:
    """Compile a recipe; returns the artifact directory. `verify=None` verifies when the
    HF reference (torch + transformers) is installed and the recipe enables it. `cache`:
    True = the default engine cache (llmbuild.engine.cache), a path = that cache,
    False/None = build every engine. A recipe with a `matrix:` has several artifacts:
    compile it with `compile_variants`."""
    from llmbuild.errors import UserError
    from llmbuild.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides, check_build=True)
    if recipe.matrix:
        raise UserError(
            f"{recipe_path} declares a matrix of variants ({', '.join(recipe.matrix)}); compile it with "
            "`llmbuild compile` or llmbuild.compile.compile_variants(), which return one artifact per variant"
        )
    return compile_loaded(recipe, Path(out_dir), quiet=quiet, verify=verify, cache=cache)


def compile_variants(
    recipe_path: str | Path, overrides: Sequence[str] = (), out_dir: str | Path = "out", *, quiet: bool = False,
    verify: bool | None = None, cache: bool | str | Path | None = True,
) -> list[Path]:
    """Compile every variant of a recipe's `matrix:` (the recipe itself if it has none);
    all variants are validated before the first one is built."""
    from llmbuild.recipe.matrix import load_variants

    recipes = load_variants(recipe_path, overrides, check_build=True)
    return [compile_loaded(r, Path(out_dir), quiet=quiet, verify=verify, cache=cache) for r in recipes]


def compile_loaded(
    recipe, out_dir: Path, *, quiet: bool = False, verify: bool | None = None,
    cache: bool | str | Path | None = True,
) -> Path:
    """Compile one loaded recipe. Every stage is keyed by what it depends on and reused
    from the cache when unchanged (`llmbuild.buildcache`; `cache=False` runs them all);
    verification runs concurrently with the engine builds, and the artifact is published
    when both are done."""
    from llmbuild.buildcache import StageStore

    rd = recipe.to_dict()
    limits = dict(rd["limits"])
    check_engines_before_work(rd)
    store = StageStore.for_cache(cache)
    with Reporter(quiet=quiet) as rep, staged_artifact(out_dir, recipe.name) as stage, \
            _ReferenceSupply(recipe, rd, verify, store) as reference:
        source = _source_stage(store, rep, recipe.source_path)
        fingerprint = source.fingerprint()
        reference.prefetch(fingerprint)  # the HF load overlaps the ONNX export and the engine build
        dims = model_dims(source.config, rd["precision"])
        tp = rd.get("parallel", {}).get("tp", 1)
        graphs = _onnx_stage(store, rep, recipe, rd, source, stage, tp)
        model_paths, graph_hash = graphs["paths"], graphs["graph_hash"]
        cancelled = threading.Event()

        def beside_engines():
            """What does not need the engines, in a thread while they build: the CPU-ready
            graph, the tokenizer, the provisional manifest, verification."""
            cpu_graph = None
            if tp == 1 and not cancelled.is_set():
                cpu_graph = _cpu_graph_stage(store, rep, rd, stage, graphs)
            if cpu_graph is not None:
                graphs["graph"]["cpu"] = cpu_graph
            if cancelled.is_set():
                return None
            tok_stage = _tokenizer_stage(store, rep, source, stage)
            tokenizer = tok_stage["tokenizer"]
            manifest = Manifest(
                name=recipe.name,
                recipe=rd,
                hashes=Hashes(recipe=recipe_hash(rd), source=fingerprint, graph=graph_hash),
                source={"path": str(recipe.source_path), "format": source.format,
                        **source_record(recipe.model.source, recipe.source_path)},
                variant=getattr(recipe, "variant", None),
                toolchain=toolchain(),
                model=dims,
                limits=limits,
                graph={**graphs["graph"], "opset": 24, **graphs["contract"]},
                parallel=graphs["parallel"],
                quantization=graphs["quantization"],
                tokenizer=Tokenizer(
                    dir=TOKENIZER_DIR,
                    bos_token_id=tokenizer.get("bos_token_id"),
                    eos_token_ids=_eos_ids(tokenizer, source.config),
                    add_bos_token=bool(tokenizer.get("add_bos_token", False)),
                    chat_template=tokenizer.get("chat_template"),
                ),
                timings=dict(rep.stages),
            )
            # The runtime reads the manifest: write a provisional one into the staging dir.
            write_manifest(stage, manifest)
            if cancelled.is_set():
                return None
            verification = _verify_stage(store, rep, recipe, rd, stage, source, verify, graph_hash, tok_stage["key"],
                                         cpu_graph, reference)
            return manifest, verification

        # The engines need only the graph: they build from here on (here, in the main
        # thread: Ctrl-C reaches it), everything else in a thread; publishing waits for both.
        def cancel():  # the thread starts no further stage; a verification waiting for HF fails at once
            cancelled.set()
            reference.kill()

        (manifest, verification), engines = _concurrently(
            beside_engines,
            lambda: build_engines(stage, rd, dims, model_paths, rep, source_hash=fingerprint, graph_hash=graph_hash,
                                  cache=cache),
            cancel=cancel,
        )
        reference.close()
        manifest.record_engines(engines)
        manifest.verification = verification
        quantized = bool(rd.get("quantization"))
        if quantized:  # (quantize.stage imports onnx_ir: not on an unquantized no-op)
            from llmbuild.quantize.stage import raise_if_failed, record_allocation_result

            record_allocation_result(manifest.quantization, verification)
        source.close()
        manifest.timings = _stage_order(rep.stages)
        write_manifest(stage, manifest)
        if quantized:
            raise_if_failed(verification, out_dir / recipe.name)  # the accuracy gate
        if verification is not None and not verification["passed"]:
            report_path = keep_failed_report(verification, out_dir / recipe.name)
            raise BuildError(
                "verification against HF transformers failed: " + "; ".join(verification["failures"])
                + f"\n(the artifact is not kept; figures per prompt: {report_path})"
            )
    return out_dir / recipe.name


def export_graphs(source, stage: Path, *, precision: str, max_seq_len: int, tp: int = 1, recipe=None,
                  rep: Reporter | None = None, progress=None) -> dict:
    """The ONNX stage, one pipeline for every tp: rank r of tp (tp = 1: the only rank,
    written to model/; tp > 1: rank<r>/) is the architecture's graph on the rank's view of
    the source, with all-reduce markers after its row-parallel linears (tp > 1), quantized
    by one QuantizationJob computed on the whole model, and saved with streamed weights.

    `recipe` (a loaded Recipe) is needed only for its `quantization:` section. Returns
    {paths, graph_hash, graph (manifest entry), parallel (section or None), quantization
    (entry or None)}."""
    from llmbuild.graph.export import MODEL_FILE, WEIGHTS_FILE, save_model
    from llmbuild.models.build import build_model
    from llmbuild.parallel.artifact import parallel_section
    from llmbuild.parallel.export import META_RANK, META_TP, mark_allreduce_points, rank_dir
    from llmbuild.parallel.hints import ShardPlan
    from llmbuild.parallel.sharder import RankSource
    from llmbuild.quantize.stage import WORK_DIR, QuantizationJob

    plan = ShardPlan.for_config(source.config, tp)
    plan.check()
    job = full = None
    if recipe is not None and recipe.quantization is not None:
        full = build_model(source, precision, max_seq_len)  # lazy: nothing is read to plan
        job = QuantizationJob(full, source, recipe, stage / WORK_DIR, rep)
    ranks = []
    digest = hashlib.sha256()
    for rank in range(tp):
        if tp == 1:
            model = full if full is not None else build_model(source, precision, max_seq_len)
        else:
            model = build_model(RankSource(source, plan, rank), precision, max_seq_len)
            model.metadata_props[META_TP], model.metadata_props[META_RANK] = str(tp), str(rank)
        points = mark_allreduce_points(model) if tp > 1 else []
        if job is not None:
            job.apply(model, None if tp == 1 else (plan, rank), last=rank == tp - 1)
        directory = stage / (MODEL_DIR if tp == 1 else rank_dir(rank))
        report = None if progress is None else (lambda d, t, r=rank: progress(r * t + d, tp * t))
        path = save_model(model, directory, progress=report)
        del model
        digest.update((file_sha256(path) + file_sha256(directory / WEIGHTS_FILE)).encode())
        ranks.append({"rank": rank, "dir": directory, "path": path, "collectives": points})
    del full
    rel = [r["dir"].name for r in ranks]
    graph = {"file": f"{rel[0]}/{MODEL_FILE}", "weights": f"{rel[0]}/{WEIGHTS_FILE}"}
    if tp > 1:
        graph["ranks"] = [f"{d}/{MODEL_FILE}" for d in rel]
    return {
        "paths": [r["path"] for r in ranks], "graph_hash": digest.hexdigest(), "graph": graph,
        "parallel": parallel_section(ranks, plan, source.config, precision) if tp > 1 else None,
        "quantization": job.manifest_entry(rep) if job is not None else None,
    }


_CANCEL_WAIT = 30.0  # seconds an interrupted compile waits for the thread's current step


def yield_cpu(increment: int = 10) -> None:
    """Lower the calling thread's scheduling priority (Linux: nice is per thread, and
    threads it starts, ONNX Runtime's pools included, inherit it), so that work run beside
    the engine build takes only the cycles the build leaves. Best effort: where the
    platform has no per-thread priority, nothing changes."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError):
        pass


def _concurrently(first, second, *, cancel=None):
    """(first(), second()), first run in a thread while second runs here; an exception of
    first is raised after second finished. On an exception of second (Ctrl-C included),
    `cancel()` tells first to stop, and first's current step is waited for (at most
    _CANCEL_WAIT s) before the exception propagates: the staging directory is removed
    after it, so no step of first writes into it again."""
    result: dict = {}

    def run():
        try:
            yield_cpu()
            result["value"] = first()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name="llmbuild-beside-engines", daemon=True)
    thread.start()
    try:
        second_value = second()
        thread.join()
    except BaseException:
        if cancel is not None:
            cancel()
        thread.join(timeout=_CANCEL_WAIT)
        raise
    if "error" in result:
        raise result["error"]
    return result["value"], second_value


# -- stages (each reused from the stage store when its key is unchanged) ---------------

def _source_stage(store, rep, source_path: Path):
    """Fingerprint, config and format of the source, keyed by its files' stats; the
    source itself is opened only when a later stage needs its tensors."""
    from llmbuild.buildcache import LazySource, run_stage, source_stat_key, stage_key
    from llmbuild.source import open_source

    opened = []

    def build(update):
        src = open_source(source_path)
        opened.append(src)
        update(1, 1)
        return {"fingerprint": src.fingerprint(), "config": src.config, "format": src.format}

    key = stage_key("source", files=source_stat_key(source_path))
    meta = run_stage(store, rep, "source", key, Path("."), [], build)
    return LazySource(source_path, meta["fingerprint"], meta["config"], meta["format"],
                      opened[0] if opened else None)


def _onnx_stage(store, rep, recipe, rd: dict, source, stage: Path, tp: int) -> dict:
    """The ONNX graph (quantized if the recipe says so), one per tensor-parallel rank
    (export_graphs)."""
    from llmbuild.buildcache import run_stage, stage_key, tool_versions

    precision, max_seq_len = rd["precision"], rd["limits"]["max_seq_len"]

    def build(update):
        graphs = export_graphs(source, stage, precision=precision, max_seq_len=max_seq_len, tp=tp, recipe=recipe,
                               rep=rep, progress=update)
        return {**graphs, "paths": [str(p.relative_to(stage)) for p in graphs["paths"]],
                "contract": graph_contract(graphs["paths"][0])}

    model = {k: v for k, v in rd["model"].items() if k != "source"}
    key = stage_key("onnx", source=source.fingerprint(), model=model, precision=precision, max_seq_len=max_seq_len,
                    quantization=rd.get("quantization"), parallel=rd.get("parallel"),
                    tools=tool_versions("onnx", "onnx-ir", "numpy", "ml-dtypes", "gguf", "onnxruntime"))
    if tp == 1:
        rels = [MODEL_DIR]
    else:  # (parallel.export imports onnx_ir: not on a reused tp = 1 stage)
        from llmbuild.parallel.export import rank_dir

        rels = [rank_dir(r) for r in range(tp)]
    meta = run_stage(store, rep, "onnx", key, stage, rels, build)
    return {**meta, "paths": [stage / p for p in meta["paths"]]}


def _cpu_graph_stage(store, rep, rd: dict, stage: Path, graphs: dict) -> dict | None:
    """The CPU-ready graph (recipe `runtime.cpu_graph`, llmbuild.lowering.cpu_graph),
    keyed by the standard graph's hash; its manifest entry, or None (disabled, or a
    graph the lowering does not recognise: runtimes then run the standard graph)."""
    from llmbuild.lowering.cpu_graph import CPU_DATA_FILE, CPU_GRAPH_FILE, write_cpu_graph
    from llmbuild.buildcache import run_stage, stage_key, tool_versions

    if not rd.get("runtime", {}).get("cpu_graph", True):
        return None

    def build(update):
        from llmbuild.lowering.cpu import LoweringError  # (imports onnx_ir: only when the stage runs)

        try:
            entry = write_cpu_graph(graphs["paths"][0])
        except LoweringError as e:
            rep.log(f"CPU-ready graph not written ({e}); runtimes will run the standard graph")
            return {"entry": None}
        update(1, 1)
        return {"entry": entry}

    key = stage_key("cpu_graph", graph=graphs["graph_hash"], tools=tool_versions("onnx-ir", "numpy", "ml-dtypes"))
    rels = [f"{MODEL_DIR}/{CPU_GRAPH_FILE}", f"{MODEL_DIR}/{CPU_DATA_FILE}"]
    return run_stage(store, rep, "cpu_graph", key, stage, rels, build)["entry"]


def _tokenizer_stage(store, rep, source, stage: Path) -> dict:
    from llmbuild.buildcache import run_stage, stage_key, tool_versions

    def build(update):
        info = source.export_tokenizer(stage / TOKENIZER_DIR)
        update(1, 1)
        return {"tokenizer": info}

    key = stage_key("tokenizer", source=source.fingerprint(), tools=tool_versions("tokenizers", "transformers"))
    meta = run_stage(store, rep, "tokenizer", key, stage, [TOKENIZER_DIR], build)
    return {**meta, "key": key}


def _verify_stage(store, rep, recipe, rd: dict, stage: Path, source, verify: bool | None, graph_hash: str,
                  tokenizer_key: str, cpu_graph: dict | None = None, reference=None) -> dict | None:
    """Verification of the graph (HF logits, or the accuracy gate of a quantized graph),
    reused when the graph, tokenizer and verify settings are unchanged; only passing
    reports are reused."""
    from llmbuild.buildcache import stage_key, tool_versions

    settings = rd.get("verify") or {}
    if store is None or verify is False or not settings.get("enabled", True):
        report = _maybe_verify(recipe, rd, stage, source, rep, verify, store, reference)
        if "verify" in rep.stages:
            rep.stages["verify"]["reused"] = False
        return report
    cpu = None if cpu_graph is None else [cpu_graph["sha256"], cpu_graph.get("data_sha256")]
    key = stage_key("verify", graph=graph_hash, cpu_graph=cpu, tokenizer=tokenizer_key, source=source.fingerprint(),
                    precision=rd["precision"], verify=settings, quantization=rd.get("quantization"),
                    tools=tool_versions("onnxruntime", "torch", "transformers", "numpy"))
    with store.lock("verify", key):
        report = store.load("verify", key, stage)
        if report is not None:
            with rep.stage("verify") as update:
                update(1, 1, "reused")
            rep.stages["verify"]["reused"] = True
            return report
        report = _maybe_verify(recipe, rd, stage, source, rep, verify, store, reference)
        if report is not None and report.get("passed") and "skipped" not in report:
            store.store("verify", key, stage, [], report)
        if "verify" in rep.stages:
            rep.stages["verify"]["reused"] = False
        return report


def keep_failed_report(report: dict, artifact: Path) -> Path:
    """Write a failed verification report to `<artifact>.verification.json`, beside where
    the artifact would have been (the staged artifact itself is discarded)."""
    path = artifact.parent / f"{artifact.name}.verification.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def check_engines_before_work(rd: dict) -> None:
    """What would stop the engine stage, found before the source is read: a precision no
    engine can be built at, a backend whose TensorRT package is missing or too old."""
    from llmbuild.engine.backends import installed_version
    from llmbuild.engine.options import precision_problem
    from llmbuild.errors import UserError

    if not rd["engines"]:
        return
    problem = precision_problem(rd["precision"])
    if problem:
        raise UserError(problem)
    for backend in dict.fromkeys(e["backend"] for e in rd["engines"]):
        installed_version(backend)


def _engine_cache(cache: bool | str | Path | None):
    from llmbuild.engine.cache import EngineCache, cache_directory

    directory = cache_directory(cache)
    return None if directory is None else EngineCache(directory)


def build_engines(
    stage: Path, rd: dict, dims: dict, model_paths: list[Path], rep: Reporter, *, source_hash: str,
    graph_hash: str, cache: bool | str | Path | None = True,
) -> list[dict]:
    """Every engine of the recipe (one per entry and tensor-parallel rank), from the
    cache when an identical one was built before; their manifest entries."""
    from llmbuild.engine.backends import installed_version
    from llmbuild.engine.build import build_engine
    from llmbuild.engine.cache import engine_key
    from llmbuild.engine.options import target_label

    engine_cache = _engine_cache(cache)
    tools = toolchain()
    infos = []
    for entry in rd["engines"]:
        backend = entry["backend"]
        options = {k: v for k, v in entry.items() if k != "backend"}
        label = target_label(backend, options)
        trt_module, trt_version = installed_version(backend)  # TensorRT is imported only to build
        for rank, rank_path in enumerate(model_paths):  # one engine per tensor-parallel rank
            name = engine_file_name(backend, label, rank)
            stage_name = f"engine:{backend}:{label}" + (f":rank{rank}" if len(model_paths) > 1 else "")
            with rep.stage(stage_name) as update:
                (stage / ENGINES_DIR).mkdir(exist_ok=True)

                def build(path: Path, rank_path=rank_path, update=update) -> dict:
                    return build_engine(
                        rank_path, path, backend=backend, precision=rd["precision"], limits=dict(rd["limits"]),
                        num_layers=dims["num_layers"], options=options,
                        progress=lambda phase, done, total: update(done, total, phase),
                    )

                path = stage / ENGINES_DIR / name
                key, hit = None, False
                if engine_cache is None:
                    info = build(path)
                else:
                    key = engine_key(recipe=rd, source=source_hash, graph=graph_hash, toolchain=tools, engine=entry,
                                     trt_module=trt_module, trt_version=trt_version, rank=rank)
                    info, hit = engine_cache.get_or_build(key, path, build)
                    if hit:
                        update(1, 1, "reused")
                infos.append({**info, "file": f"{ENGINES_DIR}/{name}", "stage": stage_name, "cache": {"key": key}})
            rep.stages[stage_name]["reused"] = hit  # in the timings: the manifest is otherwise the same
    return infos


def _eos_ids(tokenizer: dict, config: dict) -> list[int]:
    ids = []
    for value in (tokenizer.get("eos_token_id"), config.get("eos_token_id")):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def _maybe_verify(recipe, rd, stage: Path, source, rep: Reporter, verify: bool | None, store=None,
                  reference=None) -> dict | None:
    from llmbuild.quantize.stage import maybe_gate
    from llmbuild.verify.reference import reference_available

    if rd.get("quantization"):  # quantized graphs: the accuracy gate replaces the HF logit check
        return maybe_gate(recipe, stage, source, rep, verify)
    settings = rd.get("verify") or {}
    if verify is False or not settings.get("enabled", True):
        return None
    if rd["precision"] == "bfloat16":
        rep.log("verification skipped: ONNX Runtime's CPU provider has no bfloat16 kernels")
        return {"skipped": "bfloat16 graphs cannot run on ONNX Runtime's CPU provider", "passed": True}
    if not reference_available():
        if verify:
            from llmbuild.errors import UserError

            raise UserError("--verify needs the HF reference: pip install 'llmbuild[reference]'")
        rep.log("verification skipped: torch/transformers not installed (pip install 'llmbuild[reference]')")
        return None
    with rep.stage("verify") as update:
        report = verify_in_compile(stage, recipe.source_path, source.fingerprint(), rd,
                                   cache_dir=store.dir if store is not None else None,
                                   reference=None if reference is None else reference.get)
        update(1, 1, "passed" if report["passed"] else "FAILED")
    return report


def verification_threads(rd: dict) -> int | None:
    """Threads of compile's verification (torch and ONNX Runtime): half the cores when it
    runs beside engine builds, which take the other half (on 2 cores one thread each:
    more oversubscribes them and slows both, benchmarks/compile_smollm2.md); None (the
    libraries' defaults) without engines."""
    import os

    if not rd["engines"]:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // 2)


def verify_in_compile(stage: Path, source_path: Path, fingerprint: str, rd: dict, *, cache_dir: Path | None,
                      threads: int | None = None, reference=None) -> dict:
    """Compile's verification of a staged artifact against HF transformers: reference
    outputs cached under `cache_dir` by source fingerprint (the HF model is loaded once,
    only on a miss: `reference()` returns it, already loading — compile's _ReferenceSupply;
    default: a ReferenceProcess started at the first miss and ended here), the recipe's
    thresholds and prompts, `threads` (default: verification_threads). The staged files'
    hashes were just computed: not re-read."""
    from llmbuild.buildcache import CachedReference
    from llmbuild.verify import DEFAULT_PROMPTS, default_thresholds
    from llmbuild.verify.compare import verify_what_runs
    from llmbuild.verify.reference import ReferenceProcess

    settings = rd.get("verify") or {}
    threads = threads or verification_threads(rd)
    started = []

    def start():
        started.append(ReferenceProcess(source_path, threads))
        return started[0]

    outputs = CachedReference(cache_dir, fingerprint, reference or start)
    try:
        return verify_what_runs(
            stage, source_path, prompts=settings.get("prompts") or DEFAULT_PROMPTS,
            thresholds=default_thresholds(rd["precision"], settings), reference_outputs=outputs, threads=threads,
            check_hashes=False,
        )
    finally:
        for process in started:
            process.close()


class _ReferenceSupply:
    """The HF reference of one compile's verification: started (a ReferenceProcess,
    a child process) right after the source stage when verification will need HF outputs
    the cache does not hold (`prefetch`) — its load then overlaps the ONNX export and the
    engine build — else at the first miss (`get`); ended when the compile ends, also on
    an error or Ctrl-C."""

    def __init__(self, recipe, rd: dict, verify: bool | None, store):
        self.path, self.threads = recipe.source_path, verification_threads(rd)
        self.cache_dir = None if store is None else store.dir
        self.wanted = _verifies_against_hf(rd, verify)
        self._reference = None

    def prefetch(self, fingerprint: str) -> None:
        from llmbuild.buildcache import CachedReference

        if self.wanted and not CachedReference.holds_outputs(self.cache_dir, fingerprint):
            self.get()

    def get(self):
        from llmbuild.verify.reference import ReferenceProcess

        if self._reference is None:
            self._reference = ReferenceProcess(self.path, self.threads)
        return self._reference

    def close(self) -> None:
        if self._reference is not None:
            self._reference.close()
            self._reference = None

    def kill(self) -> None:
        """End the reference at once (from another thread than the one using it)."""
        if self._reference is not None:
            self._reference.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _verifies_against_hf(rd: dict, verify: bool | None) -> bool:
    """Whether compile's verification will compare with HF transformers (not: disabled,
    quantized — the accuracy gate —, bfloat16, or torch/transformers not installed)."""
    from llmbuild.verify.reference import reference_available

    settings = rd.get("verify") or {}
    return (verify is not False and settings.get("enabled", True) and not rd.get("quantization")
            and rd["precision"] != "bfloat16" and reference_available())


_STAGE_RANK = {"source": 0, "onnx": 1, "cpu_graph": 2, "tokenizer": 3, "verify": 5}


def _stage_order(stages: dict) -> dict:
    """The stages' timings in pipeline order (source, onnx and its quantization steps,
    cpu_graph, tokenizer, engines, verify), not in the order the concurrent ones ended:
    the manifest of a recompile is laid out as the first one's."""
    def rank(name: str) -> float:
        if name in _STAGE_RANK:
            return _STAGE_RANK[name]
        return 4 if name.startswith("engine:") else 1.5

    return {name: stages[name] for name in sorted(stages, key=rank)}
