"""`llmbuild serve`: load the artifact, then run the app on uvicorn.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, in-flight requests finish
within the grace period (streams included), the engine is closed, and the process
exits 0. /ready answers 503 from the signal on.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
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


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's address, bound (not yet listening) before the model is loaded: a port
    in use or a host that is not this machine's is a message and exit 2 at once, not a
    uvicorn error after a long load. Clients are refused until uvicorn listens on it."""
    where = f"--host {host} --port {port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"{where}: cannot resolve {host!r} ({getattr(e, 'strerror', None) or e}); expected an "
                        "address or host name of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        reason = {
            errno.EADDRINUSE: f"port {port} is already in use on {host} (another server?); pass another --port, "
                              "or --port 0 for a free one",
            errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; expected one of its addresses, "
                                 "127.0.0.1 (loopback) or 0.0.0.0 (every interface)",
            errno.EACCES: f"binding port {port} needs privileges this process does not have; pass a port above 1023",
        }.get(e.errno, e.strerror or str(e))
        raise UserError(f"{where}: cannot listen there: {reason}") from None
    return sock


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
    sock = bind_socket(host, port)
    port = sock.getsockname()[1]  # --port 0: the free port the system chose
    try:
        state = load_state(artifact, backend=backend, threads=threads, max_batch_size=max_batch_size,
                           max_queue=max_queue, api_key=api_key, model_id=model_id)
    except BaseException:
        sock.close()
        raise
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
    url_host = f"[{host}]" if ":" in host else host
    print(f"llmbuild serve: {state.model_id} ({state.model.executor.name}, {state.slots} slots, "
          f"queue {state.capacity - state.slots}) at http://{url_host}:{port}/v1 — {auth}, {where}", file=sys.stderr,
          flush=True)
    if not api_key and not is_loopback(host):
        print(f"llmbuild serve: warning: {host} is not a loopback address and no --api-key-env is set: "
              "anyone who reaches this port can use the model", file=sys.stderr, flush=True)
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1
