"""The modules split by job (issue 10) keep their old import paths and the packages' import direction."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_old_import_paths_name_the_same_objects():
    from embeddings import checkpoints, replicas, sharding
    from recsys_tapper import events, table_io, update, user_ops

    for mod, names in [(table_io, ["TOWER_KEY", "export_model", "import_model", "import_into_table",
                                   "import_into_module", "run_export", "run_import", "ExportConfig"]),
                       (events, ["UpdateError", "validate_events"]),
                       (update, ["update_model", "finetune_rows", "run_update", "UpdateConfig"])]:
        for n in names:
            assert getattr(user_ops, n) is getattr(mod, n), n
    for mod, names in [(checkpoints, ["latest_checkpoint", "checkpoint_step", "save_checkpoint", "load_checkpoint"]),
                       (replicas, ["average_grads", "broadcast_parameters"])]:
        for n in names:
            assert getattr(sharding, n) is getattr(mod, n), n


def test_sharded_tower_forwards_only_its_named_attributes():
    from embeddings.sharding import ShardedUserTower

    assert "__getattr__" not in vars(ShardedUserTower)
    assert {"pooling", "table", "fused_optimizer"} <= {n for n, v in vars(ShardedUserTower).items()
                                                       if isinstance(v, property)}


def test_the_wheel_fetcher_imports_neither_torch_transformers_nor_torchrec():
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import llm_bridge.fetch, recsys_tapper.data.movielens; "
            "bad = [m for m in ('torch', 'transformers', 'torchrec') if m in sys.modules]; assert not bad, bad; "
            "import llm_bridge.backbone; assert 'torchrec' not in sys.modules; "
            "assert llm_bridge.backbone.pip_download is llm_bridge.fetch.pip_download")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
