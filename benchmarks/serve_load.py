"""serve_load: the HTTP service under load on loopback, batch-1 against batched serving.

For each serving mode a ``tapper serve`` subprocess is started on 127.0.0.1 (its own event log in a temp
folder; the model directory is not written), warmed up, then driven by an asyncio httpx client in this
process through two sweeps:

  concurrency  closed loop: c clients, each sends its next /v1/answer when the last one returned
  rate         open loop: Poisson arrivals at r requests/s (at most ``--max-in-flight`` outstanding; an
               arrival past that is counted as ``shed``, not sent)

Each cell stops at ``--cell-requests`` answers or ``--cell-s`` seconds, whichever comes first; the whole run
stops at ``--budget-s`` (remaining cells are listed as skipped). Latency is client-side (queueing included):
p50/p95/p99 and the mean, throughput is answered requests / cell wall time. The mean server batch size of
a cell comes from the service's own ``tapper_batch_size`` histogram (/metrics, before and after the cell).

    python benchmarks/serve_load.py --model-dir /tmp/tiny_serve/model --model-note "tiny random Llama ..."
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks.common import REPO, RESULTS, run_meta, write_section

QUESTIONS = ["Rate the movie from 1 to 5. movie: Heat (1995) | Action, Crime, Thriller",
             "Rate the movie from 1 to 5. movie: Toy Story (1995) | Animation, Children's, Comedy",
             "Rate the movie from 1 to 5. movie: Fargo (1996) | Crime, Drama, Thriller",
             "Rate the movie from 1 to 5. movie: Titanic (1997) | Drama, Romance"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of xs, or None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    return round(s[max(1, math.ceil(p / 100.0 * len(s))) - 1], 3)  # rank ceil(p/100 * n)


def batch_stats(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of the service's tapper_batch_size histogram."""
    vals = {}
    for line in metrics_text.splitlines():
        for k in ("tapper_batch_size_sum", "tapper_batch_size_count"):
            if line.startswith(k + " "):
                vals[k] = float(line.split()[-1])
    return vals.get("tapper_batch_size_sum", 0.0), vals.get("tapper_batch_size_count", 0.0)


