"""The serving event log: append-only JSON lines, fsynced before an append returns, replayed on restart.

One line is one accepted request (a list of events), so a request is in the log whole or not at all::

    {"seq": 0, "received": "2026-12-02T07:30:00", "events": [{"user_id": "405", "record_id": "r1",
     "text": "Heat (1995) | Action", "label": "4", "day": 10250.5}]}

``append`` writes the line with one ``write`` loop on an ``O_APPEND`` descriptor and then ``fsync``s it; if the
write fails part-way (disk full), the file is truncated back to where it was, so no half line stays behind.
A crash (``kill -9``, power loss) can still leave a torn last line: ``replay`` drops it (and truncates it off,
counted in ``torn_bytes``), since its request was never answered. A bad line anywhere else is an error naming
the line. The log is held with an exclusive ``flock``: a second server on the same log is refused.

Example::

    log = EventLog("runs/demo/model/serve_events.jsonl")
    for batch in log.replay():          # every request accepted before, in order
        apply(batch)
    log.append([{"user_id": "405", "record_id": "r1", "text": "...", "label": "4", "day": 10250.5}])
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from pathlib import Path

from embeddings.atomic import fsync_dir as _fsync_dir
from recsys_tapper.errors import InputError

EVENT_KEYS = ("user_id", "record_id", "text", "label", "day")


class EventLogError(InputError):
    """A damaged or locked event log; the message names the file and the line (from 1)."""


class EventLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise EventLogError(f"{self.path}: held by another server (one server per event log)") from None
        if created:
            _fsync_dir(self.path.parent)  # the new file's name survives a crash too
        self.seq = 0
        self.torn_bytes = 0
        self.n_events = 0

    def replay(self) -> list[list[dict]]:
        """Every logged request's events, in order. A torn last line is dropped and truncated off."""
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a torn line
        if end < len(data):
            self.torn_bytes = len(data) - end
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        out = []
        for i, line in enumerate(data[:end].splitlines(), start=1):
            try:
                rec = json.loads(line)
                events = rec["events"]
                if not isinstance(events, list) or not all(
                        isinstance(e, dict) and all(k in e for k in EVENT_KEYS) for e in events):
                    raise ValueError(f"events must be a list of objects with {', '.join(EVENT_KEYS)}")
            except (ValueError, KeyError, TypeError) as e:
                raise EventLogError(f"{self.path}: line {i}: not an event-log line ({e})") from None
            out.append(events)
            self.seq = max(self.seq, int(rec.get("seq", i - 1)) + 1)
        self.n_events = sum(len(b) for b in out)
        return out

    def append(self, events: list[dict]) -> int:
        """Write one request's events as one line and fsync; returns its sequence number."""
        line = json.dumps({"seq": self.seq,
                           "received": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "events": [{k: e[k] for k in EVENT_KEYS} for e in events]},
                          ensure_ascii=False, allow_nan=False)
        buf = (line + "\n").encode()
        start = os.fstat(self.fd).st_size
        try:
            view = memoryview(buf)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)
        except BaseException:
            os.ftruncate(self.fd, start)  # nothing half-written
            raise
        seq, self.seq = self.seq, self.seq + 1
        self.n_events += len(events)
        return seq

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1
