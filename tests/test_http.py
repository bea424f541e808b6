"""The HTTP service over real HTTP on 127.0.0.1 (uvicorn in a thread, or a ``tapper serve`` subprocess).

Answers equal ``Server``'s in-process answers; an event changes the next answer of its user only (and equals
the in-process answer with that event in the history: P_q, no training step); new users are cold-start at
once; concurrent clients get their own answers, batched; a ``kill -9`` loses no acknowledged event; every
bad request gets its 4xx naming the field and leaves the event log untouched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from recsys_tapper.event_log import EventLog, EventLogError
from recsys_tapper.http_requests import Limits
from recsys_tapper.http_service import HttpServeConfig, create_app, uvicorn_server
from recsys_tapper.serve import Server

REPO = Path(__file__).resolve().parents[1]
Q = "Rate the movie from 1 to 5. movie: film 12 | drama"
Q2 = "Rate the movie from 1 to 5. movie: film 77 | comedy"
DAY = 86400.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(cfg: HttpServeConfig, server: Server | None = None, start_s: float = 120.0):
    """Serve ``cfg`` from a uvicorn thread on a free loopback port; yields an httpx client. Stops on exit."""
    cfg.host, cfg.port = "127.0.0.1", free_port()
    srv = uvicorn_server(cfg, create_app(cfg, server))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_s
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60.0) as client:
            yield client
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "server did not stop"


def config(model_dir, tmp_path, **kw) -> HttpServeConfig:
    return HttpServeConfig(model_dir=str(model_dir), events_log=str(tmp_path / "events.jsonl"), **kw)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The in-process Server the HTTP answers are checked against (never given events)."""
    return Server(model_dir)


def probs(d: dict) -> torch.Tensor:
    return torch.tensor([d["probs"][k] for k in sorted(d["probs"])])


def saved_history(server: Server, user: str) -> list[dict]:
    return [{"id": r.id, **r.fields, "date": r.date} for r in server.histories[user]]


def test_answers_equal_the_in_process_server(model_dir, tiny_run, reference, tmp_path):
    _, test = tiny_run
    cases = [(ex.user_id, ex.input, ex.date) for ex in test if ex.user_id in ("syn0", "syn1", "syn2")][:6]
    with running(config(model_dir, tmp_path, max_batch=1)) as c:
        for user, q, day in cases:
            got = c.post("/v1/answer", json={"user_id": user, "question": q, "date": day * DAY})
            assert got.status_code == 200, got.text
            got = got.json()
            ref = reference.predict(user, q, date=day)
            assert got["served_by"] == ref["served_by"] == "pu+pq" and got["n_history"] == ref["n_history"] > 0
            assert got["answer"] == ref["pred"] and got["batch_size"] == 1
            torch.testing.assert_close(probs(got), probs(ref), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["expected"], ref["expected"], rtol=1e-5, atol=1e-6)
        # a cold user with an inline history: P_q alone over those records
        hist = [{"record_id": "a", "text": "film 1 | drama", "label": "5", "timestamp": 3 * DAY},
                {"record_id": "b", "text": "film 2 | comedy", "label": 1, "timestamp": "1970-01-07"}]
        got = c.post("/v1/answer", json={"user_id": "never-seen", "question": Q, "history": hist,
                                         "date": "1970-01-09"}).json()
        ref = reference.predict("never-seen", Q, date=8.0, history_records=[
            {"id": "a", "text": "film 1 | drama", "score": "5", "date": 3.0},
            {"id": "b", "text": "film 2 | comedy", "score": "1", "date": 6.0}])
        assert got["served_by"] == "pq_only(zero)" and got["n_history"] == 2 and got["query_date"] == "1970-01-09T00:00:00"
        torch.testing.assert_close(probs(got), probs(ref), rtol=1e-5, atol=1e-6)
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["n_users_with_row"] == 3 and health["events_replayed"] == 0


