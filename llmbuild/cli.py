"""The `llmbuild` command line. Commands import their heavy libraries lazily, so that
`llmbuild --help` and `llmbuild validate` start fast.

Exit status: 0 success, 1 build or verification failure, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import json
import sys

import click

from llmbuild import __version__
from llmbuild.errors import LlmbuildError


class _Group(click.Group):
    def invoke(self, ctx):
        as_json = "--json" in [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except LlmbuildError as e:
            click.echo(f"error: {e}", err=True)
            if as_json:  # machine-readable too: {"error", "exit_code", "problems"?}
                _emit_json(_error_json(e))
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmbuild")
def cli():
    """Compile declarative LLM recipes into TensorRT engines and ONNX artifacts."""


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def _error_json(e: LlmbuildError) -> dict:
    out = {"error": str(e), "kind": "bad input" if e.exit_code == 2 else "build failure", "exit_code": e.exit_code}
    problems = getattr(e, "problems", None)  # RecipeError: one entry per problem, with its position
    if problems:
        out["problems"] = [{"path": p.path, "message": p.message, "file": p.file, "line": p.line,
                            "column": p.column} for p in problems]
    return out


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the resolved recipe as JSON.")
@click.option("--portable", is_flag=True, help="Skip compile's engine-stage checks (engine precision, backend "
              "installed here, a GPU for the target 'current'): for a recipe another machine will compile.")
def validate(recipe, overrides, as_json, portable):
    """Check a recipe (and OVERRIDES like limits.max_seq_len=4096 or ~engines) without
    building: everything `compile` would refuse before any work, on this machine."""
    from llmbuild.recipe.matrix import load_variants

    # the recipe itself, or every matrix variant
    variants = load_variants(recipe, overrides, check_build=not portable)
    if as_json:
        r = variants[0]
        out = {"valid": True, "recipe": r.to_dict(), "source": str(r.source_path)}
        if r.variant:
            out["variants"] = [{"name": v.name, "values": v.variant["values"], "recipe": v.to_dict()} for v in variants]
        _emit_json(out)
        return
    for r in variants:
        engines = ", ".join(f"{e.backend} ({e.label})" for e in r.engines) or "none"
        click.echo(f"{recipe}: valid ({r.name}, {r.precision}, engines: {engines})")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("-o", "--out", "out_dir", default="out", show_default=True, help="Output directory for artifacts.")
@click.option("--verify/--no-verify", default=None, help="Force or skip the check against HF transformers "
              "(default: run it when torch and transformers are installed).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Engine cache directory (default: $LLMBUILD_CACHE_DIR or ~/.cache/llmbuild).")
@click.option("--no-cache", is_flag=True, help="Build every engine, do not reuse or store cached ones.")
def compile(recipe, overrides, out_dir, verify, quiet, as_json, cache_dir, no_cache):
    """Compile RECIPE into an artifact directory OUT/<name> (one per variant of its matrix:)."""
    from llmbuild.artifact import read_manifest
    from llmbuild.compile import compile_variants
    from llmbuild.progress import quiet_third_party

    quiet_third_party()
    cache = False if no_cache else (cache_dir or True)
    paths = compile_variants(recipe, overrides, out_dir, quiet=quiet or as_json, verify=verify, cache=cache)
    if not as_json:
        for path in paths:
            click.echo(f"artifact: {path}")
            if not quiet:
                click.echo(_stage_summary(read_manifest(path)["timings"]))
        return
    artifacts = []
    for path in paths:
        m = read_manifest(path)
        engines = [{"file": e["file"], "backend": e["backend"], "trt_version": e["trt_version"],
                    "targets": e.get("targets"), "sha256": e["sha256"], "bytes": e["bytes"],
                    "cached": bool(m["timings"].get(e.get("stage"), {}).get("reused"))} for e in m["engines"]]
        artifacts.append({"name": m["name"], "artifact": str(path), "variant": m.get("variant"), "engines": engines,
                          "verification": m["verification"], "timings": m["timings"]})
    out = {"artifacts": artifacts}
    if len(artifacts) == 1:  # the one artifact's fields at the top level as well
        a = artifacts[0]
        out.update(artifact=a["artifact"], engines=[e["file"] for e in a["engines"]],
                   verification=a["verification"], timings=a["timings"])
    _emit_json(out)


def _stage_summary(timings: dict) -> str:
    """One line per compile: which stages were reused and which ran (with their time)."""
    reused = [n for n, t in timings.items() if t.get("reused")]
    ran = [f"{n} {t['seconds']:.1f}s" for n, t in timings.items() if not t.get("reused")]
    return f"  reused: {', '.join(reused) or '-'}; ran: {', '.join(ran) or '-'}"


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(recipe, overrides, as_json):
    """What `compile RECIPE` would do and need: parameters, weight/KV-cache/activation
    bytes, engines, and which common GPUs it fits. Reads only the recipe and model config."""
    from llmbuild.plan import format_plan, plan_recipe

    plans = plan_recipe(recipe, overrides)
    if as_json:
        _emit_json(plans[0] if len(plans) == 1 else {"variants": plans})
    else:
        click.echo("\n\n".join(format_plan(p) for p in plans))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(artifact, as_json):
    """Show an artifact's manifest: model, limits, engines and their I/O contract."""
    from llmbuild.artifact import read_manifest

    m = read_manifest(artifact)
    if as_json:
        _emit_json(m)
        return
    try:
        _print_manifest(m)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        from llmbuild.errors import UserError

        raise UserError(f"{artifact}: damaged manifest: cannot show {type(e).__name__} {e}") from None


