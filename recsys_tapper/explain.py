"""``tapper explain``: what the time-aware attention read for one answer, as a PNG and a JSON.

    tapper explain model_dir=runs/demo/model user=405 question="Rate the movie from 1 to 5. movie: Heat (1995)"
                   [date=1998-04-01] [top_k=5] [out=explain/405]       # -> explain/405.png, explain/405.json

For every history record j of the query (jagged row of one example, time order):

    din_j     = DIN(q, h_j)                                   the scorer, before the penalties
    score_j   = din_j - lambda_t * log(1 + dt_j) - lambda_o * log(1 + dpos_j)  [- window_j]  [+ content_j]
    window_j  = lambda_w * softplus(dpos_j - w)               only with ``model.pooling.window`` set
    content_j = beta * cos(q - mu_q, h_j - mu_h)                only with ``model.pooling.content_beta`` set
    alpha_j   = softmax_j(score_j)                            read from the user tower itself

``alpha`` is the tower's own output (``model.tower(...)``, the inference path serving runs); ``din`` comes
from the pooling's public parts (``pooling.scorer`` on the same q and records, ``pooling.time_penalty`` /
``order_penalty`` and ``pooling.cfg``) computed here, since ``embeddings/pooling.py`` has no accessor for the
pre-softmax scores.
``softmax(score)`` equals ``alpha`` (checked in the tests; ``alpha_check_max_abs`` in the JSON).

The answer distribution is shown with the prefix (the served path, ``TapperModel.label_probs``) and without
it: the same LM (bridge LoRA included) with no soft tokens, i.e. a ``TapperModel`` without a tower.
The picture: attention vs days before the query (top records' texts labelled); DIN score before and after
the penalties; the learned penalty curves; the two answer distributions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from recsys_tapper.data import format_date
from recsys_tapper.model import TapperModel
from recsys_tapper.serve import Query, Server, _day


@dataclass
class ExplainConfig:
    """Args:
    model_dir: a saved model directory. user / question: whom and what to explain.
    date: the query's date (epoch seconds or a date string; None: the last history record's date).
    out: output path without suffix: ``<out>.png`` and ``<out>.json``. top_k: records labelled in the picture.
    cold_start: ``zero`` | ``mean`` for a user without a row.
    """

    model_dir: str = "runs/demo/model"
    user: str = "???"
    question: str = "???"
    date: str | None = None
    out: str = "explain"
    top_k: int = 5
    cold_start: str = "zero"
    allow_fingerprint_mismatch: bool = False


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="explain_schema", node=ExplainConfig)


@torch.no_grad()
def explain(server: Server, user_id: str, question: str, date: float | str | None = None,
            history_records=None, item_id: str | None = None, top_k: int = 5, curve_points: int = 64) -> dict:
    """The attention, scores, penalty curves and answer distributions of one query (JSON-ready dict).

    ``date``: days since the epoch (a number) or a date string, as ``Server.predict``."""
    query = Query(user_id, question, history_records, date, item_id)
    recs = server.records(user_id, history_records)
    batch = server.batch([query])
    model = server.model
    model.eval()
    pool = model.tower.pooling
    lam_t, lam_o = float(pool.lambda_t), float(pool.lambda_o)
    ids = batch.history.record_ids()  # (T,) bank rows
    dt, dpos = batch.history.dt.values().float(), batch.history.order_gaps()  # (T,) days before the query, order gap
    if len(ids) != len(recs):
        raise RuntimeError(f"history has {len(recs)} records but the batch carries {len(ids)}")

    _, _, alpha = model.tower(batch.users, batch.history, batch.q, batch.extra_records)  # (T,) what the model used
    bank = model.tower.bank_vectors()
    if batch.extra_records is not None:
        bank = torch.cat([bank, batch.extra_records])
    h = bank[ids]  # (T, d)
    din = pool.scorer(batch.q.expand(len(ids), -1), h).float() if len(ids) else torch.zeros(0)  # (T,)
    pen_t, pen_o = pool.time_penalty(dt).float(), pool.order_penalty(dpos).float()  # (T,) as the pooling applies them
    content = pool.content(batch.q.expand(len(ids), -1), h) if len(ids) else None  # (T,) or None: off
    content = torch.zeros(len(ids)) if content is None else content.detach().float()
    score = din - pen_t - pen_o + content  # (T,)
    check = float((torch.softmax(score, 0) - alpha.float()).abs().max()) if len(ids) else 0.0

    labels = list(server.task.labels)
    with_p = server.label_distribution(model, batch, server.cold_row)[0]  # (n_labels,)
    bare = TapperModel(model.lm, None, None, prefix_layer=model.prefix_layer, trunk=model.trunk)
    without_p = server.label_distribution(bare, batch)[0]
    numeric = all(x.isdigit() for x in labels)

    def dist(p: torch.Tensor) -> dict:
        out = {"probs": {lab: float(x) for lab, x in zip(labels, p)}, "pred": labels[int(p.argmax())]}
        if numeric:
            out["expected"] = float(p @ torch.tensor([float(x) for x in labels]))
        return out

    out_field = server.task.output_field
    records = [{"record_id": r.id, "text": server.task.record_text(r.fields), "label": r.fields.get(out_field),
                "date": None if r.date is None else format_date(r.date), "days_before_query": float(dt[j]),
                "position_gap": float(dpos[j]), "din_score": float(din[j]), "time_penalty": float(pen_t[j]),
                "order_penalty": float(pen_o[j]), "content_score": float(content[j]), "score": float(score[j]), "alpha": float(alpha[j])}
               for j, r in enumerate(recs)]
    order = sorted(range(len(records)), key=lambda j: -records[j]["alpha"])
    max_days = max([1.0, *(float(x) for x in dt)])
    days = [max_days * i / (curve_points - 1) for i in range(curve_points)]
    gaps = list(range(1, max(2, len(records)) + 1))
    ent = -sum(a * math.log(a) for a in (r["alpha"] for r in records) if a > 0)
    query_day = _day(query.date, "date")  # as the pooling used it: the given date, else the last record's
    if query_day is None:
        dated = [r.date for r in recs if r.date is not None]
        query_day = dated[-1] if dated else None
    return {
        "model_dir": str(server.model_dir),
        "user_id": user_id,
        "question": question,
        "query_date": None if query_day is None else format_date(query_day),
        "served_by": "pu+pq" if not batch.cold[0] else f"pq_only({server.cold_start})",
        "n_history": len(records),
        "lambda_t": lam_t,
        "lambda_o": lam_o,
        "time_bias": pool.cfg.time_bias,
        "order_bias": pool.cfg.order_bias,
        "formula": "score = din - lambda_t*log(1+days_before_query) - lambda_o*log(1+position_gap)"
                   + (" - lambda_w*softplus(position_gap - window_width)" if pool.windowed else "")
                   + (" + beta*cos(q - mu_q, h - mu_h)" if pool.cfg.content_beta is not None else "")
                   + "; alpha = softmax(score)",
        **({"beta": float(pool.beta)} if pool.cfg.content_beta is not None else {}),
        **({"lambda_w": float(pool.window_lambda), "window_width": float(pool.window_width)} if pool.windowed else {}),
        "alpha_check_max_abs": check,
        "alpha_entropy": ent,
        "effective_records": math.exp(ent) if records else 0.0,
        "records": records,
        "top": order[:top_k],
        "penalty_curves": {
            "days": days, "time_penalty": pool.time_penalty(torch.tensor(days, dtype=torch.float64)).tolist(),
            "position_gap": [float(g) for g in gaps],
            "order_penalty": pool.order_penalty(torch.tensor(gaps, dtype=torch.float64)).tolist(),
        },
        "answer": {"labels": labels, "with_prefix": dist(with_p), "without_prefix": dist(without_p),
                   "without_prefix_is": "the same LM (bridge LoRA included) given no soft tokens"},
    }


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_explain(data: dict, path: str | Path, title_note: str = "") -> Path:
    """The four panels of ``explain``'s data as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = data["records"]
    days = [r["days_before_query"] for r in recs]
    alpha = [r["alpha"] for r in recs]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0, 0]
    ax.scatter(days, alpha, s=14, c=[r["position_gap"] for r in recs], cmap="viridis")
    for k, j in enumerate(data["top"]):  # labels stacked in the lower left, an arrow to each record
        r = recs[j]
        ax.annotate(f"{k + 1}. {_short(r['text'])}", (r["days_before_query"], r["alpha"]), fontsize=7,
                    xytext=(0.03, 0.30 - 0.06 * k), textcoords="axes fraction",
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"})
    if max(days, default=0.0) > 10.0:
        ax.set_xscale("symlog", linthresh=1.0)  # linear up to a day, log past it
    ax.set_xlabel("days before the query")
    ax.set_ylabel("attention weight alpha")
    ax.set_title(f"attention over {len(recs)} records (colour: position gap; top {len(data['top'])} labelled)")
    if recs:
        ax.axhline(1.0 / len(recs), color="grey", lw=0.8, ls=":", label="uniform 1/N")
        ax.legend(fontsize=8)

    ax = axes[0, 1]
    x = [r["position_gap"] for r in recs]
    ax.scatter(x, [r["din_score"] for r in recs], s=10, marker="o", facecolors="none", edgecolors="C0",
               label="DIN score (before penalties)")
    ax.scatter(x, [r["score"] for r in recs], s=10, marker="x", color="C3", label="after time + order penalties")
    ax.set_xscale("log")
    ax.set_xlabel("position gap (most recent = 1)")
    ax.set_ylabel("score")
    ax.set_title("DIN score before and after the penalties")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    c = data["penalty_curves"]
    ax.plot(c["days"], c["time_penalty"], color="C0", label=f"λ_t·log(1+Δdays), λ_t={data['lambda_t']:.4g}")
    ax.set_xlabel("Δdays", color="C0")
    ax.set_ylabel("penalty subtracted from the score")
    top = ax.twiny()
    top.plot(c["position_gap"], c["order_penalty"], color="C1", label=f"λ_o·log(1+Δpos), λ_o={data['lambda_o']:.4g}"
             + (f" + λ_w·softplus(Δpos−w), λ_w={data['lambda_w']:.3g}, w={data['window_width']:.3g}"
                if "lambda_w" in data else ""))
    top.set_xlabel("Δpos", color="C1")
    lines = ax.get_lines() + top.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="best")
    ax.set_title("learned penalty curves")

    ax = axes[1, 1]
    ans = data["answer"]
    labels = ans["labels"]
    xs = range(len(labels))
    w = 0.4
    ax.bar([i - w / 2 for i in xs], [ans["with_prefix"]["probs"][lab] for lab in labels], w, label="with prefix")
    ax.bar([i + w / 2 for i in xs], [ans["without_prefix"]["probs"][lab] for lab in labels], w,
           label="without prefix")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("probability")
    ax.set_title(f"answer: {ans['with_prefix']['pred']} with the prefix, {ans['without_prefix']['pred']} without")
    ax.legend(fontsize=8)
    fig.suptitle(f"user {data['user_id']} ({data['served_by']}), query date {data['query_date']}: "
                 f"{_short(data['question'], 90)}{title_note}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_explain(cfg: ExplainConfig) -> tuple[Path, Path]:
    """Load the model, explain one query, write ``<out>.json`` and ``<out>.png``."""
    from recsys_tapper.data import parse_date
    from recsys_tapper.data.dates import DateParseError
    from recsys_tapper.errors import InputError

    try:
        day = parse_date(cfg.date)
    except DateParseError as e:
        raise InputError(f"date: {e}") from None
    server = Server(cfg.model_dir, cold_start=cfg.cold_start, allow_fingerprint_mismatch=cfg.allow_fingerprint_mismatch)
    try:
        data = explain(server, str(cfg.user), cfg.question, date=day, top_k=cfg.top_k)
    except ValueError as e:
        raise InputError(str(e)) from None
    out = Path(cfg.out)
    if out.suffix in (".png", ".json"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out.with_suffix(".json"), out.with_suffix(".png")
    jpath.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    plot_explain(data, ppath)
    return jpath, ppath
