"""Hydra configs are checked against the structured schema: a mistyped key or a wrong type fails at compose."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from recsys_tapper.cli import CONFIG_DIR
from recsys_tapper.config import RunConfig, register


def _compose(overrides):
    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="demo", overrides=overrides)


def test_demo_config_composes_to_the_schema():
    cfg = OmegaConf.to_object(_compose(["data.n_users=7", "model=tiny"]))
    assert isinstance(cfg, RunConfig)
    assert cfg.data.n_users == 7 and cfg.model.backbone.name_or_path == "tiny-random-llama"


def test_mistyped_key_is_refused():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["trainer.stage2_per_usr=3"])
    assert isinstance(e.value.__cause__, ConfigAttributeError)
    assert "Key 'stage2_per_usr' not in 'TrainerConfig'" in str(e.value.__cause__)


def test_wrong_type_is_refused():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["data.n_users=many"])
    assert isinstance(e.value.__cause__, ValidationError)
    assert "n_users" in str(e.value.__cause__)
