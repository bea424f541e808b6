"""The ``tapper`` command: ``tapper <command> [hydra overrides]``.

    tapper demo                                    # == make demo
    tapper demo model=tiny trainer=smoke data.n_users=5 out_dir=runs/smoke
    tapper export model_dir=runs/demo/model out=exports/demo dtype=fp32     # fp16 | int8
    tapper import export_dir=exports/demo model_dir=runs/demo/model
    tapper update model_dir=runs/demo/model events=new.parquet [strict=false]
    tapper benchmark ml100k [methods=[tapper,oppu]] [per_user=2]       # every method, side by side
    tapper params [--hidden 576 --layers 30 ... | --model-dir DIR | --paper] --users 1000   (argparse)
    torchrun --nproc_per_node=2 -m recsys_tapper.dist_train ...             # distributed Stage 2
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


def _benchmark(cfg: DictConfig) -> None:
    from recsys_tapper.benchmark import benchmark

    bcfg = OmegaConf.to_object(cfg)
    result = benchmark(bcfg, command="tapper benchmark " + " ".join(sys.argv[1:]))
    print((Path(bcfg.results_dir) / "ml100k.md").read_text())
    print(f"{len(result['methods'])} methods written to {bcfg.results_dir}/ml100k.json")


def _register_user_ops() -> None:
    from recsys_tapper.user_ops import register as register_user_ops

    register_user_ops()


COMMANDS = {"demo": ("demo", _demo), "export": ("export", _export), "import": ("import", _import),
            "update": ("update", _update), "benchmark": ("benchmark", _benchmark)}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "params":  # plain argparse: no training config involved
        from recsys_tapper.params import main as params_main

        sys.argv = ["tapper params", *argv[1:]]
        return params_main()
    if argv[:1] == ["benchmark"] and len(argv) > 1 and "=" not in argv[1]:
        argv = ["benchmark", f"target={argv[1]}", *argv[2:]]  # tapper benchmark ml100k -> target=ml100k
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        print("commands:", ", ".join([*COMMANDS, "params"]))
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    name, fn = COMMANDS[argv[0]]
    register()
    if name in ("export", "import", "update"):
        _register_user_ops()
    if name == "benchmark":
        from hydra.core.config_store import ConfigStore

        from recsys_tapper.benchmark import BenchmarkConfig

        ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)
    sys.argv = [f"tapper {argv[0]}", *argv[1:]]
    hydra.main(config_path=CONFIG_DIR, config_name=name, version_base="1.3")(fn)()
