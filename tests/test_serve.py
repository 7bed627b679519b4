"""`llmbuild serve` driven over loopback HTTP by the official `openai` client (and raw
httpx for malformed bodies), against the runtime's own answers on a tiny random model:
chat and completions, streaming, stop strings, seeds, logprobs, n > 1, structured
output, usage; a bounded load test with cancellations; faults (disconnect, queue
overflow, too-long prompt, 200+ malformed bodies, SIGTERM drain, API key)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from llmbuild.runtime import SamplingParams, load
from tests.serve_util import ServerProcess
from tests.tiny import compile_tiny, make_tiny_hf

LIMITS = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 160}
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return compile_tiny(make_tiny_hf(root / "hf", seed=33), root / "out", limits=LIMITS)


@pytest.fixture(scope="module")
def model(artifact):
    m = load(artifact, backend="onnxruntime", threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    s = ServerProcess(artifact, tmp_path_factory.mktemp("serve-log") / "server.log", "--threads", "1")
    yield s
    code = s.stop()
    log = s.log()
    assert code == 0, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_slots_free(server, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("llmbuild_slots_busy") == 0 and server.metric("llmbuild_sequences_in_flight") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("slots still busy")


# -- the API against the runtime --------------------------------------------------------------


def test_models_health_ready(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").json() == {"ready": True, "model": "tiny"}


def test_chat_greedy_equals_runtime_and_usage_equals_tokenizer(client, model):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    expect = model.chat(MESSAGES, max_new_tokens=24)
    assert r.choices[0].message.content == expect.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if expect.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(model.tokenizer.encode_chat(MESSAGES))
    assert r.usage.completion_tokens == len(expect.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream_with_usage(client):
    kw = dict(model="tiny", messages=MESSAGES, max_completion_tokens=30, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_equals_runtime_stream_and_not(client, model):
    prompt = "The tiny model says"
    expect = model.generate(prompt, max_new_tokens=20)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == expect.text
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == len(expect.token_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed == expect.text
    # token-id prompts and several prompts at once
    ids = model.tokenizer.encode(prompt)
    two = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=20, temperature=0)
    assert [c.text for c in two.choices] == [expect.text, expect.text]
    assert two.usage.prompt_tokens == 2 * len(ids)


def test_stop_strings(client, model):
    full = model.chat(MESSAGES, max_new_tokens=40).text
    stop = full[10:12]
    cut = full[: full.find(stop)]
    for s in (stop, [stop, "\x00never"]):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, stop=s)
        assert r.choices[0].message.content == cut
        assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_seeds_reproducible_and_equal_runtime(client, model):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=8).choices[0].message.content
    assert a == b and a != c
    ids = model.tokenizer.encode_chat(MESSAGES)
    expect = model.submit(ids, max_new_tokens=24, params=SamplingParams(temperature=1.0, top_p=0.9, seed=7)).result()
    assert a == expect.text


def test_penalties_equal_runtime(client, model):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                       presence_penalty=1.5, frequency_penalty=0.5)
    ids = model.tokenizer.encode_chat(MESSAGES)
    expect = model.submit(ids, max_new_tokens=24, params=SamplingParams(presence_penalty=1.5,
                                                                        frequency_penalty=0.5)).result()
    assert r.choices[0].message.content == expect.text
    assert expect.text != model.chat(MESSAGES, max_new_tokens=24).text  # the penalties changed something


def test_logprobs_equal_runtime(client, model):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3)
    ids = model.tokenizer.encode_chat(MESSAGES)
    expect = model.submit(ids, max_new_tokens=12, logprobs=3).result()
    got = r.choices[0].logprobs.content
    assert len(got) == len(expect.logprobs) == len(expect.token_ids)
    for g, e in zip(got, expect.logprobs):
        assert g.token == model.tokenizer.decode([e.token_id])
        assert g.logprob == pytest.approx(e.logprob, abs=1e-9)
        assert [t.logprob for t in g.top_logprobs] == pytest.approx([v for _, v in e.top], abs=1e-9)
        assert [t.token for t in g.top_logprobs] == [model.tokenizer.decode([t]) for t, _ in e.top]
    c = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0, logprobs=2)
    e = model.submit(model.tokenizer.encode("abc"), max_new_tokens=6, logprobs=2).result()
    assert c.choices[0].logprobs.token_logprobs == pytest.approx([lp.logprob for lp in e.logprobs], abs=1e-9)


def test_streamed_logprobs_equal_non_streamed(client, model):
    """With stream=true every chunk carries the logprobs of the tokens sampled since the
    previous one; per choice they add up to the non-streaming answer's, which are the
    runtime's (n = 2 sampled choices, a stop string, chat and completions)."""
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0, seed=5, n=2, logprobs=True,
              top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    streamed = {0: [], 1: []}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed[c.index] += c.logprobs.content
    ids = model.tokenizer.encode_chat(MESSAGES)
    for i in range(2):
        expect = model.submit(ids, max_new_tokens=20, params=SamplingParams(temperature=1.0, seed=5 + i),
                              logprobs=2).result()
        got = whole.choices[i].logprobs.content
        flat = [(t.token, t.logprob, [x.logprob for x in t.top_logprobs]) for t in got]
        assert [(t.token, t.logprob, [x.logprob for x in t.top_logprobs]) for t in streamed[i]] == flat
        assert [t for t, _, _ in flat] == [model.tokenizer.decode([e.token_id]) for e in expect.logprobs]
        assert [v for _, v, _ in flat] == pytest.approx([e.logprob for e in expect.logprobs], abs=1e-9)
        assert [w for _, _, top in flat for w in top] == pytest.approx(
            [v for e in expect.logprobs for _, v in e.top], abs=1e-9)
        assert len(flat) == len(expect.token_ids) > 0

    full = model.generate("abc", max_new_tokens=12)[0].text
    stop = full[4:6]
    ckw = dict(model="tiny", prompt="abc", max_tokens=12, temperature=0, logprobs=2, stop=stop)
    c = client.completions.create(**ckw).choices[0]
    tokens, values, offsets, text = [], [], [], ""
    for chunk in client.completions.create(**ckw, stream=True):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
                offsets += ch.logprobs.text_offset
    assert text == c.text == full[: full.find(stop)]
    assert (tokens, values, offsets) == (c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.text_offset)
    assert offsets[0] == 0 and offsets == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]


