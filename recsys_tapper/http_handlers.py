"""The HTTP service's state and routes (``recsys_tapper.http_service`` has the app, batcher and metrics).

``Service`` owns the loaded ``Server``, the event log and the one model thread. Every handler checks its
input on the event loop (``recsys_tapper.http_requests``), then runs model work on the model thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from recsys_tapper.data import ProfileRecord, format_date
from recsys_tapper.http_requests import (
    AnswerIn,
    ApiError,
    EventsIn,
    answer_query,
    events_records,
    text_field,
    validation_field,
)
from recsys_tapper.serve import Query

log = logging.getLogger("recsys_tapper.serve")

_JSON_TYPES = {"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
               "dict": "an object", "bool": "a boolean", "NoneType": "null"}
_EXPECTED = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
             "list_type": "a list", "model_type": "an object", "dict_type": "an object", "bool_type": "a boolean"}


def validation_error(errors: list[dict]) -> tuple[int, dict]:
    """FastAPI/pydantic errors -> (status, error body) naming the first bad field."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return 400, {"error": {"field": "body", "message": f"not valid JSON ({first.get('ctx', {}).get('error')})"}}
    fld = validation_field(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "missing":
        msg = "field required"
    elif kind.endswith("_type") or kind in ("model_attributes_type",):
        same = [e for e in errors if validation_field(tuple(e.get("loc", ()))) == fld]
        want = sorted({_EXPECTED.get(e.get("type"), e.get("type")) for e in same})
        got = _JSON_TYPES.get(type(first.get("input")).__name__, type(first.get("input")).__name__)
        msg = f"must be {' or '.join(want)}, got {got}"
    else:
        msg = first.get("msg", "invalid value")
    if fld == "body" and kind.endswith("_type"):
        msg = "the body must be a JSON object"
    return 422, {"error": {"field": fld, "message": msg}}


def _iso(day: float | None) -> str | None:
    return None if day is None else format_date(day)


class Service:
    """The loaded model, its event log and the single model thread."""

    def __init__(self, cfg, metrics, server, event_log) -> None:
        self.cfg, self.metrics, self.server, self.log = cfg, metrics, server, event_log
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tapper-model")
        self.batcher = None
        self.text_field = text_field(server.task)
        self.replayed = self.replay_skipped = 0
        self.started = time.time()

    @classmethod
    def start(cls, cfg, metrics, server=None) -> Service:
        from recsys_tapper.event_log import EventLog
        from recsys_tapper.serve import Server

        if server is None:
            server = Server(cfg.model_dir, cold_start=cfg.cold_start,
                            allow_fingerprint_mismatch=cfg.allow_fingerprint_mismatch)
        path = Path(cfg.events_log) if cfg.events_log else Path(cfg.model_dir) / "serve_events.jsonl"
        svc = cls(cfg, metrics, server, EventLog(path))
        try:
            svc.replay()
        except BaseException:
            svc.close()
            raise
        return svc

    def replay(self) -> None:
        """Apply every logged request in order; a record the model already holds (e.g. applied since by
        ``tapper update``) is skipped and counted."""
        pairs, skipped = [], 0
        seen = set()
        for batch in self.log.replay():
            for e in batch:
                key = (str(e["user_id"]), str(e["record_id"]))
                if key in seen or self.server.has_record(*key):
                    skipped += 1
                    continue
                seen.add(key)
                rec = ProfileRecord(key[1], {self.text_field: e["text"], self.server.task.output_field: e["label"]},
                                    float(e["day"]))
                pairs.append((key[0], rec))
        if pairs:
            self.server.add_records(pairs)
        self.replayed, self.replay_skipped = len(pairs), skipped
        self.metrics.replayed.set(len(pairs))
        if pairs or skipped or self.log.torn_bytes:
            log.warning("replayed %d events from %s (%d already held, %d torn bytes dropped)", len(pairs),
                        self.log.path, skipped, self.log.torn_bytes)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.log.close()

    # ---------------------------------------------------------------------------- on the model thread

    def predict_batch(self, queries: list[Query]) -> list[dict]:
        return self.server.predict_many(queries)

    def append_events(self, pairs: list[tuple[str, ProfileRecord]]) -> list[dict]:
        """Duplicate check, encode, log + fsync, then add (a failure before the log leaves nothing behind)."""
        for i, (u, r) in enumerate(pairs):
            if self.server.has_record(u, r.id):
                raise ApiError(409, f"events[{i}].record_id",
                               f"user {u!r} already has record {r.id!r} (records are immutable)")
        vectors = self.server.encode_records(pairs)  # (n, d)
        self.log.append([{"user_id": u, "record_id": r.id, "text": r.fields[self.text_field],
                          "label": r.fields[self.server.task.output_field], "day": r.date} for u, r in pairs])
        self.server.add_records(pairs, vectors)
        self.metrics.events.inc(len(pairs))
        return [self.user_info(u) for u in dict.fromkeys(u for u, _ in pairs)]

    def user_info(self, user: str) -> dict:
        info = self.server.user_info(user)
        info["last_event_time"] = _iso(info["last_event_day"])
        return info

    async def on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def add_routes(app, get_svc, metrics) -> None:
    def fail(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.post("/v1/answer")
    async def answer(body: AnswerIn):
        svc = get_svc()
        t0 = time.perf_counter()
        try:
            query = answer_query(body, svc.server.task, svc.cfg.limits)
            out, batch_size = await svc.batcher.submit(query)
        except ApiError as e:
            return fail(e)
        res = {"user_id": out["user_id"], "answer": out["pred"], "probs": out["probs"]}
        if "expected" in out:
            res["expected"] = out["expected"]
        res |= {"served_by": out["served_by"], "n_history": out["n_history"],
                "query_date": _iso(out["query_date"]), "batch_size": batch_size,
                "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        return res

    @app.post("/v1/events")
    async def events(body: EventsIn):
        svc = get_svc()
        try:
            pairs = events_records(body, svc.server.task, svc.cfg.limits, time.time() / 86400.0)
            users = await svc.on_model_thread(svc.append_events, pairs)
        except ApiError as e:
            return fail(e)
        return {"appended": len(pairs), "users": users}

    @app.get("/v1/users/{user_id}")
    async def user(user_id: str):
        svc = get_svc()
        info = await svc.on_model_thread(svc.user_info, user_id)
        if not info["n_history"] and not info["has_row"]:
            return fail(ApiError(404, "user_id", f"unknown user {user_id!r} (no row and no history)"))
        return info

    @app.get("/v1/explain")
    async def explain(request: Request):
        svc = get_svc()
        allowed = {"user_id", "question", "date", "top_k"}
        try:
            extra = sorted(set(request.query_params) - allowed)
            if extra:
                raise ApiError(422, extra[0], "unknown query parameter")
            params = dict(request.query_params)
            for name in ("user_id", "question"):
                if not params.get(name, "").strip():
                    raise ApiError(422, name, "query parameter required (non-empty)")
            top_k = params.get("top_k", "5")
            if not top_k.isdigit() or not 0 < int(top_k) <= 100:
                raise ApiError(422, "top_k", f"must be an integer in 1..100, got {top_k!r}")
            body = AnswerIn(user_id=params["user_id"], question=params["question"],
                            date=params.get("date"))
            query = answer_query(body, svc.server.task, svc.cfg.limits)
            from recsys_tapper.explain import explain as explain_fn

            return await svc.on_model_thread(lambda: explain_fn(svc.server, query.user_id, query.question,
                                                                 date=query.date, top_k=int(top_k)))
        except ApiError as e:
            return fail(e)

    @app.get("/healthz")
    async def healthz():
        svc = get_svc()
        return {"status": "ok", "model_dir": str(svc.server.model_dir), "task": svc.server.task.name,
                "n_users_with_row": len(svc.server.users), "n_records": len(svc.server.bank),
                "events_log": str(svc.log.path), "events_replayed": svc.replayed,
                "max_batch": svc.cfg.max_batch, "max_wait_ms": svc.cfg.max_wait_ms,
                "uptime_s": round(time.time() - svc.started, 3)}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)
