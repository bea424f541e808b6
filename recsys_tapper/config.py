"""Structured configs: the schema behind configs/*.yaml (a mistyped key fails at compose time).

Each part's dataclass lives next to its module (BackboneConfig in llm_bridge.backbone, ...); this file only
composes them into the run config and registers it with Hydra's ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from embeddings.pooling import TimeAwarePoolingConfig
from llm_bridge.backbone import BackboneConfig
from llm_bridge.lora import LoraSpec
from llm_bridge.projector import BridgeProjectorConfig
from recsys_tapper.errors import InputError
from recsys_tapper.training import OptimConfig


@dataclass
class ModelConfig:
    """Args:
    backbone: which LM (d, layers, heads are read from it, never configured).
    user_dim: width of a user's row; None = L*d (the paper's full P_u), r < L*d = compressed + shared up-projection.
    max_history: keep only the k most recent records (None = all, the paper's default).
    prefix_layer: k, the decoder layer whose input the prefix enters (0 = the paper's input-level prefix). With
        k > 0 the frozen layers below k run once per distinct prompt (``llm_bridge.trunk.TrunkCache``) and the
        bridge LoRA sits on layers >= k only.
    trunk_dtype / trunk_max_bytes: storage of the cached trunk states (past the bound they spill to disk).
    readout / rmse_readout: how a rating answer is read from the label distribution for MAE and for RMSE
        (argmax | median | expected); the job sets them to what scores best on the dev questions and saves
        them with the model, so ``tapper evaluate`` reports what the training run reported.
    item_dim: width of an item-table row keyed by the query's item id (None = no item table; tasks whose
        questions name no item, such as LaMP, have none); ``item_slots`` prefix slots come from it.
    warm_start: ``mf`` initialises user rows (and item rows) as ``[p_u, b_u]`` (``[q_i, b_i]``) of a biased MF
        fitted on the Stage-2 training ratings only; user_dim and item_dim are then ``warm_start_rank + 1``.
    record_label_weight: w in h_j = mean_emb(record text) + w·mean_emb(label) (``FeatureBuilder.record_vectors``);
        0 = the paper's record vector, where the label is one or two tokens of the record's ~25.
    text_weighting: how record and question vectors weigh their tokens: ``mean`` (the paper's plain mean) or
        ``sif`` (smooth-inverse-frequency weights fitted on the training records' texts, saved with the bank;
        ``recsys_tapper.features.text_weights``), with which ``pooling.content_beta`` can tell a record's topic.
    lambda_init: None = the paper's N(0, 0.02) start of lambda_t, lambda_o; ``data`` = the recency prior that best
        predicts each Stage-2 target's answer from its history's answers (``recsys_tapper.recency_prior``).
    lambda_init_latest: with ``lambda_init=data``, fit that prior on each user's k latest Stage-2 targets only
        (None = every target). They are the targets nearest the queries' time: after a recent drift most older
        targets follow the old rule, and a prior fitted on them learns to read old records.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: BridgeProjectorConfig = field(default_factory=BridgeProjectorConfig)
    pooling: TimeAwarePoolingConfig = field(default_factory=TimeAwarePoolingConfig)
    user_dim: int | None = None
    user_init_std: float = 0.02
    task_lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=8, alpha=8, dropout=0.05))
    bridge_lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=4, alpha=8, dropout=0.05))
    max_record_tokens: int = 128
    max_prompt_tokens: int = 96
    max_history: int | None = None
    prefix_layer: int = 0
    trunk_dtype: str = "float32"
    trunk_max_bytes: int = 2 << 30
    readout: str = "argmax"
    rmse_readout: str = "argmax"
    item_dim: int | None = None
    item_slots: int = 1
    warm_start: str | None = None
    warm_start_rank: int = 32
    lambda_init: str | None = None
    lambda_init_latest: int | None = None
    record_label_weight: float = 0.0
    text_weighting: str = "mean"


LAMBDA_INITS = (None, "data")