def test_n_choices_are_seed_plus_index(client, model):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    ids = model.tokenizer.encode_chat(MESSAGES)
    expect = [model.submit(ids, max_new_tokens=16, params=SamplingParams(temperature=1.0, seed=11 + i)).result()
              for i in range(3)]
    assert [c.message.content for c in r.choices] == [g.text for g in expect]
    assert r.usage.completion_tokens == sum(len(g.token_ids) for g in expect)
    assert r.usage.prompt_tokens == len(ids)
    streamed = {}
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0,
                                                seed=11, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == [g.text for g in expect]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


def test_json_schema_outputs_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=120, temperature=1.0, seed=3, n=8,
                                       response_format=fmt, presence_penalty=0.3)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    obj = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_python_generate_json_schema(model):
    gens = model.generate(["x", "y", "z"], max_new_tokens=120, temperature=1.0, seed=[1, 2, 3], json_schema=SCHEMA)
    for g in gens:
        assert g.finish_reason == "stop"
        jsonschema.validate(json.loads(g.text), SCHEMA)


def test_a_failing_request_fails_alone(model):
    """An error inside one request's sampling (here: its grammar) fails that request; the
    request beside it and the next ones are served."""
    class Broken:
        def matcher(self):
            return self

        calls = 0

        def mask(self, logits):
            Broken.calls += 1
            if Broken.calls > 3:
                raise RuntimeError("grammar state lost")
            return logits

        def accept(self, token):
            pass

        stopped = False

    ids = model.tokenizer.encode_chat(MESSAGES)
    good = model.submit(ids, max_new_tokens=20)
    bad = model.submit(ids, max_new_tokens=20, grammar=Broken())
    with pytest.raises(RuntimeError, match="grammar state lost"):
        bad.result(timeout=60)
    assert len(good.result(timeout=60).token_ids) == len(model.chat(MESSAGES, max_new_tokens=20).token_ids)
    assert all(s is None for s in model.engine.scheduler.slots)