def test_concurrent_clients_get_their_own_answers_in_shared_batches(model_dir, reference, tmp_path):
    asks = [(u, q) for u in ("syn0", "syn1", "syn2", "never-seen") for q in (Q, Q2)] * 2  # 16 requests
    barrier = threading.Barrier(len(asks))
    cfg = config(model_dir, tmp_path, max_batch=8, max_wait_ms=200.0)
    with running(cfg) as c:
        base = str(c.base_url)

        def ask(i):
            user, q = asks[i]
            with httpx.Client(base_url=base, timeout=60.0) as own:
                barrier.wait(timeout=30)
                return own.post("/v1/answer", json={"user_id": user, "question": q}).json()

        with ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(ask, range(len(asks))))
        metrics = c.get("/metrics").text
    for (user, q), g in zip(asks, got):
        ref = reference.predict(user, q)
        assert g["user_id"] == user and g["served_by"] == ref["served_by"]
        torch.testing.assert_close(probs(g), probs(ref), rtol=1e-4, atol=1e-5)  # padded batch: float rounding
    sizes = [g["batch_size"] for g in got]
    assert max(sizes) > 1 and max(sizes) <= 8  # grouped, never past max_batch
    n_batches = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("tapper_batch_size_count")))
    assert n_batches < len(asks)
    assert f'tapper_http_requests_total{{endpoint="/v1/answer",method="POST",status="200"}} {len(asks)}.0' in metrics


def test_an_event_changes_the_next_answer_of_its_user_only(model_dir, reference, tmp_path):
    with running(config(model_dir, tmp_path)) as c:
        def ans(user):
            return c.post("/v1/answer", json={"user_id": user, "question": Q}).json()

        before0, before1 = ans("syn0"), ans("syn1")
        n0 = c.get("/v1/users/syn0").json()
        assert n0["has_row"] and n0["n_history"] == before0["n_history"]
        last = reference.histories["syn0"][-1].date
        ev = {"user_id": "syn0", "record_id": "live-1", "text": "film 12 | drama", "label": "1",
              "timestamp": (last + 1.0) * DAY}
        r = c.post("/v1/events", json={"events": [ev]})
        assert r.status_code == 200 and r.json()["appended"] == 1, r.text
        after0, after1 = ans("syn0"), ans("syn1")
        info = c.get("/v1/users/syn0").json()
    assert after0["n_history"] == before0["n_history"] + 1 == info["n_history"]
    assert info["last_event_time"] == f"1970-01-{int(last) + 2:02d}T00:00:00"
    torch.testing.assert_close(probs(after1), probs(before1), rtol=0, atol=0)  # another user: bit-identical
    assert after1["n_history"] == before1["n_history"]
    # == the in-process answer with that event in the history (read through P_q, no training step). The tiny
    # random model moves little (one record more among 8, ~1e-6), but the same input gives the same bits
    # (syn1 above), so the move is real; the tolerance below is well under it.
    ref = reference.predict("syn0", Q, history_records=[*saved_history(reference, "syn0"),
                                                        {"id": "live-1", "text": "film 12 | drama", "score": "1",
                                                         "date": last + 1.0}])
    moved = (probs(ref) - probs(before0)).abs().max()
    assert moved > 5e-7 and (probs(after0) - probs(before0)).abs().max() > 5e-7
    torch.testing.assert_close(probs(after0), probs(ref), rtol=0, atol=float(moved) / 10)


def test_a_new_user_is_a_cold_start_user_at_once(model_dir, reference, tmp_path):
    with running(config(model_dir, tmp_path)) as c:
        r = c.get("/v1/users/newbie")
        assert r.status_code == 404 and r.json()["error"]["field"] == "user_id"
        bare = c.post("/v1/answer", json={"user_id": "newbie", "question": Q}).json()
        evs = [{"user_id": "newbie", "record_id": "n1", "text": "film 3 | drama", "label": "5",
                "timestamp": "1970-01-05"},
               {"user_id": "newbie", "record_id": "n2", "text": "film 4 | horror", "label": "2",
                "timestamp": "1970-01-03T12:00:00"}]
        assert c.post("/v1/events", json={"events": evs}).json()["users"] == [
            {"user_id": "newbie", "n_history": 2, "has_row": False, "last_event_day": 4.0,
             "last_event_time": "1970-01-05T00:00:00"}]
        got = c.post("/v1/answer", json={"user_id": "newbie", "question": Q}).json()
    assert bare["n_history"] == 0 and got["n_history"] == 2 and got["served_by"] == "pq_only(zero)"
    ref = reference.predict("newbie", Q, history_records=[
        {"id": "n1", "text": "film 3 | drama", "score": "5", "date": 4.0},
        {"id": "n2", "text": "film 4 | horror", "score": "2", "date": 2.5}])  # time order: n2 first
    moved = float((probs(ref) - probs(bare)).abs().max())  # ~5e-5 on the tiny random model
    assert moved > 1e-5 and (probs(got) - probs(bare)).abs().max() > 1e-5
    torch.testing.assert_close(probs(got), probs(ref), rtol=0, atol=moved / 10)


