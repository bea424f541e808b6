"""``linear_schedule`` and ``train_loop`` against values worked out by hand.

The loop is driven by a stand-in model whose loss is linear in its parameters (loss = 3·w + 3·v): the gradient
is constant, so each AdamW step (no weight decay) moves a parameter by exactly its learning rate at that step,
whatever the clipping does to the gradient's scale. The trajectory of w is then the schedule's partial sums.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from recsys_tapper.features import Sample
from recsys_tapper.training import OptimConfig, linear_schedule, train_loop


def test_linear_schedule_warms_up_then_decays_to_zero():
    f = linear_schedule(10, 0.2)  # warm-up = int(10 * 0.2) = 2 steps, then (10 - step) / (10 - 2)
    assert [f(s) for s in range(11)] == [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]


def test_linear_schedule_has_at_least_one_warmup_step():
    f = linear_schedule(5, 0.1)  # int(0.5) = 0 -> one warm-up step
    assert [f(s) for s in range(6)] == [1.0, 1.0, 3 / 4, 2 / 4, 1 / 4, 0.0]
    assert [linear_schedule(4, 0.0)(s) for s in range(4)] == [1.0, 1.0, 2 / 3, 1 / 3]


class _Linear(torch.nn.Module):
    """loss = 3·w + 3·v, w and v scalars starting at 1; records the sample ids of every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.v = torch.nn.Parameter(torch.tensor(1.0))
        self.nan_at: int | None = None
        self.calls = 0

    def forward(self, batch):  # a train module, as TapperTrain: batch -> (loss, (detached loss, n targets))
        loss = 3 * self.w + 3 * self.v
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        self.calls += 1
        return loss, (loss.detach(), len(batch))


def _samples(n: int) -> list[Sample]:
    return [Sample(f"s{i}", "u", [], [], None, "q", "1") for i in range(n)]


def _fb(seen: list[list[str]]):
    def collate(chunk):
        seen.append([s.id for s in chunk])
        return chunk

    return SimpleNamespace(collate=collate)


def test_train_loop_steps_batches_in_order_with_the_scheduled_learning_rates():
    model, seen, steps = _Linear(), [], []
    cfg = OptimConfig(lr=0.1, epochs=2, batch_size=2, weight_decay=0.0, warmup=0.34, clip=0.3)
    groups = [{"params": [model.w]}, {"params": [model.v], "lr": 0.2}]
    losses = train_loop(model, _samples(5), _fb(seen), groups, cfg, on_step=lambda s, loss: steps.append((s, loss)))

    # 5 samples in batches of 2 -> 3 steps per epoch (the last batch holds one sample), 2 epochs -> 6 steps
    assert seen == [["s0", "s1"], ["s2", "s3"], ["s4"]] * 2
    # warm-up int(6 * 0.34) = 2 steps: factors 1/2, 1; then (6 - s) / 4 for s = 2..5
    factors = [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    w = [1.0 - 0.1 * sum(factors[:s]) for s in range(7)]  # 1, .95, .85, .75, .675, .625, .6
    v = [1.0 - 0.2 * sum(factors[:s]) for s in range(7)]  # its group's own lr, twice w's
    want = [3 * w[s] + 3 * v[s] for s in range(6)]  # the loss is read before each step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=0, atol=1e-6)
    assert [s for s, _ in steps] == list(range(6)) and [loss for _, loss in steps] == losses
    torch.testing.assert_close(model.w.detach(), torch.tensor(w[6]), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.v.detach(), torch.tensor(v[6]), rtol=0, atol=1e-6)
    assert not model.training  # left in eval mode


def test_train_loop_applies_decoupled_weight_decay():
    model = _Linear()
    cfg = OptimConfig(lr=0.1, epochs=1, batch_size=1, weight_decay=0.5, warmup=0.0, clip=1.0)
    train_loop(model, _samples(1), _fb([]), [{"params": [model.w, model.v]}], cfg)
    # one step at factor 1: w <- w * (1 - lr * wd) - lr * sign(grad) = 1 * 0.95 - 0.1
    torch.testing.assert_close(model.w.detach(), torch.tensor(0.85), rtol=0, atol=1e-6)


def test_train_loop_raises_on_a_non_finite_loss_and_on_nothing_to_train():
    model = _Linear()
    model.nan_at = 1
    with pytest.raises(FloatingPointError, match="at step 1"):
        train_loop(model, _samples(4), _fb([]), [{"params": [model.w]}], OptimConfig(batch_size=2))
    assert math.isfinite(model.w.item())
    with pytest.raises(ValueError, match="nothing to train"):
        train_loop(model, _samples(4), _fb([]), [{"params": []}], OptimConfig())
