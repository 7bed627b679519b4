"""The HF transformers reference model (float32, CPU) for a checkpoint dir or GGUF file."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from llmbuild.errors import UserError


def reference_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def load_reference(path: str | Path, threads: int | None = None):
    """The HF model of a checkpoint dir or GGUF file, float32, eval mode. `threads`: torch's
    intra-op threads (process-wide; compile gives verification its share of the cores)."""
    if not reference_available():
        raise UserError(
            "verification needs the HF reference: pip install 'llmbuild[reference]' (torch, transformers)"
        )
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    if not path.exists():
        raise UserError(f"reference {path} does not exist")
    if not ((path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix == ".gguf")):
        raise UserError(f"reference {path}: expected a Hugging Face checkpoint directory (with config.json) or a "
                        ".gguf file")
    if threads:
        torch.set_num_threads(threads)
    try:
        if path.is_file():
            with _gguf_read_once():
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:  # a config or weights transformers cannot read
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"reference {path}: transformers cannot load it ({type(e).__name__}: {reason})") from None
    return model.eval()


@contextlib.contextmanager
def _gguf_read_once():
    """transformers' GGUF loader parses the file's header twice (for the config, then for
    the weights; the tokenizer's 49k strings are most of it) and builds gguf's
    TensorNameMap again for every module of the model: 3/4 of loading SmolLM2-135M's
    GGUF (benchmarks/compile_smollm2.md). Both are pure functions of their arguments,
    memoized here for one load, and the header's views skip numpy's memmap subclass
    (what is read and converted is unchanged)."""
    import gguf
    import numpy as np

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    class PlainViews(reader):
        """gguf's reader, its views plain ndarrays over the same memmap (`data` is the
        memmap seen as an ndarray): numpy runs Python code (memmap.__array_finalize__)
        for every view of a memmap, and the header is two views per tokenizer string —
        98k for SmolLM2's tokens and merges, a third of the header parse. The bytes read
        are the same."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)  # its base keeps the mapping open

    def read_once(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = PlainViews(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def check_same_vocabulary(reference, reference_logits, artifact, artifact_logits) -> None:
    """Logits of two models can be compared only over one vocabulary: a reference that is
    not the model the artifact was built from (another checkpoint at the recorded path,
    a wrong --reference) is a UserError, not a numpy broadcasting error."""
    ours, theirs = artifact_logits.shape[-1], reference_logits.shape[-1]
    if ours != theirs:
        raise UserError(f"the reference {reference} has a vocabulary of {theirs} tokens and the artifact {artifact} "
                        f"{ours}: it is not the model the artifact was compiled from; pass --reference with that "
                        "model")


class OutOfVocabulary(Exception):
    """Token ids the reference has no embedding for: another model than the artifact's."""

    def __init__(self, vocab: int):
        super().__init__(f"token ids beyond the reference's vocabulary of {vocab}")
        self.vocab = vocab


def reference_logits(model, ids: list[int]):
    """Float32 logits [S, vocab] of one sequence (OutOfVocabulary: ids it cannot embed)."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    if ids and max(ids) >= vocab:
        raise OutOfVocabulary(vocab)

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def reference_greedy(model, ids: list[int], max_new_tokens: int, eos_token_ids: list[int]) -> list[int]:
    """Greedy continuation with HF's own KV-cached decoding loop."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
            eos_token_id=eos_token_ids or None, pad_token_id=(eos_token_ids or [0])[0],
        )
    tokens = out[0, len(ids):].tolist()
    for i, t in enumerate(tokens):
        if t in eos_token_ids:
            return tokens[:i]
    return tokens


def source_mismatch(reference, manifest: dict) -> str | None:
    """A warning when a checkpoint or GGUF reference is not the source the artifact was
    compiled from (its fingerprint differs from the manifest's hashes.source): the figures
    then compare two different models. None when it is, or when it cannot be told."""
    from llmbuild.source import open_source

    recorded = (manifest.get("hashes") or {}).get("source")
    path = Path(reference)
    if not recorded or not ((path.is_dir() and (path / "config.json").is_file()) or path.suffix == ".gguf"):
        return None
    source = open_source(path)
    try:
        fingerprint = source.fingerprint()
    finally:
        source.close()
    if fingerprint == recorded:
        return None
    return (f"the reference {path} is not the source this artifact was compiled from (its fingerprint "
            f"{fingerprint[:12]} differs from the manifest's hashes.source {recorded[:12]}): the figures compare two "
            "different models")


# -- the HF reference in a child process (compile) -----------------------------------------

class ReferenceProcess:
    """The HF reference (`load_reference`) loaded and run in a child process: started at
    once, it loads while the caller works (compile starts it right after the source
    stage, so the load overlaps the ONNX export and the engine build); `logits(ids)` waits
    for the load, then computes in the child. A process, not a thread: transformers'
    GGUF load is mostly Python (header parse, dequantization), which in a thread holds the
    GIL against compile's own Python work (ONNX export, tokenizer, ONNX Runtime feeds); the
    parent never imports torch, and its peak memory excludes the float32 HF model. `close()`
    ends the child (it ignores Ctrl-C: the parent, interrupted, ends it)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # not fork: the parent runs threads (progress, engine build)
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve_reference, args=(child, str(path), threads), daemon=True,
                                    name="llmbuild-hf-reference")
        self._process.start()
        child.close()

    def logits(self, ids: list[int]):
        """Float32 logits [S, vocab] of one sequence, computed by the child
        (`reference_logits`; OutOfVocabulary and UserError re-raised here)."""
        try:
            self._conn.send(("logits", [int(i) for i in ids]))
            kind, value = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = self._process.exitcode
            raise UserError(f"the HF reference process ended unexpectedly (exit code {code})") from None
        if kind == "oov":
            raise OutOfVocabulary(value)
        if kind == "user_error":
            raise UserError(value)
        if kind == "error":
            raise RuntimeError(f"the HF reference process failed: {value}")
        return value

    def kill(self) -> None:
        """End the child now (safe from another thread than the one using `logits`: that
        one's wait then fails with a UserError)."""
        if self._process.is_alive():
            self._process.terminate()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve_reference(conn, path: str, threads: int | None) -> None:
    """The child of ReferenceProcess: load, then answer `logits` requests until `stop`.
    A load that fails is reported on the first request."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent ends this process
    try:
        os.nice(10)  # beside the engine build: take only the cycles it leaves
    except (AttributeError, OSError):
        pass
    model, failure = None, None
    try:
        model = load_reference(path, threads=threads)
    except UserError as e:
        failure = ("user_error", str(e))
    except Exception as e:  # reported to the parent, which raises it
        failure = ("error", f"{type(e).__name__}: {e}")
    while True:
        try:
            kind, ids = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        if failure is not None:
            conn.send(failure)
            continue
        try:
            conn.send(("ok", reference_logits(model, ids)))
        except OutOfVocabulary as e:
            conn.send(("oov", e.vocab))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
