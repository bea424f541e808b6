"""Render ``tapper benchmark drift`` results: drift.md (a table per task) and drift.png (metric vs fraction)."""

from __future__ import annotations

from pathlib import Path

from recsys_tapper.io import atomic_write_text

METRIC_NAMES = {"accuracy": "accuracy", "mae": "MAE", "rougeL": "ROUGE-L"}
SECOND = {"accuracy": ("f1", "F1"), "mae": ("rmse", "RMSE"), "rougeL": ("rouge1", "ROUGE-1")}


def _fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _grid(result: dict) -> dict:
    """task -> method -> fraction -> row; tasks and methods in the order of the last run's config (others after)."""
    grid: dict = {}
    for row in result["rows"].values():
        grid.setdefault(row["task"], {}).setdefault(row["method"], {})[row["drift_frac"]] = row

    def order(first: list, seen) -> list:
        return [x for x in first if x in seen] + [x for x in seen if x not in first]

    return {t: {m: dict(sorted(grid[t][m].items())) for m in order(result.get("methods", []), grid[t])}
            for t in order(result.get("tasks", []), grid)}


def _metric(methods: dict) -> tuple[str, bool]:
    """(the task's headline metric, higher is better), as its rows record them."""
    row = next(iter(next(iter(methods.values())).values()))
    return row["metric"], row["higher_is_better"]


def write_drift_report(result: dict, out_dir: Path) -> None:
    write_drift_markdown(result, out_dir / "drift.md")
    if result["rows"]:
        write_drift_plot(result, out_dir / "drift.png")


def _sha(meta: dict) -> str:
    """A row's or a table's commit as the report shows it: ``abc1234``, with `` (dirty)`` for an unclean tree."""
    return f"{(meta.get('git_sha') or '–')[:7]}{' (dirty)' if meta.get('dirty') else ''}"


def _rows_by_commit(result: dict) -> list[str]:
    """A line naming which rows each commit computed, when they come from more than one (a table resumed after
    a change that reran some rows); nothing otherwise."""
    by: dict[str, dict[str, list[str]]] = {}
    for r in result["rows"].values():
        by.setdefault(_sha(r), {}).setdefault(f"{r['task']} {r['method']}", []).append(f"{r['drift_frac']:g}")
    if len(by) <= 1:
        return []
    parts = [f"git `{sha}`: " + ", ".join(f"{row} (f = {'/'.join(sorted(fs, key=float))})" for row, fs in rows.items())
             for sha, rows in by.items()]
    return ["Rows by commit: " + "; ".join(parts) + ".", ""]