# -- errors: OpenAI's shape, field named, never 500 -------------------------------------------


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 400}], max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=1000)
    assert e.value.code == "context_length_exceeded"


def test_bad_values_name_the_field(server):
    cases = {
        "temperature": {"temperature": "1"},
        "top_p": {"top_p": 1.5},
        "n": {"n": 0},
        "max_tokens": {"max_tokens": -1},
        "messages": {"messages": []},
        "messages.0.role": {"messages": [{"role": "robot", "content": "x"}]},
        "stop": {"stop": 5},
        "top_logprobs": {"logprobs": True, "top_logprobs": 99},
        "response_format.type": {"response_format": {"type": "yaml"}},
        "bogus": {"bogus": 1},
    }
    for param, patch in cases.items():
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **patch}
        r = httpx.post(server.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400, (param, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and param in err["message"], (param, err)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                       "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def fuzz_bodies(rng: random.Random, n: int) -> list[bytes]:
    good = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    values = [None, True, -1, 0, 1e309, 2**70, -2**70, 3.5, "", "x", "\udcff", [], [1], {}, {"a": 1}, [None],
              [{"role": "user"}], [{"content": 1}], {"type": "json_schema"}, "NaN"]
    keys = [*good, "n", "stop", "seed", "top_p", "logprobs", "top_logprobs", "stream", "stream_options",
            "response_format", "presence_penalty", "frequency_penalty", "max_completion_tokens", "prompt", "user"]
    bodies = [b"", b"{", b"[]", b"null", b"42", b'"x"', b"\xff\xfe", b'{"model": "tiny", "messages": [', b"{}" * 3,
              b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":NaN}']
    while len(bodies) < n:
        body = dict(good)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(keys)] = rng.choice(values)
        if rng.random() < 0.2:
            body.pop(rng.choice(list(body)), None)
        raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        if rng.random() < 0.1:
            cut = rng.randint(0, len(raw))
            raw = raw[:cut] + bytes([rng.randint(0, 255)]) + raw[cut + 1:]
        bodies.append(raw)
    return bodies


def test_fuzzed_bodies_never_500(server):
    rng = random.Random(0)
    statuses = {}
    with httpx.Client(timeout=60) as http:
        for path in ("/v1/chat/completions", "/v1/completions"):
            for raw in fuzz_bodies(rng, 120):
                r = http.post(server.url + path, content=raw, headers={"content-type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (raw, r.text)
                if r.status_code >= 400:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                elif r.headers["content-type"].startswith("text/event-stream"):
                    lines = [line for line in r.text.splitlines() if line]
                    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]", r.text
                else:
                    assert r.json()["choices"], r.text
    assert statuses.get(400, 0) >= 200  # malformed: 234 of the 240 fail validation
    assert "Traceback" not in server.log()


# -- load and cancellation ----------------------------------------------------------------------


def test_load_32_streaming_clients_with_cancellations(server, model):
    """200 streaming requests from 32 concurrent clients, mixed lengths, every 7th
    cancelled after its second chunk: none fails, every slot is free afterwards, and
    every greedy output equals the same request sent alone."""
    rng = random.Random(1)
    words = ["tiny", "model", "says", "hello", "a", "bb", "ccc", "serve", "me"]
    jobs = [(" ".join(rng.choices(words, k=rng.randint(1, 12))), rng.choice([4, 16, 40, 80]), i % 7 == 3)
            for i in range(200)]
    alone = {}
    for prompt, max_tokens, cancel in jobs:
        if not cancel and (prompt, max_tokens) not in alone:
            alone[(prompt, max_tokens)] = model.chat([{"role": "user", "content": prompt}],
                                                     max_new_tokens=max_tokens).text
    before = server.metric("llmbuild_generations_total")

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        results, failures = [], []

        async def worker():
            while not queue.empty():
                prompt, max_tokens, cancel = queue.get_nowait()
                try:
                    stream = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                        temperature=0, stream=True)
                    text, chunks = "", 0
                    async for chunk in stream:
                        chunks += 1
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                        if cancel and chunks == 2:
                            await stream.close()
                            break
                    if not cancel:
                        results.append((prompt, max_tokens, text))
                except Exception as e:  # noqa: BLE001 - counted
                    failures.append(repr(e))

        await asyncio.gather(*(worker() for _ in range(32)))
        await client.close()
        return results, failures

    results, failures = asyncio.run(run())
    assert failures == []
    assert len(results) == sum(not c for _, _, c in jobs)
    for prompt, max_tokens, text in results:
        assert text == alone[(prompt, max_tokens)], prompt
    wait_slots_free(server)
    assert server.metric("llmbuild_generations_total") - before == 200
    assert server.metric("llmbuild_queue_depth") == 0


# -- a second server: small queue, API key, SIGTERM drain --------------------------------------


def test_queue_overflow_auth_and_sigterm_drain(artifact, tmp_path):
    s = ServerProcess(artifact, tmp_path / "small.log", "--max-batch-size", "1", "--max-queue", "1",
                      "--api-key-env", "LLMBUILD_TEST_KEY", "--grace-period", "60", "--threads", "1",
                      env={"LLMBUILD_TEST_KEY": "sekret"})
    try:
        assert "API key required" in s.log()
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        headers = {"Authorization": "Bearer sekret"}
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 120, "temperature": 0}

        async def burst():
            async with httpx.AsyncClient(timeout=120, headers=headers) as http:
                return await asyncio.gather(*(http.post(s.url + "/v1/chat/completions", json=body)
                                              for _ in range(6)))
        answers = asyncio.run(burst())
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        for r in answers:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"

        # SIGTERM while a stream is running: it finishes, then the process exits 0
        out = {}

        def stream():
            with httpx.Client(timeout=120, headers=headers) as http:
                with http.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                    out["lines"] = [line for line in r.iter_lines() if line]
        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 30
        while s.metric("llmbuild_slots_busy") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.terminate()
        t.join(120)
        assert s.proc.wait(120) == 0
        assert out["lines"][-1] == "data: [DONE]"
        finish = json.loads(out["lines"][-2][6:])["choices"][0]["finish_reason"]
        assert finish in ("stop", "length")
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")
    finally:
        s.stop()
    assert "Traceback" not in s.log()


def test_start_up_refusals_are_messages(artifact):
    """A port already taken, an unknown host, an unset --api-key-env: exit 2 with one
    line saying what is wrong, before the model is loaded; never a traceback."""
    import socket
    import subprocess

    from tests.serve_util import LLMBUILD

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            f"port {port} is already in use on 127.0.0.1 (another server?)": ["--port", str(port)],
            "cannot resolve 'no.such.host.invalid'": ["--host", "no.such.host.invalid"],
            "the environment variable LLMBUILD_UNSET_KEY is not set": ["--api-key-env", "LLMBUILD_UNSET_KEY"],
        }
        for message, args in cases.items():
            r = subprocess.run([str(LLMBUILD), "serve", str(artifact), *args], capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
            assert "Traceback" not in r.stderr and "llmbuild serve:" not in r.stderr  # refused before loading