# ----------------------------------------------------------------------------------- bad input

GOOD_EVENT = {"user_id": "syn1", "record_id": "ok-1", "text": "film 5 | drama", "label": "3",
              "timestamp": "1970-01-20"}


def _ev(**kw) -> dict:
    return {"events": [GOOD_EVENT | kw]}


BAD = [  # (path, json body or raw bytes, status, field)
    ("/v1/answer", {"user_id": "syn0", "question": Q, "bogus": 1}, 422, "bogus"),
    ("/v1/answer", {"user_id": 1.5, "question": Q}, 422, "user_id"),
    ("/v1/answer", {"user_id": True, "question": Q}, 422, "user_id"),
    ("/v1/answer", {"user_id": "syn0", "question": 7}, 422, "question"),
    ("/v1/answer", {"user_id": "syn0"}, 422, "question"),
    ("/v1/answer", {"user_id": "syn0", "question": "   "}, 422, "question"),
    ("/v1/answer", {"user_id": "syn0", "question": "x" * 201}, 422, "question"),
    ("/v1/answer", {"user_id": "", "question": Q}, 422, "user_id"),
    ("/v1/answer", {"user_id": "a/b", "question": Q}, 422, "user_id"),
    ("/v1/answer", {"user_id": "syn0", "question": Q, "date": "13/45/2020"}, 422, "date"),
    ("/v1/answer", {"user_id": "syn0", "question": Q, "history": "x"}, 422, "history"),
    ("/v1/answer", {"user_id": "syn0", "question": Q, "history": [{"record_id": "a", "text": "t", "label": "9"}]},
     422, "history[0].label"),
    ("/v1/answer", {"user_id": "syn0", "question": Q,
                    "history": [{"record_id": "a", "text": "t", "label": "1", "timestamp": "yesterday"}]},
     422, "history[0].timestamp"),
    ("/v1/answer", b'{"user_id": "syn0", "question": ', 400, "body"),
    ("/v1/answer", b"[1, 2]", 422, "body"),
    ("/v1/events", _ev(color="red"), 422, "events[0].color"),
    ("/v1/events", {"events": [GOOD_EVENT, GOOD_EVENT | {"record_id": "ok-2", "text": "y" * 201}]}, 422,
     "events[1].text"),
    ("/v1/events", _ev(text=""), 422, "events[0].text"),
    ("/v1/events", _ev(timestamp="13/45/2020"), 422, "events[0].timestamp"),
    ("/v1/events", _ev(timestamp=[2020]), 422, "events[0].timestamp"),
    ("/v1/events", _ev(timestamp="2999-01-01"), 422, "events[0].timestamp"),
    ("/v1/events", _ev(timestamp=time.time() + 3600), 422, "events[0].timestamp"),
    ("/v1/events", (b'{"events": [{"user_id": "syn1", "record_id": "n", "text": "t", "label": "1", '
                    b'"timestamp": NaN}]}'), 422, "events[0].timestamp"),
    ("/v1/events", _ev(label="6"), 422, "events[0].label"),
    ("/v1/events", _ev(label=True), 422, "events[0].label"),
    ("/v1/events", {"events": [{k: v for k, v in GOOD_EVENT.items() if k != "label"}]}, 422, "events[0].label"),
    ("/v1/events", {"events": [GOOD_EVENT, GOOD_EVENT]}, 422, "events[1].record_id"),
    ("/v1/events", _ev(record_id="syn1_0"), 409, "events[0].record_id"),  # a saved record: immutable
    ("/v1/events", {"events": []}, 422, "events"),
    ("/v1/events", {"events": [GOOD_EVENT | {"record_id": f"m{i}"} for i in range(4)]}, 422,
     "events"),
    ("/v1/events", {"events": [GOOD_EVENT], "text": "pad" * 2000}, 413, "body"),
    ("/v1/explain?user_id=syn0&question=q&colour=red", None, 422, "colour"),
    ("/v1/explain?user_id=syn0", None, 422, "question"),
    ("/v1/explain?user_id=syn0&question=q&top_k=0", None, 422, "top_k"),
]