def write_drift_markdown(result: dict, path: Path) -> None:
    s = result.get("settings", {})
    lines = [
        "# Synthetic drift: each method's metric against the fraction f of the profile after the drift point", "",
        (f"{'Command' if len(result.get('runs') or []) <= 1 else 'Last saved by'}: `{result.get('command')}` · git "
         f"`{_sha(result)}` · {result.get('date')} · backbone `{s.get('backbone')}`"), "",
        (f"{s.get('n_users')} users per task and fraction, {s.get('n_records')} profile records and {s.get('n_test')} "
        f"test quer{'y' if s.get('n_test') == 1 else 'ies'} each; the last f of every profile and the test queries "
        "follow the new rule (smaller f: a more recent drift). Stage 1: "
        f"{s.get('stage1_examples')} examples of {s.get('stage1_users')} other users, no drift."), "",
        *(["Runs that wrote this table: " + "; ".join(f"`{r['command']}` (git {(r.get('git_sha') or '–')[:7]}, "
                                                      f"{r['date']})" for r in result["runs"]), ""]
          if result.get("runs") else []),
        *_rows_by_commit(result),
    ]
    for task, methods in _grid(result).items():
        metric, higher = _metric(methods)
        second, second_name = SECOND[metric]
        fracs = sorted({f for rows in methods.values() for f in rows})
        layout = next(iter(next(iter(methods.values())).values()))["layout"]
        lines += [(f"## {task} (SYNTHETIC {layout}): {METRIC_NAMES[metric]}, {'higher' if higher else 'lower'} "
                  f"is better ({second_name} in brackets)"), "",
                  "| method | " + " | ".join(f"f = {f:g}" for f in fracs) + " |",
                  "|---|" + "---|" * len(fracs)]
        for name, rows in methods.items():
            cells = [f"{_fmt(rows[f].get(metric))} ({_fmt(rows[f].get(second))})" if f in rows else "–" for f in fracs]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if metric == "accuracy":
            lines += ["", "Answers outside the label set: " + "; ".join(
                f"{name} {max(r.get('out_of_label_set_frac') or 0.0 for r in rows.values()):.3f}"
                for name, rows in methods.items()) + " (the largest over f)."]
        lam = [(name, f, r) for name, rows in methods.items() for f, r in rows.items() if "lambda_t" in r]
        if lam:
            lines += ["", "| row | f | λ_t start → end | λ_o start → end | biases on | Stage-2 targets | train s |",
                      "|---|---|---|---|---|---|---|"]
            for name, f, r in lam:
                on = "yes" if r.get("time_bias") or r.get("order_bias") else "no (λ unused)"
                if "lambda_w" in r:  # the soft recency window (model.pooling.window)
                    on += (f"; window λ_w {_fmt(r.get('lambda_w_start'))} → {_fmt(r['lambda_w'])}, "
                           f"w {_fmt(r.get('window_width_start'))} → {_fmt(r['window_width'])}")
                if "beta" in r:  # the pooling's content term (model.pooling.content_beta)
                    on += f"; content β {_fmt(r.get('beta_start'))} → {_fmt(r['beta'])}"
                if "attention_after_drift" in r:  # P_q's attention share on the post-drift records
                    on += f"; attention after the drift {_fmt(r['attention_after_drift'])}"
                lines.append(f"| {name} | {f:g} | {_fmt(r.get('lambda_t_start'))} → {_fmt(r['lambda_t'])} | "
                             f"{_fmt(r.get('lambda_o_start'))} → {_fmt(r['lambda_o'])} | {on} | "
                             f"{r.get('n_stage2_examples')} | {_fmt(r.get('train_s'), '.0f')} |")
        lines.append("")
    est = result.get("estimate_s") or {}
    if est:
        lines.append("Estimated SmolLM2 wall time of the command's settings on 2 CPU cores (printed at start): "
                     + ", ".join(f"{t} {v / 60:.1f} min" for t, v in est.items()) + ".")
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_drift_plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = drift_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def drift_figure(result: dict):
    """One panel per task: each method's metric against the drift fraction, each panel with its own legend
    (the tasks' methods differ: rating has ``tapper_no_content``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _grid(result)
    fig, axes = plt.subplots(1, len(grid), figsize=(4.6 * len(grid), 4), squeeze=False)
    styles = {"tapper": ("#d62728", "o", "-"), "tapper_no_time": ("#ff7f0e", "s", "--"),
              "non_personalized": ("#7f7f7f", "^", ":"), "rag_recency_k4": ("#1f77b4", "D", "-."),
              "tapper_no_label_weight": ("#9467bd", "v", "--"), "tapper_random_lambda": ("#8c564b", "P", "--"),
              "tapper_no_content": ("#2ca02c", "X", "--")}
    for ax, (task, methods) in zip(axes[0], grid.items()):
        metric, higher = _metric(methods)
        for name, rows in methods.items():
            color, marker, ls = styles.get(name, ("black", "x", "-"))
            fracs = list(rows)
            ax.plot(fracs, [rows[f].get(metric) for f in fracs], color=color, marker=marker, ls=ls, label=name)
        ax.invert_xaxis()  # left to right: the drift gets more recent
        ax.set_xlabel("fraction of the profile after the drift point")
        ax.set_ylabel(f"{METRIC_NAMES[metric]} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Synthetic drift: as the drift gets more recent (right), old records mislead", fontsize=10)
    fig.tight_layout()
    return fig
