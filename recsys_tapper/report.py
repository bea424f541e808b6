"""Render benchmark results: a markdown table and a bar plot of MAE per method."""

from __future__ import annotations

from pathlib import Path

from recsys_tapper.io import atomic_write_text


def _fmt(x, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _short_sha(sha: str | None, dirty: bool | None = None) -> str:
    """``abc1234`` or ``abc1234+dirty``: ``dirty`` is run_meta's flag; older files marked it as a sha suffix."""
    if not sha:
        return "–"
    return sha[:7] + ("+dirty" if dirty or sha.endswith("+dirty") else "")


def _readouts(m: dict) -> str:
    if m.get("kind") != "llm":
        return "raw"
    fixed = ", fixed" if m.get("readout_chosen_on") == "fixed" else ""
    return f"{m.get('readout', 'argmax')} / {m.get('rmse_readout', m.get('readout', 'argmax'))}{fixed}"


def code_versions(methods: dict) -> str:
    """One line: how many code versions (``code_hash``) the rows ran, and which rows ran which."""
    groups: dict[str, list[str]] = {}
    for name, m in methods.items():
        groups.setdefault(m.get("code_hash") or "unrecorded", []).append(name)
    known = [h for h in groups if h != "unrecorded"]
    parts = [f"`{h[:12]}`: {', '.join(groups[h])}" for h in known]
    if "unrecorded" in groups:
        parts.append(f"not recorded (rows older than the hash): {', '.join(groups['unrecorded'])}")
    head = ("Every row ran one code version" if len(groups) == 1 and known else
            f"Rows ran {len(known)} recorded code version(s)")
    return f"{head} (code hash of the package, configs and pins; README, tests and results excluded): " + "; ".join(parts)


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# MovieLens-100K time split: {result.get('n_users')} users, {result.get('n_test_queries')} test queries"
        + ("" if result.get("complete") else " (PARTIAL: not every requested method has run yet)"),
        "",
        (f"Command: `{result.get('command')}` · git `{result.get('git_sha')}`{' (dirty)' if result.get('dirty') else ''} · "
        f"{result.get('date')} · "
        f"training capped at {result.get('train_examples_per_user')} examples per user, "
        f"{result.get('epochs')} epoch(s)"),
        "",
        *(["Runs that wrote this table: " + "; ".join(
            f"`{r['command']}` (git {_short_sha(r['git_sha'], r.get('dirty'))}, {r['date']})" for r in result["runs"]), ""]
          if result.get("runs") else []),
        code_versions(result["methods"]),
        "",
        ("| method | kind | MAE | RMSE | readout (MAE / RMSE) | MAE (E) | RMSE (E) | MAE rounded | unparsable | "
         "train targets/user | params/user | params, 1000 users | train s | eval s | git |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        lines.append(
            f"| {name} | {m.get('kind')} | {_fmt(m.get('mae'))} | {_fmt(m.get('rmse'))} | {_readouts(m)} | "
            f"{_fmt(m.get('mae_expected'))} | {_fmt(m.get('rmse_expected'))} | {_fmt(m.get('mae_rounded'))} | "
            f"{_fmt(m.get('unparsable_frac'), '.3f')} | {_fmt(m.get('train_examples_per_user'), '.1f')} | "
            f"{m.get('params_per_user', 0):,} | "
            f"{m.get('params_total_1000_users', 0):,} | {_fmt(m.get('train_s'), '.0f')} | {_fmt(m.get('eval_s'), '.0f')} | "
            f"{_short_sha(m.get('git_sha'), m.get('dirty'))} |"
        )
    lines += ["", ("MAE/RMSE: LLM methods read the label distribution by the readout named beside them (argmax: the "
              "answer; median: the MAE-optimal label; expected: the real-valued mean), chosen per metric on the dev "
              "queries, never on test ('fixed': not chosen: the median and the expectation for rows refit on the "
              "dev ratings (refit=true), argmax for rows without dev predictions); classical methods give "
              "a raw real-valued prediction. (E): the expectation over the label distribution; classical 'rounded' "
              "is the prediction rounded half up. "
              "git: the commit that made the row (a resumed run reuses a row only when every setting it depends "
              "on is unchanged; each row's settings are in ml100k.json); +dirty: uncommitted changes in the tree. "
              "OPPU trains and scores user by user: its train s includes its evaluation.")]
    carried = {n: m["carried_from"] for n, m in result["methods"].items() if m.get("carried_from")}
    if carried:
        lines += ["", "Carried from an earlier table (`benchmarks/carry_rows.py`): " + "; ".join(
            f"{n} (table at {c['git_sha'][:7]}; {c['check']})" for n, c in carried.items())]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    llm = {k: v for k, v in result["methods"].items() if v.get("kind") == "llm"}
    classical = {k: v for k, v in result["methods"].items() if v.get("kind") == "classical"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(llm)
    ax.bar(names, [llm[n]["mae"] for n in names], color=["#d62728" if n == "tapper" else "#1f77b4" for n in names])
    for i, n in enumerate(names):
        ax.text(i, llm[n]["mae"] + 0.01, f"{llm[n]['mae']:.3f}", ha="center", fontsize=8)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    for (n, m), ls in zip(classical.items(), styles):
        ax.axhline(m["mae"], ls=ls, color="gray", lw=1, label=f"{n} {m['mae']:.3f}")
    if classical:
        ax.legend(title="classical references", loc="upper left", fontsize=7, title_fontsize=7)
    ax.set_ylabel("MAE (lower is better)")
    ax.set_title(f"MovieLens-100K time split, {result.get('n_test_queries')} test queries"
                 + ("" if result.get("complete") else " (partial: not every method has run)"))
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