def test_every_bad_request_gets_its_4xx_naming_the_field_and_writes_nothing(model_dir, tmp_path):
    cfg = config(model_dir, tmp_path, max_body_bytes=4096,
                 limits=Limits(max_text_chars=200, max_events=3, max_history=10))
    with running(cfg) as c:
        before = c.get("/v1/users/syn1").json()
        for path, body, status, fld in BAD:
            if body is None:
                r = c.get(path)
            elif isinstance(body, bytes):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(path, json=body)
            assert (r.status_code, r.json()) == (status, {"error": {"field": fld, "message": r.json()["error"]["message"]}}), \
                (path, body, r.text)
            assert "Traceback" not in r.text and r.json()["error"]["message"]
        # a body over the limit with no Content-Length (chunked): refused while it streams in
        r = c.post("/v1/events", content=iter([b'{"events": [', b" " * 5000, b"]}"]),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"
        after = c.get("/v1/users/syn1").json()
        ok = c.post("/v1/events", json={"events": [GOOD_EVENT]})  # the same event, well-formed: accepted
        assert ok.status_code == 200 and c.get("/v1/users/syn1").json()["n_history"] == before["n_history"] + 1
    assert after == before
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [e["record_id"] for e in json.loads(lines[0])["events"]] == ["ok-1"] and len(lines) == 1


def test_an_internal_failure_is_a_500_without_traceback(model_dir, tmp_path):
    server = Server(model_dir)

    def boom(queries):
        raise RuntimeError("secret internals")

    server.predict_many = boom
    with running(config(model_dir, tmp_path), server=server) as c:
        r = c.post("/v1/answer", json={"user_id": "syn0", "question": Q})
        assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text
        assert r.json()["error"]["field"] is None
        assert c.get("/healthz").status_code == 200  # still serving


# ------------------------------------------------------------------------------ durability

def test_event_log_drops_a_torn_tail_and_refuses_damage_and_a_second_writer(tmp_path):
    path = tmp_path / "log.jsonl"
    log = EventLog(path)
    assert log.replay() == []
    e = {"user_id": "u", "record_id": "r1", "text": "t", "label": "1", "day": 3.5}
    assert log.append([e]) == 0 and log.append([e | {"record_id": "r2"}]) == 1
    with pytest.raises(EventLogError, match="held by another server"):
        EventLog(path)
    log.close()
    whole = path.read_bytes()
    torn = b'{"seq": 2, "events": [{"user_id": "u", "rec'  # a crash mid-write: 43 bytes, no newline
    path.write_bytes(whole + torn)
    log = EventLog(path)
    assert [[x["record_id"] for x in b] for b in log.replay()] == [["r1"], ["r2"]]
    assert log.torn_bytes == len(torn) == 43 and path.read_bytes() == whole and log.seq == 2 and log.n_events == 2
    log.close()
    path.write_bytes(b"not json\n" + whole)
    with pytest.raises(EventLogError, match="line 1: not an event-log line"):
        EventLog(path).replay()


def _start(model_dir, log_path, port) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recsys_tapper", "serve", f"model_dir={model_dir}", "host=127.0.0.1",
           f"port={port}", f"events_log={log_path}", "max_seconds=240", "threads=1"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})