def _print_manifest(m: dict) -> None:
    md, lim = m["model"], m["limits"]
    click.echo(f"{m['name']}  (schema {m['schema_version']}, llmbuild {m['toolchain']['llmbuild']})")
    click.echo(f"  model     {md['architecture']}  {md['num_layers']} layers, hidden {md['hidden_size']}, "
               f"heads {md['num_attention_heads']}/{md['num_key_value_heads']}, vocab {md['vocab_size']}, "
               f"{md['precision']}")
    click.echo(f"  limits    batch {lim['max_batch_size']}, input {lim['max_input_len']}, seq {lim['max_seq_len']}")
    click.echo(f"  graph     {m['graph']['file']}  opset {m['graph']['opset']}")
    if m["graph"].get("cpu"):  # llmbuild.lowering.cpu_graph
        click.echo(f"  cpu graph {m['graph']['cpu']['file']}  (lowered for ONNX Runtime on the CPU, at compile)")
    if m.get("parallel"):  # tensor parallelism: one graph (and engine) per rank
        par = m["parallel"]
        per = par["per_rank"]
        click.echo(f"  parallel  tp {par['tp']}: per rank heads {per['num_attention_heads']}/"
                   f"{per['num_key_value_heads']}, MLP {per['intermediate_size']}, weights "
                   f"{par['weight_bytes']['per_rank'][0] / 1e6:.1f} MB; {len(par['collectives'])} all-reduce points")
        for note in par.get("notes", []):
            click.echo(f"            {note}")
    for g in (m.get("quantization") or {}).get("summary", {}).get("groups", []):  # llmbuild.quantize
        click.echo(f"  quantized {g['setting']}: {g['weights']} weights, {g['parameters']:,} parameters, "
                   f"{g['bytes'] / 1e6:.1f} MB")
    v = m.get("verification")
    if v and v.get("kind") == "accuracy" and "skipped" not in v:
        click.echo(f"  accuracy  {'passed' if v['passed'] else 'FAILED'}: perplexity {v['reference_perplexity']:.3f}"
                   f" -> {v['perplexity']:.3f} ({v['perplexity_increase']:+.2%}), KL {v['kl_divergence']:.4f},"
                   f" top-1 {v['top1_agreement']:.3f} (vs the unquantized graph, {v['positions']} positions)")
    elif v and "skipped" not in v:
        click.echo(f"  verified  {'passed' if v['passed'] else 'FAILED'}: max |Δlogit| {v['max_abs_logit_diff']:.3g}, "
                   f"top-1 {v['top1_agreement']:.3f}, greedy {v['greedy_agreement']:.3f}")
    elif v:
        click.echo(f"  verified  skipped: {v['skipped']}")
    for e in m["engines"]:
        click.echo(f"  engine    {e['file']}  {e['backend']} {e['trt_version']}  {e['bytes'] / 1e6:.1f} MB  "
                   f"targets: {_targets(e.get('targets'))}")
        click.echo(_engine_details(e))
        for line in _contract_lines(e):
            click.echo(line)
    for stage, t in m.get("timings", {}).items():
        reused = "  reused" if t.get("reused") else ""
        click.echo(f"  timing    {stage:<20} {t['seconds']:8.2f} s  peak RSS {t['peak_rss_bytes'] / 2**20:7.0f} MiB"
                   f"{reused}")