@dataclass
class DataConfig:
    """Args:
    source: ``ml100k`` (fetched, split by time, written as LaMP JSON) or ``lamp`` (your files).
    dir: for ``lamp``, the folder holding ``{train_split}_questions.json`` etc.
    n_users: personalize the N users with the longest histories (None = all).
    strict: reject bad records (True) or skip them and count (False).
    """

    source: str = "ml100k"
    dir: str | None = None
    train_split: str = "dev"
    test_split: str = "test"
    n_users: int | None = 100
    strict: bool = True
    max_text_chars: int = 4000


@dataclass
class TaskConfig:
    name: str = "movielens"


@dataclass
class TrainerConfig:
    """Args:
    stage1_examples: non-personalized (query -> answer) pairs from *other* users for the task LoRA.
    stage2_per_user: most recent profile records per user used as Stage-2 targets (None = all).
    lr_user / lr_dense / lr_bridge: Stage-2 learning rates of P_u rows, scorer+projection, bridge LoRA.
    lr_lambda: None = lambda_t, lambda_o train with the scorer at lr_dense (and its weight decay, as before);
        a value gives the two scalars their own group at that rate, without weight decay (decay would pull the
        recency prior towards none). At lr_dense = 3e-3 Adam moves a scalar at most ~0.3 in a hundred steps.
    table_optimizer: the P_u rows' optimizer, the same locally and under torchrun: adamw (in the job's AdamW,
        lr_user, wd_user, scheduled and clipped; torchrun: dist.sharding=data_parallel) | rowwise_adagrad |
        adagrad | sgd (FBGEMM's fused update under torchrun, its twin locally: constant table_lr, no decay or
        clipping). table_lr: None = lr_user. table_eps: the Adagrad epsilon.
    eval_max_new_tokens: greedy decoding budget for classification and generation tasks.
    class_readout: how classification tasks answer (``recsys_tapper.label_scoring``): ``label_set`` (the best
        label by length-normalised log-likelihood), ``generate`` (greedy decoding, exact match) or ``both``
        (label_set is the answer, generation reported beside it as ``accuracy_generate``, ``f1_generate``, ...).
    label_norm: label-set scoring's score: ``mean`` token log-probability (length-normalised) or ``sum`` (the
        label's log-probability; the mean favours long labels). See ``recsys_tapper.label_scoring``.

    The paper trains 3 epochs at lr 1e-4 to 2e-4. A CPU run affords about a hundred steps per stage, so the
    defaults are one epoch at higher rates (picked on the MovieLens validation queries, never on test).
    """

    seed: int = 0
    threads: int | None = None
    stage1: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, epochs=1))
    stage1_examples: int = 400
    stage2: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, epochs=1))
    stage2_per_user: int | None = 15
    lr_user: float = 3e-3
    lr_dense: float = 3e-3
    lr_bridge: float = 1e-3
    lr_lambda: float | None = None
    wd_user: float = 0.01
    table_optimizer: str = "adamw"
    table_lr: float | None = None
    table_eps: float = 1e-8
    eval_batch_size: int = 32
    eval_max_new_tokens: int = 32
    class_readout: str = "both"
    label_norm: str = "mean"


TABLE_OPTIMIZERS = ("adamw", "rowwise_adagrad", "adagrad", "sgd")


def check_table_optimizer(name: str, sharding: str | None = None) -> None:
    """``trainer.table_optimizer`` is known, and under torchrun (``sharding`` given) ``adamw`` has a
    ``data_parallel`` table."""
    if name not in TABLE_OPTIMIZERS:
        raise InputError(f"trainer.table_optimizer {name!r} is not one of {', '.join(TABLE_OPTIMIZERS)}")
    if name == "adamw" and sharding not in (None, "data_parallel"):
        raise InputError(f"trainer.table_optimizer=adamw trains the P_u rows as a dense parameter: use "
                         f"dist.sharding=data_parallel, or a fused optimizer (rowwise_adagrad, adagrad, sgd) "
                         f"with dist.sharding={sharding}")


@dataclass
class RunConfig:
    """Args:
    expected_duration: printed when ``tapper demo`` starts without overrides (configs/demo.yaml: the measured
        wall time of ``make demo``); None prints nothing.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str = "runs/demo"
    expected_duration: str | None = None


def register() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
