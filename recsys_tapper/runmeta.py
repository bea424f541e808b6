"""command, git sha, machine and date of a run, for every results JSON."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess

import torch


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
        # results files are outputs, not code: their own changes do not make a run "+dirty"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], check=True, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_meta(command: str) -> dict:
    return {
        "command": command,
        "git_sha": git_sha(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
