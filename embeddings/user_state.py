"""Per-user state rows in a TorchRec EmbeddingBagCollection (the paper's P_u table).

Each user has one row of width ``dim`` (L*d for the paper's full prefix, or a compressed r that a shared
layer up-projects). Lookups come as a KJT with one key, ``user_id``, and one id per example; an example
with no id (length 0) is a cold-start user and pools to zeros (SUM pooling of an empty bag).

    key       example 0   example 1   example 2
    user_id   [17]        []          [4]

Example::

    table = UserStateTable(UserStateConfig(num_users=943, dim=8 * 576))
    rows = table(user_kjt)          # (B, dim)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

USER_ID = "user_id"
TABLE = "user_state"


@dataclass
class UserStateConfig:
    """Args:
    num_users: rows in the table.
    dim: row width (L*d for full P_u; r for compressed).
    init_std: rows start from N(0, init_std); the paper uses 0.02.
    """

    num_users: int = 1
    dim: int = 8
    init_std: float = 0.02


def user_kjt(user_rows: list[int | None], key: str = USER_ID) -> KeyedJaggedTensor:
    """Build the ``user_id`` KJT (or another one-id feature, e.g. ``item_id``); ``None`` marks an id without a
    row (cold start)."""
    ids = [u for u in user_rows if u is not None]
    lengths = [0 if u is None else 1 for u in user_rows]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[key],
        values=torch.tensor(ids, dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )


class UserStateTable(nn.Module):
    """``feature``/``table`` name the KJT key and the TorchRec table: ``item_id``/``item_state`` for the item
    table of the recsys warm start (same module, keyed by the query's item)."""

    def __init__(self, cfg: UserStateConfig, device: torch.device | None = None, feature: str = USER_ID,
                 table: str = TABLE) -> None:
        super().__init__()
        self.cfg, self.feature, self.table_name = cfg, feature, table
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=table,
                    embedding_dim=cfg.dim,
                    num_embeddings=cfg.num_users,
                    feature_names=[feature],
                    pooling=PoolingType.SUM,
                    init_fn=partial(nn.init.normal_, mean=0.0, std=cfg.init_std),
                )
            ],
            device=device or torch.device("cpu"),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The (num_users, dim) table (unsharded module only)."""
        return self.ebc.embedding_bags[self.table_name].weight

    def forward(self, users: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(users)[self.feature]  # (B, dim)
