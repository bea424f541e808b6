"""Crash and resume: SIGKILL a real 2-rank torchrun training mid-run, run the same command again, and get the
run that was never interrupted.

    A: torchrun -m recsys_tapper.dist_train ... out_dir=A                 (uninterrupted)
    B: the same, out_dir=B, slowed down; SIGKILL to both ranks and the agent after a checkpoint
    B': the same command again, out_dir=B: resumes from B's newest complete checkpoint

The bridge LoRA keeps its dropout (0.05), so an exact match also needs the per-rank RNG state restored.
Tolerance: atol=1e-6, rtol=1e-6 on losses and on every saved tensor (same ranks, same reduction order).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embeddings.sharding import checkpoint_step, latest_checkpoint
from llm_bridge.encoder import TextEncoder
from recsys_tapper.checkpoint import load_model
from recsys_tapper.data.lamp import load_lamp, write_lamp
from recsys_tapper.evaluation import predict_labels
from recsys_tapper.features import FeatureBuilder
from recsys_tapper.synthetic import synthetic_rating_task
from recsys_tapper.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
TOL = {"atol": 1e-6, "rtol": 1e-6}
STEPS, EVERY = 16, 3  # 4 users x 4 targets / batch 2 = 8 steps, 2 epochs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "recsys_tapper.dist_train",
        "model=tiny", "trainer=smoke", "data.source=lamp", f"data.dir={data}", "data.n_users=4",
        "trainer.stage1_examples=8", "trainer.stage1.batch_size=4", "trainer.stage2_per_user=4",
        "trainer.stage2.batch_size=2", "trainer.stage2.epochs=2", "dist.sharding=column_wise",
        "model.warm_start_rank=7", "model.item_dim=8",  # MF rows of width 8: two column shards (+ item table)
        f"dist.checkpoint_every={EVERY}", "dist.keep_checkpoints=2", f"out_dir={out}", *extra,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _saved(out: Path) -> dict[str, torch.Tensor]:
    m = out / "model"
    return {f"{f}:{k}": v for f in ("tower", "projector", "bridge_lora", "task_lora")
            for k, v in load_file(m / f"{f}.safetensors").items()}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    data = tmp_path / "data"
    train, test = synthetic_rating_task(n_users=6, n_records=10, seed=5)
    write_lamp(train, data / "dev_questions.json", data / "dev_outputs.json", task="movielens")
    write_lamp(test, data / "test_questions.json", data / "test_outputs.json", task="movielens")
    out_a, out_b = tmp_path / "A", tmp_path / "B"

    _run(_command(data, out_a))

    # B: slowed to 0.5 s a step, killed with SIGKILL (ranks and agent) once a checkpoint is complete
    agent = subprocess.Popen(_command(data, out_b, "dist.step_sleep_s=0.5"), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    ranks: list[int] = []
    while latest_checkpoint(out_b / "checkpoints") is None:
        assert agent.poll() is None, "the run to be killed ended on its own"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        ranks = _children(agent.pid) or ranks
        time.sleep(0.05)
    ranks = _children(agent.pid) or ranks
    assert len(ranks) == 2, ranks
    for pid in [*ranks, agent.pid]:
        os.kill(pid, signal.SIGKILL)
    assert agent.wait(timeout=30) == -signal.SIGKILL
    for pid in ranks:  # the ranks are in their own sessions: make sure they are gone, not orphaned
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"rank process {pid} survived SIGKILL")
    killed_at = checkpoint_step(latest_checkpoint(out_b / "checkpoints"))
    assert EVERY <= killed_at < STEPS and killed_at % EVERY == 0
    assert not (out_b / "metrics.json").exists()  # it really died mid-training

    # B': the same command again resumes
    _run(_command(data, out_b))

    a = json.loads((out_a / "metrics.json").read_text())
    b = json.loads((out_b / "metrics.json").read_text())
    assert a["resumed_from_step"] == 0 and b["resumed_from_step"] == killed_at
    assert not a["stage1_reused"] and b["stage1_reused"]  # B' loaded B's task LoRA instead of training it
    assert a["n_stage2_steps"] == b["n_stage2_steps"] == STEPS
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), **TOL)
    sa, sb = _saved(out_a), _saved(out_b)
    assert sa.keys() == sb.keys() and any("user_state" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], **TOL, msg=k)
    # the saved model/ is the single-process format: it reloads and predicts what the sharded eval predicted
    model, tok, users, bank, cfg = load_model(out_b / "model")
    task = get_task("movielens")
    fb = FeatureBuilder(tok, TextEncoder(model.lm, tok), task, bank, users, cfg.model.max_prompt_tokens,
                        items=model.item_index)
    preds = json.loads((out_b / "predictions.json").read_text())["tapper"]
    chosen = {p["user"] for p in preds}
    questions, _ = load_lamp(data / "test_questions.json", data / "test_outputs.json", task="movielens")
    again = predict_labels(model, fb, fb.question_samples([q for q in questions if q.user_id in chosen]), task.labels)
    assert [r["id"] for r in again] == [p["id"] for p in preds] and len(preds) == 12
    torch.testing.assert_close(torch.tensor([r["expected"] for r in again]),
                               torch.tensor([p["expected"] for p in preds]), **TOL)
    # one run directory per job, written by rank 0: Hydra's config once, no per-rank directories
    assert (out_b / ".hydra" / "config.yaml").exists()
    assert sorted(p.name for p in out_b.iterdir() if p.is_dir()) == [".hydra", "checkpoints", "model", "stage1"]
