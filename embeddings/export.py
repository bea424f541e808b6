"""Export and import a user-state table (P_u) as a self-describing, checksummed directory.

An export is three files with fixed names, readable without torch (pyarrow + ``safetensors.numpy``)::

    user_state.safetensors   fp32/fp16: "weight" (N, D)
                             int8: "weight_q" int8 (N, D), "scale" fp32 (N,), "offset" fp32 (N,)
                                   row-wise affine: x ~= q * scale[row] + offset[row]
    users.parquet            user_id (string), row (int64), last_event_time (float64, days since epoch,
                             null if unknown), event_count (int64); one line per table row
    manifest.json            schema_version, N, D, L, d, dtype, backbone fingerprint, resolved config,
                             sha256 of the two files above, and for fp16/int8 the error the
                             quantization adds, measured against the fp32 rows

Only those names are ever opened: a manifest that lists any other name (``../x``, ``/etc/passwd``) is
refused, and so is a file that resolves outside the directory (a symlink). Every write is atomic (temp file
in the same folder, fsync, rename) and the manifest is written last, so a crash leaves either the old
export or files whose checksums no longer match (refused on import).

int8 error: a row with range [lo, hi] is stored with ``scale = (hi - lo) / 255``; each element is off by at
most ``scale / 2`` (plus float32 rounding). The manifest's ``quantization.max_abs_bound`` is that bound for
the whole table; ``quantization.max_abs`` / ``rms`` are what was actually measured.

Example::

    manifest = export_user_table(weight, ids, stats, "exports/demo", {"L": 8, "d": 576,
                                 "backbone_fingerprint": fp, "config": cfg}, dtype="int8")
    weight, ids, stats, manifest = import_user_table("exports/demo", expected_fingerprint=fp)
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from embeddings.atomic import atomic_write_bytes

SCHEMA_VERSION = 1
FORMAT = "recsys-tapper/user-table"
WEIGHTS = "user_state.safetensors"
USERS = "users.parquet"
MANIFEST = "manifest.json"
DATA_FILES = (WEIGHTS, USERS)  # the allow-list: nothing else is read or written besides the manifest
DTYPES = ("fp32", "fp16", "int8")
STATS_COLUMNS = ("user_id", "last_event_time", "event_count")
USERS_SCHEMA = pa.schema([("user_id", pa.string()), ("row", pa.int64()), ("last_event_time", pa.float64()),
                          ("event_count", pa.int64())])
FP16_MAX = 65504.0
_FP16_REL = 2.0**-11  # round-to-nearest relative error of a normal fp16 number
_FP16_SUBNORMAL_ABS = 2.0**-25  # half the spacing of fp16 subnormals
_FP32_SLACK = 2.0**-20  # float32 rounding in q * scale + offset, relative to the row's largest |x|


class ExportError(RuntimeError):
    """A bad export or a refused import; the message names the file."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ quantization


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise affine int8: (N, D) fp32 -> q int8 (N, D), scale (N,), offset (N,); x ~= q * scale + offset."""
    w64 = w.double()
    if w.shape[0] == 0:
        return torch.zeros(w.shape, dtype=torch.int8), torch.zeros(0), torch.zeros(0)
    lo = w64.amin(dim=1)  # (N,)
    hi = w64.amax(dim=1)  # (N,)
    scale = ((hi - lo) / 255.0).float()  # (N,) stored as fp32
    offset = (lo + 128.0 * scale.double()).float()  # q = -128 -> lo, q = 127 -> hi
    s64, o64 = scale.double()[:, None], offset.double()[:, None]
    safe = torch.where(s64 > 0, s64, torch.ones_like(s64))
    q = torch.where(s64 > 0, torch.round((w64 - o64) / safe), torch.zeros_like(w64))  # constant row: q = 0
    return q.clamp(-128, 127).to(torch.int8), scale, offset


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None] + offset[:, None]  # (N, D)


def int8_error_bound(w: torch.Tensor) -> float:
    """Largest error the int8 scheme may add to any element of ``w`` (see the module docstring)."""
    if w.numel() == 0:
        return 0.0
    w64 = w.double()
    half_step = (w64.amax(dim=1) - w64.amin(dim=1)) / 510.0
    return float((half_step + _FP32_SLACK * w64.abs().amax(dim=1)).max())


def fp16_error_bound(w: torch.Tensor) -> float:
    """Largest error fp16 rounding may add to any element of ``w`` (values within fp16 range)."""
    if w.numel() == 0:
        return 0.0
    return float(w.double().abs().max() * _FP16_REL + _FP16_SUBNORMAL_ABS)


def _error(w: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    if w.numel() == 0:
        return 0.0, 0.0
    diff = approx.double() - w.double()
    return float(diff.abs().max()), float(diff.pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------ export


def _stats_table(user_ids: Sequence[str], stats: pd.DataFrame | None) -> pa.Table:
    """users.parquet contents: one line per row, stats joined by user id (missing -> null time, 0 events)."""
    n = len(user_ids)
    last: list[float | None] = [None] * n
    count = [0] * n
    if stats is not None and len(stats):
        missing = [c for c in STATS_COLUMNS if c not in stats.columns]
        if missing:
            raise ExportError(f"stats: columns {missing} missing (need {list(STATS_COLUMNS)})")
        where = {u: i for i, u in enumerate(user_ids)}
        seen: set[str] = set()
        for j, (u, t, c) in enumerate(zip(stats["user_id"], stats["last_event_time"], stats["event_count"])):
            if u not in where:
                raise ExportError(f"stats: row {j}: user_id {u!r} is not in user_ids")
            if u in seen:
                raise ExportError(f"stats: row {j}: user_id {u!r} appears twice")
            seen.add(u)
            t = None if t is None or pd.isna(t) else float(t)
            if pd.isna(c) or int(c) != c or c < 0:
                raise ExportError(f"stats: row {j}: event_count {c!r} is not a non-negative integer")
            last[where[u]], count[where[u]] = t, int(c)
    return pa.Table.from_pydict(
        {"user_id": list(user_ids), "row": list(range(n)), "last_event_time": last, "event_count": count},
        schema=USERS_SCHEMA,
    )


def _check_ids(user_ids: Sequence[str], n: int) -> None:
    if len(user_ids) != n:
        raise ExportError(f"{n} table rows but {len(user_ids)} user ids")
    seen: set[str] = set()
    for i, u in enumerate(user_ids):
        if not isinstance(u, str) or not u:
            raise ExportError(f"user_ids[{i}] must be a non-empty string, got {u!r}")
        if u in seen:
            raise ExportError(f"user_ids[{i}]: user {u!r} appears twice")
        seen.add(u)


def export_user_table(
    weight: torch.Tensor,
    user_ids: Sequence[str],
    stats: pd.DataFrame | None,
    out_dir: str | Path,
    meta: dict,
    dtype: str = "fp32",
) -> dict:
    """Write an export of a (N, D) user table; returns the manifest.

    Args:
        weight: (N, D) table, row i belongs to ``user_ids[i]``.
        user_ids: N distinct non-empty strings.
        stats: DataFrame(user_id, last_event_time [days since epoch], event_count); users not in it get
            a null time and 0 events.
        out_dir: the export directory (created; files in it with the fixed names are replaced).
        meta: ``L``, ``d``, ``backbone_fingerprint``, ``config`` (stored at the manifest's top level);
            any other keys go under ``meta``.
        dtype: ``fp32`` (bit-exact), ``fp16`` or ``int8`` (row-wise affine).

    Example::

        export_user_table(table.weight, users.ids, stats, "exports/demo", {"L": 8, "d": 576}, dtype="fp16")
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if weight.dim() != 2:
        raise ExportError(f"weight must be 2-D (N, D), got shape {tuple(weight.shape)}")
    w = weight.detach().cpu().contiguous().to(torch.float32)  # (N, D); a no-op copy for fp32 input
    _check_ids(list(user_ids), w.shape[0])
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).any(dim=1).nonzero()[0])
        raise ExportError(f"weight row {bad} (user {user_ids[bad]!r}) contains NaN or inf; refusing to export")
    quant: dict | None = None
    if dtype == "fp32":
        tensors = {"weight": w}
    elif dtype == "fp16":
        big = float(w.abs().max()) if w.numel() else 0.0
        if big > FP16_MAX:
            raise ExportError(f"weight has |x| = {big:.6g} > {FP16_MAX} (fp16 max); export as fp32 or int8")
        half = w.to(torch.float16)
        max_abs, rms = _error(w, half.float())
        tensors = {"weight": half}
        quant = {"scheme": "fp16", "max_abs": max_abs, "rms": rms, "max_abs_bound": fp16_error_bound(w)}
    else:
        q, scale, offset = quantize_int8(w)
        max_abs, rms = _error(w, dequantize_int8(q, scale, offset))
        tensors = {"weight_q": q, "scale": scale, "offset": offset}
        quant = {"scheme": "int8-rowwise-affine", "formula": "x = q * scale[row] + offset[row]",
                 "max_abs": max_abs, "rms": rms, "max_abs_bound": int8_error_bound(w)}
    if quant is not None:
        ref = float(w.double().pow(2).mean().sqrt()) if w.numel() else 0.0
        quant["rms_relative"] = quant["rms"] / ref if ref > 0 else 0.0

    weights_bytes = st_save({k: v.contiguous() for k, v in tensors.items()})
    sink = pa.BufferOutputStream()
    pq.write_table(_stats_table(list(user_ids), stats), sink)
    users_bytes = sink.getvalue().to_pybytes()

    known = ("L", "d", "backbone_fingerprint", "backbone", "config")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "num_users": int(w.shape[0]),
        "dim": int(w.shape[1]),
        "L": meta.get("L"),
        "d": meta.get("d"),
        "dtype": dtype,
        "backbone": meta.get("backbone"),
        "backbone_fingerprint": meta.get("backbone_fingerprint"),
        "config": meta.get("config"),
        "meta": {k: v for k, v in meta.items() if k not in known},
        "quantization": quant,
        "files": {WEIGHTS: sha256_bytes(weights_bytes), USERS: sha256_bytes(users_bytes)},
    }
    text = json.dumps(manifest, indent=2, default=str)  # fails here, before any file is touched
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS, weights_bytes)
    atomic_write_bytes(out / USERS, users_bytes)
    atomic_write_bytes(out / MANIFEST, text.encode("utf-8"))  # last: it vouches for the files above
    return manifest


