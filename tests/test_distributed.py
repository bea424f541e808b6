"""One job, two executors: the local executor (``tapper demo``) == torchrun at world size 1 == 2 gloo ranks on CPU,
same seed and data (tiny Llama, synthetic ratings).

Local (``run_job`` with ``LocalExecutor``, in this process) against torchrun at world size 1, for each P_u
optimizer: losses of both stages, the trained rows, both models' predictions and metrics. The local twins of the
fused updates are torchrec's RowWiseAdagrad and torch's SGD; ``adamw`` (the single-process default) is checked
against 2 ranks with a data_parallel table.

Reference: ``train_distributed`` in one process (world size 1, ``table_wise``: the whole table in one shard)
with the *same* fused FBGEMM table optimizer as the 2-rank run, so the comparison isolates the sharding,
the all-to-all lookups and the dense all-reduce. Dropout is off (masks would differ with the batch split).

    2 ranks                                 vs 1 process
    table_wise    + rowwise_adagrad (fused)    table_wise + rowwise_adagrad   (the production optimizer)
    table_wise    + sgd (fused)                table_wise + sgd
    column_wise   + sgd (fused)                table_wise + sgd
    data_parallel + sgd (dense)                table_wise + sgd
    data_parallel + rowwise_adagrad (dense)    table_wise + rowwise_adagrad   (FBGEMM's fused kernel vs
                                                                               torchrec's reference code)

SGD is linear in the gradient, so it checks the gradient itself, scale included (Adagrad variants divide the
scale out: a table gradient off by a factor W would pass them). Column-wise runs use SGD because row-wise
Adagrad keeps one accumulator per row *per column shard*, a different (documented) update.

Tolerance: losses and rows within atol=1e-5, rtol=1e-4 (float32 sums in another order across ranks).
"""

from __future__ import annotations

import socket
import uuid

import pytest
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

ATOL, RTOL = 1e-5, 1e-4
TABLE_LR = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 20.0}
RUNS_1 = [("table_wise", "rowwise_adagrad"), ("table_wise", "sgd")]
RUNS_2 = [("table_wise", "rowwise_adagrad"), ("table_wise", "sgd"), ("column_wise", "sgd"), ("data_parallel", "sgd"),
          ("data_parallel", "rowwise_adagrad"), ("data_parallel", "adamw")]
TABLE_LR["adamw"] = None  # trainer.lr_user


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, nproc: int, *args) -> dict:
    """Run ``fn(*args)`` on ``nproc`` local gloo ranks; returns {rank: return value}."""
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                       rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                       monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(),
                       local_addr="127.0.0.1")
    return elastic_launch(cfg, fn)(*args)


def tiny_config(out_dir: str, sharding: str, optimizer: str, **dist_kw):
    from recsys_tapper.dist_train import DistConfig, DistRunConfig

    cfg = DistRunConfig(dist=DistConfig(sharding=sharding, **{"save_model": False, **dist_kw}))
    cfg.trainer.table_optimizer = optimizer
    cfg.trainer.table_lr = TABLE_LR[optimizer]
    cfg.model.backbone.name_or_path = "tiny-random-llama"
    cfg.model.projector.slots = 4  # user rows of 4 * 32 = 128: two column shards of 64
    cfg.model.max_prompt_tokens = 48
    cfg.model.task_lora.dropout = 0.0
    cfg.model.bridge_lora.dropout = 0.0
    cfg.data.n_users = 4
    cfg.trainer.threads = 1
    cfg.trainer.stage1_examples = 8
    cfg.trainer.stage1.batch_size = 4
    cfg.trainer.stage2_per_user = 4
    cfg.trainer.stage2.batch_size = 4
    cfg.trainer.stage2.epochs = 2  # 16 samples: 8 steps
    cfg.trainer.lr_dense = 1e-2
    cfg.trainer.lr_bridge = 1e-2
    cfg.out_dir = out_dir
    return cfg


def _parity_worker(root: str, runs: list[tuple[str, str]]) -> list[dict]:
    from recsys_tapper.dist_train import train_distributed
    from recsys_tapper.synthetic import synthetic_rating_task

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # one group for all runs (a group re-created on the agent's store hangs)
    splits = synthetic_rating_task(n_users=6, n_records=10, seed=3)
    out = []
    for i, (sharding, optimizer) in enumerate(runs):
        cfg = tiny_config(f"{root}/{sharding}-{optimizer}", sharding, optimizer, evaluate=i == 0 or optimizer == "adamw")
        r = train_distributed(cfg, splits=splits)
        out.append(_kept(r))
    dist.destroy_process_group()
    return out


