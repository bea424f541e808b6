"""The ``tapper`` command: ``tapper <command> [hydra overrides]``.

    tapper demo                                    # == make demo
    tapper demo model=tiny trainer=smoke data.n_users=5 out_dir=runs/smoke
    tapper export model_dir=runs/demo/model out=exports/demo dtype=fp32     # fp16 | int8
    tapper import export_dir=exports/demo model_dir=runs/demo/model
    tapper update model_dir=runs/demo/model events=new.parquet [strict=false]
    python -m recsys_tapper demo ...

Each command is a thin @hydra.main around an importable function (``recsys_tapper.pipeline.run``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from recsys_tapper.config import RunConfig, register

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def _demo(cfg: DictConfig) -> None:
    from recsys_tapper.pipeline import format_table, run

    run_cfg: RunConfig = OmegaConf.to_object(cfg)
    result = run(run_cfg)
    print(format_table(result))
    print(f"wrote {Path(run_cfg.out_dir) / 'metrics.json'}")


def _export(cfg: DictConfig) -> None:
    from recsys_tapper.user_ops import run_export

    manifest = run_export(OmegaConf.to_object(cfg))
    q = manifest["quantization"]
    err = f", max abs error {q['max_abs']:.3g} (bound {q['max_abs_bound']:.3g}), rms {q['rms']:.3g}" if q else ""
    print(f"exported {manifest['num_users']} users x {manifest['dim']} ({manifest['dtype']}{err}) to {cfg.out}")


def _import(cfg: DictConfig) -> None:
    from recsys_tapper.user_ops import run_import

    report = run_import(OmegaConf.to_object(cfg))
    print(f"imported into {cfg.model_dir}: {report}")


def _update(cfg: DictConfig) -> None:
    from recsys_tapper.user_ops import run_update

    r = run_update(OmegaConf.to_object(cfg))
    print(f"{r['n_kept']} events applied ({r['n_skipped']} skipped), {len(r['new_users'])} new users, "
          f"{r['affected_users']} rows fine-tuned in {r['timings_s'].get('total', 0.0):.1f} s")
    for line in r["problems"][:20]:
        print("  skipped:", line)


def _register_user_ops() -> None:
    from recsys_tapper.user_ops import register as register_user_ops

    register_user_ops()


COMMANDS = {"demo": ("demo", _demo), "export": ("export", _export), "import": ("import", _import),
            "update": ("update", _update)}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    name, fn = COMMANDS[argv[0]]
    register()
    if name in ("export", "import", "update"):
        _register_user_ops()
    sys.argv = [f"tapper {argv[0]}", *argv[1:]]
    hydra.main(config_path=CONFIG_DIR, config_name=name, version_base="1.3")(fn)()
