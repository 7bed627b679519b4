"""Scale-out: the same ASGI app as N Ray Serve replicas, one engine per replica.

    llmbuild serve ARTIFACT --replicas 2 --port 8000     # a local Ray instance, started and stopped here
    serve run llmbuild.serve.ray_app:build artifact=out/smollm2 replicas=4   # on an existing Ray cluster

Ray Serve's HTTP proxy spreads requests over the replicas (each holds at most
slots + max_queue requests, so the proxy queues the rest instead of overloading one).
Every response carries `x-llmbuild-replica` (host:pid) of the replica that answered.
Needs the `ray` extra: pip install 'llmbuild[ray]'.
"""

from __future__ import annotations

import signal
import sys
import threading

from llmbuild.errors import UserError


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise UserError(f"--replicas needs Ray Serve: pip install 'llmbuild[ray]' ({e})") from None
    return ray, serve


def application(artifact: str, *, replicas: int = 1, api_key_env: str | None = None, max_queue: int = 64,
                backend: str = "auto", threads: int | None = None, max_batch_size: int | None = None,
                model_id: str | None = None):
    """A Ray Serve Application of `replicas` copies of the llmbuild app."""
    from llmbuild.artifact import read_manifest
    from llmbuild.serve.server import api_key_from_env

    _, serve = _ray()
    slots = max_batch_size or read_manifest(artifact)["limits"]["max_batch_size"]
    api_key = api_key_from_env(api_key_env)  # read here, shipped to the replicas
    options = dict(backend=backend, threads=threads, max_batch_size=max_batch_size, max_queue=max_queue,
                   api_key=api_key, model_id=model_id)

    def build_app():  # runs in each replica
        from llmbuild.serve.app import create_app
        from llmbuild.serve.server import load_state

        return create_app(load_state(artifact, **options))

    @serve.deployment(name="llmbuild", num_replicas=replicas, max_ongoing_requests=slots + max_queue,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(build_app)
    class LlmbuildReplica:
        pass

    return LlmbuildReplica.bind()


def build(args: dict):
    """Entry point for `serve run llmbuild.serve.ray_app:build artifact=... [replicas=N ...]`."""
    if "artifact" not in args:
        raise UserError("serve run llmbuild.serve.ray_app:build needs artifact=PATH")
    ints = {"replicas", "max_queue", "threads", "max_batch_size"}
    kw = {k: (int(v) if k in ints else v) for k, v in args.items() if k != "artifact"}
    return application(args["artifact"], **kw)


def serve_with_ray(artifact: str, *, replicas: int, host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    """Start a local Ray instance, deploy, serve until SIGTERM/SIGINT, shut down; exit code."""
    from llmbuild.serve.server import bind_socket

    ray, serve = _ray()
    bind_socket(host, port).close()  # refused before Ray starts
    app = application(artifact, replicas=replicas, **options)
    # address="local": always a new instance of our own, never a cluster found on the machine
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="llmbuild", route_prefix="/")
        print(f"llmbuild serve: {artifact} as {replicas} Ray Serve replicas at http://{host}:{port}/v1",
              file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
