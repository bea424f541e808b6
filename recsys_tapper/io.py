"""Atomic file writes (see ``embeddings.atomic``), and reading back a results table to resume."""

from __future__ import annotations

import json
from pathlib import Path

from embeddings.atomic import atomic_write_bytes, atomic_write_text
from recsys_tapper.errors import InputError

__all__ = ["atomic_write_bytes", "atomic_write_text", "load_resumable"]


def load_resumable(json_path: Path, settings: dict, resume: bool) -> dict | None:
    """The results table at ``json_path`` to resume (None when there is none or ``resume`` is off).

    Raises InputError when the table on disk ran other shared ``settings``: resuming it would mix two runs in one
    table, and replacing it silently would lose the other run.

    Example::

        old = load_resumable(Path("benchmarks/results/ml100k.json"), {"seed": 0}, resume=True)
    """
    if not resume or not json_path.exists():
        return None
    old = json.loads(json_path.read_text())
    if old.get("settings") != settings:  # never overwrite another run's table by accident
        raise InputError(f"{json_path} holds a run with settings {old.get('settings')}, these are {settings}: "
                         "pass results_dir=<another folder> for a new table, or resume=false to replace it")
    return old
