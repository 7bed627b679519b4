"""`llmbuild compile`: recipe → source → ONNX → (verify) → engines → artifact.

Every stage writes into a staging directory that becomes the artifact only when the
manifest is complete (`llmbuild.artifact.writer`).
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Sequence

from llmbuild import __version__
from llmbuild.artifact import (
    ENGINES_DIR,
    MODEL_DIR,
    SCHEMA_VERSION,
    TOKENIZER_DIR,
    engine_file_name,
    file_sha256,
    staged_artifact,
    write_manifest,
)
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
    from llmbuild.models import architecture_of, get_architecture

    arch = get_architecture(config)
    d = arch.LlamaDims.from_config(config)
    return {
        "architecture": architecture_of(config),
        "precision": precision,
        "num_layers": d.layers,
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab,
        "tie_word_embeddings": d.tied,
        "max_position_embeddings": config.get("max_position_embeddings"),
        "rope_theta": config.get("rope_theta"),
        "rope_scaling": config.get("rope_scaling"),
    }


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

    recipe = load_recipe(recipe_path, overrides)
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

    recipes = load_variants(recipe_path, overrides)
    return [compile_loaded(r, Path(out_dir), quiet=quiet, verify=verify, cache=cache) for r in recipes]


def compile_loaded(
    recipe, out_dir: Path, *, quiet: bool = False, verify: bool | None = None,
    cache: bool | str | Path | None = True,
) -> Path:
    from llmbuild.graph.export import MODEL_FILE, WEIGHTS_FILE, build_model, save_model
    from llmbuild.quantize.stage import quantize_for_compile, raise_if_failed
    from llmbuild.source import open_source

    rd = recipe.to_dict()
    limits = dict(rd["limits"])
    precision = rd["precision"]
    check_engines_before_work(rd)
    with Reporter(quiet=quiet) as rep, staged_artifact(out_dir, recipe.name) as stage:
        with rep.stage("source") as update:
            source = open_source(recipe.source_path)
            fingerprint = source.fingerprint()
            dims = model_dims(source.config, precision)
            update(1, 1)
        tp = rd.get("parallel", {}).get("tp", 1)
        with rep.stage("onnx") as update:
            if tp > 1:  # one graph per tensor-parallel rank: rank<r>/ (llmbuild.parallel)
                from llmbuild.parallel.artifact import export_ranks

                ranks = export_ranks(source, tp, stage, precision, limits["max_seq_len"], progress=update,
                                     quantization=rd.get("quantization"))
                model_paths, model_path, graph_hash = ranks["paths"], ranks["paths"][0], ranks["graph_hash"]
            else:
                model = build_model(source, precision, limits["max_seq_len"])
                quantization = quantize_for_compile(recipe, model, source, stage, rep)  # llmbuild.quantize
                model_path = save_model(model, stage / MODEL_DIR, progress=lambda d, t: update(d, t))
                del model
                graph_hash = hashlib.sha256(
                    (file_sha256(model_path) + file_sha256(stage / MODEL_DIR / WEIGHTS_FILE)).encode()
                ).hexdigest()
                model_paths = [model_path]
        with rep.stage("tokenizer") as update:
            tokenizer = source.export_tokenizer(stage / TOKENIZER_DIR)
            update(1, 1)
        tokenizer_info = {
            "dir": TOKENIZER_DIR,
            "bos_token_id": tokenizer.get("bos_token_id"),
            "eos_token_ids": _eos_ids(tokenizer, source.config),
            "add_bos_token": bool(tokenizer.get("add_bos_token", False)),
            "chat_template": tokenizer.get("chat_template"),
        }
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": recipe.name,
            "recipe": rd,
            "hashes": {"recipe": recipe_hash(rd), "source": fingerprint, "graph": graph_hash},
            "source": {"path": str(recipe.source_path), "format": source.format,
                       **source_record(recipe.model.source, recipe.source_path)},
            **({"variant": recipe.variant} if getattr(recipe, "variant", None) else {}),
            "toolchain": toolchain(),
            "model": dims,
            "limits": limits,
            "graph": {
                "file": f"{MODEL_DIR}/{MODEL_FILE}",
                "weights": f"{MODEL_DIR}/{WEIGHTS_FILE}",
                "opset": 24,
                **graph_contract(model_path),
                **(ranks["graph"] if tp > 1 else {}),
            },
            **({"parallel": ranks["parallel"]} if tp > 1 else {}),
            **({"quantization": quantization} if tp == 1 and quantization else {}),
            "tokenizer": tokenizer_info,
            "engines": [],
            "verification": None,
            "timings": rep.stages,
        }
        # The runtime reads the manifest: write a provisional one into the staging dir.
        write_manifest(stage, manifest)

        verification = _maybe_verify(recipe, rd, stage, source, rep, verify)
        manifest["verification"] = verification
        source.close()

        manifest["engines"] = build_engines(
            stage, rd, dims, model_paths, rep, source_hash=fingerprint, graph_hash=graph_hash, cache=cache
        )
        for info in manifest["engines"]:  # TensorRT flavour + version in the toolchain record
            manifest["toolchain"][info["trt_module"]] = info["trt_version"]
        manifest["timings"] = rep.stages
        write_manifest(stage, manifest)
        raise_if_failed(verification, out_dir / recipe.name)  # quantized: the accuracy gate
        if verification is not None and not verification["passed"]:
            report_path = keep_failed_report(verification, out_dir / recipe.name)
            raise BuildError(
                "verification against HF transformers failed: " + "; ".join(verification["failures"])
                + f"\n(the artifact is not kept; figures per prompt: {report_path})"
            )
    return out_dir / recipe.name


def keep_failed_report(report: dict, artifact: Path) -> Path:
    """Write a failed verification report to `<artifact>.verification.json`, beside where
    the artifact would have been (the staged artifact itself is discarded)."""
    path = artifact.parent / f"{artifact.name}.verification.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def check_engines_before_work(rd: dict) -> None:
    """What would stop the engine stage, found before the source is read: a precision no
    engine can be built at, a backend whose TensorRT package is missing or too old."""
    from llmbuild.engine.backends import import_backend
    from llmbuild.engine.options import precision_problem
    from llmbuild.errors import UserError

    if not rd["engines"]:
        return
    problem = precision_problem(rd["precision"])
    if problem:
        raise UserError(problem)
    for backend in dict.fromkeys(e["backend"] for e in rd["engines"]):
        import_backend(backend)


def _engine_cache(cache: bool | str | Path | None):
    from llmbuild.engine.cache import EngineCache, default_cache_dir

    if cache is None or cache is False:
        return None
    return EngineCache(default_cache_dir() if cache is True else Path(cache))


def build_engines(
    stage: Path, rd: dict, dims: dict, model_paths: list[Path], rep: Reporter, *, source_hash: str,
    graph_hash: str, cache: bool | str | Path | None = True,
) -> list[dict]:
    """Every engine of the recipe (one per entry and tensor-parallel rank), from the
    cache when an identical one was built before; their manifest entries."""
    from llmbuild.engine.backends import import_backend
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
        trt = import_backend(backend)  # before any work: a missing package is a UserError
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
                                     trt_module=trt.__name__, trt_version=trt.__version__, rank=rank)
                    info, hit = engine_cache.get_or_build(key, path, build)
                    if hit:
                        update(1, 1, "cached")
                infos.append({**info, "file": f"{ENGINES_DIR}/{name}", "cache": {"key": key, "hit": hit}})
    return infos


def _eos_ids(tokenizer: dict, config: dict) -> list[int]:
    ids = []
    for value in (tokenizer.get("eos_token_id"), config.get("eos_token_id")):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def _maybe_verify(recipe, rd, stage: Path, source, rep: Reporter, verify: bool | None) -> dict | None:
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
    from llmbuild.verify import DEFAULT_PROMPTS, default_thresholds, verify_artifact

    with rep.stage("verify") as update:
        thresholds = default_thresholds(rd["precision"], settings)
        report = verify_artifact(
            stage, recipe.source_path, prompts=settings.get("prompts") or DEFAULT_PROMPTS, thresholds=thresholds
        )
        update(1, 1, "passed" if report["passed"] else "FAILED")
    return report
