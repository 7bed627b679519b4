"""`llmbuild serve` on the default model (SmolLM2-135M-Instruct, the session's fp16
artifact without engines): structured output on 50 sampled generations (temperature 1)
that parse and validate against the schema, and client disconnects (streaming and
not) that cancel the generation and free the slot while it is still running."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from tests.serve_util import ServerProcess

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "minLength": 1, "maxLength": 24},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "city", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(smollm2_artifact, tmp_path_factory):
    s = ServerProcess(smollm2_artifact, tmp_path_factory.mktemp("serve-smollm2") / "server.log",
                      "--model-name", "smollm2")
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def test_capital_of_france(client):
    r = client.chat.completions.create(model="smollm2", messages=[
        {"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0)
    assert r.choices[0].message.content.startswith("The capital of France is Paris")


def test_json_schema_50_sampled_generations_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Describe a fictional person as JSON with name, age, city and the "
                 "languages they speak."}]
    outputs = []
    for seed in range(5):  # 5 requests of n=10: 50 generations, batched in the engine
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=120, temperature=1.0,
                                           seed=1000 * seed, n=10, response_format=fmt)
        outputs += [c.message.content for c in r.choices]
        assert all(c.finish_reason == "stop" for c in r.choices), [c.message.content for c in r.choices]
    assert len(outputs) == 50
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(outputs)) > 25  # sampled, not one answer repeated


def _cancelled(server) -> float:
    try:
        return server.metric('llmbuild_generations_total{reason="cancelled"}')
    except KeyError:
        return 0.0


def _wait_free(server, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("llmbuild_slots_busy") == 0 and server.metric("llmbuild_sequences_in_flight") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("a slot is still busy after the client left")


LONG = {"model": "smollm2", "messages": [{"role": "user", "content": "Count from 1 to 1000, one number a line."}],
        "max_tokens": 1500, "temperature": 0}


def test_disconnect_mid_stream_cancels_and_frees_the_slot(server):
    before = _cancelled(server)
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(8):
                next(lines)
            assert server.metric("llmbuild_slots_busy") == 1
    _wait_free(server)
    assert _cancelled(server) == before + 1


def test_disconnect_while_waiting_for_a_whole_answer(server):
    before = _cancelled(server)

    def go():
        try:
            httpx.post(server.url + "/v1/chat/completions", json=LONG, timeout=3)
        except httpx.TimeoutException:
            pass
    t = threading.Thread(target=go)
    t.start()
    t.join()
    _wait_free(server)
    assert _cancelled(server) == before + 1
