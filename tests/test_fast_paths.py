"""Every inference fast path computes the reference function.

Tolerances: fp32 paths rtol=1e-4, atol=1e-5 against the literal computation (they differ only in summation
order). bf16 paths: rtol=atol=3e-2 against the fp32 reference on the same inputs (bf16 keeps 8 mantissa bits,
~4e-3 per rounding, accumulated over a few GEMMs and a softmax). The low-rank scorer is a different function;
its fast path is checked against its own unfused definition, ``DINScorer.forward``.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from embeddings.history import build_history, gaps
from embeddings.jagged import segment_ids, segment_softmax, segment_sum, segment_weighted_sum, softmax_pool
from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig
from embeddings.scorer import DINScorer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common

FP32 = {"rtol": 1e-4, "atol": 1e-5}
BF16 = {"rtol": 3e-2, "atol": 3e-2}


def _literal(sc: DINScorer, q: torch.Tensor, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return sc.reference(q[segment_ids(lengths)], h)


@pytest.mark.parametrize("n", [5, 40])  # 40 >= d: the single query is folded into the weights
@pytest.mark.parametrize("cached", [False, True])
def test_score_jagged_single_query_equals_literal_din(n, cached):
    sc = DINScorer(32)
    q, h = torch.randn(1, 32), torch.randn(n, 32)
    lengths = torch.tensor([n])
    rt = sc.record_term(h).detach() if cached else None
    assert_close(sc.score_jagged(q, h, lengths, rt), _literal(sc, q, h, lengths), **FP32)


@pytest.mark.parametrize("cached", [False, True])
def test_score_jagged_batch_equals_literal_din(cached):
    sc = DINScorer(32)
    lengths = torch.tensor([3, 0, 17, 1, 0])
    q, h = torch.randn(5, 32), torch.randn(int(lengths.sum()), 32)
    rt = sc.record_term(h).detach() if cached else None
    assert_close(sc.score_jagged(q, h, lengths, rt), _literal(sc, q, h, lengths), **FP32)


@pytest.mark.parametrize("lengths", [[50], [4, 0, 9]])
def test_lowrank_fast_path_equals_its_definition(lengths):
    sc = DINScorer(32, interaction_rank=4)
    lengths = torch.tensor(lengths)
    q, h = torch.randn(len(lengths), 32), torch.randn(int(lengths.sum()), 32)
    ref = sc(q[segment_ids(lengths)], h)  # the low-rank scorer's own (unfused) definition
    assert_close(sc.score_jagged(q, h, lengths, sc.record_term(h)), ref, **FP32)
    assert_close(sc.score_jagged(q, h, lengths), ref, **FP32)


def test_inference_weights_follow_an_optimizer_step():
    sc = DINScorer(16)
    q, h, lengths = torch.randn(1, 16), torch.randn(30, 16), torch.tensor([30])
    before = sc.score_jagged(q, h, lengths)
    with torch.no_grad():
        sc.fc1.weight.mul_(1.5)  # an in-place update bumps the version: the cached layout must be rebuilt
    after = sc.score_jagged(q, h, lengths)
    assert not torch.allclose(before, after)
    assert_close(after, _literal(sc, q, h, lengths), **FP32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # CSR path and index_add path on CPU
def test_segment_weighted_sum_and_softmax_pool(dtype):
    lengths = torch.tensor([2, 0, 3, 1])
    seg = segment_ids(lengths)
    w, v = torch.rand(6), torch.randn(6, 8)
    expect = segment_sum(w[:, None] * v, seg, 4)
    assert_close(
        segment_weighted_sum(w, v.to(dtype), lengths).float(),
        expect,
        **(FP32 if dtype == torch.float32 else BF16),
    )
    s = torch.randn(6)
    c, a = softmax_pool(s, v, lengths)
    assert_close(a, segment_softmax(s, seg, 4))
    assert_close(c, segment_sum(a[:, None] * v, seg, 4), **FP32)
    assert_close(c[1], torch.zeros(8))


def _batch(d, rows, n_records, seed=0):
    g = torch.Generator().manual_seed(seed)
    days = [sorted((torch.rand(len(r), generator=g) * 30).tolist()) for r in rows]
    qdays = [40.0 if i % 2 == 0 else None for i in range(len(rows))]
    hist = build_history(rows, days, qdays)
    bank, q = torch.randn(n_records, d, generator=g), torch.randn(len(rows), d, generator=g)
    hists = [bank[torch.tensor(r, dtype=torch.long)] for r in rows]
    dts, dps = [], []
    for dd, qd in zip(days, qdays, strict=True):
        a, b = gaps(dd, qd)
        dts.append(torch.tensor(a))
        dps.append(torch.tensor(b))
    return q, bank, hist, (hists, dts, dps)


def _pool(d, rank=None):
    pool = TimeAwarePooling(TimeAwarePoolingConfig(interaction_rank=rank), d)
    with torch.no_grad():
        pool.lambda_t.fill_(0.4)
        pool.lambda_o.fill_(-0.2)
    return pool


ROWS = {
    "batch_with_empty_and_duplicates": [[1, 2, 3], [], [4, 5, 5, 6, 0], [7], [9, 3]],
    "single_long_contiguous": [list(range(3, 43))],  # 40 records >= d: folded path, bank view (no gather)
    "single_short_shuffled": [[8, 2, 5]],
    "single_empty": [[]],
    "all_empty": [[], []],
}


@pytest.mark.parametrize("case", list(ROWS))
@pytest.mark.parametrize("cached", [False, True])
def test_infer_equals_naive_loop_and_forward(case, cached):
    d = 32
    rows = ROWS[case]
    q, bank, hist, (hists, dts, dps) = _batch(d, rows, n_records=50)
    pool = _pool(d)
    cache = pool.scorer.record_term(bank).detach() if cached else None
    c, alpha = pool.infer(q, hist, bank, cache)
    assert_close(c, pool.reference(q, hists, dts, dps).detach(), **FP32)
    c_fwd, alpha_fwd = pool(q, hist, bank, cache)
    assert_close(c, c_fwd.detach(), **FP32)
    assert_close(alpha, alpha_fwd.detach(), **FP32)


def test_infer_lowrank_equals_forward():
    d = 32
    q, bank, hist, _ = _batch(d, ROWS["batch_with_empty_and_duplicates"], n_records=50)
    pool = _pool(d, rank=4)
    cache = pool.scorer.record_term(bank).detach()
    for qq, kk in [
        (q, hist),
        (q[:1], build_history([list(range(40))], [[float(i) for i in range(40)]], [50.0])),
    ]:
        c, _ = pool.infer(qq, kk, bank, cache)
        assert_close(c, pool(qq, kk, bank, cache)[0].detach(), **FP32)


@pytest.mark.parametrize("case", ["batch_with_empty_and_duplicates", "single_long_contiguous"])
def test_infer_bf16_is_close_to_fp32_reference(case):
    d = 32
    q, bank, hist, (hists, dts, dps) = _batch(d, ROWS[case], n_records=50)
    pool = _pool(d)
    ref = pool.reference(q, hists, dts, dps).detach()
    pool16 = _pool(d)
    pool16.load_state_dict(pool.state_dict())
    pool16 = pool16.to(torch.bfloat16)
    bank16 = bank.to(torch.bfloat16)
    c, alpha = pool16.infer(q.to(torch.bfloat16), hist, bank16, pool16.scorer.record_term(bank16))
    assert c.dtype == torch.bfloat16 and alpha.dtype == torch.float32
    assert_close(c.float(), ref, **BF16)


def test_benchmark_dense_reference_is_the_same_function():
    """The padded dense and bucketed references the benchmarks time == the naive per-example loop (+ projection)."""
    d, slots = 16, 3
    rows = [[1, 2, 3], [], [4, 5, 6, 7, 0]]
    q, bank, hist, (hists, dts, dps) = _batch(d, rows, n_records=10)
    pool = _pool(d)
    ids, lengths = hist.record_ids(), hist.lengths().long()
    hp, mask, dtp, dpp = common.pad_jagged(bank, ids, lengths, hist.dt.values(), hist.order_gaps())
    lam = (pool.lambda_t.detach(), pool.lambda_o.detach())
    proj = nn.Linear(d, slots * d)
    with torch.no_grad():
        ref = pool.reference(q, hists, dts, dps)
        for chunk in (None, 2):
            pq = common.dense_reference_pq(pool.scorer, *lam, proj, q, hp, mask, dtp, dpp, slots, chunk=chunk)
            assert_close(pq, proj(ref).view(3, slots, d), **FP32)
        rtp = common.pad_jagged(pool.scorer.record_term(bank), ids, lengths)[0]
        fac = common.dense_reference_context(
            pool.scorer,
            *lam,
            q,
            hp,
            mask,
            dtp,
            dpp,
            score_fn=common.padded_factorized_scores(pool.scorer, rtp),
        )
        assert_close(fac, ref, **FP32)
        for size in (1, 2, 16):  # length-sorted buckets, each padded to its own longest
            buckets = common.pad_buckets(bank, ids, lengths, hist.dt.values(), hist.order_gaps(), size=size)
            assert sorted(i for idx, *_ in buckets for i in idx.tolist()) == [0, 1, 2]
            assert_close(common.bucketed_reference_context(pool.scorer, *lam, q, buckets), ref, **FP32)
        assert common.bucket_slots(lengths, 2) == 2 * 3 + 1 * 5  # buckets {1: 0, 0: 3} and {2: 5}


def test_gpu_script_path_equals_infer_and_imports_no_torchrec():
    from benchmarks import gpu_pq

    d = 32
    q, bank, hist, _ = _batch(d, ROWS["batch_with_empty_and_duplicates"], n_records=50)
    pool = _pool(d)
    cache = pool.scorer.record_term(bank).detach()
    c = gpu_pq.fast_context(
        pool.scorer,
        pool.lambda_t.detach(),
        pool.lambda_o.detach(),
        q,
        bank,
        cache,
        hist.record_ids(),
        hist.lengths().long(),
        hist.dt.values(),
        hist.order_gaps(),
    )
    assert_close(c, pool.infer(q, hist, bank, cache)[0], **FP32)
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import benchmarks.gpu_pq; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_write_section_keeps_other_sections(tmp_path):
    path = tmp_path / "perf.json"
    common.write_section(path, "serve_latency", {"x": 1})
    common.write_section(path, "pq_latency", {"y": float("inf")})
    common.write_section(path, "pq_latency", {"y": 2})
    import json

    data = json.loads(path.read_text())
    assert data == {"serve_latency": {"x": 1}, "pq_latency": {"y": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["perf.json"]  # no temp or lock files left