class Load:
    def __init__(self, base: str, users: list[str], seed: int) -> None:
        self.base, self.users, self.rng = base, users, random.Random(seed)

    def body(self) -> dict:
        return {"user_id": self.rng.choice(self.users), "question": self.rng.choice(QUESTIONS)}

    async def one(self, client, lat: list[float], errors: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            r = await client.post(self.base + "/v1/answer", json=self.body())
            if r.status_code == 200:
                lat.append((time.perf_counter() - t0) * 1e3)
            else:
                errors.append(str(r.status_code))
        except httpx.HTTPError as e:  # a transport error is a failed request of the cell, not the end of the run
            errors.append(type(e).__name__)

    async def closed(self, client, conc: int, n: int, seconds: float) -> dict:
        lat, errors, sent = [], [], [0]
        stop = time.perf_counter() + seconds

        async def worker():
            while sent[0] < n and time.perf_counter() < stop:
                sent[0] += 1
                await self.one(client, lat, errors)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        return self.summary(lat, errors, time.perf_counter() - t0, concurrency=conc)

    async def open(self, client, rate: float, n: int, seconds: float, max_in_flight: int) -> dict:
        lat, errors, tasks, shed = [], [], set(), 0
        t0 = time.perf_counter()
        nxt = t0
        for _ in range(n):
            nxt += self.rng.expovariate(rate)
            if nxt - t0 > seconds:
                break
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            tasks = {t for t in tasks if not t.done()}
            if len(tasks) >= max_in_flight:
                shed += 1
                continue
            tasks.add(asyncio.create_task(self.one(client, lat, errors)))
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        return self.summary(lat, errors, time.perf_counter() - t0, offered_rps=rate, shed=shed)

    @staticmethod
    def summary(lat: list[float], errors: list[str], wall: float, **extra) -> dict:
        return {**extra, "n_ok": len(lat), "n_errors": len(errors), "errors": sorted(set(errors)),
                "wall_s": round(wall, 3), "throughput_rps": round(len(lat) / wall, 2) if wall > 0 else None,
                "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
                "mean_ms": round(sum(lat) / len(lat), 3) if lat else None}


def start_server(model_dir: str, log_dir: str, mode: dict, threads: int, max_seconds: float):
    port = free_port()
    cmd = [sys.executable, "-m", "recsys_tapper", "serve", f"model_dir={model_dir}", "host=127.0.0.1",
           f"port={port}", f"events_log={log_dir}/events-{mode['name']}.jsonl", f"max_batch={mode['max_batch']}",
           f"max_wait_ms={mode['max_wait_ms']}", f"threads={threads}", f"max_seconds={max_seconds}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(client, base: str, proc, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if (await client.get(base + "/healthz")).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:  # not listening yet
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("server did not become ready")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


async def run_mode(args, mode: dict, users: list[str], deadline: float, log_dir: str) -> dict:
    proc, base = start_server(args.model_dir, log_dir, mode, args.server_threads,
                              max(10.0, deadline - time.perf_counter() + 30))
    out = {"settings": mode, "cells": [], "skipped": []}
    limits = httpx.Limits(max_connections=args.max_in_flight + 8, max_keepalive_connections=args.max_in_flight + 8)
    try:
        async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
            out["startup_s"] = round(await wait_ready(client, base, proc, 180.0), 2)
            load = Load(base, users, args.seed)
            await load.closed(client, 4, args.warmup, 30.0)  # warm-up: not recorded
            cells = [("concurrency", c) for c in args.concurrency] + [("rate", r) for r in args.rates]
            for kind, x in cells:
                if time.perf_counter() + args.cell_s > deadline:
                    out["skipped"].append({kind: x})
                    continue
                s0, n0 = batch_stats((await client.get(base + "/metrics")).text)
                if kind == "concurrency":
                    cell = await load.closed(client, int(x), args.cell_requests, args.cell_s)
                else:
                    cell = await load.open(client, float(x), args.cell_requests, args.cell_s, args.max_in_flight)
                s1, n1 = batch_stats((await client.get(base + "/metrics")).text)
                cell["mean_server_batch"] = round((s1 - s0) / (n1 - n0), 3) if n1 > n0 else None
                out["cells"].append(cell)
                print(mode["name"], kind, x, {k: cell[k] for k in ("n_ok", "throughput_rps", "p50_ms", "p99_ms",
                                                                   "mean_server_batch")}, flush=True)
    finally:
        stop_server(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--model-note", required=True, help="what model this is (written into the JSON)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rates", type=float, nargs="+", default=[10.0, 40.0, 160.0])
    ap.add_argument("--cell-requests", type=int, default=400)
    ap.add_argument("--cell-s", type=float, default=7.0)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=170.0, help="the whole run stops by then")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    users = json.loads((Path(args.model_dir) / "users.json").read_text()) + ["cold-user-1"]
    modes = [{"name": "batch1", "max_batch": 1, "max_wait_ms": 0.0},
             {"name": "batched", "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms}]
    load0 = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for mode in modes:
            results[mode["name"]] = asyncio.run(run_mode(args, mode, users, deadline, log_dir))
    ratios = {}
    for a, b in zip(results["batch1"]["cells"], results["batched"]["cells"]):
        key = f"c{a['concurrency']}" if "concurrency" in a else f"r{a['offered_rps']:g}"
        if a.get("throughput_rps") and b.get("throughput_rps"):
            ratios[key] = {"throughput_batched_over_batch1": round(b["throughput_rps"] / a["throughput_rps"], 3),
                           "p99_batched_over_batch1": round(b["p99_ms"] / a["p99_ms"], 3)
                           if a["p99_ms"] and b["p99_ms"] else None}
    payload = {
        "meta": run_meta() | {"loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "model": {"model_dir": args.model_dir, "note": args.model_note},
        "method": "tapper serve subprocesses on 127.0.0.1 (one per mode, one model thread each), driven by an "
                  "asyncio httpx client in the benchmark process (same machine: the client's CPU time competes "
                  "with the server's). Closed-loop cells: c clients back to back. Open-loop cells: Poisson "
                  "arrivals at the offered rate, shed past max_in_flight outstanding. Latency is client-side. "
                  "Users: the model's trained users plus one cold user; 4 fixed MovieLens-style questions.",
        "settings": {"concurrency": args.concurrency, "rates_rps": args.rates, "cell_requests": args.cell_requests,
                     "cell_s": args.cell_s, "warmup": args.warmup, "max_in_flight": args.max_in_flight,
                     "server_threads": args.server_threads, "budget_s": args.budget_s},
        "modes": results,
        "ratios": ratios,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_section(args.out, "serve_load", payload)
    print(json.dumps(ratios), f"wall {payload['wall_s']} s")


if __name__ == "__main__":
    main()
