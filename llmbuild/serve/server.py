"""`llmbuild serve`: load the artifact, then run the app on uvicorn.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, in-flight requests finish
within the grace period (streams included), the engine is closed, and the process
exits 0. /ready answers 503 from the signal on.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys

from llmbuild.errors import UserError


def api_key_from_env(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key:
        raise UserError(f"--api-key-env {var}: the environment variable {var} is not set or empty")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int) -> None:
    """Refuse, before the model is loaded, an address this process cannot listen on."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def load_state(artifact: str, *, backend: str = "auto", threads: int | None = None, max_batch_size: int | None = None,
               max_queue: int = 64, api_key: str | None = None, model_id: str | None = None):
    import llmbuild
    from llmbuild.serve.app import ServerState

    if max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {max_queue}")
    model = llmbuild.load(artifact, backend=backend, threads=threads, max_batch_size=max_batch_size)
    return ServerState(model, max_queue=max_queue, api_key=api_key, model_id=model_id)


def serve(artifact: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_queue: int = 64, backend: str = "auto", threads: int | None = None, max_batch_size: int | None = None,
          grace_period: float = 30.0, model_id: str | None = None, log_level: str = "info") -> int:
    try:
        import uvicorn

        from llmbuild.serve.app import create_app
    except ImportError as e:
        raise UserError(f"llmbuild serve needs its extra: pip install 'llmbuild[serve]' ({e})") from None
    api_key = api_key_from_env(api_key_env)
    check_listen(host, port)
    state = load_state(artifact, backend=backend, threads=threads, max_batch_size=max_batch_size,
                       max_queue=max_queue, api_key=api_key, model_id=model_id)
    app = create_app(state)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.ready = False
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)  # a drained shutdown exits 0, not by the signal

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_period,
                            access_log=False, lifespan="on")
    auth = "API key required (Bearer)" if api_key else "no API key"
    where = "loopback only" if is_loopback(host) else f"reachable on {host}"
    print(f"llmbuild serve: {state.model_id} ({state.model.executor.name}, {state.slots} slots, "
          f"queue {state.capacity - state.slots}) at http://{host}:{port}/v1 — {auth}, {where}", file=sys.stderr,
          flush=True)
    if not api_key and not is_loopback(host):
        print(f"llmbuild serve: warning: {host} is not a loopback address and no --api-key-env is set: "
              "anyone who reaches this port can use the model", file=sys.stderr, flush=True)
    server = Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn could not start (it logged why): the port was taken meanwhile
        if server.started:
            raise
    return 0 if server.started else 1
