"""The OpenAI-compatible HTTP server: FastAPI app, auth, errors in OpenAI's shape, SSE streaming."""
from __future__ import annotations

import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from flashserve.entrypoints.metrics import ServerMetrics
from flashserve.entrypoints.openai.disconnect import ClientGone, cancel_on_disconnect
from flashserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from flashserve.entrypoints.openai.serving_base import error_body
from flashserve.entrypoints.openai.serving_chat import ChatServing
from flashserve.entrypoints.openai.serving_completions import CompletionServing
from flashserve.errors import FlashserveError, InvalidRequestError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")  # the chat page: plain HTML/JS/CSS, no build step


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status)


def build_app(engine, model_names: list[str], api_key: str | None = None, max_waiting: int = 256,
              tool_call_parser: str | None = None, engine_thread: ThreadPoolExecutor | None = None) -> FastAPI:
    """`engine` is an LLMEngine; the first model name is the one reported; tool_call_parser
    overrides the tool-call format read from the chat template; engine_thread: the one-thread pool
    that built the engine, to step it on (AsyncLLMEngine)."""
    async_engine = AsyncLLMEngine(engine, max_waiting=max_waiting, engine_thread=engine_thread)
    metrics = ServerMetrics()
    async_engine.on_finished = metrics.observe_finished
    async_engine.on_aborted = metrics.observe_outcome
    completion_serving = CompletionServing(async_engine, model_names[0])
    chat_serving = ChatServing(async_engine, model_names[0], tool_call_parser)

    @asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        yield
        await async_engine.stop()

    app = FastAPI(title="flashserve", lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or invalid API key", "invalid_request_error", "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                      "invalid_request_error")

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(request: Request, exc: InvalidRequestError):
        metrics.observe_outcome("rejected")
        return _error(400, str(exc))

    @app.exception_handler(QueueFullError)
    async def on_full(request: Request, exc: QueueFullError):
        metrics.observe_outcome("rejected_queue_full")
        return _error(429, str(exc), "rate_limit_error")

    @app.exception_handler(EngineDeadError)
    async def on_dead(request: Request, exc: EngineDeadError):
        return _error(503, f"the engine has stopped: {exc}", "server_error")

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(FlashserveError)
    async def on_engine_error(request: Request, exc: FlashserveError):
        return _error(500, str(exc), "server_error")

    def check_model(name: str) -> None:
        if name not in model_names:
            raise InvalidRequestError(f"model {name!r} is not served here; available: {', '.join(model_names)}")

    def respond(result):
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        if async_engine.dead is not None:
            return _error(503, f"the engine has stopped: {async_engine.dead}", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": int(time.time()),
                                            "owned_by": "flashserve"} for n in model_names]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        return respond(await cancel_on_disconnect(request, completion_serving.completions(req)))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        return respond(await cancel_on_disconnect(request, chat_serving.chat(req)))

    @app.get("/metrics")
    async def prometheus():
        metrics.refresh(async_engine.stats)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(engine_args, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_waiting: int = 256, tool_call_parser: str | None = None) -> None:
    import uvicorn

    from flashserve.engine.llm_engine import LLMEngine

    logging.basicConfig(level=logging.INFO)
    # Built and stepped on one thread, so that one OpenMP team does all its work (AsyncLLMEngine).
    engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashserve-engine")
    engine = engine_thread.submit(LLMEngine.from_engine_args, engine_args).result()
    names = [engine_args.model]
    stem = Path(engine_args.model).name
    if stem not in names:
        names.append(stem)
    app = build_app(engine, names, api_key=api_key, max_waiting=max_waiting, tool_call_parser=tool_call_parser,
                    engine_thread=engine_thread)
    logger.info("serving %s on http://%s:%d/v1", names[0], host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5))
    # Workers that failed leave nothing to serve: answer 503 while shutting down, then exit non-zero.
    app.state.engine.on_dead = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    finally:
        engine.shutdown()
    if app.state.engine.dead is not None:
        raise app.state.engine.dead
