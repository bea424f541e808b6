"""The ``tapper`` command: ``tapper <command> [hydra overrides]``.

    tapper demo                                    # == make demo
    tapper demo model=tiny trainer=smoke data.n_users=5 out_dir=runs/smoke
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


COMMANDS = {"demo": ("demo", _demo)}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    name, fn = COMMANDS[argv[0]]
    register()
    sys.argv = [f"tapper {argv[0]}", *argv[1:]]
    hydra.main(config_path=CONFIG_DIR, config_name=name, version_base="1.3")(fn)()
