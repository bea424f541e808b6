"""State where it belongs: the tower owns the record bank and its cached record terms; the train wrapper owns
the loss (as TorchRec's DLRMTrain)."""

import torch
from torch.testing import assert_close
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.history import build_history
from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig
from embeddings.record_bank import RecordBank
from embeddings.tower import UserTower
from embeddings.user_state import USER_ID, UserStateConfig, UserStateTable

D = 8


def _tower(n_records: int = 5) -> UserTower:
    bank = RecordBank(D)
    bank.add([f"u/r{i}" for i in range(n_records)], torch.randn(n_records, D))
    return UserTower(UserStateTable(UserStateConfig(num_users=2, dim=4)),
                     TimeAwarePooling(TimeAwarePoolingConfig(), D), bank)


def _inputs(rows: list[list[int]]):
    users = KeyedJaggedTensor.from_lengths_sync([USER_ID], torch.tensor([0, 1][: len(rows)]),
                                                torch.ones(len(rows), dtype=torch.int32))
    days = [[float(3 * j) for j in range(len(r))] for r in rows]
    return users, build_history(rows, days, [30.0] * len(rows)), torch.randn(len(rows), D)


def test_record_terms_are_cached_until_the_bank_grows_or_the_scorer_steps():
    tower = _tower()
    scorer = tower.pooling.scorer
    terms = tower.record_terms()
    with torch.no_grad():
        assert_close(terms, scorer.record_term(tower.bank.vectors), rtol=0, atol=0)
    assert tower.record_terms() is terms  # no recomputation while nothing changed

    tower.bank.add(["u/new"], torch.randn(1, D))  # the feature builder appends a record
    grown = tower.record_terms()
    assert grown.shape == (6, D)
    with torch.no_grad():
        assert_close(grown, scorer.record_term(tower.bank.vectors), rtol=0, atol=0)

    opt = torch.optim.SGD(scorer.parameters(), lr=0.5)
    scorer.record_term(tower.bank.vectors).sum().backward()
    opt.step()  # in place: the cache key (parameter versions) changes
    stepped = tower.record_terms()
    assert not torch.equal(stepped, grown)
    with torch.no_grad():
        assert_close(stepped, scorer.record_term(tower.bank.vectors), rtol=0, atol=0)


def test_inference_and_training_paths_pool_the_same_context():
    tower = _tower()
    users, history, q = _inputs([[0, 2, 4], [1, 3]])
    _, c_train, a_train = tower(users, history, q)  # autograd path, record terms computed per batch
    with torch.no_grad():
        _, c_infer, a_infer = tower(users, history, q)  # fast path over the cached terms
    assert_close(c_infer, c_train.detach(), rtol=1e-5, atol=1e-6)
    assert_close(a_infer, a_train.detach(), rtol=1e-5, atol=1e-6)


def test_extra_records_read_like_records_in_the_bank():
    """Serving's records the bank lacks travel beside the batch; the result equals holding them in the bank."""
    extra = torch.randn(2, D)
    tower = _tower()
    users, history, q = _inputs([[0, 5, 6], [2, 6]])  # rows 5 and 6 are not in the bank: extra[0], extra[1]
    with torch.no_grad():
        got = tower(users, history, q, extra)
        tower.bank.add(["u/x0", "u/x1"], extra)
        want = tower(users, history, q)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_train_wrapper_loss_is_the_token_mean_cross_entropy_of_the_lm():
    """k = 0: TapperTrain's loss equals Hugging Face's own causal-LM loss on [P | prompt + answer]."""
    from llm_bridge.backbone import BackboneConfig, load_backbone
    from llm_bridge.encoder import TextEncoder
    from llm_bridge.inject import prepend_prefix
    from recsys_tapper.build import build_tapper
    from recsys_tapper.features import FeatureBuilder
    from recsys_tapper.model import TapperTrain
    from recsys_tapper.synthetic import synthetic_rating_task
    from recsys_tapper.tasks import get_task
    from recsys_tapper.users import UserIndex
    from tests.conftest import tiny_config

    train, _ = synthetic_rating_task(n_users=3, n_records=6, seed=1)
    lm, tok = load_backbone(BackboneConfig(name_or_path="tiny-random-llama"))
    users = UserIndex(sorted({ex.user_id for ex in train}))
    fb = FeatureBuilder(tok, TextEncoder(lm, tok), get_task("movielens"), RecordBank(lm.config.hidden_size), users)
    fb.register(train)
    model = build_tapper(tiny_config("unused").model, lm, len(users), bank=fb.bank).eval()
    batch = fb.collate(fb.profile_samples(train, per_user=2))
    with torch.no_grad():
        loss, (detached, n) = TapperTrain(model)(batch)
        embeds, mask, labels = prepend_prefix(lm.get_input_embeddings()(batch.input_ids), batch.attention_mask,
                                              batch.labels, model.prefix(batch))
        want = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert n == int((batch.labels != -100).sum())
    assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert detached.item() == loss.item()


def test_a_training_step_computes_record_terms_only_for_the_records_it_reads(monkeypatch):
    # The whole bank's terms are an inference cache; a training forward that rebuilt them after every optimizer
    # step (the scorer's weights change) spent more than half of a MovieLens Stage-2 step on records it never read.
    tower = _tower(n_records=50)
    scorer = tower.pooling.scorer
    rows_scored = []
    record_term = scorer.record_term
    monkeypatch.setattr(scorer, "record_term", lambda h: rows_scored.append(h.shape[0]) or record_term(h))
    opt = torch.optim.SGD(tower.parameters(), lr=0.1)
    for _ in range(3):
        users, history, q = _inputs([[0, 2, 4], [1, 3]])
        _, context, _ = tower(users, history, q)
        context.sum().backward()
        opt.step()
        opt.zero_grad()
    assert rows_scored and max(rows_scored) <= 5  # the 5 history records of a batch, never the 50 of the bank
    with torch.no_grad():
        tower(*_inputs([[0, 2, 4], [1, 3]]))
    assert rows_scored[-1] == 50  # inference builds the bank's cache, once per weights version