def _targets(targets) -> str:
    """An engine's recorded targets as words: `sm80, sm86, sm89, sm120 (tensorrt-rtx default
    (portable))`, with the hardware compatibility level when one is set."""
    if not isinstance(targets, dict):
        return "unrecorded" if targets is None else str(targets)
    caps = targets.get("compute_capabilities")
    text = ", ".join(map(str, caps)) if caps else "the build GPU"
    notes = [str(targets[k]) for k in ("source",) if targets.get(k)]
    if targets.get("hardware_compatibility"):
        notes.append(f"hardware compatibility {targets['hardware_compatibility']}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _dims(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _profile_text(profiles, names) -> str:
    """Per optimization profile: `prefill min [1, 1] opt [2, 256] max [4, 512]`."""
    parts = []
    for i, triple in enumerate(profiles):
        name = names[i] if names and i < len(names) else f"profile {i}"
        lo, opt, hi = triple
        parts.append(f"{name} min {_dims(lo)} opt {_dims(opt)} max {_dims(hi)}")
    return "; ".join(parts)


def _contract_lines(engine: dict) -> list[str]:
    """One line per I/O tensor; per-layer tensors (`past_key.0` … `past_key.29`) with the
    same dtype, shape and profile are folded into one line (`past_key.{0..29}`)."""
    import re

    aliases = engine.get("aliases", {})
    groups: dict[tuple, list] = {}
    for t in engine["io"]:
        m = re.fullmatch(r"(.*)\.(\d+)", t["name"])
        stem, index = (m.group(1), int(m.group(2))) if m else (t["name"], None)
        alias = aliases.get(t["name"])
        alias_stem = re.sub(r"\.\d+$", "", alias) if alias else None
        profiles = _profile_text(t["profile_shapes"], engine.get("profile_names")) if t.get("profile_shapes") else ""
        key = (t["mode"], stem, t["dtype"], _dims(t["shape"]), profiles, alias_stem)
        groups.setdefault(key, []).append(index)
    lines = []
    for (mode, stem, dtype, shape, profiles, alias_stem), indices in groups.items():
        name = stem if indices == [None] else f"{stem}.{{{min(indices)}..{max(indices)}}}"
        if alias_stem:
            suffix = "" if indices == [None] else f".{{{min(indices)}..{max(indices)}}}"
            name += f" (aliases {alias_stem}{suffix})"
        extra = f"  {profiles}" if mode == "input" and profiles else ""
        lines.append(f"    {mode:<6} {name:<44} {dtype:<8} {shape}{extra}")
    return lines


def _engine_details(e: dict) -> str:
    """Profiles, builder options, weight streaming and cache use of one engine entry."""
    parts = [f"profiles {', '.join(e.get('profile_names') or [str(len(e.get('profiles', [])))])}"]
    if e.get("builder_options"):
        parts.append("options " + ", ".join(f"{k}={v}" for k, v in e["builder_options"].items()))
    ws = e.get("weight_streaming") or {}
    if ws.get("enabled"):
        budget = f"{ws['budget_mib']} MiB" if ws.get("budget_mib") is not None else "automatic"
        parts.append(f"weight streaming (budget {budget})")
    cache = e.get("cache") or {}
    if cache.get("key"):
        parts.append(f"cache {'hit' if cache.get('hit') else 'miss'} {cache['key'][:12]}")
    return "            " + "; ".join(parts)


def _sampling_options(f):
    f = click.option("--stop", multiple=True, help="Stop string (repeatable); not part of the output.")(f)
    f = click.option("--presence-penalty", default=0.0, show_default=True)(f)
    f = click.option("--repetition-penalty", default=1.0, show_default=True, help="1 = none.")(f)
    f = click.option("--min-p", default=0.0, show_default=True, help="0 = no min-p cut.")(f)
    f = click.option("--seed", default=0, show_default=True, help="Sampling seed.")(f)
    f = click.option("--top-p", default=1.0, show_default=True)(f)
    f = click.option("--top-k", default=0, show_default=True, help="0 = no top-k cut.")(f)
    f = click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")(f)
    f = click.option("--max-new-tokens", default=128, show_default=True)(f)
    return f


def _runtime_options(f):
    f = click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: physical cores).")(f)
    f = click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
                     show_default=True)(f)
    return f


