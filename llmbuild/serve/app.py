"""The ASGI app: OpenAI's chat/completions API in front of one LoadedModel's engine.

    HTTP body ─► schemas.parse_body (400 naming the field) ─► prompt ids, limits check
        ─► admission (slots + --max-queue, else 429 Retry-After) ─► n engine requests
        ─► RequestHandle.drain() woken by notify ─► JSON answer, or SSE chunks + [DONE]

The engine thread does the work (continuous batching); the event loop only parses,
tokenizes, and moves text deltas. A client that goes away cancels its sequences, so
their slots are free at the next engine step. Each response carries
`x-llmbuild-replica` (host:pid), which tells Ray Serve replicas apart.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmbuild.errors import UserError
from llmbuild.runtime.sampling import SamplingParams
from llmbuild.serve.metrics import Metrics
from llmbuild.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, parse_body

log = logging.getLogger("llmbuild.serve")
REPLICA = f"{socket.gethostname()}:{os.getpid()}"
_U64 = (1 << 64) - 1
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
DISCONNECT_POLL = 0.25  # seconds between disconnect checks of a non-streaming request


class ClientGone(Exception):
    """The client of a non-streaming request closed its connection."""


class ServerState:
    """What the endpoints share: the model, admission control, metrics, readiness."""

    def __init__(self, model, *, max_queue: int, api_key: str | None, model_id: str | None = None):
        self.model = model
        self.model_id = model_id or model.manifest.get("name") or model.path.name
        self.slots = model.engine.scheduler.num_slots
        self.capacity = self.slots + max_queue
        self.api_key = api_key
        self.in_flight = 0
        self.ready = True
        self.created = int(time.time())
        self.metrics = Metrics(model.engine, capacity=self.capacity)
        self._grammars: OrderedDict[str, object] = OrderedDict()

    def admit(self, n: int) -> None:
        if self.in_flight + n > self.capacity:
            raise ApiError(429, f"the server is at capacity ({self.capacity} sequences in flight or queued); "
                           "retry shortly", type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += n
        self.metrics.in_flight.set(self.in_flight)

    def release(self, n: int) -> None:
        self.in_flight -= n
        self.metrics.in_flight.set(self.in_flight)

    async def grammar(self, response_format):
        """The compiled grammar of a response_format (cached by schema), or None."""
        if response_format is None or response_format.type == "text":
            return None
        schema = response_format.json_schema.schema_ if response_format.type == "json_schema" else None
        key = json.dumps(schema, sort_keys=True)
        if key in self._grammars:
            self._grammars.move_to_end(key)
            return self._grammars[key]
        try:
            grammar = await asyncio.to_thread(self.model.grammar, schema)
        except UserError as e:
            raise ApiError(400, str(e), param="response_format") from None
        self._grammars[key] = grammar
        if len(self._grammars) > 64:
            self._grammars.popitem(last=False)
        return grammar


# -- requests into engine jobs -------------------------------------------------------------------


class Job:
    """The n engine requests of one HTTP request, woken on the event loop by the engine."""

    def __init__(self, state: ServerState, prompts: list[list[int]], n: int, *, max_tokens: int, params: list,
                 stop, logprobs, stream: bool, grammar):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.handles = []
        self.count = len(prompts) * n
        state.admit(self.count)
        try:
            for p, prompt in enumerate(prompts):
                for j in range(n):
                    self.handles.append(state.model.submit(
                        prompt, max_new_tokens=max_tokens, params=params[j], stop=stop, logprobs=logprobs,
                        stream=stream, grammar=grammar, notify=self._notify, on_finish=state.metrics.observe))
        except BaseException:
            self.cancel()
            raise
        self.open = set(range(len(self.handles)))

    def _notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:  # the loop is closed (shutdown)
            pass

    async def events(self, request: Request | None = None):
        """(choice index, text delta or None when that choice finished), until all finished."""
        while self.open:
            try:
                await asyncio.wait_for(self.wake.wait(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ClientGone
                continue
            self.wake.clear()
            for i in sorted(self.open):
                handle = self.handles[i]
                finished = handle.done()
                for delta in handle.drain():
                    yield i, delta
                if finished:
                    self.open.discard(i)
                    yield i, None

    def result(self, i: int):
        handle = self.handles[i]
        if handle.error is not None:
            log.error("generation failed: %s: %s", type(handle.error).__name__, handle.error)
            raise ApiError(500, f"the generation failed: {handle.error}", type="server_error", code="engine_error")
        return handle.result()

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done():
                h.cancel()

    def close(self) -> None:
        self.cancel()
        if self.count:
            self.state.release(self.count)
            self.count = 0


def _sampling(body, n: int) -> list[SamplingParams]:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:
        temperature, top_p = 0.0, 1.0  # only the most likely token is left
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    return [SamplingParams(temperature=temperature, top_p=top_p, seed=(seed + j) & _U64,
                           presence_penalty=body.presence_penalty or 0.0,
                           frequency_penalty=body.frequency_penalty or 0.0) for j in range(n)]


def _check_length(state: ServerState, prompt_len: int, max_tokens: int | None, what: str) -> int:
    limit = state.model.engine.limits.max_seq_len
    wanted = max_tokens if max_tokens is not None else max(1, limit - prompt_len)
    if prompt_len == 0:  # nothing to continue: not a length problem
        raise ApiError(400, f"the {what} is empty (0 tokens); expected at least one token", param=what)
    if prompt_len + wanted > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + wanted} tokens ({prompt_len} in the {what}, {wanted} in the completion). "
                       f"Please reduce the length of the {what} or completion.", param=what,
                       code="context_length_exceeded")
    return wanted


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _finish_reason(generation) -> str:
    return _FINISH.get(generation.finish_reason, "stop")


# -- the app ---------------------------------------------------------------------------------------


def create_app(server: ServerState, *, close_model: bool = True) -> FastAPI:
    """The FastAPI app over `server`; at shutdown the model is closed (close_model)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            server.ready = False
            if close_model:
                await asyncio.to_thread(server.model.close)

    app = FastAPI(title="llmbuild serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def state(request: Request) -> ServerState:
        return request.app.state.server

    def answer(endpoint: str, state_: ServerState, status: int, body=None, headers=None) -> Response:
        state_.metrics.requests.labels(endpoint, str(status)).inc()
        headers = {"x-llmbuild-replica": REPLICA, **(headers or {})}
        return JSONResponse(body, status_code=status, headers=headers)

    def authorize(request: Request, state_: ServerState) -> None:
        if state_.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), state_.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def guarded(endpoint: str, request: Request, work) -> Response:
        s = state(request)
        try:
            authorize(request, s)
            response = await work(s)
        except ApiError as e:
            return answer(endpoint, s, e.status, e.body(), e.headers)
        except ClientGone:  # nobody reads this answer; its sequences are cancelled
            return answer(endpoint, s, 499, {"error": {"message": "client closed the request", "type": "cancelled",
                                                       "param": None, "code": None}})
        except UserError as e:  # the runtime's own checks (limits, parameters)
            return answer(endpoint, s, 400, ApiError(400, str(e)).body())
        except ValueError as e:  # e.g. a chat template that refuses the messages
            return answer(endpoint, s, 400, ApiError(400, str(e), param="messages").body())
        except Exception as e:  # noqa: BLE001 - one request fails, the server goes on
            log.error("%s failed: %s: %s", endpoint, type(e).__name__, e)
            return answer(endpoint, s, 500, ApiError(500, "internal error", type="server_error").body())
        if not isinstance(response, StreamingResponse):
            s.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        response.headers["x-llmbuild-replica"] = REPLICA
        return response

    @app.get("/health")
    async def health():
        return Response(b"ok\n", media_type="text/plain", headers={"x-llmbuild-replica": REPLICA})

    @app.get("/ready")
    async def ready(request: Request):
        s = state(request)
        status = 200 if s.ready else 503
        return JSONResponse({"ready": s.ready, "model": s.model_id}, status_code=status,
                            headers={"x-llmbuild-replica": REPLICA})

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(state(request).metrics.render(), media_type="text/plain; version=0.0.4",
                        headers={"x-llmbuild-replica": REPLICA})

    @app.get("/v1/models")
    async def models(request: Request):
        async def work(s: ServerState):
            return JSONResponse({"object": "list", "data": [
                {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "llmbuild"}]})
        return await guarded("models", request, work)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        async def work(s: ServerState):
            body = parse_body(ChatCompletionRequest, await request.body())
            _check_model(s, body.model)
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = s.model.tokenizer.encode_chat(messages)
            max_tokens = body.max_completion_tokens or body.max_tokens
            max_tokens = _check_length(s, len(prompt), max_tokens, "messages")
            n = body.n or 1
            grammar = await s.grammar(body.response_format)
            top = (body.top_logprobs or 0) if body.logprobs else None
            job = Job(s, [prompt], n, max_tokens=max_tokens, params=_sampling(body, n), stop=body.stops(),
                      logprobs=top, stream=bool(body.stream), grammar=grammar)
            meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": s.model_id}
            if body.stream:
                usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_chat_stream(s, job, meta, len(prompt), usage, bool(body.logprobs)),
                                         media_type="text/event-stream")
            try:
                async for _ in job.events(request):
                    pass
                gens = [job.result(i) for i in range(n)]
            finally:
                job.close()
            choices = []
            for i, g in enumerate(gens):
                choice = {"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                          "finish_reason": _finish_reason(g)}
                if body.logprobs:
                    choice["logprobs"] = {"content": [_chat_logprob(s, lp) for lp in g.logprobs or []]}
                choices.append(choice)
            return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                                 "usage": _usage(len(prompt), sum(len(g.token_ids) for g in gens))})
        return await guarded("chat.completions", request, work)

    @app.post("/v1/completions")
    async def completions(request: Request):
        async def work(s: ServerState):
            body = parse_body(CompletionRequest, await request.body())
            _check_model(s, body.model)
            prompts = _prompts(s, body.prompt)
            max_tokens = min(_check_length(s, len(p), body.max_tokens, "prompt") for p in prompts)
            n = body.n or 1
            grammar = await s.grammar(body.response_format)
            job = Job(s, prompts, n, max_tokens=max_tokens, params=_sampling(body, n), stop=body.stops(),
                      logprobs=body.logprobs, stream=bool(body.stream), grammar=grammar)
            meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": s.model_id}
            echo = [s.model.tokenizer.decode(p) if body.echo else "" for p in prompts]
            prompt_tokens = sum(len(p) for p in prompts)
            if body.stream:
                usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_completion_stream(s, job, meta, prompt_tokens, usage, echo, n,
                                                            body.logprobs is not None),
                                         media_type="text/event-stream")
            try:
                async for _ in job.events(request):
                    pass
                gens = [job.result(i) for i in range(job_len(job))]
            finally:
                job.close()
            choices = []
            for i, g in enumerate(gens):
                choice = {"index": i, "text": echo[i // n] + g.text, "logprobs": None, "finish_reason": _finish_reason(g)}
                if body.logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(s, g.logprobs or [], len(echo[i // n]))
                choices.append(choice)
            return JSONResponse({**meta, "object": "text_completion", "choices": choices,
                                 "usage": _usage(prompt_tokens, sum(len(g.token_ids) for g in gens))})
        return await guarded("completions", request, work)

    return app


def job_len(job: Job) -> int:
    return len(job.handles)


def _check_model(s: ServerState, model: str) -> None:
    if model != s.model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{s.model_id}'", param="model",
                       code="model_not_found")


def _prompts(s: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [s.model.tokenizer.encode(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [s.model.tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        ids = [prompt]
    else:
        ids = prompt
    vocab = s.model.engine.vocab_size
    for p in ids:
        if vocab is not None and any(t >= vocab for t in p):
            raise ApiError(400, f"prompt: token ids must be < the vocabulary size {vocab}", param="prompt")
    return [list(p) for p in ids]


def _token_text(s: ServerState, token_id: int) -> str:
    return s.model.tokenizer.decode([token_id])


def _chat_logprob(s: ServerState, lp) -> dict:
    def entry(tid, value):
        text = _token_text(s, tid)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}
    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


def _completion_logprobs(s: ServerState, lps, at: int = 0) -> dict:
    """OpenAI's completion logprobs; text_offset counts from `at` (a stream's earlier chunks)."""
    tokens = [_token_text(s, lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_token_text(s, t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


class _StreamedLogprobs:
    """Per choice, the logprobs not yet sent: each chunk carries those of the tokens sampled
    since the previous one, the finish chunk the rest; together they are the whole answer's."""

    def __init__(self, job: Job, wanted: bool):
        self.job, self.wanted = job, wanted
        self.sent = [0] * len(job.handles)

    def new(self, i: int, generation=None) -> list:
        if not self.wanted:
            return []
        if generation is None:
            lps = self.job.handles[i].logprobs(self.sent[i])
        else:
            lps = (generation.logprobs or [])[self.sent[i]:]
        self.sent[i] += len(lps)
        return lps


async def _chat_stream(s: ServerState, job: Job, meta: dict, prompt_tokens: int, include_usage: bool,
                       logprobs: bool = False):
    base = {**meta, "object": "chat.completion.chunk"}
    completion = 0
    pending = _StreamedLogprobs(job, logprobs)

    def lp_field(lps):
        return {"content": [_chat_logprob(s, lp) for lp in lps]} if logprobs else None
    try:
        for i in range(len(job.handles)):
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        async for i, delta in job.events():
            if delta is not None:
                yield _sse({**base, "choices": [{"index": i, "delta": {"content": delta},
                                                 "logprobs": lp_field(pending.new(i)), "finish_reason": None}]})
                continue
            try:
                g = job.result(i)
            except ApiError as e:
                yield _sse(e.body())
                return
            completion += len(g.token_ids)
            rest = pending.new(i, g)
            yield _sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": lp_field(rest) if rest else None,
                                             "finish_reason": _finish_reason(g)}]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})
        yield b"data: [DONE]\n\n"
        s.metrics.requests.labels("chat.completions", "200").inc()
    finally:
        job.close()


async def _completion_stream(s: ServerState, job: Job, meta: dict, prompt_tokens: int, include_usage: bool,
                             echo: list[str], n: int, logprobs: bool = False):
    base = {**meta, "object": "text_completion"}
    completion = 0
    pending = _StreamedLogprobs(job, logprobs)
    offsets = [len(echo[i // n]) for i in range(len(job.handles))]

    def lp_field(i, lps):
        if not logprobs:
            return None
        out = _completion_logprobs(s, lps, offsets[i])
        offsets[i] += sum(len(t) for t in out["tokens"])
        return out
    try:
        for i in range(len(job.handles)):
            if echo[i // n]:
                yield _sse({**base, "choices": [{"index": i, "text": echo[i // n], "logprobs": None,
                                                 "finish_reason": None}]})
        async for i, delta in job.events():
            if delta is not None:
                yield _sse({**base, "choices": [{"index": i, "text": delta, "logprobs": lp_field(i, pending.new(i)),
                                                 "finish_reason": None}]})
                continue
            try:
                g = job.result(i)
            except ApiError as e:
                yield _sse(e.body())
                return
            completion += len(g.token_ids)
            rest = pending.new(i, g)
            yield _sse({**base, "choices": [{"index": i, "text": "", "logprobs": lp_field(i, rest) if rest else None,
                                             "finish_reason": _finish_reason(g)}]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})
        yield b"data: [DONE]\n\n"
        s.metrics.requests.labels("completions", "200").inc()
    finally:
        job.close()
