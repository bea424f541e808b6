"""The TAP-PER user tower inside an ordinary TorchRec ranking model (two-tower / DLRM-style).

The UserTower is a plain TorchRec module: KJTs in (``user_id``; a ``History``: ``history`` ids + day gaps), dense
tensors out. It owns the record bank its history ids index (a ``RecordBank`` of frozen record vectors). Here it is the user side of a click model whose item side is an EmbeddingBagCollection over
``item_id``; a small MLP scores the concatenation [P_u row | pooled history | item]. One forward and
backward pass, then a check that gradients reached the user table, the attention scorer and the item table.

    python examples/torchrec_interop.py

    key        example 0    example 1    example 2    example 3
    user_id    [0]          [2]          []           [1]         (example 2: a cold-start user)
    item_id    [5]          [1, 7]       [3]          [0]
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.modules.mlp import MLP

from embeddings.history import History, build_history
from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig
from embeddings.record_bank import RecordBank
from embeddings.tower import UserTower
from embeddings.user_state import UserStateConfig, UserStateTable, user_kjt


class RankingModel(nn.Module):
    """p(click | user, history, query, item). Composes a UserTower and an item EBC (compose, don't inherit)."""

    def __init__(self, tower: UserTower, items: EmbeddingBagCollection, user_dim: int, d: int, item_dim: int):
        super().__init__()
        self.tower = tower
        self.items = items
        self.over = MLP(user_dim + d + item_dim, [32, 1], activation="relu")

    def forward(self, users: KeyedJaggedTensor, history: History, q: torch.Tensor,
                item_kjt: KeyedJaggedTensor) -> torch.Tensor:
        user_state, context, _ = self.tower(users, history, q)  # (B, user_dim), (B, d)
        item = self.items(item_kjt)["item_id"]  # (B, item_dim), mean of each example's items
        return self.over(torch.cat([user_state, context, item], dim=1)).squeeze(1)  # (B,) logits


def main(seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    n_users, n_items, n_records, d, user_dim, item_dim = 3, 8, 10, 16, 24, 12
    bank = RecordBank(d)  # the frozen record vectors the history ids index (here random)
    bank.add([f"record-{i}" for i in range(n_records)], torch.randn(n_records, d))
    tower = UserTower(UserStateTable(UserStateConfig(num_users=n_users, dim=user_dim)),
                      TimeAwarePooling(TimeAwarePoolingConfig(), d), bank)
    items = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="item_table", embedding_dim=item_dim,
                                                              num_embeddings=n_items, feature_names=["item_id"],
                                                              pooling=PoolingType.MEAN)])
    model = RankingModel(tower, items, user_dim, d, item_dim)

    users = user_kjt([0, 2, None, 1])
    history = build_history([[0, 1, 2], [3, 4], [5], []],
                            record_days=[[1.0, 2.0, 4.0], [3.0, None], [7.0], []],
                            query_days=[5.0, 6.0, None, 9.0])
    item_kjt = KeyedJaggedTensor.from_lengths_sync(keys=["item_id"], values=torch.tensor([5, 1, 7, 3, 0]),
                                                   lengths=torch.tensor([1, 2, 1, 1], dtype=torch.int32))
    q = torch.randn(4, d)  # (B, d) query vectors
    clicks = torch.tensor([1.0, 0.0, 1.0, 0.0])

    logits = model(users, history, q, item_kjt)  # (B,)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, clicks)
    loss.backward()
    grads = {
        "user_table": tower.table.weight.grad.norm().item(),
        "scorer": tower.pooling.scorer.fc1.weight.grad.norm().item(),
        "item_table": items.embedding_bags["item_table"].weight.grad.norm().item(),
    }
    print(f"loss {loss.item():.4f}; gradient norms: " + ", ".join(f"{k} {v:.3g}" for k, v in grads.items()))
    return {"loss": loss.item(), **grads}


if __name__ == "__main__":
    main()