def _kept(r: dict) -> dict:
    keys = ("losses", "stage1_losses", "table", "predictions", "replica_max_diff", "world_size", "n_stage2_steps",
            "methods")
    return {k: r.get(k) for k in keys}


def _local(root: str, optimizer: str) -> dict:
    """The same config through the local executor (what ``tapper demo`` runs), in this process."""
    from recsys_tapper.executors import LocalExecutor
    from recsys_tapper.job import run_job
    from recsys_tapper.synthetic import synthetic_rating_task

    threads = torch.get_num_threads()
    try:
        cfg = tiny_config(f"{root}/local-{optimizer}", "table_wise", optimizer)
        r = run_job(cfg, LocalExecutor(), synthetic_rating_task(n_users=6, n_records=10, seed=3))
    finally:
        torch.set_num_threads(threads)
    return {**_kept(r), "table": r["rows"], "predictions": r["predictions"]["tapper"], "world_size": 1,
            "np_predictions": r["predictions"]["non_personalized"]}


def _initial_table() -> torch.Tensor:
    """The P_u rows every run starts from (build_tapper under the Stage-2 seed)."""
    from llm_bridge.tiny import tiny_llama
    from recsys_tapper.build import build_tapper
    from recsys_tapper.pipeline import seed_everything

    cfg = tiny_config("unused", "table_wise", "rowwise_adagrad")
    lm, _ = tiny_llama()
    seed_everything(cfg.trainer.seed + 1)
    from llm_bridge.lora import add_lora

    lm = add_lora(lm, cfg.model.bridge_lora)
    return build_tapper(cfg.model, lm, 4).tower.table.weight.detach().clone()


def _close(a, b, what: str) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=ATOL, rtol=RTOL, msg=what)


@pytest.mark.slow
def test_local_executor_and_torchrun_at_world_sizes_1_and_2_agree(tmp_path):
    one = launch(_parity_worker, 1, str(tmp_path / "w1"), RUNS_1)[0]
    two = launch(_parity_worker, 2, str(tmp_path / "w2"), RUNS_2)
    local = {opt: _local(str(tmp_path), opt) for opt in ("rowwise_adagrad", "sgd", "adamw")}

    # local == torchrun at world size 1, the same job and the same P_u update
    for (_, optimizer), w1 in zip(RUNS_1, one, strict=True):
        loc = local[optimizer]
        assert loc["n_stage2_steps"] == w1["n_stage2_steps"] == 8
        for key in ("stage1_losses", "losses", "table"):
            _close(loc[key], w1[key], f"local vs world 1, {optimizer}: {key}")
    w1 = one[0]  # the run that evaluated (rowwise_adagrad): the same predictions and metrics
    assert [r["id"] for r in local["rowwise_adagrad"]["predictions"]] == [r["id"] for r in w1["predictions"]]
    _close([r["expected"] for r in local["rowwise_adagrad"]["predictions"]], [r["expected"] for r in w1["predictions"]],
           "tapper predictions")
    for method in ("non_personalized", "tapper"):
        for metric in ("mae", "rmse", "mae_expected"):
            _close(local["rowwise_adagrad"]["methods"][method][metric], w1["methods"][method][metric], method)
    # adamw, the single-process default: 2 ranks with a data_parallel table == local
    dp_adamw = two[0][RUNS_2.index(("data_parallel", "adamw"))]
    for key in ("stage1_losses", "losses", "table"):
        _close(dp_adamw[key], local["adamw"][key], f"local vs 2 ranks, adamw: {key}")
    _close(dp_adamw["methods"]["tapper"]["mae_expected"], local["adamw"]["methods"]["tapper"]["mae_expected"], "adamw")
    # the optimizers differ, so the comparisons above can fail
    assert (local["adamw"]["table"] - local["sgd"]["table"]).abs().max() > 1e-3

    ref = {run: r for run, r in zip(RUNS_1, one, strict=True)}
    ref_for = {opt: ref[("table_wise", opt)] for opt in ("rowwise_adagrad", "sgd")}
    init = _initial_table()
    for (sharding, optimizer), r0, r1 in zip(RUNS_2, two[0], two[1], strict=True):
        if optimizer == "adamw":  # no world-1 table_wise twin (adamw needs data_parallel): compared with local above
            continue
        base = ref_for[optimizer]
        what = f"{sharding}/{optimizer}"
        assert r0["world_size"] == 2 and base["world_size"] == 1
        assert r0["n_stage2_steps"] == base["n_stage2_steps"] == 8, what
        # both ranks report the same global losses, equal to the one-process losses
        assert r0["losses"] == r1["losses"], what
        torch.testing.assert_close(torch.tensor(r0["stage1_losses"]), torch.tensor(base["stage1_losses"]),
                                   atol=ATOL, rtol=RTOL, msg=what)
        torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(base["losses"]),
                                   atol=ATOL, rtol=RTOL, msg=what)
        # the updated user rows, gathered from the shards on rank 0 only
        assert r1["table"] is None and r0["table"].shape == (4, 128)
        torch.testing.assert_close(r0["table"], base["table"], atol=ATOL, rtol=RTOL, msg=what)
        # replicas of the dense parts stayed identical
        assert r0["replica_max_diff"] == 0.0, what
    # the runs trained the rows (a parity of untouched tables would prove nothing)
    for r in [*one, *two[0]]:
        assert (r["table"] - init).abs().max() > 1e-2
    # another optimizer gives other rows: the comparison can fail
    assert (ref_for["sgd"]["table"] - ref_for["rowwise_adagrad"]["table"]).abs().max() > 1e-3
    # sharded evaluation: same predictions, in the same order, as one process
    p1, p2 = ref[("table_wise", "rowwise_adagrad")]["predictions"], two[0][0]["predictions"]
    assert [r["id"] for r in p2] == [r["id"] for r in p1] and len(p1) == 12
    torch.testing.assert_close(torch.tensor([r["expected"] for r in p2]), torch.tensor([r["expected"] for r in p1]),
                               atol=ATOL, rtol=RTOL)