def _sampling(kw: dict, max_new_tokens) -> dict:
    """The sampling keyword arguments of LoadedModel.stream/chat from the CLI options,
    checked by the shared request layer before any model is loaded (errors name the
    option: `--top-p: expected a finite number in (0, 1], got 2.0`)."""
    from llmbuild.runtime.requests import check_field, check_sampling

    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "seed")
    check_field("max_new_tokens", max_new_tokens, field="--max-new-tokens")
    return check_sampling({k: kw[k] for k in keys}, names={k: "--" + k.replace("_", "-") for k in keys})


def _stream_out(deltas) -> None:
    for delta in deltas:
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="Prompt text.")
@_sampling_options
@click.option("--chat/--raw", default=True, show_default=True, help="Apply the artifact's chat template.")
@click.option("--system", default=None, help="System message before the prompt (chat template only).")
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print {artifact, prompt, text, finish_reason, usage, "
              "timings} as JSON instead of streaming.")
def run(artifact, prompt, max_new_tokens, stop, chat, system, backend, threads, as_json, **sampling):
    """Generate a reply to PROMPT, streaming tokens to stdout.

    A tensor-parallel artifact (parallel.tp = N) runs one worker process per GPU
    (GPUs 0..N-1, or CUDA_VISIBLE_DEVICES) with NCCL, or, without N GPUs, all ranks on
    ONNX Runtime; no torchrun/mpirun needed (docs/tensor-parallel.md)."""
    import llmbuild
    from llmbuild.errors import UserError
    from llmbuild.runtime.requests import check_optional, check_stop, check_text
    from llmbuild.runtime.sampling import sampling_params

    options = _sampling(sampling, max_new_tokens)
    check_text("--prompt", prompt)
    check_stop(stop)
    check_optional("threads", threads, field="--threads")
    if system is not None:
        check_text("--system", system)
        if not chat:
            raise UserError("--system needs the chat template; it cannot be combined with --raw")
    model = llmbuild.load(artifact, backend=backend, threads=threads)
    try:
        if system is not None and not model.tokenizer.chat_template:
            raise UserError(f"{artifact}: the tokenizer has no chat template, so --system cannot be applied")
        message = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        text = message if system is not None else prompt
        if not as_json:
            _stream_out(model.stream(text, max_new_tokens=max_new_tokens, stop=stop, chat=chat, **options))
            return
        ids = (model.tokenizer.encode_chat(message) if system is not None else model.encode(prompt, chat=chat))
        g = model.submit(ids, max_new_tokens=max_new_tokens, params=sampling_params(**options),
                         stop=stop).result()
        _emit_json({"artifact": str(artifact), "prompt": prompt, "system": system, "text": g.text,
                    "finish_reason": g.finish_reason, "usage": _usage(g), "timings": _run_timings(g)})
    finally:
        model.close()


def _usage(g) -> dict:
    """OpenAI-style token counts of one Generation."""
    prompt, completion = len(g.prompt_token_ids), len(g.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _run_timings(g) -> dict:
    """Time to first token and rates of one Generation (seconds from submission):
    decode tokens/s = tokens after the first over the time from the first to the last."""
    times = g.token_times
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"time_to_first_token_s": g.time_to_first_token, "total_s": g.seconds,
            "decode_tokens_per_s": decode,
            "tokens_per_s": len(g.token_ids) / g.seconds if g.seconds else None}


