"""Export / import of the P_u table, the model-directory commands, recsys interop, and the TorchRec example."""

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import copy_model
from safetensors.torch import load_file

from embeddings.export import (
    USERS,
    WEIGHTS,
    ExportError,
    export_user_table,
    import_user_table,
)
from embeddings.user_state import UserStateConfig, UserStateTable
from recsys_tapper.checkpoint import load_model, verify
from recsys_tapper.interop import init_rows_from_vectors, read_user_vectors
from recsys_tapper.user_ops import (
    TOWER_KEY,
    export_model,
    import_into_module,
    import_into_table,
    import_model,
)
from recsys_tapper.users import UserIndex

ROOT = Path(__file__).resolve().parents[1]



def _table(model_dir: Path) -> torch.Tensor:
    return load_file(model_dir / "tower.safetensors")[TOWER_KEY]


def test_fp32_export_round_trips_bit_exactly_with_stats(model_dir, tmp_path):
    manifest = export_model(model_dir, tmp_path / "exp", dtype="fp32")
    weight, ids, stats, m2 = import_user_table(tmp_path / "exp", verify(model_dir)["backbone_fingerprint"])
    assert torch.equal(weight, _table(model_dir))
    assert ids == json.loads((model_dir / "users.json").read_text())
    assert m2 == manifest and manifest["quantization"] is None
    assert (manifest["L"], manifest["d"], manifest["dim"], manifest["num_users"]) == (2, 32, 64, 3)
    assert manifest["config"]["model"]["backbone"]["name_or_path"] == "tiny-random-llama"
    # stats == a naive count over histories.parquet
    hist = pd.read_parquet(model_dir / "histories.parquet")
    for u, t, c in zip(stats["user_id"], stats["last_event_time"], stats["event_count"]):
        mine = hist[hist["user_id"] == u]
        assert c == len(mine) and t == mine["date"].max()


def _wide_table() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g) * torch.tensor([0.02, 1.0, 30.0, 1e-4, 1.0, 1.0])[:, None]
    w[4] = 0.0  # a cold (all-zero) row
    w[5] = -1.25  # a constant row
    return w


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantized_error_is_reported_and_within_the_bound(dtype, tmp_path):
    w = _wide_table()
    ids = [f"u{i}" for i in range(w.shape[0])]
    m = export_user_table(w, ids, None, tmp_path, {"backbone_fingerprint": "f"}, dtype=dtype)
    back, ids2, _, _ = import_user_table(tmp_path)
    assert ids2 == ids
    diff = (back.double() - w.double()).abs()
    q = m["quantization"]
    torch.testing.assert_close(q["max_abs"], diff.max().item(), rtol=1e-12, atol=0)
    torch.testing.assert_close(q["rms"], diff.pow(2).mean().sqrt().item(), rtol=1e-9, atol=0)
    if dtype == "int8":  # per row: half a quantization step of that row's range, plus float32 rounding
        rng = w.double().amax(1) - w.double().amin(1)
        bound_rows = rng / 510 + 2.0**-20 * w.abs().amax(1).double()
        assert (diff.amax(1) <= bound_rows).all()
        assert torch.equal(back[4], w[4]) and torch.equal(back[5], w[5])  # zero and constant rows exact
    else:  # relative rounding of fp16 (10 mantissa bits) + subnormal spacing
        bound_rows = 2.0**-11 * w.abs().amax(1).double() + 2.0**-25
        assert (diff.amax(1) <= bound_rows).all()
    assert q["max_abs"] <= q["max_abs_bound"] <= bound_rows.max().item() * (1 + 1e-9)
    assert diff.max() > 0  # quantization did something, so the check above is not vacuous


