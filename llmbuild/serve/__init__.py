"""`llmbuild serve`: an OpenAI-compatible HTTP server over an artifact.

    app.py      the ASGI app (FastAPI): endpoints, admission, streaming
    schemas.py  request bodies (pydantic, OpenAI's types and ranges) and error shape
    metrics.py  Prometheus metrics
    server.py   uvicorn, start-up message, SIGTERM drain
    ray_app.py  the same app as Ray Serve replicas (llmbuild[ray])

Imported only by the `serve` command (its libraries are the `serve` extra).
"""
