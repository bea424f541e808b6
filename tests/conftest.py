import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def tiny_config(out_dir, slots: int = 2, n_users: int = 3, stage1_examples: int = 8, stage2_per_user: int = 2):
    """A RunConfig for the tiny random Llama, sized for tests."""
    from recsys_tapper.config import RunConfig

    cfg = RunConfig()
    cfg.model.backbone.name_or_path = "tiny-random-llama"
    cfg.model.projector.slots = slots
    cfg.data.n_users = n_users
    cfg.trainer.stage1_examples = stage1_examples
    cfg.trainer.stage2_per_user = stage2_per_user
    cfg.out_dir = str(out_dir)
    return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny trained run per test module (3 users syn0..syn2, L=2, d=32): (out_dir, test questions)."""
    from pathlib import Path

    from recsys_tapper.job import run
    from recsys_tapper.synthetic import synthetic_rating_task

    cfg = tiny_config(tmp_path_factory.mktemp("run"))
    splits = synthetic_rating_task(n_users=4, n_records=8, seed=2)
    run(cfg, splits=splits)
    return Path(cfg.out_dir), splits[1]


@pytest.fixture(scope="module")
def model_dir(tiny_run):
    """The saved model directory of the module's tiny run (copy it before changing it: ``copy_model``)."""
    return tiny_run[0] / "model"


def copy_model(src, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst
