"""Provenance of a run, for every results JSON: command, git sha and dirty flag, machine, ISO date.

One writer for the whole project: ``tapper benchmark``, the ``benchmarks/`` scripts (through
``benchmarks.common.run_meta``) and the sweeps all call :func:`run_meta`. Standard library and torch only, so
a torch-only machine (``benchmarks/gpu_pq.py``) can import it.

Example::

    meta = run_meta()                      # command = this process's command line
    meta = run_meta("tapper benchmark results_dir=r", device="cuda:0")
    meta["git_sha"], meta["dirty"], meta["machine"]["cpu_flags"]     # '9f2c…' (40 hex), False, ['avx2', …]
    meta = run_meta(files=["benchmarks/pooling_throughput.py"])
    meta["files_committed"]                 # {'benchmarks/pooling_throughput.py': True}
    code_hash()                             # 'c0ffee…' (64 hex): the code a result depends on, across commits
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The CPU features that decide which kernels torch and FBGEMM run (x86 and Arm names, as /proc/cpuinfo has them).
CPU_FLAGS = ("sse4_2", "fma", "f16c", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def _git(*args: str) -> str | None:
    """``git args`` in the repository this file belongs to; None outside a checkout or without git."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_ok(*args: str) -> bool | None:
    """Whether ``git args`` exits 0; None outside a checkout or without git."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.returncode == 0


def git_sha() -> str | None:
    """The full sha of HEAD (40 hex digits), or None outside a checkout."""
    return _git("rev-parse", "HEAD")


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD; None outside a checkout. Changes under ``benchmarks/results``
    do not count: results files are outputs, not code."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return None if status is None else bool(status)


def files_committed(paths: Sequence[str], sha: str | None = None) -> dict[str, bool | None]:
    """For each repository-relative path: True when the file exists at ``sha`` (default HEAD) and the working
    tree's copy equals it, i.e. the results can be reproduced from that commit; False for an uncommitted,
    untracked or modified file; None outside a checkout."""
    sha = sha or git_sha()
    out: dict[str, bool | None] = {}
    for p in paths:
        if sha is None:
            out[p] = None
            continue
        tracked = _git_ok("cat-file", "-e", f"{sha}:{p}")
        same = _git_ok("diff", "--quiet", sha, "--", p)
        out[p] = None if tracked is None or same is None else (tracked and same)
    return out


# What a result's numbers depend on: the package's code and configs and its pins (not README, tests, benchmarks).
CODE_PATHS = ("recsys_tapper", "embeddings", "llm_bridge", "configs", "pyproject.toml", "requirements.txt",
              "scripts/setup_env.sh")
CODE_SUFFIXES = (".py", ".yaml", ".toml", ".txt", ".sh")


def code_hash(root: Path = REPO) -> str:
    """sha256 over the path and bytes of every code file under :data:`CODE_PATHS` (working tree, sorted).

    Two rows with the same hash ran the same code, whatever commit each was made at: a commit that touches
    only the README, tests or results keeps it; any edit to the package, a config or a pin changes it.
    """
    h = hashlib.sha256()
    for name in CODE_PATHS:
        top = root / name
        files = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        for f in files:
            if f.is_file() and f.suffix in CODE_SUFFIXES and "__pycache__" not in f.parts:
                rel = f.relative_to(root).as_posix().encode()
                h.update(len(rel).to_bytes(4, "big") + rel)
                data = f.read_bytes()
                h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; the platform's processor name and no flags elsewhere."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or "unknown", flags


def machine(device: str = "cpu") -> dict:
    """Where the run computed: platform, CPU model and flags, cores, torch and its thread count, device."""
    cpu, flags = _cpuinfo()
    dev = torch.device(device)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernel set torch dispatches to
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
    }


def run_meta(command: str | None = None, device: str = "cpu", files: Sequence[str] = ()) -> dict:
    """The provenance block of a results file.

    Args:
        command: the command that produced the results; None = this process's (``python`` + ``sys.argv``).
        device: the compute device (``cpu``, ``cuda:0``); a CUDA device's name is recorded.
        files: repository-relative paths (e.g. the benchmark script itself) to check against the recorded sha.

    Returns:
        ``{"command", "git_sha" (full, or None), "dirty" (bool, or None outside a checkout), "date" (ISO 8601,
        UTC, seconds), "machine": machine(device)}``, plus ``"files_committed": files_committed(files, sha)``
        when ``files`` is given (``dirty`` ignores untracked files; this does not).
    """
    sha = git_sha()
    meta = {
        "command": shlex.join(["python", *sys.argv]) if command is None else command,
        "git_sha": sha,
        "dirty": git_dirty(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
    }
    if files:
        meta["files_committed"] = files_committed(files, sha)
    return meta