# ------------------------------------------------------------------------------------------------ import


def _inside(root: Path, name: str) -> Path:
    """``root / name`` for an allow-listed name that resolves inside ``root``; anything else is refused."""
    if name not in DATA_FILES:
        raise ExportError(
            f"{root / MANIFEST}: file name {name!r} is not allowed (only {', '.join(DATA_FILES)}); "
            "refusing paths outside the export directory"
        )
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ExportError(f"{path}: is a link or resolves outside the export directory; refusing to read it")
    return path


def read_manifest(export_dir: str | Path) -> dict:
    """Parse and sanity-check ``manifest.json`` (no data files are read)."""
    root = Path(export_dir)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ExportError(f"{root}: no {MANIFEST}; not a recsys-tapper user-table export")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{mpath}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{mpath}: not a user-table manifest (format != {FORMAT!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ExportError(f"{mpath}: schema_version {manifest.get('schema_version')!r} != {SCHEMA_VERSION}")
    if manifest.get("dtype") not in DTYPES:
        raise ExportError(f"{mpath}: dtype {manifest.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ExportError(f"{mpath}: 'files' must map file names to sha256 digests")
    for name in files:
        _inside(root, name)  # refuses ../x, /abs, anything not on the allow-list
    for name in DATA_FILES:
        if name not in files:
            raise ExportError(f"{mpath}: no checksum for {name}")
    for key in ("num_users", "dim"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 0:
            raise ExportError(f"{mpath}: {key!r} must be a non-negative integer")
    return manifest


def _read_verified(root: Path, name: str, digest: str) -> bytes:
    path = _inside(root, name)
    if not path.is_file():
        raise ExportError(f"{path}: listed in the manifest but missing")
    data = path.read_bytes()
    if sha256_bytes(data) != digest:
        raise ExportError(f"{path}: checksum mismatch (truncated or corrupted); refusing to import")
    return data


def _tensor(tensors: dict, path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in tensors:
        raise ExportError(f"{path}: tensor {name!r} missing")
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ExportError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    return t


def import_user_table(
    export_dir: str | Path,
    expected_fingerprint: str | None = None,
    allow_fingerprint_mismatch: bool = False,
) -> tuple[torch.Tensor, list[str], pd.DataFrame, dict]:
    """Read an export back: ``(weight fp32 (N, D), user_ids, stats DataFrame, manifest)``.

    Checks, in order: manifest shape and allow-listed names, sha256 of each file, backbone fingerprint
    (refused on mismatch unless ``allow_fingerprint_mismatch``; then a warning), tensor names/dtypes/shapes,
    and that ``users.parquet`` maps each row 0..N-1 to one distinct user. fp16/int8 are dequantized.
    """
    root = Path(export_dir)
    manifest = read_manifest(root)
    blobs = {name: _read_verified(root, name, manifest["files"][name]) for name in DATA_FILES}
    found = manifest.get("backbone_fingerprint")
    if expected_fingerprint is not None and found != expected_fingerprint:
        msg = (f"{root}: exported from backbone fingerprint {found}, but the expected fingerprint is "
               f"{expected_fingerprint}")
        if not allow_fingerprint_mismatch:
            raise ExportError(msg + "; pass allow_fingerprint_mismatch=True to import anyway")
        warnings.warn(msg + "; importing anyway (allow_fingerprint_mismatch=True)", stacklevel=2)

    n, dim = manifest["num_users"], manifest["dim"]
    wpath = root / WEIGHTS
    try:
        tensors = st_load(blobs[WEIGHTS])
    except (SafetensorError, ValueError) as e:
        raise ExportError(f"{wpath}: not a readable safetensors file ({e})") from None
    if manifest["dtype"] == "fp32":
        weight = _tensor(tensors, wpath, "weight", torch.float32, (n, dim))
    elif manifest["dtype"] == "fp16":
        weight = _tensor(tensors, wpath, "weight", torch.float16, (n, dim)).float()
    else:
        weight = dequantize_int8(_tensor(tensors, wpath, "weight_q", torch.int8, (n, dim)),
                                 _tensor(tensors, wpath, "scale", torch.float32, (n,)),
                                 _tensor(tensors, wpath, "offset", torch.float32, (n,)))

    upath = root / USERS
    try:
        table = pq.read_table(pa.BufferReader(blobs[USERS]))
    except pa.ArrowException as e:
        raise ExportError(f"{upath}: not a readable parquet file ({e})") from None
    for field in USERS_SCHEMA:
        if field.name not in table.column_names:
            raise ExportError(f"{upath}: column {field.name!r} missing")
        if not table.schema.field(field.name).type.equals(field.type):
            raise ExportError(f"{upath}: column {field.name!r} is {table.schema.field(field.name).type}, "
                              f"expected {field.type}")
    df = table.select([f.name for f in USERS_SCHEMA]).to_pandas()
    if len(df) != n or sorted(df["row"].tolist()) != list(range(n)):
        raise ExportError(f"{upath}: rows must be exactly 0..{n - 1}, one line each")
    df = df.sort_values("row", kind="stable").reset_index(drop=True)
    ids = df["user_id"].tolist()
    if any(not isinstance(u, str) or not u for u in ids) or len(set(ids)) != n:
        raise ExportError(f"{upath}: user_id must be distinct non-empty strings")
    stats = df[list(STATS_COLUMNS)].copy()
    return weight.contiguous(), ids, stats, manifest