@cli.command()
@click.argument("artifact", type=click.Path())
@_sampling_options
@click.option("--system", default=None, help="System message that starts the conversation.")
@_runtime_options
def chat(artifact, max_new_tokens, stop, system, backend, threads, **sampling):
    """Talk to ARTIFACT: one line per message, replies stream. /reset starts over,
    /exit (or Ctrl-D) leaves; Ctrl-C stops a reply."""
    import llmbuild
    from llmbuild.runtime.requests import RequestError, check_optional, check_stop, check_text

    options = _sampling(sampling, max_new_tokens)
    check_stop(stop)
    check_optional("threads", threads, field="--threads")
    if system is not None:
        check_text("--system", system)
    # Bytes that are not UTF-8 become lone surrogates instead of a UnicodeDecodeError
    # inside input(); check_text then refuses that line with a message.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    model = llmbuild.load(artifact, backend=backend, threads=threads)
    if not model.tokenizer.chat_template:
        from llmbuild.errors import UserError

        raise UserError(f"{artifact}: the tokenizer has no chat template; use `llmbuild run --raw`")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        click.echo(f"{model.manifest['name']}: /reset to start over, /exit or Ctrl-D to leave", err=True)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            continue
        try:
            check_text("input line", text)
        except RequestError as e:
            click.echo(f"error: {e}; line ignored", err=True)
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        handle = model.chat(messages, stream=True, max_new_tokens=max_new_tokens, stop=stop, **options)
        try:
            for delta in handle:
                reply.append(delta)
                click.echo(delta, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            handle.close()
            click.echo(" [stopped]", nl=False)
        click.echo()
        messages.append({"role": "assistant", "content": "".join(reply)})
    model.close()


@cli.command()
@click.argument("artifact", type=click.Path())
@_runtime_options
@click.option("--new-tokens", default=64, show_default=True, help="Tokens generated per request in decode runs.")
@click.option("--batch", default=8, show_default=True, help="The larger decode batch.")
@click.option("--repeats", default=3, show_default=True, help="Runs per figure (the best is kept).")
@click.option("--no-cpu-lowering", is_flag=True, help="ONNX Runtime: run the standard graph, not the CPU lowering.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def bench(artifact, backend, threads, new_tokens, batch, repeats, no_cpu_lowering, as_json):
    """Measure prefill/decode tokens/s, time to first token, inter-token latency,
    Python overhead per decode step, padding and peak RSS on this machine."""
    import llmbuild
    from llmbuild.runtime.bench import format_results, run_bench

    options = {"cpu_lowering": False} if no_cpu_lowering else {}
    probe = llmbuild.load(artifact, backend=backend, threads=threads, **options)
    slots = probe.limits.max_batch_size
    if probe.executor.name == "onnxruntime" and batch > slots:  # ONNX Runtime: slots are a runtime choice
        probe.close()
        probe = llmbuild.load(artifact, backend=backend, threads=threads, max_batch_size=batch, **options)
    try:
        results = run_bench(probe, new_tokens=new_tokens, batch=batch, repeats=repeats,
                            progress=None if as_json else (lambda msg: click.echo(f"  ... {msg}", err=True)))
    finally:
        probe.close()
    if as_json:
        _emit_json(results)
    else:
        click.echo(format_results(results))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--reference", default=None,
              help="HF checkpoint dir, .gguf file, package:MODULE/FILE or hf:ORG/NAME[@REV] "
                   "(default: the source recorded in the manifest).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt(s) to compare on (default: three built-in ones).")
@click.option("--max-abs-logit-diff", type=float, default=None, help="Threshold (default per precision).")
@click.option("--min-top1-agreement", type=float, default=None)
@click.option("--min-greedy-agreement", type=float, default=None)
@click.option("--max-new-tokens", default=16, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--json", "as_json", is_flag=True)
def verify(artifact, reference, prompts, max_abs_logit_diff, min_top1_agreement, min_greedy_agreement,
           max_new_tokens, as_json):
    """Compare ARTIFACT's ONNX graphs (the standard one and the CPU-lowered one) on ONNX
    Runtime with HF transformers; exit 1 past thresholds."""
    from llmbuild.artifact import read_manifest
    from llmbuild.eval import check_cpu_runnable
    from llmbuild.recipe.model_source import resolve_reference
    from llmbuild.progress import quiet_third_party
    from llmbuild.verify import DEFAULT_PROMPTS, default_thresholds, verify_what_runs

    quiet_third_party()
    m = read_manifest(artifact)
    check_cpu_runnable(m, artifact, "verify")
    reference = resolve_reference(reference, m)
    from llmbuild.verify.reference import source_mismatch

    if (warning := source_mismatch(reference, m)) is not None:
        click.echo(f"warning: {warning}", err=True)
    thresholds = default_thresholds(m["model"]["precision"], {
        "max_abs_logit_diff": max_abs_logit_diff, "min_top1_agreement": min_top1_agreement,
        "min_greedy_agreement": min_greedy_agreement})
    report = verify_what_runs(artifact, reference, prompts=prompts or DEFAULT_PROMPTS, thresholds=thresholds,
                             max_new_tokens=max_new_tokens)
    if as_json:
        _emit_json(report)
    else:
        for row in report["prompts"]:
            click.echo(f"{row['prompt'][:40]!r:<44} max|Δ| {row['max_abs_logit_diff']:.3g}  "
                       f"top-1 {row['top1_agreement']:.3f}  greedy {row['greedy_tokens_equal']}/{row['greedy_tokens']}")
        low = report["cpu_lowered"]
        click.echo(f"CPU-lowered graph: max |Δlogit| {low['max_abs_logit_diff']:.3g}, top-1 {low['top1_agreement']:.3f}, "
                   f"greedy {low['greedy_agreement']:.3f}: {'passed' if low['passed'] else 'FAILED'}")
        click.echo(f"max |Δlogit| {report['max_abs_logit_diff']:.3g} (≤ {thresholds.max_abs_logit_diff:g}), "
                   f"top-1 {report['top1_agreement']:.3f} (≥ {thresholds.min_top1_agreement:g}), "
                   f"greedy {report['greedy_agreement']:.3f} (≥ {thresholds.min_greedy_agreement:g}): "
                   f"{'PASSED' if report['passed'] else 'FAILED'}")
        for failure in report.get("failures", []):
            click.echo(f"  FAILED: {failure}", err=True)
    if not report["passed"]:
        sys.exit(1)


@cli.command(name="eval")
@click.argument("artifact", type=click.Path())
@click.option("--reference", default=None,
              help="Artifact dir, .onnx graph, HF checkpoint dir, .gguf file, package:MODULE/FILE or "
                   "hf:ORG/NAME[@REV] to compare with (KL, top-1); default: the source recorded in the manifest.")
@click.option("--no-reference", is_flag=True, help="Perplexity only, compared with nothing.")
@click.option("--dataset", default="kjv", show_default=True,
              help="Bundled corpus (its evaluation split) or a .txt / .jsonl file.")
@click.option("--tokens", default=16384, show_default=True, help="Tokens to evaluate (whole chunks).")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per chunk (no context across chunks).")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--json", "as_json", is_flag=True)
def eval_command(artifact, reference, no_reference, dataset, tokens, seq_len, threads, as_json):
    """Perplexity of ARTIFACT on held-out text, the mean KL divergence of its next-token
    distributions from the reference's (by default the model it was compiled from) and
    their top-1 agreement."""
    from pathlib import Path

    from llmbuild.artifact import read_manifest
    from llmbuild.eval import evaluate
    from llmbuild.progress import quiet_third_party
    from llmbuild.recipe.model_source import resolve_reference

    quiet_third_party()
    if no_reference and reference is not None:
        raise click.UsageError("--no-reference and --reference exclude each other")
    if no_reference:
        reference = None
    elif reference is not None:
        reference = resolve_reference(reference, {})
    elif (Path(artifact) / "manifest.json").is_file():
        reference = resolve_reference(None, read_manifest(artifact), otherwise="or --no-reference (perplexity only)")

    if reference is not None and (Path(artifact) / "manifest.json").is_file():
        from llmbuild.verify.reference import source_mismatch

        if (warning := source_mismatch(reference, read_manifest(artifact))) is not None:
            click.echo(f"warning: {warning}", err=True)
    report = evaluate(artifact, reference, dataset=dataset, tokens=tokens, seq_len=seq_len, threads=threads)
    if as_json:
        _emit_json(report)
        return
    click.echo(f"{report['dataset']} ({report['split']}): {report['chunks']} chunks x {report['seq_len']} tokens,"
               f" {report['positions']} positions")
    click.echo(f"  perplexity       {report['perplexity']:.4f}")
    for side in ("candidate", "reference"):
        if (nf := report.get(f"{side}_non_finite")):
            click.echo(f"  WARNING: non-finite logits from the {side}: first at chunk {nf['chunk']}, position "
                       f"{nf['position']} ({nf['positions']} positions)", err=True)
    if reference is not None:
        click.echo(f"  reference ppl    {report['reference_perplexity']:.4f}  ({report['perplexity_increase']:+.2%})")
        click.echo(f"  KL divergence    {report['kl_divergence']:.5f} nats/token")
        click.echo(f"  top-1 agreement  {report['top1_agreement']:.4f}")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.argument("text")
@click.option("--chat/--raw", default=False, show_default=True, help="Apply the chat template first.")
@click.option("--json", "as_json", is_flag=True, help="Print {ids} as JSON.")
def tokenize(artifact, text, chat, as_json):
    """Print the token ids of TEXT (space-separated), e.g. for the C++ runtime."""
    from llmbuild.artifact import TOKENIZER_DIR, read_manifest
    from llmbuild.runtime.tokenizer import Tokenizer
    from pathlib import Path

    from llmbuild.runtime.requests import check_text

    check_text("TEXT", text)
    m = read_manifest(artifact)
    tok = Tokenizer(Path(artifact) / TOKENIZER_DIR, m["tokenizer"])
    ids = tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text)
    if as_json:
        _emit_json({"ids": [int(i) for i in ids]})
    else:
        click.echo(" ".join(map(str, ids)))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.argument("ids", nargs=-1, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print {text} as JSON.")
def detokenize(artifact, ids, as_json):
    """Print the text of token IDS."""
    from llmbuild.artifact import TOKENIZER_DIR, read_manifest
    from llmbuild.runtime.tokenizer import Tokenizer
    from pathlib import Path

    from llmbuild.runtime.requests import check_token_ids

    m = read_manifest(artifact)
    tok = Tokenizer(Path(artifact) / TOKENIZER_DIR, m["tokenizer"])
    check_token_ids(ids, field="IDS", vocab_size=m["model"].get("vocab_size") or tok.tok.get_vocab_size())
    text = tok.decode(list(ids))
    if as_json:
        _emit_json({"text": text})
    else:
        click.echo(text)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; without --api-key-env keep it on loopback.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key-env", metavar="VAR", default=None,
              help="Require 'Authorization: Bearer <key>' with the key read from environment variable VAR.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Sequences waiting beyond the slots; more answer 429 with Retry-After.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None,
              help="Cache slots (default: the artifact's max_batch_size).")
