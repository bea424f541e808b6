"""``tapper benchmark ml100k``: every method on the MovieLens-100K time split, side by side, in one run.

All 943 users, each with their 5 test queries (the test set is always complete). LLM methods share one
backbone and one Stage-1 task LoRA; their training budget per user is capped (``per_user``, ``epochs``,
written into the JSON) so the run fits a CPU. Results are written after every method to
``benchmarks/results/ml100k.json`` (so a killed run resumes where it stopped), then ``ml100k.md`` (the table)
and ``ml100k.png`` (MAE per method; classical references drawn as lines).

    tapper benchmark ml100k                                  # everything
    tapper benchmark ml100k methods=[non_personalized,tapper] per_user=2
    tapper benchmark ml100k methods=[tapper_no_time]         # add one row to the committed table
    tapper benchmark ml100k refit=false results_dir=runs/dev  # every TAP-PER row chooses its readouts on dev

With ``refit=true`` (configs/benchmark.yaml) every TAP-PER row trains Stage 2 on every rating before the test
period, the dev ratings included, as the classical rows are fit, and reads the label distribution by the fixed
:data:`REFIT_READOUTS`. With ``refit=false`` they train on the training ratings alone and choose their readouts
on the dev queries (the 5 ratings before each user's test queries).

Several invocations may fill one table at the same time (say one per core, each with ``trainer.threads=1`` and
its own ``methods``): every write happens under a file lock and merges the rows the others wrote since, and
Stage 1 is trained once (under the lock) and shared through its cache file.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from llm_bridge.backbone import load_backbone
from llm_bridge.lora import add_lora, merge_lora
from recsys_tapper.baselines.classical import run_classical
from recsys_tapper.baselines.oppu import OppuConfig, oppu_params_per_user, run_oppu
from recsys_tapper.baselines.rag import run_rag
from recsys_tapper.build import build_trunk, prefix_slots
from recsys_tapper.config import RunConfig
from recsys_tapper.errors import InputError
from recsys_tapper.evaluation import choose_readout, predict_labels, rating_report
from recsys_tapper.features import FeatureBuilder, feature_builder
from recsys_tapper.io import atomic_write_text, load_resumable
from recsys_tapper.job import train_stage1, train_stage2
from recsys_tapper.model import TapperModel
from recsys_tapper.pipeline import load_splits, prefill_trunk, select_users
from recsys_tapper.runmeta import code_hash, run_meta
from recsys_tapper.tasks import get_task
from recsys_tapper.users import UserIndex

LLM_METHODS = ["non_personalized", "tapper", "tapper_paper", "tapper_no_time", "tapper_pq_only",
               "tapper_pu_only", "tapper_no_warm_start", "tapper_no_item", "rag_recency_k4", "rag_bm25_k4", "oppu"]
CLASSICAL_METHODS = ["global_mean", "user_mean", "item_mean", "user_item_bias", "biased_mf"]
METHOD_NAMES = CLASSICAL_METHODS + LLM_METHODS


@dataclass
class BenchmarkConfig(RunConfig):
    """Args:
    target: only ``ml100k`` for now.
    methods: which methods to run (default: all, LLM and classical).
    per_user: Stage-2 training targets per user (most recent records; null: every record after the first,
        the paper's full-history regime).
    results_dir: where ml100k.json/.md/.png go.
    resume: skip methods already in the results JSON of the same settings (false: start a new table).
    rerun: methods to compute again even when a matching row exists (the other rows are kept).
    same_code: reuse a row only when it also ran this code (its ``code_hash``, see :func:`runmeta.code_hash`),
        so that a table resumed across sessions and commits is one code's table; rows older than the hash are
        recomputed.
    refit: every TAP-PER row trains Stage 2 on every rating before the test period (the training and the dev
        ratings, what the classical rows are fit on) and reads :data:`REFIT_READOUTS`, fixed; false: on the
        training ratings alone, readouts chosen on the dev queries (see :func:`refits`).
    rag_max_prompt_tokens: RAG prompts keep their k records whole up to this many tokens.
    paper_per_user: Stage-2 targets per user of ``tapper_paper`` (k = 0 costs ~15x more per example).
    oppu_per_user: OPPU's training targets per user (a per-user LoRA trained through all layers: the full history
        would take hours of CPU per epoch).
    """

    target: str = "ml100k"
    methods: list[str] = field(default_factory=lambda: CLASSICAL_METHODS + LLM_METHODS)
    per_user: int | None = 2
    results_dir: str = "benchmarks/results"
    resume: bool = True
    rerun: list[str] = field(default_factory=list)
    same_code: bool = False
    refit: bool = False
    rag_max_prompt_tokens: int = 192
    paper_per_user: int | None = 2
    oppu_per_user: int | None = 2


ABLATIONS = {
    "tapper": {},  # the default configuration (configs/benchmark.yaml), picked on dev queries
    # the paper's configuration: input-level prefix, random-init full P_u rows, no item table
    "tapper_paper": {"model": {"prefix_layer": 0, "warm_start": None, "item_dim": None, "user_dim": None}},
    "tapper_no_warm_start": {"model": {"warm_start": None, "user_dim": 33}},
    "tapper_no_item": {"model": {"item_dim": None}},
    "tapper_pq_only": {"model": {"projector": {"use_user_state": False}}},
    "tapper_pu_only": {"model": {"projector": {"use_history": False}}},
    "tapper_no_time": {"model": {"pooling": {"time_bias": False, "order_bias": False}}},
}


# What a refit row reads (see refits): its dev queries are training targets, so it cannot choose a readout on
# them. The median for MAE and the expectation for RMSE: the readouts that minimise each loss, and the ones the dev
# queries chose for the default when it trained on the training ratings alone (refit=false).
REFIT_READOUTS = ("median", "expected")


def refits(cfg: RunConfig, name: str) -> bool:
    """Whether row ``name`` trains Stage 2 on the test questions' profiles (every rating before the test period:
    the training ratings and the dev ratings) instead of the training ratings alone: every TAP-PER row under
    ``refit=true``, what the classical rows are fit on, and what a deployment does once its settings are chosen
    on dev. OPPU keeps its training ratings (its per-user LoRA trains user by user on ``train``)."""
    return bool(getattr(cfg, "refit", False)) and name in ABLATIONS


def stage2_examples(cfg: RunConfig, name: str, train: list, test: list) -> list:
    """The questions whose profiles give a TAP-PER row its Stage-2 targets: ``test``'s (train + dev ratings) for
    a refit row, else ``train``'s (the training ratings; the dev ratings stay unseen for dev)."""
    return test if refits(cfg, name) else train


