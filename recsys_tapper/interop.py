"""Initialise P_u rows from a user-embedding table an existing recommender already has.

The source is a parquet file ``user_id (string) -> vector (list<float>)`` of any width k. The map to the row
width D is a **least-squares fit** (closed form, ridge-regularised, with a bias), not a learned layer:

    W, b = argmin_{W, b} sum_{u in fit users} || x_u W + b - P_u ||^2 + ridge * ||W||^2       W: (k, D)

fitted on users that have both a source vector and an already-trained row; every user to initialise then
gets ``P_u = x_u W + b``. Without such overlap there is nothing to fit, and the call is refused.

Example::

    ids, x = read_user_vectors("recsys_users.parquet")                       # (M, k)
    weight, report = init_rows_from_vectors(table.weight, users, ids, x,
                                            fit_users=trained, init_users=new_users)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys_tapper.users import UserIndex


def read_user_vectors(path: str | Path) -> tuple[list[str], torch.Tensor]:
    """Read ``user_id -> vector`` from parquet; every vector must be finite and of one width k. -> (ids, (M, k))"""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    for col in ("user_id", "vector"):
        if col not in table.column_names:
            raise ValueError(f"{path}: column {col!r} missing (columns: {', '.join(table.column_names)})")
    vtype = table.schema.field("vector").type
    if not (pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)):
        raise ValueError(f"{path}: column 'vector' must be list<float>, got {vtype}")
    ids, vecs = table.column("user_id").to_pylist(), table.column("vector").to_pylist()
    seen: set[str] = set()
    width = None
    for i, (u, v) in enumerate(zip(ids, vecs)):
        if u is None or str(u) == "":
            raise ValueError(f"{path}: row {i}: field 'user_id' is missing")
        if str(u) in seen:
            raise ValueError(f"{path}: row {i}: user_id {u!r} appears twice")
        seen.add(str(u))
        if v is None or len(v) == 0:
            raise ValueError(f"{path}: row {i}: field 'vector' is empty")
        width = len(v) if width is None else width
        if len(v) != width:
            raise ValueError(f"{path}: row {i}: vector has width {len(v)}, earlier rows have {width}")
        if any(x is None or not math.isfinite(x) for x in v):
            raise ValueError(f"{path}: row {i}: vector has a null, NaN or inf")
    x = torch.tensor(vecs, dtype=torch.float64) if vecs else torch.zeros(0, 0, dtype=torch.float64)
    return [str(u) for u in ids], x


def fit_projection(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares with a bias: x (M, k), y (M, D) -> W (k, D), b (D,) minimising ||x W + b - y||^2."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need matching, non-empty fit sets; got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)  # centring absorbs the bias
    xc, yc = x - mx, y - my  # (M, k), (M, D)
    gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype)  # (k, k)
    w = torch.linalg.solve(gram, xc.T @ yc)  # (k, D)
    return w, my - mx @ w


def init_rows_from_vectors(
    weight: torch.Tensor,
    users: UserIndex,
    ids: Sequence[str],
    x: torch.Tensor,
    fit_users: Iterable[str],
    init_users: Iterable[str] | None = None,
    ridge: float = 1e-3,
) -> tuple[torch.Tensor, dict]:
    """Return a copy of ``weight`` (N, D) whose ``init_users`` rows are ``x_u W + b``, W and b fitted on
    ``fit_users`` (users with a source vector and a trained row). ``init_users`` default: every user with a
    source vector and a row that is not a fit user. Also returns a report (fit RMS residual, counts)."""
    where = {u: i for i, u in enumerate(ids)}
    fit = [u for u in dict.fromkeys(fit_users) if u in where and users.row(u) is not None]
    if not fit:
        raise ValueError("no fit user has both a source vector and a table row: nothing to fit the projection on")
    fit_set = set(fit)
    if init_users is None:
        init = [u for u in ids if users.row(u) is not None and u not in fit_set]
    else:
        init = list(dict.fromkeys(init_users))
        lacking = [u for u in init if u not in where or users.row(u) is None]
        if lacking:
            raise ValueError(f"{len(lacking)} users to initialise lack a source vector or a row, e.g. {lacking[:3]}")
    xf = x[[where[u] for u in fit]]  # (M, k)
    yf = weight.detach()[[users.row(u) for u in fit]]  # (M, D)
    w, b = fit_projection(xf, yf, ridge)
    resid = (xf.double() @ w + b - yf.double()).pow(2).mean().sqrt().item()
    out = weight.detach().clone()
    if init:
        rows = torch.tensor([users.row(u) for u in init])
        out[rows] = (x[[where[u] for u in init]].double() @ w + b).to(out.dtype)  # (n_init, D)
    return out, {"method": "ridge least squares", "ridge": ridge, "n_fit": len(fit), "n_init": len(init),
                 "source_width": int(x.shape[1]), "row_width": int(weight.shape[1]), "fit_rms_residual": resid}
