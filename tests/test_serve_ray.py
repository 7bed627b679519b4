"""`llmbuild serve` as 2 Ray Serve replicas on a local Ray instance (the `ray` extra), on
a tiny random model: concurrent requests through Ray Serve's proxy are answered by both
replicas (each response names its replica in `x-llmbuild-replica`), the greedy answers of
both equal the runtime's, and everything is shut down at the end. Two Ray starts, so
this module takes about a minute on a loaded 2-core machine:

    test_two_replicas_in_process    ray.init(num_cpus=1, no dashboard) in this process,
                                    ray_app.application() deployed with serve.run
    test_cli_replicas_and_sigterm   `llmbuild serve ART --replicas 2`: its own Ray
                                    instance, SIGTERM stops Serve and Ray, exit 0
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from llmbuild.runtime import load
from llmbuild.serve.ray_app import application
from tests.serve_util import ServerProcess, free_port
from tests.tiny import compile_tiny, make_tiny_hf

LIMITS = {"max_batch_size": 2, "max_input_len": 32, "max_seq_len": 96}
PROMPTS = [f"replica test {i}" for i in range(4)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ray")
    return compile_tiny(make_tiny_hf(root / "hf", seed=34), root / "out", limits=LIMITS)


@pytest.fixture(scope="module")
def expected(artifact):
    """The runtime's greedy answers to PROMPTS (chat), loaded in this process."""
    m = load(artifact, backend="onnxruntime", threads=1)
    try:
        return {p: m.chat([{"role": "user", "content": p}], max_new_tokens=MAX_TOKENS).text for p in PROMPTS}
    finally:
        m.close()


def wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} was not ready in {timeout} s")


def replicas_answering(url: str, expected: dict[str, str], rounds: int = 6) -> dict[str, int]:
    """Rounds of 8 concurrent chat requests until two replicas have answered (at most
    `rounds`); every answer must equal the runtime's. Answers per replica."""
    async def one_round(client):
        calls = [client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0)
            for p in PROMPTS * 2]
        return await asyncio.gather(*calls)

    async def run():
        seen: dict[str, int] = {}
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
            for _ in range(rounds):
                for p, raw in zip(PROMPTS * 2, await one_round(client)):
                    assert raw.parse().choices[0].message.content == expected[p]
                    replica = raw.headers["x-llmbuild-replica"]
                    seen[replica] = seen.get(replica, 0) + 1
                if len(seen) >= 2:
                    break
        return seen
    return asyncio.run(run())


def metrics_of_each_replica(url: str, replicas: set[str], tries: int = 40) -> dict[str, dict[str, float]]:
    """GET /metrics through the proxy until every replica's own registry was read."""
    found: dict[str, dict[str, float]] = {}
    for _ in range(tries):
        r = httpx.get(url + "/metrics", timeout=30)
        values: dict[str, float] = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        found[r.headers["x-llmbuild-replica"]] = values
        if replicas <= set(found):
            break
    return found


def test_two_replicas_in_process(artifact, expected):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(str(artifact), replicas=2, backend="onnxruntime", threads=1), name="llmbuild",
                  route_prefix="/")
        wait_ready(url)
        seen = replicas_answering(url, expected)
        assert len(seen) == 2, seen
        # each replica has its own engine and metrics: its generations are the answers it gave
        time.sleep(0.5)  # a generation is counted just after its handle finished
        metrics = metrics_of_each_replica(url, set(seen))
        for replica, answered in seen.items():
            m = metrics[replica]
            assert m["llmbuild_generations_total"] == answered, (replica, m)
            assert m["llmbuild_slots_busy"] == 0 and m["llmbuild_sequences_in_flight"] == 0
    finally:
        serve.shutdown()
        ray.shutdown()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_cli_replicas_and_sigterm(artifact, expected, tmp_path):
    s = ServerProcess(artifact, tmp_path / "ray.log", "--replicas", "2", "--threads", "1", ready_timeout=240)
    try:
        deadline = time.monotonic() + 60  # printed once serve.run returns, about when /ready answers
        while "as 2 Ray Serve replicas" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "as 2 Ray Serve replicas" in s.log()
        seen = replicas_answering(s.url, expected)
        assert len(seen) == 2, seen
        code = s.stop(timeout=120)
    finally:
        s.stop()
    assert code == 0, s.log()
    assert "Traceback" not in s.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=5)
