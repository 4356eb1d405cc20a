"""The HTTP API: a FastAPI app over a :class:`~opsvlm.serving.endpoint.Backend`, assembled from endpoint modules.

Ray Serve (``serve_app/app.py``) and the benchmark's plain-FastAPI baseline run the same app: Serve's backend sends
the work to deployments; :class:`~opsvlm.serving.local.LocalBackend` does it in-process.

Routes: ``GET /health``, ``GET /status``, ``GET /docs`` (OpenAPI UI; ``/openapi.json``) here, and the routes of
each endpoint module (:data:`DEFAULT_ENDPOINTS`: ``/predict`` and ``/batch_predict`` from
:mod:`~opsvlm.serving.clips`, ``/predict_objects`` from :mod:`~opsvlm.serving.objects`, ``/timeline`` from
:mod:`~opsvlm.serving.timeline`). To add an endpoint, write
a module exposing an :class:`~opsvlm.serving.endpoint.Endpoint` and add it to :data:`DEFAULT_ENDPOINTS` (or pass
``endpoints=`` to :func:`create_app`).

* ``/health``: ``{"status": "ok", "model_version": ...}``; 503 (``Retry-After``) when the model cannot be reached
  or its last ``unhealthy_after`` predictions failed. Never needs an API key (load-balancer probes).
* ``/status``: model name/version/run, where it came from (registry or cache), task, sampling spec, label set,
  limits, batching and health; no filesystem paths unless the server is configured to show them.

Errors: every problem is a :class:`~opsvlm.serving.errors.ServingError` answered as ``{"error": <code>, "detail":
<message naming the field or file>}``. 400 malformed JSON or multipart, JSON nested too deep, an oversized integer;
401 a missing or wrong API key (when required); 403 a path outside the allowed root (or path input disabled); 404 no
such file; 408 a body not received within the request deadline; 409 a model of another task (the detail names
the endpoint to use); 413 over a size, duration, count or pixel limit; 415 not an accepted content type,
extension or image format; 422 missing or invalid fields, windows or detections, media that does not decode; 503
overloaded, past the request deadline or the model unavailable (always with ``Retry-After``); 504 a decode that
missed its deadline. Anything unexpected is a logged 500 that names no internals.

Optional API-key auth: with ``api_key`` set, every route except ``/health`` needs the header ``X-API-Key: <key>``
(or ``Authorization: Bearer <key>``); off by default (the shipped configs bind 127.0.0.1).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from opsvlm.serving import clips, objects, timeline
from opsvlm.serving.endpoint import Backend, Endpoint, ServingContext
from opsvlm.serving.errors import ServingError, unavailable
from opsvlm.serving.limits import ServingLimits
from opsvlm.serving.schemas import DOC_ERRORS, HealthResponse
from opsvlm.serving.work import WorkPool

__all__ = ["API_KEY_HEADER", "DEFAULT_ENDPOINTS", "ApiKeyMiddleware", "create_app"]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINTS: tuple[Endpoint, ...] = (clips.ENDPOINT, objects.ENDPOINT, timeline.ENDPOINT)
API_KEY_HEADER = "X-API-Key"


class ApiKeyMiddleware:
    """ASGI middleware: requests need ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``, except ``open_paths``.

    Args:
        app: The wrapped ASGI app.
        api_key: The key (compared in constant time).
        open_paths: Paths served without a key.
    """

    def __init__(self, app: Any, api_key: str, open_paths: Sequence[str] = ("/health",)):
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self._key = api_key.encode()
        self._open = frozenset(open_paths)

    def _supplied(self, scope: dict) -> bytes:
        headers = dict(scope.get("headers") or [])
        key = headers.get(API_KEY_HEADER.lower().encode())
        if key:
            return key
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else b""

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") in self._open:
            await self.app(scope, receive, send)
            return
        if hmac.compare_digest(self._supplied(scope), self._key):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "unauthorized", "detail": f"send the API key in the {API_KEY_HEADER} header"})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"ApiKey")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def create_app(
    backend: Backend,
    limits: ServingLimits,
    *,
    title: str = "opsvlm",
    extra_status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    endpoints: Sequence[Endpoint] = DEFAULT_ENDPOINTS,
    pool: WorkPool | None = None,
    api_key: str | None = None,
    show_paths: bool = False,
) -> FastAPI:
    """The HTTP API (see the module docstring) over a backend.

    Args:
        backend: Decodes and predicts.
        limits: Input limits, deadlines, the work pool's size.
        title: OpenAPI title.
        extra_status: Coroutine adding fields to ``/status`` (Serve: replicas and deployment options).
        endpoints: The endpoint modules to serve (default :data:`DEFAULT_ENDPOINTS`).
        pool: The bounded work pool (default: one sized by ``limits``).
        api_key: Require this key on every route but ``/health`` (``None``: no auth).
        show_paths: Let ``/status`` show filesystem paths (checkpoint and cache folders, the allowed root).
    """
    pool = pool or WorkPool(limits.work_threads, limits.max_pending_work, limits.retry_after_s)
    media_routes: dict[str, str] = {}
    for endpoint in endpoints:  # the first endpoint of a media is the one a 409 names (/predict before /timeline)
        if endpoint.media is not None:
            media_routes.setdefault(endpoint.media, endpoint.path)
    context = ServingContext(backend, limits, pool, media_routes=media_routes, show_paths=show_paths)
    app = FastAPI(
        title=title,
        description="Vision-language models for operations video and inspection images: predicts the dominant "
        "operation of a clip (its time span and the next operation), or the condition of detected objects.",
    )
    app.state.context = context

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal_error", "detail": "unexpected server error (logged)"}, status_code=500)

    @app.get("/health", response_model=HealthResponse, responses={503: DOC_ERRORS[503]})
    async def health() -> dict[str, Any]:
        """Liveness and readiness: the model answers, and its recent predictions succeed."""
        try:
            report = await backend.health()
        except ServingError:
            raise
        except Exception as exc:
            raise unavailable(f"the model is not reachable: {exc!r}", limits.retry_after_s) from None
        if not report.get("healthy", False):
            raise ServingError(
                503,
                "unhealthy",
                f"the last {report.get('consecutive_failures')} predictions failed: {report.get('last_error')}",
                limits.retry_after_s,
            )
        return {"status": "ok", "model_version": report["model_version"]}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        """Model name/version/source, task, sampling spec, label set, limits, batching, health and replicas."""
        try:
            body = await backend.status(show_paths)
        except ServingError:
            raise
        except Exception as exc:
            raise unavailable(f"the model is not reachable: {exc!r}", limits.retry_after_s) from None
        body["limits"] = limits.describe(show_paths)
        body["server"] = context.describe()
        body["auth"] = {"api_key_required": api_key is not None, "header": API_KEY_HEADER}
        if extra_status is not None:
            body.update(await extra_status())
        return body

    for endpoint in endpoints:
        app.include_router(endpoint.router(context))
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