def benchmark_config(overrides: list[str] | None = None) -> BenchmarkConfig:
    """The config ``tapper benchmark ml100k <overrides>`` runs with (configs/benchmark.yaml, composed)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from recsys_tapper.config import register
    from recsys_tapper.runner import CONFIG_DIR

    register()
    ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("benchmark", overrides=list(overrides or [])))


def _variant(cfg: BenchmarkConfig, name: str) -> RunConfig:
    merged = OmegaConf.merge(OmegaConf.structured(cfg), ABLATIONS[name])
    return OmegaConf.to_object(merged)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _settings(cfg: BenchmarkConfig) -> dict:
    """What every LLM row depends on: backbone, Stage 1, prompts and record encoding, the budget."""
    m, t = cfg.model, cfg.trainer
    return {"per_user": cfg.per_user, "stage1_examples": t.stage1_examples, "epochs": t.stage2.epochs,
            "backbone": m.backbone.name_or_path, "seed": t.seed, "stage1": asdict(t.stage1),
            "task_lora": asdict(m.task_lora), "max_prompt_tokens": m.max_prompt_tokens,
            "max_record_tokens": m.max_record_tokens}


def method_settings(cfg: BenchmarkConfig, name: str) -> dict:
    """What a method's row depends on beyond the run's shared ``settings``: a row is reused on resume only when
    these match (so changing, say, a Stage-2 learning rate reruns the TAP-PER rows and nothing else)."""
    if name in CLASSICAL_METHODS or name == "non_personalized":
        return {}
    if name.startswith("rag_"):
        return {"rag_max_prompt_tokens": cfg.rag_max_prompt_tokens}
    if name == "oppu":
        return asdict(oppu_config(cfg))
    t, m = cfg.trainer, cfg.model
    pool_over = ABLATIONS[name].get("model", {}).get("pooling", {})
    biased = any(effective_biases(m.pooling, pool_over))
    return {"overrides": ABLATIONS[name], "stage2": asdict(t.stage2), "lr_user": t.lr_user, "lr_dense": t.lr_dense,
            "lr_bridge": t.lr_bridge, "wd_user": t.wd_user, "user_init_std": m.user_init_std,
            "projector": asdict(m.projector), "user_dim": m.user_dim,
            "pooling": pooling_settings(m.pooling, pool_over),
            "bridge_lora": asdict(m.bridge_lora), "max_history": m.max_history, "prefix_layer": m.prefix_layer,
            "item_dim": m.item_dim, "item_slots": m.item_slots, "warm_start": m.warm_start,
            "warm_start_rank": m.warm_start_rank, "trunk_dtype": m.trunk_dtype,
            "per_user": cfg.paper_per_user if name == "tapper_paper" else cfg.per_user,
            **({"stage2_profiles": "before_test", "readouts": list(REFIT_READOUTS)} if refits(cfg, name) else {}),
            # only when set, so rows written before these settings existed are still reused
            **({"lr_lambda": t.lr_lambda} if t.lr_lambda is not None else {}),
            **({"lambda_init": m.lambda_init} if m.lambda_init is not None else {}),
            # which targets the prior is fitted on: nothing to a row without either bias (tapper_no_time)
            **({"lambda_init_latest": m.lambda_init_latest} if m.lambda_init_latest is not None and biased else {}),
            **({"record_label_weight": m.record_label_weight} if m.record_label_weight else {}),
            **({"text_weighting": m.text_weighting} if m.text_weighting != "mean" else {})}


def effective_biases(pooling, override: dict | None = None) -> tuple[bool, bool]:
    """(time_bias, order_bias) of ``pooling`` under a method's pooling ``override`` (``tapper_no_time``'s)."""
    over = override or {}
    return over.get("time_bias", pooling.time_bias), over.get("order_bias", pooling.order_bias)


def pooling_settings(pooling, override: dict | None = None) -> dict:
    """``asdict(pooling)`` without ``content_beta`` while off and without ``window`` while it does not apply: unset,
    or the order bias off in ``pooling`` or in the method's ``override`` (``tapper_no_time``'s; the override itself
    is recorded beside, under ``overrides``); ``learn_window`` only when the window applies and is fixed. So rows
    written before these keys existed match."""
    _, order_bias = effective_biases(pooling, override)
    no_window = pooling.window is None or not order_bias
    off = {"content_beta": pooling.content_beta is None, "window": no_window,
           "learn_window": no_window or pooling.learn_window}
    return {k: v for k, v in asdict(pooling).items() if not off.get(k, False)}


def oppu_config(cfg: BenchmarkConfig) -> OppuConfig:
    return OppuConfig(per_user=cfg.oppu_per_user, eval_batch_size=cfg.trainer.eval_batch_size)


@contextmanager
def table_lock(json_path: Path):
    """An exclusive lock on a results table, held by one invocation at a time (``<table>.lock`` beside it)."""
    with open(json_path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_runs(result: dict, disk: dict) -> None:
    """The runs of a table two invocations share: the disk's, then this invocation's that are not on disk yet."""
    result["runs"] = [*disk.get("runs", []), *[r for r in result["runs"] if r not in disk.get("runs", [])]]


def merge_rows(result: dict, disk: dict, mine: set[str]) -> None:
    """Take into ``result`` what another invocation of the same table wrote to ``disk``: its rows (except the
    ones this invocation computed, ``mine``, and rows of methods this code no longer has), its runs and the
    Stage-1 seconds; rows kept in METHOD_NAMES order. Filter the disk rows first (merge_from_disk)."""
    if disk.get("table_started") != result.get("table_started"):
        return  # another table (an older run replaced by resume=false): nothing of it is ours
    methods = {**{k: v for k, v in disk.get("methods", {}).items() if k not in mine and k in METHOD_NAMES},
               **{k: v for k, v in result["methods"].items() if k in mine or k not in disk.get("methods", {})}}
    result["methods"] = {k: methods[k] for k in sorted(methods, key=METHOD_NAMES.index)}
    merge_runs(result, disk)
    if result.get("stage1_s") is None:
        result["stage1_s"] = disk.get("stage1_s")


def merge_from_disk(result: dict, disk: dict, mine: set[str], cfg: BenchmarkConfig, code: str) -> None:
    """merge_rows over only the disk rows that resume would reuse (reusable_rows): a concurrent invocation's row
    of other settings, without settings or, under ``same_code``, of another code version is stale, and the merge
    must not bring it back into the table."""
    merge_rows(result, {**disk, "methods": reusable_rows(disk.get("methods", {}), cfg, code)}, mine)


def reusable_rows(methods: dict, cfg: BenchmarkConfig, code: str | None = None) -> dict:
    """The rows of an earlier run (same shared settings) that this config would reproduce; with
    ``cfg.same_code``, only those that also ran the code whose hash is ``code``."""
    return {k: v for k, v in methods.items() if k in METHOD_NAMES and v.get("settings") == method_settings(cfg, k)
            and (not cfg.same_code or v.get("code_hash") == code)}


def benchmark(cfg: BenchmarkConfig, command: str = "tapper benchmark ml100k") -> dict:
    if cfg.target != "ml100k":
        raise InputError(f"unknown benchmark target {cfg.target!r}; available: ml100k (drift: tapper benchmark drift)")
    unknown = [m for m in [*cfg.methods, *cfg.rerun] if m not in METHOD_NAMES]
    if unknown:
        raise InputError(f"unknown methods {unknown}; known: {METHOD_NAMES}")
    if cfg.trainer.threads:
        import torch

        torch.set_num_threads(cfg.trainer.threads)
    out_dir = Path(cfg.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "ml100k.json"
    settings = _settings(cfg)
    meta = {**run_meta(command), "code_hash": code_hash()}
    result = {"methods": {}, "table_started": meta["date"]}
    if (old := load_resumable(json_path, settings, cfg.resume)) is not None:
        old["methods"] = reusable_rows(old["methods"], cfg, meta["code_hash"])
        result = {"table_started": old.get("date"), **old}
    # every invocation that wrote to this table, in order; each row also records its own git_sha, date and machine
    keys = ("command", "git_sha", "code_hash", "date", "machine")
    runs = result.get("runs") or ([{k: result.get(k) for k in keys}] if "command" in result else [])
    stamp = {k: meta[k] for k in ("git_sha", "code_hash", "date", "machine")}  # what every row this invocation writes records
    result.update(meta, runs=[*runs, {k: meta[k] for k in keys}], settings=settings,
                  train_examples_per_user=cfg.per_user, epochs=cfg.trainer.stage2.epochs)
    mine: set[str] = set()  # the rows this invocation computes (others' rows are merged in, never overwritten)

    def sync() -> None:
        """Under the lock: merge what other invocations of this table wrote (see merge_rows)."""
        if json_path.exists():
            merge_from_disk(result, json.loads(json_path.read_text()), mine, cfg, meta["code_hash"])

    def save() -> None:
        with table_lock(json_path):
            sync()
            result["complete"] = all(m in result["methods"] for m in CLASSICAL_METHODS + LLM_METHODS)
            atomic_write_text(json_path, json.dumps(result, indent=2))
            write_report(result, out_dir)

    todo = [m for m in cfg.methods if m not in result["methods"] or m in cfg.rerun]
    mine.update(todo)
    cfg.data.n_users = None
    train, test = load_splits(cfg)
    users_all = select_users(test, None)
    result["n_users"] = len(users_all)
    result["n_test_queries"] = len(test)

    classical = [m for m in todo if m in CLASSICAL_METHODS]
    if classical:
        for name, rep in run_classical(test, methods=classical, seed=cfg.trainer.seed).items():
            result["methods"][name] = {**rep, "kind": "classical", "params_total_1000_users": rep["params_per_user"] * 1000,
                                       "train_s": rep["fit_s"], "eval_s": rep["predict_s"], "settings": {},
                                       **stamp}
        save()
    llm = [m for m in todo if m in LLM_METHODS]
    if not llm:
        return result

    task = get_task(cfg.task.name)
    cache = out_dir / "ml100k_stage1_lora.safetensors"  # a resume cache, git-ignored
    with table_lock(json_path):  # one invocation trains Stage 1; the others wait and load its cache
        sync()
        lm, tok, fb, stage1_s = stage1_model(cfg, train, train + test, users_all, cache, result.get("stage1_s"))
    if result.get("stage1_s") is None:
        result["stage1_s"] = stage1_s
        save()
    users = fb.users
    test_samples = fb.question_samples(test)
    dev_samples = fb.question_samples(train)  # dev queries: choose the readout, never on test
    trunks: dict = {}

    def trunk_for(vcfg) -> object:
        """One cached trunk per (prefix layer, prefix length), shared by every row that needs it."""
        key = (vcfg.model.prefix_layer, prefix_slots(vcfg.model))
        if vcfg.model.prefix_layer > 0 and key not in trunks:
            trunks[key] = build_trunk(vcfg.model, lm, {"stage1": file_digest(cache)})
        return trunks.get(key)
    base = TapperModel(lm, None, None)

    def record(name: str, rows: list[dict], train_s: float, eval_s: float, per_user: int, total_1000: int,
               dev_rows: list[dict] | None = None, **extra):
        fixed = REFIT_READOUTS if refits(cfg, name) else ("argmax", "argmax")
        readout, rmse_readout, dev = choose_readout(dev_rows) if dev_rows is not None else (*fixed, {})
        rep = rating_report(rows, readout, rmse_readout)
        extra.update({f"dev_{k}": v for k, v in dev.items()}, readout_chosen_on="dev" if dev else "fixed")
        rep["pred_counts"] = dict(sorted(Counter(r["pred"] for r in rows).items()))  # how answers spread
        result["methods"][name] = {**rep, "kind": "llm", "params_per_user": per_user,
                                   "params_total_1000_users": total_1000, "train_s": train_s, "eval_s": eval_s,
                                   **extra, "settings": method_settings(cfg, name), **stamp}
        save()
        print(f"[benchmark] {name}: mae {rep['mae']:.3f} rmse {rep['rmse']:.3f}", flush=True)

    for name in llm:
        t0 = time.perf_counter()
        if name == "non_personalized":  # the Stage-1 model alone; on the cached trunk when the default has one
            trunk = trunk_for(cfg)
            plain = base if trunk is None else TapperModel(lm, None, None, trunk.k, trunk)
            prefill_trunk(trunk, fb, test_samples + dev_samples, with_labels=False, desc="trunk cache, queries")
            rows = predict_labels(plain, fb, test_samples, task.labels, cfg.trainer.eval_batch_size, desc=name)
            eval_s = time.perf_counter() - t0
            dev_rows = predict_labels(plain, fb, dev_samples, task.labels, cfg.trainer.eval_batch_size, desc=f"{name} dev")
            record(name, rows, stage1_s, eval_s, 0, 0, dev_rows=dev_rows)
        elif name.startswith("rag_"):
            fb_rag = FeatureBuilder(tok, fb.encoder, task, fb.bank, users, cfg.rag_max_prompt_tokens)
            rows = run_rag(base, fb_rag, test, name, batch_size=cfg.trainer.eval_batch_size)
            record(name, rows, stage1_s, time.perf_counter() - t0, 0, 0)
        elif name == "oppu":
            ocfg = oppu_config(cfg)
            per = oppu_params_per_user(lm, ocfg.r, ocfg.target_modules)
            rows = run_oppu(lm, fb, train, test_samples, ocfg)
            record(name, rows, stage1_s + time.perf_counter() - t0, 0.0, per, per * 1000,
                   train_examples_per_user=ocfg.per_user, epochs=ocfg.optim.epochs, prefix_layer=None)
        else:
            vcfg = _variant(cfg, name)
            vcfg.trainer.stage2_per_user = cfg.paper_per_user if name == "tapper_paper" else cfg.per_user
            trunk = trunk_for(vcfg)
            model, s2, losses, stage2_s, _ = train_stage2(vcfg, lm, fb, users, stage2_examples(cfg, name, train, test),
                                                       trunk, resume=out_dir / f"ml100k_{name}_stage2_resume.safetensors")
            prefill_trunk(trunk, fb, test_samples + dev_samples, with_labels=False, desc="trunk cache, queries")
            t1 = time.perf_counter()
            rows = predict_labels(model, fb, test_samples, task.labels, cfg.trainer.eval_batch_size, desc=name)
            eval_s = time.perf_counter() - t1
            dev_rows = None if refits(cfg, name) else predict_labels(model, fb, dev_samples, task.labels,
                                                                 cfg.trainer.eval_batch_size, desc=f"{name} dev")
            per = model.tower.table.cfg.dim if vcfg.model.projector.use_user_state else 0
            item_params = _count(model.items.parameters()) if model.items is not None else 0
            shared = _count(model.tower.pooling.parameters()) + _count(model.projector.parameters()) + _count(
                p for n, p in model.lm.named_parameters() if "lora_" in n) + item_params
            record(name, rows, stage1_s + stage2_s, eval_s, per, per * 1000 + shared, dev_rows=dev_rows,
                   n_train=len(s2), train_examples_per_user=len(s2) / max(1, len({x.user for x in s2})),
                   epochs=vcfg.trainer.stage2.epochs, prefix_layer=vcfg.model.prefix_layer,
                   s_per_train_example=stage2_s / len(s2),
                   final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])),
                   lambda_t=model.tower.pooling.lambda_t.item(), lambda_o=model.tower.pooling.lambda_o.item())
            model.lm.unload()
    return result


def stage1_model(cfg: RunConfig, train: list, register: list, users_all: list[str], cache: Path,
                 cached_s: float | None) -> tuple:
    """Backbone + the Stage-1 task LoRA (merged), shared by every LLM method; ``register``'s records encoded.

    The LoRA comes from ``cache`` when it exists and ``cached_s`` (its training seconds) is known, else it is
    trained (every user is personalized: Stage 1 falls back to records that are never Stage-2 targets) and
    cached. Returns (lm, tokenizer, feature builder, stage-1 seconds)."""
    task = get_task(cfg.task.name)
    lm, tok = load_backbone(cfg.model.backbone)
    fb = feature_builder(cfg.model, lm, tok, task, UserIndex(users_all), register, progress=True)
    if cache.exists() and cached_s is not None:
        lm = add_lora(lm, cfg.model.task_lora)
        set_peft_model_state_dict(lm, load_file(cache))
        return merge_lora(lm), tok, fb, cached_s
    lm, state, _, stage1_s, _, _ = train_stage1(cfg, lm, fb, train, set(users_all))
    save_file(state, cache)
    return lm, tok, fb, stage1_s


def file_digest(path: Path):
    """A file's sha256 as a uint8 tensor (what cached trunk states depend on beyond the backbone)."""
    import hashlib

    import torch

    return torch.tensor(list(hashlib.sha256(path.read_bytes()).digest()), dtype=torch.uint8)


def write_report(result: dict, out_dir: Path) -> None:
    from recsys_tapper.report import write_markdown, write_plot

    write_markdown(result, out_dir / "ml100k.md")
    write_plot(result, out_dir / "ml100k.png")
