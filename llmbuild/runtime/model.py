"""`llmbuild.load(artifact)`: an artifact's tokenizer + an executor + the generation engine.

    model = llmbuild.load("out/smollm2-135m-instruct")
    model.generate(["Hi", "Hello"], max_new_tokens=32)      # list in, list of Generations out
    for delta in model.stream("Tell me a story"): ...        # text deltas as they come
    model.chat([{"role": "user", "content": "Hi"}])         # the artifact's chat template
    model.generate("A user:", json_schema={"type": "object"})  # JSON matching a schema

All calls go through one engine (llmbuild.runtime.engine) with continuous batching, so
they may be made from several threads at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from llmbuild.artifact import TOKENIZER_DIR, read_manifest
from llmbuild.artifact.integrity import check_artifact_files
from llmbuild.errors import UserError
from llmbuild.runtime.engine import Engine, RequestHandle
from llmbuild.runtime.generator import Generation, Limits, Request
from llmbuild.runtime import requests as checks
from llmbuild.runtime.sampling import SamplingParams, check_params, sampling_params
from llmbuild.runtime.tokenizer import Tokenizer

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def _open_executor(directory: Path, manifest: dict, backend: str, threads: int | None, slots: int,
                   cpu_lowering: bool | None):
    if backend not in BACKENDS:
        raise UserError(f"unknown runtime backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if manifest.get("parallel", {}).get("tp", 1) > 1:  # one graph/engine per rank
        from llmbuild.runtime.executors.tensor_parallel import open_parallel_executor

        return open_parallel_executor(directory, manifest, backend, threads)
    if backend == "auto":
        from llmbuild.runtime.executors.tensorrt import gpu_available

        backend = "tensorrt" if manifest["engines"] and gpu_available() else "onnxruntime"
    limits = manifest["limits"]
    layers = manifest["model"]["num_layers"]
    if backend == "tensorrt":
        from llmbuild.runtime.executors.tensorrt import TensorRTExecutor

        return TensorRTExecutor(directory, manifest, batch_size=slots)
    from llmbuild.runtime.executors.onnxruntime import OnnxRuntimeExecutor

    from llmbuild.lowering.cpu_graph import cpu_graph_file

    return OnnxRuntimeExecutor(
        directory / manifest["graph"]["file"], num_layers=layers, cache_len=limits["max_seq_len"], threads=threads,
        batch_size=slots, cpu_lowering=cpu_lowering, cpu_graph=cpu_graph_file(directory, manifest),
    )


class LoadedModel:
    def __init__(self, artifact: str | Path, backend: str = "auto", threads: int | None = None, *,
                 max_batch_size: int | None = None, max_num_tokens: int | None = None,
                 cpu_lowering: bool | None = None, check_hashes: bool | None = None):
        """max_batch_size: cache slots (default: the artifact's limit; more only on ONNX
        Runtime, whose graph has no fixed batch). max_num_tokens: tokens of one prefill
        pass; longer prompts are prefilled in chunks (default and maximum for an engine:
        the artifact's max_input_len). cpu_lowering: see OnnxRuntimeExecutor (the
        artifact's CPU-ready graph, when it has one, is the lowered graph: loaded as is).
        check_hashes: compare the graph's and engines' sha256 with the manifest's
        (default: yes, unless $LLMBUILD_SKIP_HASH_CHECK=1; presence and sizes are
        always checked, llmbuild.artifact.integrity)."""
        if backend not in BACKENDS:
            raise UserError(f"unknown runtime backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        threads = checks.check_optional("threads", threads)
        max_batch_size = checks.check_optional("max_batch_size", max_batch_size)
        max_num_tokens = checks.check_optional("max_num_tokens", max_num_tokens)
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path)
        check_artifact_files(self.path, self.manifest, hashes=check_hashes)
        info = self.manifest["tokenizer"]
        self.tokenizer = Tokenizer(self.path / TOKENIZER_DIR, info)
        lim = self.manifest["limits"]
        self.limits = Limits(**{k: lim[k] for k in ("max_batch_size", "max_input_len", "max_seq_len")})
        slots = max_batch_size or self.limits.max_batch_size
        chunk = max_num_tokens or self.limits.max_input_len
        self.executor = _open_executor(self.path, self.manifest, backend, threads, slots, cpu_lowering)
        if getattr(self.executor, "name", "") not in ("onnxruntime", "onnxruntime-tp"):  # engine profiles bound both
            if slots > self.limits.max_batch_size or chunk > self.limits.max_input_len:
                raise UserError(
                    f"max_batch_size={slots}, max_num_tokens={chunk}: the {self.executor.name} engine of "
                    f"{self.path} takes at most max_batch_size={self.limits.max_batch_size} and "
                    f"max_input_len={self.limits.max_input_len} (its optimization profiles)"
                )
        self.engine = Engine(
            self.executor, limits=Limits(slots, chunk, self.limits.max_seq_len), num_slots=slots,
            max_num_tokens=chunk, eos_token_ids=self.eos_token_ids, decode=self.tokenizer.decode,
            vocab_size=self.manifest["model"].get("vocab_size"),
        )

    @property
    def eos_token_ids(self) -> list[int]:
        return self.tokenizer.eos_token_ids

    def grammar(self, json_schema: dict | str | None):
        """A compiled structured-output grammar for this artifact's tokenizer: JSON text
        matching `json_schema` (None: any JSON object). See llmbuild.runtime.grammar."""
        from llmbuild.runtime.grammar import Grammar, grammar_tokenizer

        return Grammar.json_schema(json_schema, grammar_tokenizer(self))

    def encode(self, prompt: str, *, chat: bool) -> list[int]:
        checks.check_text("prompt", prompt)
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    # -- requests -----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, params: SamplingParams = SamplingParams(),
               stop: Sequence[str] = (), logprobs: int | None = None, stream: bool = False,
               ignore_eos: bool = False, grammar=None, notify=None, on_finish=None) -> RequestHandle:
        """Queue one request of token ids (thread-safe); see RequestHandle. Every field is
        checked (llmbuild.runtime.requests) before it reaches the engine thread. `grammar`:
        from `self.grammar(...)`; `notify`, `on_finish`: see Engine.submit."""
        request = Request(checks.check_token_ids(prompt_ids), max_new_tokens, check_params(params),
                          checks.check_stop(stop), logprobs, stream, ignore_eos, grammar)
        return self.engine.submit(request, notify=notify, on_finish=on_finish)

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        stop: Sequence[str] = (), logprobs: int | None = None, grammar=None,
    ) -> list[Generation]:
        """Token ids in, Generations out; all prompts run together (continuous batching)."""
        per_prompt = list(params) if not isinstance(params, SamplingParams) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise UserError(f"{len(per_prompt)} sampling settings for {len(prompts)} prompts")
        handles = [self.submit(p, max_new_tokens=max_new_tokens, params=sp, stop=stop, logprobs=logprobs,
                               grammar=grammar)
                   for p, sp in zip(prompts, per_prompt)]
        return [h.result() for h in handles]

    def generate(
        self, prompts: str | Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0, seed: int | Sequence[int] = 0, stop: str | Sequence[str] = (),
        logprobs: int | None = None, chat: bool = False, json_schema: dict | str | None = None,
    ) -> list[Generation]:
        """Text in, `Generation`s (text, token ids, finish reason, logprobs) out; greedy at
        temperature 0. `seed` may be one per prompt; a seeded request gives the same
        text alone or batched with others. `json_schema`: the output is JSON text that
        matches this schema (structured output, llmbuild.runtime.grammar)."""
        prompts = checks.check_prompts(prompts)
        seeds = checks.check_seeds(seed, len(prompts))
        fields = checks.check_sampling(dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                            frequency_penalty=frequency_penalty))
        checks.request_fields(max_new_tokens=max_new_tokens, stop=stop, logprobs=logprobs)
        params = [SamplingParams(seed=s, **fields) for s in seeds]
        ids = [self.encode(p, chat=chat) for p in prompts]
        grammar = self.grammar(json_schema) if json_schema is not None else None
        return self.generate_ids(ids, max_new_tokens=max_new_tokens, params=params, stop=_stops(stop),
                                 logprobs=logprobs, grammar=grammar)

    def stream(self, prompt: str | list[dict], *, max_new_tokens: int = 64, stop: str | Sequence[str] = (),
               chat: bool = False, **sampling) -> Iterator[str]:
        """Text deltas of one generation, as tokens are produced. `prompt` may also be a
        list of chat messages (then the chat template applies)."""
        if isinstance(prompt, (list, tuple)):
            ids = self.tokenizer.encode_chat(checks.check_messages(prompt))
        else:
            ids = self.encode(prompt, chat=chat)
        handle = self.submit(ids, max_new_tokens=max_new_tokens, params=_params(sampling), stop=_stops(stop),
                             stream=True)
        return iter(handle)

    def chat(self, messages: list[dict], *, stream: bool = False, max_new_tokens: int = 256,
             stop: str | Sequence[str] = (), logprobs: int | None = None, **sampling):
        """Reply to chat `messages` (the artifact's chat template): a Generation, or with
        stream=True an iterator of text deltas."""
        if stream:
            return self.stream(messages, max_new_tokens=max_new_tokens, stop=stop, **sampling)
        ids = self.tokenizer.encode_chat(checks.check_messages(messages))
        return self.submit(ids, max_new_tokens=max_new_tokens, params=_params(sampling), stop=_stops(stop),
                           logprobs=logprobs).result()

    def close(self) -> None:
        self.engine.close()
        self.executor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stops(stop: str | Sequence[str]) -> tuple[str, ...]:
    return checks.check_stop(stop)


def _params(sampling: dict) -> SamplingParams:
    return sampling_params(**sampling)


def load(artifact: str | Path, backend: str = "auto", threads: int | None = None, **options) -> LoadedModel:
    """Load an artifact; options: max_batch_size, max_num_tokens, cpu_lowering, check_hashes (LoadedModel)."""
    return LoadedModel(artifact, backend=backend, threads=threads, **options)