def _content(cfg):
    """The pooling's opt-in terms: the drift rating defaults' SIF-weighted vectors and content term, and the soft
    recency window (``model.pooling.window``)."""
    cfg.model.text_weighting = "sif"
    cfg.model.pooling.content_beta = 5.0
    cfg.model.pooling.window = 3.0
    return cfg


def _content_worker(root: str) -> dict:
    from recsys_tapper.dist_train import train_distributed
    from recsys_tapper.synthetic import synthetic_rating_task

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = _content(tiny_config(f"{root}/dp-adamw", "data_parallel", "adamw", evaluate=True))
    r = train_distributed(cfg, splits=synthetic_rating_task(n_users=6, n_records=10, seed=3))
    dist.destroy_process_group()
    return _kept(r)


@pytest.mark.slow
def test_the_content_term_trains_the_same_on_two_ranks_as_locally(tmp_path):
    """model.text_weighting=sif + model.pooling.content_beta (+ model.pooling.window) under torchrun (2 gloo ranks, data_parallel table,
    adamw) == the local executor: Stage-2 losses (which the content term's centers and beta shape), rows and
    predictions."""
    from recsys_tapper.executors import LocalExecutor
    from recsys_tapper.job import run_job
    from recsys_tapper.synthetic import synthetic_rating_task

    two = launch(_content_worker, 2, str(tmp_path / "w2"))
    threads = torch.get_num_threads()
    try:
        cfg = _content(tiny_config(str(tmp_path / "local"), "data_parallel", "adamw"))
        local = run_job(cfg, LocalExecutor(), synthetic_rating_task(n_users=6, n_records=10, seed=3))
    finally:
        torch.set_num_threads(threads)
    r0 = two[0]
    assert r0["world_size"] == 2 and r0["n_stage2_steps"] == local["n_stage2_steps"] == 8
    for key in ("stage1_losses", "losses"):
        _close(r0[key], local[key], f"content term, local vs 2 ranks: {key}")
    _close(r0["table"], local["rows"], "content term: rows")
    _close([r["expected"] for r in r0["predictions"]], [r["expected"] for r in local["predictions"]["tapper"]],
           "content term: predictions")
    # the term is on and moved: beta left its start (a parity of an unused term would prove nothing)
    tp = local["methods"]["tapper"]
    assert tp["beta_start"] == 5.0 and tp["beta"] != 5.0
    assert (tp["lambda_w_start"], tp["window_width_start"]) == (1.0, 3.0)
    assert tp["lambda_w"] != 1.0 and tp["window_width"] != 3.0
