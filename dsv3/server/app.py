"""The FastAPI application: routes, API-key check, OpenAI-shaped errors, status metrics, engine lifespan.

Handlers read the raw body and validate it themselves (protocol.py, strict JSON mode), so malformed JSON and
schema errors come back as OpenAI-style 400s naming the field instead of FastAPI's 422 format.
"""
from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from . import protocol, serving, serving_chat
from .engine_loop import AsyncEngine
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving import ClientDisconnected, ServerState

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context; bounds what one request can make us hold
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def _field_names() -> frozenset[str]:
    names = set()
    for obj in vars(protocol).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            names.update(obj.model_fields)
    return frozenset(names)


_FIELDS = _field_names()


def _param(loc: tuple[Any, ...]) -> str | None:
    # Pydantic puts union member tags ("str", "list[int]", ...) in error locations; keep real field names and
    # list indices only, written the way a client would name them: messages[0].content.
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out or None


def _schema_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    # Of a union's failures, the deepest location is the most telling: content[0].type is 'image_url', rather
    # than "content is not a string".
    first = max(errors, key=lambda err: len(err["loc"]) - sum(1 for x in err["loc"] if isinstance(x, str)
                                                               and x not in _FIELDS))
    param = _param(first["loc"])
    if param is None:
        return APIError(400, f"The request body must be a JSON object: {first['msg']}", code="invalid_request")
    # A union field fails once per member; list each distinct reason for the first bad field.
    reasons = list(dict.fromkeys(err["msg"] for err in errors if _param(err["loc"]) == param))
    return APIError(400, f"Invalid value for '{param}': {'; or '.join(reasons[:4])}", param=param,
                    code="invalid_value")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and (len(length) > 15 or int(length) > MAX_BODY_BYTES):
        raise APIError(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit",
                       code="body_too_large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit",
                       code="body_too_large")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _schema_error(e) from None


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _StatusMetrics:
    """Counts every HTTP answer by endpoint and status (pure ASGI, so streaming bodies pass through untouched)."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.inc(1, endpoint, str(status or 500))


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for open responses by now; this finishes or aborts what is
            # left and stops the engine thread.
            await state.engine.shutdown(grace=state.shutdown_grace)

    app = FastAPI(title="dsv3", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(_StatusMetrics, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"{request.method} {request.url.path} is not an endpoint of this server"
        elif e.status_code == 405:
            message = f"{request.url.path} does not accept {request.method}"
        else:
            message = str(e.detail)
        return _error_response(APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None,
                                        headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        return _error_response(APIError(400, str(e), code="invalid_request"))

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal server error ({type(e).__name__}); see the server log",
                                        type="server_error"))

    def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="missing_api_key", headers=challenge)
        scheme, _, token = header.partition(" ")
        # compare_digest takes time independent of where the strings differ, so the key cannot be guessed byte
        # by byte from response times.
        ok = hmac.compare_digest(token.strip().encode(), state.api_key.encode())
        if scheme.lower() != "bearer" or not ok:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge)

    auth = [Depends(require_key)]

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request) -> Response:
        req = await _parse(request, ChatCompletionRequest)
        try:
            return await serving_chat.chat_completions(state, request, req)
        except ClientDisconnected:
            return serving.disconnected_response()

    @app.post("/v1/completions", dependencies=auth)
    async def complete(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        try:
            return await serving.completions(state, request, req)
        except ClientDisconnected:
            return serving.disconnected_response()

    def card() -> ModelCard:
        return ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str) -> Response:
        serving.check_model(state, model)
        return JSONResponse(card().model_dump())

    @app.get("/health")
    async def health() -> Response:
        e = state.engine
        if not e.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if not e.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.render(state.engine.snapshot),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def create_app(engine, model_name: str, api_key: str | None = None, shutdown_grace: float = 30.0,
               tool_call_parser: str = "auto", reasoning_parser: str = "auto",
               sampling_defaults: dict | None = None) -> FastAPI:
    """An app around an LLMEngine; its engine thread starts and stops with the app's lifespan. The queue limit
    (429 beyond it) is the engine's max_waiting. tool_call_parser: "auto" (the chat template's format), "none" or a
    format of tool_parsers.FORMATS; reasoning_parser: "auto" (when the template knows the think tags), "none",
    "think". sampling_defaults: what a request leaves out (the checkpoint's generation_config.json,
    LLM.generation_defaults); then SamplingParams' defaults."""
    from .tool_parsers import FORMATS

    if tool_call_parser not in ("auto", "none", *FORMATS):
        raise ValueError(f"tool_call_parser {tool_call_parser!r}: choose auto, none or one of {sorted(FORMATS)}")
    if reasoning_parser not in ("auto", "none", "think"):
        raise ValueError(f"reasoning_parser {reasoning_parser!r}: choose auto, none or think")
    metrics = ServerMetrics()
    state = ServerState(AsyncEngine(engine, observer=metrics), model_name, api_key, engine.config.max_waiting,
                        shutdown_grace, metrics, tool_call_parser=tool_call_parser,
                        reasoning_parser=reasoning_parser, sampling_defaults=dict(sampling_defaults or {}))
    return build_app(state)
