"""llmbuild: declarative recipes compiled into TensorRT engines and ONNX artifacts.

Heavy libraries (onnx, onnxruntime, TensorRT, torch) are imported only by the functions
that need them, so `import llmbuild` and the CLI start fast.
"""

from llmbuild.version import __version__

__all__ = ["__version__", "compile", "load"]


def load(artifact, backend: str = "auto", threads: int | None = None, **options):
    """Load a compiled artifact for generation: `llmbuild.load(path).generate([...])`.
    options: max_batch_size, max_num_tokens, cpu_lowering (llmbuild.runtime.LoadedModel)."""
    from llmbuild.runtime import load as _load

    return _load(artifact, backend=backend, threads=threads, **options)


def compile(recipe, overrides=(), out_dir="out", **kwargs):
    """Compile a recipe file into an artifact directory; returns the artifact path."""
    from llmbuild.compile import compile_recipe

    return compile_recipe(recipe, overrides=overrides, out_dir=out_dir, **kwargs)
