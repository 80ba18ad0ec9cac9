"""``pneumoseg serve``: MLflow's own scoring server for a registered pneumoseg model, with the
request-body limit that the bare ``mlflow models serve`` lacks.

The app is MLflow's (``mlflow.pyfunc.scoring_server.init``): the same ``/invocations``,
``/ping``, ``/health`` and ``/version``, the same request and error formats. In front of it,
:class:`BodyLimit` answers a body larger than ``serving.max_body_mb`` with HTTP 413 without
keeping it in memory; the packaged model itself refuses more rows than ``serving.max_rows``
and images larger than ``serving.max_image_pixels`` (HTTP 400 naming the row). One process,
requests in threads (as MLflow runs them).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from pneumoseg.params import Params

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets HTTP 413 (JSON in MLflow's
    error format). The body is read in chunks and dropped once over the limit, so memory stays
    at ``limit`` per request whatever the client sends; a body within it is replayed to the
    app."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        size, more = (int(declared) if declared.isdigit() else 0), True
        if size <= self.limit:
            size = 0  # counted as it arrives; a body declared too large is never kept
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            if size <= self.limit:
                size += len(body)
                chunks.append(body)
            if size > self.limit:
                chunks.clear()  # keep reading (the client gets its answer), keep nothing
            more = message.get("more_body", False)
        if size > self.limit:
            await self.too_large(size, send)
            return
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def too_large(self, size: int, send: Send) -> None:
        text = (
            f"request body of {size / 1e6:.1f} MB is over serving.max_body_mb "
            f"({self.limit / 1e6:g} MB); send fewer rows per request"
        )
        body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": text}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def run(
    params: Params,
    progress: bool = True,
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> None:
    """CLI entry of ``pneumoseg serve`` (runs until stopped): ``--model`` as for predict
    (default ``models:/<mlflow.registered_model>@champion``) on ``host:port`` (default
    127.0.0.1:5000)."""
    import uvicorn
    from mlflow.pyfunc import load_model, scoring_server

    from pneumoseg.registry import default_model, download_model, is_model_uri

    model = model or default_model(params)
    host, port = host or "127.0.0.1", port or 5000
    limit = int(params.serving.max_body_mb * 1e6)
    with tempfile.TemporaryDirectory(prefix="pneumoseg-serve-") as tmp:
        if is_model_uri(model):
            folder, info = download_model(params, model, Path(tmp))
        else:
            folder, info = Path(model), {"model": model}
        app = BodyLimit(scoring_server.init(load_model(str(folder))), limit)
        which = f"{info['name']} version {info['version']}" if "version" in info else model
        print(
            f"serve: {which} on http://{host}:{port}/invocations (body <= "
            f"{params.serving.max_body_mb:g} MB, rows <= the model's serving.max_rows)",
            flush=True,
        )
        uvicorn.run(app, host=host, port=port, log_level="warning", workers=1)
