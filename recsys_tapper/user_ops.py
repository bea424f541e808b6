"""User-table commands on a saved model directory: ``tapper export``, ``tapper import``, ``tapper update``.

    tapper export model_dir=runs/demo/model out=exports/demo dtype=fp32        # or fp16 / int8
    tapper import export_dir=exports/demo model_dir=runs/demo/model
    tapper update model_dir=runs/demo/model events=new.parquet [strict=false] [epochs=1]

Each job lives in its own module; this one registers their config schemas and keeps the old import path:

- ``recsys_tapper.table_io``: export and import of the P_u table (``ExportConfig``, ``ImportConfig``);
- ``recsys_tapper.events``: validation of an events file;
- ``recsys_tapper.update``: the online update, fine-tuning only the affected rows (``UpdateConfig``).

Example::

    from recsys_tapper.user_ops import export_model, update_model     # same functions as in the modules above
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from recsys_tapper.events import EVENT_FIELDS, Event, UpdateError, text_field, validate_events
from recsys_tapper.table_io import (
    TOWER_KEY,
    ExportConfig,
    ImportConfig,
    export_model,
    grow_table,
    history_stats,
    import_into_module,
    import_into_table,
    import_model,
    run_export,
    run_import,
)
from recsys_tapper.update import UpdateConfig, finetune_rows, run_update, update_model

__all__ = [
    "EVENT_FIELDS", "TOWER_KEY", "Event", "ExportConfig", "ImportConfig", "UpdateConfig", "UpdateError",
    "export_model", "finetune_rows", "grow_table", "history_stats", "import_into_module", "import_into_table",
    "import_model", "register", "run_export", "run_import", "run_update", "text_field", "update_model",
    "validate_events",
]


def register() -> None:
    """Store the export, import and update schemas in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="import_schema", node=ImportConfig)
    cs.store(name="update_schema", node=UpdateConfig)
