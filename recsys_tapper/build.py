"""Build a TAP-PER model from its model config: tables, tower, projector, item slots, the cached trunk.

Example::

    trunk = build_trunk(cfg.model, lm, task_lora_state)       # None when model.prefix_layer == 0
    model = build_tapper(cfg.model, add_lora(lm, cfg.model.bridge_lora, cfg.model.prefix_layer), n_users,
                         n_items, trunk)
"""

from __future__ import annotations

from embeddings.pooling import TimeAwarePooling
from embeddings.record_bank import RecordBank
from embeddings.tower import UserTower
from embeddings.user_state import UserStateConfig, UserStateTable
from llm_bridge.backbone import fingerprint
from llm_bridge.projector import BridgeProjector
from llm_bridge.trunk import TrunkCache, trunk_fingerprint
from recsys_tapper.config import ModelConfig
from recsys_tapper.features import ITEM_ID
from recsys_tapper.model import ItemSlots, TapperModel


def row_dims(m: ModelConfig, d: int) -> tuple[int, int | None]:
    """(user row width, item row width or None): ``warm_start=mf`` fixes both to ``warm_start_rank + 1``."""
    user_dim, item_dim = m.user_dim or m.projector.slots * d, m.item_dim
    if m.warm_start is None:
        return user_dim, item_dim
    if m.warm_start != "mf":
        raise ValueError(f"unknown model.warm_start {m.warm_start!r}: use mf or null")
    w = m.warm_start_rank + 1
    for name, got in (("user_dim", m.user_dim), ("item_dim", m.item_dim)):
        if got is not None and got != w:
            raise ValueError(f"model.{name}={got} but warm_start=mf gives rows of warm_start_rank+1={w}")
    return w, (w if m.item_dim is not None else None)


def build_tapper(m: ModelConfig, lm, n_users: int, n_items: int = 0, trunk: TrunkCache | None = None,
                 bank: RecordBank | None = None) -> TapperModel:
    """The TAP-PER model for model config ``m`` around ``lm`` (already carrying its bridge LoRA); its tower
    owns ``bank``, the record bank the history ids index."""
    d = lm.config.hidden_size  # derived, never configured
    user_dim, item_dim = row_dims(m, d)
    table = UserStateTable(UserStateConfig(num_users=n_users, dim=user_dim, init_std=m.user_init_std))
    tower = UserTower(table, TimeAwarePooling(m.pooling, d), bank)
    items = None
    if item_dim is not None:
        itable = UserStateTable(UserStateConfig(num_users=max(1, n_items), dim=item_dim, init_std=m.user_init_std),
                                feature=ITEM_ID, table="item_state")
        items = ItemSlots(itable, m.item_slots, d, m.projector.init_std)
    return TapperModel(lm, tower, BridgeProjector(m.projector, d, user_dim), m.prefix_layer, trunk, items)


def prefix_slots(m: ModelConfig) -> int:
    """How many soft tokens lead each prompt: L, plus the item slots when there is an item table."""
    return m.projector.slots + (m.item_slots if m.item_dim is not None else 0)


def build_trunk(m: ModelConfig, lm, task_lora_state: dict | None) -> TrunkCache | None:
    """The cached frozen trunk below ``m.prefix_layer`` (None for the input-level prefix, k = 0)."""
    if m.prefix_layer == 0:
        return None
    offset = prefix_slots(m)
    fp = trunk_fingerprint(fingerprint(lm), task_lora_state, m.prefix_layer, offset)
    return TrunkCache(lm, m.prefix_layer, offset, fp, m.trunk_dtype, m.trunk_max_bytes)
