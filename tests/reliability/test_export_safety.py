"""Hostile or damaged exports: path traversal, links, corruption, crashes mid-write, bad inputs, and properties."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embeddings import atomic
from embeddings.export import MANIFEST, USERS, WEIGHTS, ExportError, export_user_table, import_user_table

W = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.125]])
IDS = ["alice", "bob"]


@pytest.fixture
def export_dir(tmp_path) -> Path:
    d = tmp_path / "exp"
    export_user_table(W, IDS, None, d, {"backbone_fingerprint": "f"})
    return d


def _edit_manifest(d: Path, **changes) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m.update(changes)
    (d / MANIFEST).write_text(json.dumps(m))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/users.parquet", "extra.bin"])
def test_manifest_naming_a_file_outside_the_allow_list_is_refused(export_dir, name):
    outside = export_dir.parent / "x"
    outside.write_bytes(b"secret")  # even with a matching checksum it must not be read
    files = json.loads((export_dir / MANIFEST).read_text())["files"]
    _edit_manifest(export_dir, files={**files, name: _sha(outside)})
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir)
    assert str(e.value) == (f"{export_dir / MANIFEST}: file name {name!r} is not allowed (only {WEIGHTS}, {USERS}); "
                            "refusing paths outside the export directory")


def test_a_data_file_that_links_outside_the_directory_is_refused(export_dir):
    outside = export_dir.parent / "elsewhere.parquet"
    os.replace(export_dir / USERS, outside)
    os.symlink(outside, export_dir / USERS)  # same bytes, same checksum, but a link out of the directory
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir)
    assert str(e.value) == (f"{export_dir / USERS}: is a link or resolves outside the export directory; "
                            "refusing to read it")


@pytest.mark.parametrize("name", [WEIGHTS, USERS])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_or_truncated_file_is_refused_naming_it(export_dir, name, damage):
    p = export_dir / name
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir)
    assert str(e.value) == f"{p}: checksum mismatch (truncated or corrupted); refusing to import"


def test_missing_file_bad_manifest_and_schema_version(export_dir):
    (export_dir / USERS).unlink()
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir)
    assert str(e.value) == f"{export_dir / USERS}: listed in the manifest but missing"
    _edit_manifest(export_dir, schema_version=99)
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir)
    assert str(e.value) == f"{export_dir / MANIFEST}: schema_version 99 != 1"
    (export_dir / MANIFEST).write_text("{not json")
    with pytest.raises(ExportError, match=r"manifest is not valid JSON"):
        import_user_table(export_dir)
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir.parent / "nowhere")
    assert str(e.value) == f"{export_dir.parent / 'nowhere'}: no manifest.json; not a recsys-tapper user-table export"


def test_consistent_checksums_over_wrong_contents_are_still_refused(export_dir):
    """A manifest re-signed over a table of the wrong shape: the shape check catches it."""
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, export_dir / WEIGHTS)
    files = json.loads((export_dir / MANIFEST).read_text())["files"]
    _edit_manifest(export_dir, files={**files, WEIGHTS: _sha(export_dir / WEIGHTS)})
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir)
    assert str(e.value) == (f"{export_dir / WEIGHTS}: tensor 'weight' is torch.float32 (3, 3), "
                            "expected torch.float32 (2, 3)")


def test_a_crash_mid_export_leaves_no_temp_files_and_is_detected(export_dir, monkeypatch):
    """The second rename fails (as if the process died): the new weights are in place, the manifest is the
    old one, so import refuses by checksum instead of serving a mix of old and new."""
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="disk gone"):
        export_user_table(W * 3, IDS, None, export_dir, {"backbone_fingerprint": "f"})
    monkeypatch.setattr(atomic.os, "replace", real)
    assert sorted(p.name for p in export_dir.iterdir()) == sorted([MANIFEST, WEIGHTS, USERS])
    with pytest.raises(ExportError) as e:
        import_user_table(export_dir)
    assert str(e.value) == f"{export_dir / WEIGHTS}: checksum mismatch (truncated or corrupted); refusing to import"


def test_bad_export_inputs_fail_before_writing(tmp_path):
    nan = W.clone()
    nan[1, 2] = float("nan")
    cases = [
        ({"weight": nan}, "weight row 1 (user 'bob') contains NaN or inf; refusing to export"),
        ({"weight": W * 1e5, "dtype": "fp16"}, "weight has |x| = 200000 > 65504.0 (fp16 max); export as fp32 or int8"),
        ({"dtype": "bf16"}, "dtype 'bf16' is not one of fp32, fp16, int8"),
        ({"user_ids": ["a", "a"]}, "user_ids[1]: user 'a' appears twice"),
        ({"user_ids": ["a"]}, "2 table rows but 1 user ids"),
    ]
    for kw, msg in cases:
        args = {"weight": W, "user_ids": IDS, "stats": None, "out_dir": tmp_path / "x", "meta": {}, "dtype": "fp32"} | kw
        with pytest.raises(ExportError) as e:
            export_user_table(**args)
        assert str(e.value) == msg
        assert not (tmp_path / "x").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 5),
    dim=st.integers(1, 9),
    log_scale=st.floats(-6, 3),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["fp32", "fp16", "int8"]),
)
def test_property_round_trip_error_within_reported_bound(n, dim, log_scale, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, dim, generator=g) * 10.0**log_scale
    ids = [f"u{i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        m = export_user_table(w, ids, None, d, {}, dtype=dtype)
        back, ids2, stats, _ = import_user_table(d)
    assert ids2 == ids and back.shape == (n, dim) and len(stats) == n
    if dtype == "fp32":
        assert torch.equal(back, w)
    else:
        err = (back.double() - w.double()).abs().max().item() if w.numel() else 0.0
        assert err <= m["quantization"]["max_abs_bound"]
        assert err == pytest.approx(m["quantization"]["max_abs"], rel=1e-12, abs=0)