def _wait_ready(proc: subprocess.Popen, base: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


@pytest.mark.slow
def test_a_restart_after_kill_9_replays_the_log_with_nothing_lost(model_dir, tmp_path):
    log_path, port = tmp_path / "events.jsonl", free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(model_dir, log_path, port)
    try:
        _wait_ready(proc, base)
        acked = []
        for i in range(4):  # 4 acknowledged requests, 2 events each, for an old and a new user
            evs = [{"user_id": "syn2", "record_id": f"k{i}", "text": f"film {i} | drama", "label": str(1 + i),
                    "timestamp": (40 + i) * DAY},
                   {"user_id": "fresh", "record_id": f"f{i}", "text": f"film {i} | war", "label": "5",
                    "timestamp": (40 + i) * DAY}]
            assert httpx.post(base + "/v1/events", json={"events": evs}, timeout=60).status_code == 200
            acked += evs
        answers = {u: httpx.post(base + "/v1/answer", json={"user_id": u, "question": Q}, timeout=60).json()
                   for u in ("syn2", "fresh")}
        users = {u: httpx.get(f"{base}/v1/users/{u}", timeout=60).json() for u in ("syn2", "fresh")}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    proc = _start(model_dir, log_path, port)
    try:
        _wait_ready(proc, base)
        health = httpx.get(base + "/healthz", timeout=60).json()
        again = {u: httpx.post(base + "/v1/answer", json={"user_id": u, "question": Q}, timeout=60).json()
                 for u in ("syn2", "fresh")}
        users2 = {u: httpx.get(f"{base}/v1/users/{u}", timeout=60).json() for u in ("syn2", "fresh")}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert health["events_replayed"] == len(acked) == 8
    assert users2 == users and users["fresh"]["n_history"] == 4 and not users["fresh"]["has_row"]
    for u in ("syn2", "fresh"):
        assert again[u]["n_history"] == answers[u]["n_history"]
        torch.testing.assert_close(probs(again[u]), probs(answers[u]), rtol=1e-5, atol=1e-6)
    logged = [e for line in log_path.read_text().splitlines() for e in json.loads(line)["events"]]
    assert [(e["user_id"], e["record_id"]) for e in logged] == [(e["user_id"], e["record_id"]) for e in acked]


def test_get_explain_returns_the_explain_data(model_dir, reference, tmp_path):
    from recsys_tapper.explain import explain

    with running(config(model_dir, tmp_path)) as c:
        got = c.get("/v1/explain", params={"user_id": "syn1", "question": Q, "date": "1970-01-31", "top_k": 2})
    assert got.status_code == 200, got.text
    got, want = got.json(), explain(reference, "syn1", Q, date=30.0, top_k=2)
    assert got["top"] == want["top"] and got["query_date"] == want["query_date"] == "1970-01-31T00:00:00"
    assert got.keys() == want.keys() and len(got["records"]) == len(want["records"]) == 8
    for g, w in zip(got["records"], want["records"]):
        assert g["record_id"] == w["record_id"] and g["days_before_query"] == w["days_before_query"]
        assert g["alpha"] == pytest.approx(w["alpha"], abs=1e-7) and g["din_score"] == pytest.approx(w["din_score"])
    assert got["answer"]["with_prefix"]["probs"] == pytest.approx(want["answer"]["with_prefix"]["probs"], abs=1e-7)


@pytest.mark.parametrize("override, message", [
    ("max_batch=0", "serve: max_batch=0 must be >= 1"),
    ("max_wait_ms=-1", "serve: max_wait_ms=-1.0 must be >= 0"),
    ("limits.max_events=0", "serve: limits.max_events=0 must be >= 1"),
    ("model_dir=/nonexistent/model", "model_dir /nonexistent/model: not a directory"),
])
def test_tapper_serve_refuses_bad_settings_before_listening(model_dir, override, message, capsys):
    from recsys_tapper.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", f"model_dir={model_dir}", "port=1", "max_seconds=1", override])
    assert e.value.code == 2 and f"tapper serve: error: {message}" in capsys.readouterr().err
