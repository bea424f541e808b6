"""run_meta: one provenance block (command, full sha, dirty flag, machine, ISO date) for every results file."""

import datetime as dt
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from recsys_tapper.runmeta import CPU_FLAGS, REPO, files_committed, run_meta


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_run_meta_records_the_checkout_the_machine_and_the_time():
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    meta = run_meta("tapper demo out_dir=x")
    assert set(meta) == {"command", "git_sha", "dirty", "date", "machine"}
    assert meta["command"] == "tapper demo out_dir=x"
    assert meta["git_sha"] == _git("rev-parse", "HEAD") and len(meta["git_sha"]) == 40
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    assert meta["dirty"] is bool(status)
    date = dt.datetime.fromisoformat(meta["date"])
    assert date.tzinfo is not None and before <= date <= dt.datetime.now(dt.timezone.utc)
    m = meta["machine"]
    assert m["torch_threads"] == torch.get_num_threads() and m["cpu_count"] == os.cpu_count()
    assert m["torch"] == torch.__version__ and m["device"] == "cpu"
    info = Path("/proc/cpuinfo")
    if info.exists():
        flags = next((set(line.split(":", 1)[1].split()) for line in info.read_text().splitlines()
                      if line.split(":")[0].strip() in ("flags", "Features")), set())
        assert m["cpu_flags"] == [f for f in CPU_FLAGS if f in flags]


def test_benchmarks_run_meta_is_the_same_block_with_the_command_from_argv():
    sys.path.insert(0, str(REPO))
    from benchmarks.common import run_meta as bench_meta

    meta = bench_meta()
    assert meta["command"] == shlex.join(["python", *sys.argv])
    assert set(meta) == set(run_meta("x")) and meta["machine"]["cpu_flags"] == run_meta("x")["machine"]["cpu_flags"]


def test_run_meta_says_whether_named_files_are_committed_at_the_sha():
    path = "recsys_tapper/runmeta.py"
    meta = run_meta("x", files=[path, "no/such_file.py"])
    same = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path], cwd=REPO, check=False).returncode == 0
    assert meta["files_committed"] == {path: same, "no/such_file.py": False}
    # a file that exists here but not at an older commit is not "committed at" that commit
    root = _git("rev-list", "--max-parents=0", "HEAD").splitlines()[0]
    at_root = subprocess.run(["git", "cat-file", "-e", f"{root}:{path}"], cwd=REPO, check=False).returncode == 0
    assert at_root or files_committed([path], sha=root) == {path: False}


def test_code_hash_follows_the_code_and_configs_and_nothing_else(tmp_path):
    import shutil

    from recsys_tapper.runmeta import code_hash

    for d in ("recsys_tapper", "configs"):
        (tmp_path / d).mkdir()
    (tmp_path / "recsys_tapper" / "a.py").write_text("x = 1\n")
    (tmp_path / "configs" / "c.yaml").write_text("k: 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    first = code_hash(tmp_path)
    assert len(first) == 64 and code_hash(tmp_path) == first
    # not code: the README, tests, results, byte caches
    (tmp_path / "README.md").write_text("numbers\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("assert True\n")
    (tmp_path / "recsys_tapper" / "__pycache__").mkdir()
    (tmp_path / "recsys_tapper" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "recsys_tapper" / "__pycache__" / "b.py").write_text("y = 2\n")
    assert code_hash(tmp_path) == first
    # code: a module's bytes, a config, a pin, a new module, a renamed one
    (tmp_path / "configs" / "c.yaml").write_text("k: 2\n")
    assert code_hash(tmp_path) != first
    (tmp_path / "configs" / "c.yaml").write_text("k: 1\n")
    assert code_hash(tmp_path) == first
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    second = code_hash(tmp_path)
    assert second != first
    (tmp_path / "recsys_tapper" / "b.py").write_text("")
    assert code_hash(tmp_path) != second
    (tmp_path / "recsys_tapper" / "b.py").unlink()
    shutil.move(tmp_path / "recsys_tapper" / "a.py", tmp_path / "recsys_tapper" / "z.py")
    assert code_hash(tmp_path) != second
    assert code_hash() == code_hash(REPO)  # the default is this checkout