@click.option("--grace-period", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds in-flight requests get to finish after SIGTERM.")
@click.option("--model-name", default=None, help="Model id served under /v1/models (default: the artifact's name).")
@click.option("--replicas", default=None, type=click.IntRange(min=1),
              help="Run N replicas behind Ray Serve (needs llmbuild[ray]), one engine each.")
@_runtime_options
def serve(artifact, host, port, api_key_env, max_queue, max_batch_size, grace_period, model_name, replicas, backend,
          threads):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/models, /health, /ready, /metrics). Needs llmbuild[serve]."""
    if replicas is not None:
        from llmbuild.serve.ray_app import serve_with_ray

        sys.exit(serve_with_ray(artifact, replicas=replicas, host=host, port=port, api_key_env=api_key_env,
                                max_queue=max_queue, backend=backend, threads=threads,
                                max_batch_size=max_batch_size, model_id=model_name))
    from llmbuild.serve.server import serve as run_server

    sys.exit(run_server(artifact, host=host, port=port, api_key_env=api_key_env, max_queue=max_queue,
                        backend=backend, threads=threads, max_batch_size=max_batch_size, grace_period=grace_period,
                        model_id=model_name))


@cli.group()
def cache():
    """List, measure and prune the build cache (engines, compile stages, HF reference
    outputs) that compile reuses: $LLMBUILD_CACHE_DIR, else ~/.cache/llmbuild."""


def _cache_dir_option(f):
    return click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                        help="Cache directory (default: $LLMBUILD_CACHE_DIR or ~/.cache/llmbuild).")(f)


def _cache_dir(cache_dir):
    from pathlib import Path

    from llmbuild.engine.cache import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


def _entry_json(e) -> dict:
    return {"kind": e.kind, "name": e.name, "key": e.key, "path": str(e.path), "bytes": e.bytes,
            "last_used": e.last_used}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@cache.command(name="ls")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_ls(cache_dir, as_json):
    """Every cache entry, least recently used first: kind, name, size, last use, key."""
    import time

    from llmbuild.buildcache import cache_entries

    directory = _cache_dir(cache_dir)
    entries = cache_entries(directory)
    if as_json:
        _emit_json({"cache_dir": str(directory), "entries": [_entry_json(e) for e in entries]})
        return
    now = time.time()
    for e in entries:
        click.echo(f"{e.kind:<9} {e.name:<44} {_size(e.bytes):>10}  {_age(now - e.last_used):>9}  {e.key[:16]}")
    click.echo(f"{len(entries)} entries, {_size(sum(e.bytes for e in entries))} in {directory}")


@cache.command(name="du")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_du(cache_dir, as_json):
    """Bytes in the cache per kind of entry (engine, stage: one line per stage, reference)."""
    from llmbuild.buildcache import cache_entries

    directory = _cache_dir(cache_dir)
    groups: dict[str, list] = {}
    for e in cache_entries(directory):
        groups.setdefault(e.kind if e.kind != "stage" else f"stage:{e.name}", []).append(e)
    rows = {k: {"entries": len(v), "bytes": sum(e.bytes for e in v)} for k, v in sorted(groups.items())}
    total = sum(r["bytes"] for r in rows.values())
    if as_json:
        _emit_json({"cache_dir": str(directory), "kinds": rows, "bytes": total})
        return
    for kind, r in rows.items():
        click.echo(f"{kind:<20} {r['entries']:>5} entries {_size(r['bytes']):>10}")
    click.echo(f"{'total':<20} {sum(r['entries'] for r in rows.values()):>5} entries {_size(total):>10}  {directory}")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
_SPANS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _parse_amount(option: str, text: str, units: dict[str, int], example: str) -> float:
    import re

    from llmbuild.errors import UserError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise UserError(f"{option}: cannot read {text!r}; expected a number and a unit such as {example} "
                        f"(units: {', '.join(u for u in units if u)})")
    return float(m.group(1)) * units[m.group(2).lower()]


@cache.command(name="prune")
@_cache_dir_option
@click.option("--older-than", default=None, help="Remove entries unused for longer than this (e.g. 30d, 12h).")
@click.option("--max-size", default=None, help="Then remove the least recently used entries until the cache "
              "holds at most this much (e.g. 20G, 500MiB).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True)
def cache_prune(cache_dir, older_than, max_size, dry_run, as_json):
    """Remove cache entries by age and/or total size. Artifacts already built keep their
    files; a later compile rebuilds what it needs. Entries a running compile holds are
    skipped."""
    from llmbuild.buildcache import cache_entries, remove_entries, select_prune
    from llmbuild.errors import UserError

    if older_than is None and max_size is None:
        raise UserError("cache prune: give --older-than AGE and/or --max-size SIZE (e.g. --older-than 30d)")
    age = None if older_than is None else _parse_amount("--older-than", older_than, _SPANS, "30d or 12h")
    size = None if max_size is None else int(_parse_amount("--max-size", max_size, _UNITS, "20G or 500MiB"))
    directory = _cache_dir(cache_dir)
    entries = cache_entries(directory)
    chosen = select_prune(entries, older_than=age, max_bytes=size)
    removed, skipped = (chosen, []) if dry_run else remove_entries(directory, chosen)
    freed = sum(e.bytes for e in removed)
    if as_json:
        _emit_json({"cache_dir": str(directory), "dry_run": dry_run, "removed": [_entry_json(e) for e in removed],
                    "skipped": [_entry_json(e) for e in skipped], "bytes_freed": freed,
                    "bytes_left": sum(e.bytes for e in entries) - freed})
        return
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        click.echo(f"{verb} {e.kind} {e.name} {_size(e.bytes)} {e.key[:16]}")
    for e in skipped:
        click.echo(f"skipped {e.kind} {e.name} (in use by a running compile)")
    click.echo(f"{verb} {len(removed)} of {len(entries)} entries, {_size(freed)}; "
               f"{_size(sum(e.bytes for e in entries) - freed)} left in {directory}")


def main():
    cli(prog_name="llmbuild")


if __name__ == "__main__":
    main()
