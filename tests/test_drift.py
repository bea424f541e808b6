"""On SYNTHETIC drift data, the time/order biases of TAP-PER's history pooling must beat the same pooling without.

Each user's taste flips sign halfway through their history, so the test queries follow the recent records and
contradict the old ones. The record vectors carry the genre and the rating; the query vector the genre. A DIN
scorer alone can find same-genre records but cannot tell old from new; lambda_t / lambda_o can. Both models
(the P_q pooling + a linear rating read-out) train the same steps on the same data with the same seed.
"""

import torch

from embeddings.history import build_history
from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig
from recsys_tapper.synthetic import GENRES, synthetic_rating_task

D = 16


def _vec(text: str, score: str | None) -> torch.Tensor:
    v = torch.zeros(D)
    v[GENRES.index(text.rsplit("| ", 1)[1])] = 1.0
    if score is not None:
        v[len(GENRES) + int(score) - 1] = 1.0
    return v


def _data(drift: bool):
    _, test = synthetic_rating_task(n_users=24, n_records=30, n_test=3, seed=7, drift=drift)
    profiles = {ex.user_id: ex.profile for ex in test}
    bank, rows = [], {}
    for user, prof in profiles.items():
        for r in prof:
            rows[(user, r.id)] = len(bank)
            bank.append(_vec(r.fields["text"], r.fields["score"]))
    bank = torch.stack(bank)
    fit = []  # Stage-2 style: record i is the target, records before it the history
    for user, prof in profiles.items():
        for i in range(1, len(prof)):
            fit.append(([rows[(user, r.id)] for r in prof[:i]], [r.date for r in prof[:i]], prof[i].date,
                        _vec(prof[i].fields["text"], None), int(prof[i].fields["score"]) - 1))
    evaluation = [([rows[(ex.user_id, r.id)] for r in ex.profile], [r.date for r in ex.profile], ex.date,
                   _vec(ex.input.rsplit("movie: ", 1)[1], None), int(ex.output) - 1) for ex in test]
    return bank, fit, evaluation


def _batch(items):
    kjt = build_history([x[0] for x in items], [x[1] for x in items], [x[2] for x in items])
    return kjt, torch.stack([x[3] for x in items]), torch.tensor([x[4] for x in items])


def _train_eval(time_bias: bool, steps: int = 300) -> float:
    torch.manual_seed(0)
    bank, fit, evaluation = _data(drift=True)
    pool = TimeAwarePooling(TimeAwarePoolingConfig(time_bias=time_bias, order_bias=time_bias), d=D)
    head = torch.nn.Linear(D, 5)
    opt = torch.optim.Adam([*pool.parameters(), *head.parameters()], lr=2e-2)
    kjt, q, y = _batch(fit)
    for _ in range(steps):
        c, _ = pool(q, kjt, bank)
        loss = torch.nn.functional.cross_entropy(head(c), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    kjt, q, y = _batch(evaluation)
    with torch.no_grad():
        pred = head(pool(q, kjt, bank)[0]).argmax(-1)
    return (pred - y).abs().float().mean().item()


def test_time_and_order_biases_beat_no_bias_on_drift():
    mae_with = _train_eval(time_bias=True)
    mae_without = _train_eval(time_bias=False)
    assert mae_with < mae_without - 0.2, (mae_with, mae_without)
