"""`llmbuild.load(artifact)`: an artifact's tokenizer + an executor + generation."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from llmbuild.artifact import MODEL_DIR, TOKENIZER_DIR, read_manifest
from llmbuild.errors import UserError
from llmbuild.runtime.generator import Generation, Limits, generate_batch, stream_text
from llmbuild.runtime.sampling import SamplingParams
from llmbuild.runtime.tokenizer import Tokenizer

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def _open_executor(directory: Path, manifest: dict, backend: str, threads: int | None):
    if backend not in BACKENDS:
        raise UserError(f"unknown runtime backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        from llmbuild.runtime.executors.tensorrt import gpu_available

        backend = "tensorrt" if manifest["engines"] and gpu_available() else "onnxruntime"
    limits = manifest["limits"]
    layers = manifest["model"]["num_layers"]
    if backend == "tensorrt":
        from llmbuild.runtime.executors.tensorrt import TensorRTExecutor

        return TensorRTExecutor(directory, manifest)
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    return OnnxRuntimeExecutor(
        directory / manifest["graph"]["file"], num_layers=layers, cache_len=limits["max_seq_len"], threads=threads
    )


class LoadedModel:
    def __init__(self, artifact: str | Path, backend: str = "auto", threads: int | None = None):
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path)
        info = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer(self.path / TOKENIZER_DIR, info)
        self.limits = Limits(**{k: self.manifest["limits"][k] for k in ("max_batch_size", "max_input_len", "max_seq_len")})
        self.executor = _open_executor(self.path, self.manifest, backend, threads)

    @property
    def eos_token_ids(self) -> list[int]:
        return self.tokenizer.eos_token_ids

    def encode(self, prompt: str, *, chat: bool) -> list[int]:
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, params: SamplingParams = SamplingParams(),
        on_token=None,
    ) -> list[Generation]:
        results: list[Generation] = []
        step = self.limits.max_batch_size
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            callback = None if on_token is None else (lambda b, t, s=start: on_token(s + b, t))
            results += generate_batch(
                self.executor, chunk, max_new_tokens=max_new_tokens, params=params,
                eos_token_ids=self.eos_token_ids, limits=self.limits, on_token=callback,
            )
        for g in results:
            g.text = self.tokenizer.decode(g.token_ids)
        return results

    def generate(
        self, prompts: str | Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int = 0, chat: bool = False,
    ) -> list[Generation]:
        """Text in, `Generation`s (text, token ids, finish reason) out; greedy at temperature 0."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = [self.encode(p, chat=chat) for p in prompts]
        return self.generate_ids(ids, max_new_tokens=max_new_tokens, params=params)

    def stream(
        self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int = 0, chat: bool = False,
    ) -> Iterator[str]:
        """Text deltas of one generation, as tokens are produced."""
        import queue
        import threading

        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = self.encode(prompt, chat=chat)
        tokens: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def work():
            try:
                self.generate_ids([ids], max_new_tokens=max_new_tokens, params=params, on_token=lambda b, t: tokens.put(t))
            except BaseException as e:  # re-raised in the consumer
                failure.append(e)
            finally:
                tokens.put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from stream_text(self.tokenizer.decode, iter(tokens.get, done))
        thread.join()
        if failure:
            raise failure[0]

    def chat(self, messages: list[dict], **kwargs) -> Generation:
        ids = self.tokenizer.encode_chat(messages)
        params = SamplingParams(**{k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p", "seed") if k in kwargs})
        return self.generate_ids([ids], params=params, **kwargs)[0]

    def close(self) -> None:
        self.executor.close()


def load(artifact: str | Path, backend: str = "auto", threads: int | None = None) -> LoadedModel:
    return LoadedModel(artifact, backend=backend, threads=threads)
