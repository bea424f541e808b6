"""``tapper serve``: a saved model behind HTTP (FastAPI on uvicorn), with live history and request batching.

    tapper serve model_dir=runs/demo/model host=127.0.0.1 port=8000 [max_batch=16 max_wait_ms=5]

    POST /v1/answer        {user_id, question, [history], [date], [item_id]} -> answer, label distribution,
                           served_by (pu+pq | pq_only(zero) | pq_only(mean)), n_history, batch_size, latency_ms
    POST /v1/events        {events: [{user_id, record_id, text, label, timestamp}]} -> durable, then live
    GET  /v1/users/{id}    history length, has_row, last event time
    GET  /v1/explain       ?user_id=...&question=...[&date=...&top_k=...]: what the attention read
    GET  /healthz          GET /metrics (Prometheus text: requests, latency, batch sizes, events)

Why FastAPI + uvicorn: the most used ASGI pair in Python ML serving; pydantic gives the strict body schema
(unknown fields and wrong types refused, with the field's path), uvicorn's h11 loop is enough for a model
that answers on one worker thread. The model runs on ONE thread (``ThreadPoolExecutor(1)``): answer
batches, event appends and explains are serialized there, so an answer queued after an event's reply reads
that event. The event loop only parses, checks and queues.

Batching: ``/v1/answer`` requests queue; the batcher takes the first, waits up to ``max_wait_ms`` for more
(up to ``max_batch``) and scores them with one ``Server.predict_many`` call: one ``TapperModel.label_probs``
forward pass (the cached frozen trunk where the model has one). ``max_batch=1`` is batch-1 serving.

Events: checked whole (any bad field: 4xx, nothing written), encoded, appended to the event log as one
line and fsynced (``recsys_tapper.event_log``), then added to the user's in-memory history and the record
bank: no training step; a user without a row is a cold-start user at once. On start the log is replayed.

Every error body is ``{"error": {"field": ..., "message": ...}}``; an unexpected failure is a 500 with no
traceback (the traceback goes to the server's log). ``max_seconds`` stops the server by itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from recsys_tapper.http_requests import Limits

log = logging.getLogger("recsys_tapper.serve")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class HttpServeConfig:
    """Args:
    model_dir: a saved model directory. host / port: where to listen (127.0.0.1: loopback only).
    events_log: the event log (None: ``<model_dir>/serve_events.jsonl``).
    cold_start: ``zero`` | ``mean``, the P_u row of a user without one (``recsys_tapper.serve``).
    max_batch / max_wait_ms: answers per forward pass, and how long the first waits for company.
    max_body_bytes: a larger request body is refused (413). limits: text, event and history caps.
    threads: torch threads (None: torch's default). max_seconds: stop after this long (None: until signalled).
    """

    model_dir: str = "runs/demo/model"
    host: str = "127.0.0.1"
    port: int = 8000
    events_log: str | None = None
    cold_start: str = "zero"
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_body_bytes: int = 1 << 20
    limits: Limits = field(default_factory=Limits)
    threads: int | None = None
    max_seconds: float | None = None
    allow_fingerprint_mismatch: bool = False
    log_level: str = "warning"


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="serve_schema", node=HttpServeConfig)


class Metrics:
    """The Prometheus series of one service (its own registry: several services may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: the text stays short
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tapper_http_requests", "HTTP requests", ["endpoint", "method", "status"],
                                registry=r)
        self.latency = Histogram("tapper_http_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("tapper_batch_size", "answers per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("tapper_batch_seconds", "time of one batched forward pass",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.events = Counter("tapper_events_appended", "events appended to the log and the histories",
                              registry=r)
        self.replayed = Gauge("tapper_events_replayed", "events replayed from the log at start", registry=r)
        self.queue = Gauge("tapper_answer_queue_depth", "answers waiting for a batch", registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Batcher:
    """Groups queued items into calls of ``fn(items) -> results`` on ``executor``: at most ``max_batch``
    items, the first waiting at most ``max_wait_s`` for the rest. One batch runs at a time."""

    def __init__(self, fn: Callable[[list], list], executor: ThreadPoolExecutor, max_batch: int,
                 max_wait_s: float, metrics: Metrics) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_s * 1e3}")
        self.fn, self.executor, self.max_batch, self.max_wait_s = fn, executor, max_batch, max_wait_s
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def submit(self, item) -> tuple[object, int]:
        """Queue one item; -> (its result, the size of the batch it ran in)."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        self.metrics.queue.set(self.queue.qsize())
        return await fut

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():
            _, fut = self.queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("the server is shutting down"))

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends when stop() cancels it
            batch = await self._collect()
            self.metrics.queue.set(self.queue.qsize())
            items = [b[0] for b in batch]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as e:  # one failing batch fails its own requests only
                log.exception("batch of %d failed", len(items))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.metrics.batch_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(items))
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result((res, len(items)))


def check_config(cfg: HttpServeConfig) -> None:
    """Refuse settings that cannot serve, naming the key (an InputError: exit 2 from ``tapper serve``)."""
    from recsys_tapper.errors import InputError

    lim = cfg.limits
    bad = [(k, v, need) for k, v, need, ok in [
        ("max_batch", cfg.max_batch, ">= 1", cfg.max_batch >= 1),
        ("max_wait_ms", cfg.max_wait_ms, ">= 0", cfg.max_wait_ms >= 0),
        ("max_body_bytes", cfg.max_body_bytes, ">= 1", cfg.max_body_bytes >= 1),
        ("port", cfg.port, "in 0..65535", 0 <= cfg.port <= 65535),
        ("limits.max_text_chars", lim.max_text_chars, ">= 1", lim.max_text_chars >= 1),
        ("limits.max_events", lim.max_events, ">= 1", lim.max_events >= 1),
        ("limits.max_history", lim.max_history, ">= 0", lim.max_history >= 0),
        ("max_seconds", cfg.max_seconds, "> 0 or null", cfg.max_seconds is None or cfg.max_seconds > 0),
    ] if not ok]
    if bad:
        k, v, need = bad[0]
        raise InputError(f"serve: {k}={v!r} must be {need}")


def create_app(cfg: HttpServeConfig, server=None):
    """The FastAPI app, ready to serve: the model is loaded (``server``: an already-loaded
    ``recsys_tapper.serve.Server``, else from ``cfg.model_dir``) and the event log opened and replayed here,
    so a bad model directory or a damaged or locked log fails before anything listens (an InputError).
    The batcher starts with the app; shutdown closes the log. Run it once."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from recsys_tapper.http_handlers import Service, validation_error

    check_config(cfg)
    metrics = Metrics()
    svc = Service.start(cfg, metrics, server)
    state = {"svc": svc}

    @asynccontextmanager
    async def lifespan(app):
        svc.batcher = Batcher(svc.predict_batch, svc.executor, cfg.max_batch, cfg.max_wait_ms / 1e3, metrics)
        svc.batcher.start()
        try:
            yield
        finally:
            await svc.batcher.stop()
            svc.close()

    app = FastAPI(title="recsys-tapper", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError):
        status, body = validation_error(exc.errors())
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": {"field": None, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # the server boundary: a 500 with no traceback (the traceback goes to the log)
            log.exception("%s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": {"field": None, "message": "internal error (see the server log)"}},
                                    status_code=500)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    from recsys_tapper.http_handlers import add_routes

    add_routes(app, lambda: state["svc"], metrics)
    return BodyLimit(app, cfg.max_body_bytes)


class BodyLimit:
    """ASGI wrapper: a request body over ``limit`` bytes gets a 413 naming ``body`` (by Content-Length, or
    while it streams in, before the app sees it)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send, n: int | None) -> None:
        import json

        size = "" if n is None else f" ({n} bytes)"
        body = json.dumps({"error": {"field": "body", "message": f"request body is over the limit of "
                                                                 f"{self.limit} bytes{size}"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        seen = 0
        chunks = []
        more = True
        while more:  # read the whole body first (bounded by the limit), then hand it to the app
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await self._refuse(send, None)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def uvicorn_server(cfg: HttpServeConfig, app=None):
    """A ``uvicorn.Server`` for the app (not started): ``.run()`` blocks; set ``.should_exit`` to stop it."""
    import uvicorn

    config = uvicorn.Config(app if app is not None else create_app(cfg), host=cfg.host, port=cfg.port,
                            log_level=cfg.log_level, lifespan="on", access_log=False, timeout_keep_alive=30)
    return uvicorn.Server(config)


def serve(cfg: HttpServeConfig) -> None:
    """Run the service in the foreground until SIGINT/SIGTERM, or for ``cfg.max_seconds``."""
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    if not Path(cfg.model_dir).is_dir():
        from recsys_tapper.errors import InputError

        raise InputError(f"model_dir {cfg.model_dir}: not a directory")
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines (no authentication)", cfg.host)
    server = uvicorn_server(cfg)  # loads the model and replays the log before it listens
    print(f"serving {cfg.model_dir} on http://{cfg.host}:{cfg.port} (Ctrl-C stops"
          f"{'' if cfg.max_seconds is None else f'; stops by itself after {cfg.max_seconds:g} s'})", flush=True)
    timer = None
    if cfg.max_seconds is not None:
        timer = threading.Timer(cfg.max_seconds, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    try:
        server.run()
    finally:
        if timer is not None:
            timer.cancel()
