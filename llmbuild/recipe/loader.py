"""`load_recipe`: YAML -> extends -> overrides -> schema -> model checks, in one step,
raising one `RecipeError` with every problem found."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from llmbuild.errors import UserError
from llmbuild.recipe.messages import validation_problems
from llmbuild.recipe.model_source import SourceError, resolve_source
from llmbuild.recipe.problems import COMMAND_LINE, Problem, RecipeError
from llmbuild.recipe.schema import Limits, Recipe
from llmbuild.recipe.tree import Tree, apply_overrides, read_tree


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), *, check_model: bool = True,
                check_build: bool = False) -> Recipe:
    """Load, resolve and validate a recipe.

    `overrides` are `a.b=value` (value parsed as YAML) or `~a.b` (delete, i.e. back to
    the default). With `check_model`, the model's config is read to check the limits
    and the architecture against it. With `check_build`, also what compile's engine
    stage would refuse before any work (a precision no engine builds at, an engine
    backend not installed here, the target 'current' without a GPU): `validate` and
    `compile` set it; `plan` (which sizes a build for other machines) does not.
    Raises `RecipeError` listing every problem.
    """
    file = os.fspath(path)
    problems: list[Problem] = []
    if "\0" in file or not _is_file(file):
        raise RecipeError([Problem("", "recipe file does not exist", file)])
    tree = read_tree(file, problems)
    if tree is None:  # unreadable YAML or broken extends: nothing sensible to validate
        raise RecipeError(problems)
    apply_overrides(tree, overrides, problems)
    recipe = None
    try:
        recipe = Recipe.model_validate(tree.data)
    except ValidationError as exc:
        problems += validation_problems(exc, tree)
    if recipe is not None:
        _check_engines(recipe, tree, problems, check_build)
    source_path = _check_source(tree, check_model, problems)
    if problems or recipe is None:
        order = {f: i for i, f in enumerate(tree.files + [COMMAND_LINE])}
        problems.sort(key=lambda p: (order.get(p.file, -1), p.line, p.column))
        raise RecipeError(problems)
    recipe._path = Path(file)
    recipe._source_path = source_path
    return recipe


def _check_source(tree: Tree, check_model: bool, problems: list[Problem]) -> Path | None:
    """Resolve model.source (relative to the file that set it) and, with `check_model`,
    check the recipe against the model's config. Runs even if other keys are invalid."""
    source = tree.get(("model", "source"))
    if not isinstance(source, str):
        return None  # the schema reports it
    loc = tree.where(("model", "source"))
    base = Path.cwd() if loc.file == COMMAND_LINE else Path(loc.file).parent
    try:
        path = resolve_source(source, base)
    except SourceError as e:
        problems.append(Problem("model.source", str(e), *loc))
        return None
    if check_model:
        _check_model(path, tree, problems)
    return path


def _check_model(path: Path, tree: Tree, problems: list[Problem]) -> None:
    from llmbuild.source import read_config

    source_loc = tree.where(("model", "source"))
    try:
        config = read_config(path)
    except UserError as e:
        problems.append(Problem("model.source", f"cannot read the model config: {e}", *source_loc))
        return

    limit = config.get("max_position_embeddings")
    default = Limits.model_fields["max_seq_len"].default
    max_seq_len = tree.get(("limits", "max_seq_len"), default)
    if _is_int(limit) and _is_int(max_seq_len) and max_seq_len > limit:
        note = "" if tree.get(("limits", "max_seq_len")) is not None else " (the default)"
        problems.append(Problem(
            "limits.max_seq_len",
            f"max_seq_len {max_seq_len}{note} is larger than the model's"
            f" max_position_embeddings {limit}; expected at most {limit}",
            *tree.where(("limits", "max_seq_len")),
        ))

    try:
        from llmbuild.models import REFUSED_ARCHITECTURES, SUPPORTED_ARCHITECTURES
    except ImportError:
        return
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        problems.append(Problem(
            "model.source",
            f"model architecture {arch!r} is not supported"
            f"{' (' + REFUSED_ARCHITECTURES[arch] + ')' if arch in REFUSED_ARCHITECTURES else ''};"
            f" supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            *source_loc,
        ))
    else:
        from llmbuild.models import architecture_spec
        from llmbuild.source.checks import config_problems

        for message in config_problems(config):
            problems.append(Problem("model.source", f"model config {message}", *source_loc))
        for message in architecture_spec(arch).check_config(config):
            problems.append(Problem("model.source", f"{arch}: {message}", *source_loc))
        _check_parallel(config, tree, problems)
        _check_tied_lm_head(config, tree, problems)
        _check_target_bits(config, tree, problems)
        _check_plan_resolves(config, tree, problems)


def _check_parallel(config: dict, tree: Tree, problems: list[Problem]) -> None:
    """parallel.tp must split the model's heads, KV heads and MLP into whole parts."""
    tp = tree.get(("parallel", "tp"))
    if not _is_int(tp) or tp <= 1:
        return  # tp = 1 (or a type error the schema reports)
    from llmbuild.parallel.hints import tp_problems

    try:
        found, _notes = tp_problems(config, tp)
    except (UserError, KeyError, ValueError) as e:
        found = [f"cannot shard this model: {e}"]
    for message in found:
        problems.append(Problem("parallel.tp", message, *tree.where(("parallel", "tp"))))