_NO_TORCH_READER = r"""
import json, sys
sys.modules["torch"] = None  # any torch import now fails
import numpy as np, pyarrow.parquet as pq
from safetensors.numpy import load_file
d = sys.argv[1]
m = json.load(open(f"{d}/manifest.json"))
t = load_file(f"{d}/user_state.safetensors")
if m["dtype"] == "int8":
    w = t["weight_q"].astype(np.float32) * t["scale"][:, None] + t["offset"][:, None]
else:
    w = t["weight"].astype(np.float32)
users = pq.read_table(f"{d}/users.parquet").to_pandas()
print(json.dumps({"w": w.tolist(), "ids": users.sort_values("row")["user_id"].tolist()}))
"""


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_export_is_readable_with_pyarrow_and_numpy_only(model_dir, tmp_path, dtype):
    export_model(model_dir, tmp_path, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", _NO_TORCH_READER, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout)
    weight, ids, _, _ = import_user_table(tmp_path)
    assert got["ids"] == ids
    torch.testing.assert_close(torch.tensor(got["w"]), weight, rtol=0, atol=0)


def test_fingerprint_mismatch_is_refused_unless_flagged(model_dir, tmp_path):
    export_model(model_dir, tmp_path, dtype="fp16")
    fp = verify(model_dir)["backbone_fingerprint"]
    with pytest.raises(ExportError) as e:
        import_user_table(tmp_path, expected_fingerprint="0123456789abcdef")
    assert str(e.value) == (f"{tmp_path}: exported from backbone fingerprint {fp}, but the expected fingerprint "
                            "is 0123456789abcdef; pass allow_fingerprint_mismatch=True to import anyway")
    with pytest.warns(UserWarning, match="importing anyway"):
        weight, _, _, _ = import_user_table(tmp_path, "0123456789abcdef", allow_fingerprint_mismatch=True)
    assert weight.shape == (3, 64)


def test_import_into_model_dir_replaces_rows_adds_users_and_rewrites_manifest(model_dir, tmp_path):
    mdir = copy_model(model_dir, tmp_path)
    old = _table(mdir)
    ids = json.loads((mdir / "users.json").read_text())
    new_rows = torch.cat([old[[2, 0]] * 2.0, torch.full((1, 64), 0.5)])  # (3, 64): two known users + one new
    fp = verify(mdir)["backbone_fingerprint"]
    export_user_table(new_rows, [ids[2], ids[0], "fresh"], None, tmp_path / "exp", {"backbone_fingerprint": fp})
    report = import_model(tmp_path / "exp", mdir)
    assert report == {"replaced": 2, "added": 1, "skipped": 0}
    verify(mdir)  # the manifest vouches for the rewritten files
    now = _table(mdir)
    assert now.shape == (4, 64)
    assert torch.equal(now[2], old[2] * 2.0) and torch.equal(now[0], old[0] * 2.0)
    assert torch.equal(now[1], old[1]) and torch.equal(now[3], torch.full((64,), 0.5))
    assert json.loads((mdir / "users.json").read_text()) == [*ids, "fresh"]
    model, _, users, _, _ = load_model(mdir)
    assert torch.equal(model.tower.table.weight.detach(), now) and users.row("fresh") == 3


def test_import_into_in_memory_table(tmp_path):
    table = UserStateTable(UserStateConfig(num_users=2, dim=4))
    users = UserIndex(["a", "b"])
    before_a = table.weight.detach().clone()[0]
    rows = torch.arange(8, dtype=torch.float32).view(2, 4)
    export_user_table(rows, ["b", "c"], None, tmp_path, {"backbone_fingerprint": "f"})
    with pytest.raises(ValueError, match="1 exported users are not in the model"):
        import_into_table(tmp_path, table, users)
    same, rep = import_into_table(tmp_path, table, users, new_users="skip")
    assert same is table and rep == {"replaced": 1, "added": 0, "skipped": 1}
    assert torch.equal(table.weight[1], rows[0]) and torch.equal(table.weight[0], before_a)
    grown, rep = import_into_table(tmp_path, table, users, new_users="add")
    assert grown.weight.shape == (3, 4) and users.ids == ["a", "b", "c"]
    assert torch.equal(grown.weight.detach(), torch.stack([before_a, rows[0], rows[1]]))


def test_import_into_a_dmp_sharded_tower(tmp_path):
    """Through embeddings.sharding (gather, merge, load shards), on one gloo rank: the multi-rank broadcast
    branch is not exercised here."""
    import torch.distributed as dist

    from embeddings.pooling import TimeAwarePooling, TimeAwarePoolingConfig
    from embeddings.sharding import gather_user_table, shard_user_tower
    from embeddings.tower import UserTower

    tower = UserTower(UserStateTable(UserStateConfig(4, 8)), TimeAwarePooling(TimeAwarePoolingConfig(), 8))
    rows = torch.arange(16.0).view(2, 8)
    export_user_table(rows, ["c", "a"], None, tmp_path / "exp", {})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dmp = shard_user_tower(tower, sharding="table_wise")
        before = gather_user_table(dmp)
        report = import_into_module(tmp_path / "exp", dmp, UserIndex(["a", "b", "c", "d"]))
        after = gather_user_table(dmp)
    finally:
        dist.destroy_process_group()
    assert report == {"replaced": 2, "added": 0, "skipped": 0}
    assert torch.equal(after, torch.stack([rows[1], before[1], rows[0], before[3]]))


def test_cli_export_then_import(model_dir, tmp_path, monkeypatch, capsys):
    from recsys_tapper.cli import main

    mdir = copy_model(model_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    main(["export", f"model_dir={mdir}", "out=exp", "dtype=int8"])
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == sorted(["manifest.json", WEIGHTS, USERS])
    main(["import", "export_dir=exp", f"model_dir={mdir}"])
    verify(mdir)
    torch.testing.assert_close(_table(mdir), _table(model_dir), rtol=0,
                               atol=json.loads((tmp_path / "exp" / "manifest.json").read_text())
                               ["quantization"]["max_abs"])
    with pytest.raises(SystemExit):  # the schema rejects a mistyped key
        main(["export", f"model_dir={mdir}", "out=exp", "dtyp=fp16"])
    assert "Key 'dtyp' not in 'ExportConfig'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ recsys interop


def _write_vectors(path: Path, ids, x) -> None:
    pq.write_table(pa.table({"user_id": ids, "vector": [list(map(float, r)) for r in x]}), path)


def test_interop_least_squares_recovers_a_planted_linear_map(tmp_path):
    g = torch.Generator().manual_seed(1)
    k, dim, n_fit = 5, 12, 20
    a, b = torch.randn(k, dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    ids = [f"u{i}" for i in range(n_fit + 3)]
    x = torch.randn(len(ids), k, generator=g, dtype=torch.float64)
    users = UserIndex(ids)
    weight = torch.zeros(len(ids), dim)
    weight[:n_fit] = (x[:n_fit] @ a + b).float()  # the "trained" rows follow the planted map
    _write_vectors(tmp_path / "v.parquet", ids, x.tolist())
    rids, rx = read_user_vectors(tmp_path / "v.parquet")
    out, rep = init_rows_from_vectors(weight, users, rids, rx, fit_users=ids[:n_fit], ridge=1e-9)
    assert rep["n_fit"] == n_fit and rep["n_init"] == 3 and rep["fit_rms_residual"] < 1e-6
    torch.testing.assert_close(out[n_fit:], (x[n_fit:] @ a + b).float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[:n_fit], weight[:n_fit])


def test_interop_rejects_ragged_vectors_and_no_overlap(tmp_path):
    pq.write_table(pa.table({"user_id": ["a", "b"], "vector": [[1.0, 2.0], [1.0]]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError) as e:
        read_user_vectors(tmp_path / "bad.parquet")
    assert str(e.value) == f"{tmp_path / 'bad.parquet'}: row 1: vector has width 1, earlier rows have 2"
    with pytest.raises(ValueError, match="nothing to fit"):
        init_rows_from_vectors(torch.zeros(1, 2), UserIndex(["z"]), ["a"], torch.ones(1, 3), fit_users=["a"])


def test_torchrec_interop_example_runs_forward_and_backward():
    out = runpy.run_path(str(ROOT / "examples" / "torchrec_interop.py"))["main"]()
    assert math.isfinite(out["loss"])
    assert all(out[k] > 0 and math.isfinite(out[k]) for k in ("user_table", "scorer", "item_table"))