def _check_tied_lm_head(config: dict, tree: Tree, problems: list[Problem]) -> None:
    """An override naming a tied lm_head must be one the quantize stage can apply."""
    q = tree.get(("quantization",))
    if not config.get("tie_word_embeddings") or not isinstance(q, dict) or not q.get("overrides"):
        return
    from llmbuild.models import spec_for
    from llmbuild.quantize.plan import tied_lm_head_refusal, tied_lm_head_spec

    try:
        lm_head = spec_for(config, check=False).lm_head
        named = tied_lm_head_spec(q, int(config.get("num_hidden_layers") or 1), lm_head)
        refusal = tied_lm_head_refusal(named[0]) if named is not None else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return  # a malformed section: the schema reports it
    if refusal:
        index = named[1]
        problems.append(Problem(f"quantization.overrides[{index}]", refusal,
                                *tree.where(("quantization", "overrides", index))))


def _check_plan_resolves(config: dict, tree: Tree, problems: list[Problem]) -> None:
    """The weights + overrides must resolve on this model's linears and routed experts: a
    setting one section allows can meet another's it inherits (scale_bits 8 from `weights`,
    algorithm gptq from an override), or a kind of weight that refuses it (scale_bits 8 on
    routed experts), which the schema, field by field, cannot see."""
    q = tree.get(("quantization",))
    if not isinstance(q, dict) or not isinstance(q.get("weights"), dict):
        return
    from llmbuild.models import spec_for
    from llmbuild.quantize.expert_plan import resolve_expert_plan, stacked_expert_shapes
    from llmbuild.quantize.plan import resolve_plan

    at = ("quantization", "overrides") if q.get("overrides") else ("quantization", "weights")
    try:
        spec = spec_for(config, check=False)
        d = spec.dims(config)
        layers = int(config.get("num_hidden_layers") or 1)
        resolve_plan(q, list(spec.linear_weights(d)), layers)
        if hasattr(d, "top_k"):  # an MoE model: its stacked routed experts
            resolve_expert_plan(q, list(stacked_expert_shapes(spec, d)), layers)
    except UserError as e:
        problems.append(Problem(".".join(at), str(e).removeprefix("quantization: "), *tree.where(at)))
    except (KeyError, TypeError, ValueError, AttributeError):
        return  # a malformed section or config: the schema / config_problems report it


def _check_target_bits(config: dict, tree: Tree, problems: list[Problem]) -> None:
    """quantization.target.bits_per_weight must be reachable with this model's linears."""
    path = ("quantization", "target", "bits_per_weight")
    bits = tree.get(path)
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 0:
        return  # absent, or a type error the schema reports
    from llmbuild.quantize.allocate import bits_problem, linear_shapes

    scale_bytes = 4 if tree.get(("precision",)) == "float32" else 2  # the graph dtype's
    try:
        problem = bits_problem(float(bits), linear_shapes(config), scale_bytes)
    except (KeyError, TypeError, ValueError, AttributeError):
        return  # a malformed config: config_problems reports it
    if problem:
        problems.append(Problem("quantization.target.bits_per_weight", problem, *tree.where(path)))


def _check_engines(recipe: Recipe, tree: Tree, problems: list[Problem], check_build: bool) -> None:
    """What compile's engine stage would refuse, found at validate without importing
    TensorRT: a precision no engine builds at, a backend whose module is not installed
    here, the target 'current' on a machine without a GPU."""
    import importlib.util

    from llmbuild.engine.backends import get_backend
    from llmbuild.engine.options import precision_problem

    if not recipe.engines or not check_build:
        return
    problem = precision_problem(recipe.precision)
    if problem:
        problems.append(Problem("precision", problem, *tree.where(("precision",))))
    for i, entry in enumerate(recipe.engines):
        backend = get_backend(entry.backend)
        try:
            installed = importlib.util.find_spec(backend.module) is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            problems.append(Problem(f"engines[{i}]", f"engine backend {entry.backend!r} needs the Python module "
                                    f"{backend.module!r}, which is not installed; install it with: pip install "
                                    f"{backend.pip}", *tree.where(("engines", i))))
        targets = getattr(entry, "compute_capabilities", None) or []
        if "current" in targets:
            from llmbuild.engine.compat import current_compute_capability

            if current_compute_capability() is None:
                path = ("engines", i, "compute_capabilities")
                problems.append(Problem(f"engines[{i}].compute_capabilities",
                                        "compute capability 'current' means the GPU of the build machine, and this "
                                        "machine has none; name the targets (e.g. [sm86, sm89])", *tree.where(path)))


def _is_file(file: str) -> bool:
    try:
        return os.path.isfile(file)
    except (OSError, ValueError):  # too long a name, NUL bytes
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
