"""The ``tapper`` command: ``tapper <command> [key=value ...] [--debug]``.

    tapper demo                                    # == make demo
    tapper demo model=tiny trainer=smoke data.n_users=5 out_dir=runs/smoke
    tapper evaluate model_dir=runs/demo/model data=lamp data.dir=/path/to/LaMP_3 [data.split=dev] [out_dir=...]
    tapper export model_dir=runs/demo/model out=exports/demo dtype=fp32     # fp16 | int8
    tapper import export_dir=exports/demo model_dir=runs/demo/model
    tapper update model_dir=runs/demo/model events=new.parquet [strict=false]
    tapper serve model_dir=runs/demo/model host=127.0.0.1 port=8000 [max_batch=16 max_wait_ms=5]   # HTTP
    tapper explain model_dir=runs/demo/model user=405 question="..." [out=explain]   # -> explain.{png,json}
    tapper benchmark ml100k [methods=[tapper,oppu]] [per_user=2]       # every method, side by side
    tapper benchmark drift [tasks=[tagging] fractions=[0.1,0.5]]         # metric vs drift recency (synthetic)
    tapper params [--hidden 576 --layers 30 ... | --model-dir DIR | --paper] --users 1000   (argparse)
    tapper <command> --help                        # that command's options
    torchrun --nproc_per_node=2 -m recsys_tapper.dist_train ...             # distributed Stage 2
    python -m recsys_tapper demo ...

Each command composes its Hydra config (configs/<command>.yaml) and calls an importable function
(``recsys_tapper.job.run``, ...) through ``recsys_tapper.runner.execute``. Bad input (a file, record,
field or config value) prints a few plain lines on stderr and exits 2; ``--debug`` or ``TAPPER_DEBUG=1``
shows the traceback. This module imports nothing heavy, so ``tapper --help`` is quick.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recsys_tapper.errors import EXIT_BAD_INPUT, debug_requested
from recsys_tapper.runner import CONFIG_DIR, execute

__all__ = ["COMMANDS", "CONFIG_DIR", "main"]


def _demo(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.job import run
    from recsys_tapper.pipeline import format_table

    run_cfg = OmegaConf.to_object(cfg)
    if run_cfg.expected_duration and len(sys.argv) == 1:  # `make demo`: the measured duration of these settings
        print(f"tapper demo: expected duration {run_cfg.expected_duration}", flush=True)
    result = run(run_cfg)
    print(format_table(result))
    print(f"wrote {Path(run_cfg.out_dir) / 'metrics.json'}")


def _evaluate(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.evaluate_saved import evaluate_saved, summary

    ecfg = OmegaConf.to_object(cfg)
    result = evaluate_saved(ecfg, command="tapper evaluate " + " ".join(sys.argv[1:]))
    print(summary(result))
    print(f"wrote {Path(ecfg.out_dir) / 'metrics.json'}")


def _export(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.user_ops import run_export

    manifest = run_export(OmegaConf.to_object(cfg))
    q = manifest["quantization"]
    err = f", max abs error {q['max_abs']:.3g} (bound {q['max_abs_bound']:.3g}), rms {q['rms']:.3g}" if q else ""
    print(f"exported {manifest['num_users']} users x {manifest['dim']} ({manifest['dtype']}{err}) to {cfg.out}")


def _import(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.user_ops import run_import

    report = run_import(OmegaConf.to_object(cfg))
    print(f"imported into {cfg.model_dir}: {report}")


def _update(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.user_ops import run_update

    r = run_update(OmegaConf.to_object(cfg))
    print(f"{r['n_kept']} events applied ({r['n_skipped']} skipped), {len(r['new_users'])} new users, "
          f"{r['affected_users']} rows fine-tuned in {r['timings_s'].get('total', 0.0):.1f} s")
    for line in r["problems"][:20]:
        print("  skipped:", line)


def _benchmark(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.benchmark import benchmark

    bcfg = OmegaConf.to_object(cfg)
    result = benchmark(bcfg, command="tapper benchmark " + " ".join(sys.argv[1:]))
    print((Path(bcfg.results_dir) / "ml100k.md").read_text())
    print(f"{len(result['methods'])} methods written to {bcfg.results_dir}/ml100k.json")


def _benchmark_drift(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.drift_benchmark import benchmark_drift

    dcfg = OmegaConf.to_object(cfg)
    result = benchmark_drift(dcfg, command="tapper benchmark drift " + " ".join(sys.argv[1:]))
    print((Path(dcfg.results_dir) / "drift.md").read_text())
    print(f"{len(result['rows'])} rows written to {dcfg.results_dir}/drift.json")


def _register_drift() -> None:
    from recsys_tapper.drift_benchmark import register_drift

    register_drift()


def _check_drift(cfg) -> None:
    from recsys_tapper.drift_benchmark import check_drift_config

    check_drift_config(cfg)
    _check_run(cfg)


def _serve(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.http_service import serve

    serve(OmegaConf.to_object(cfg))


def _explain(cfg) -> None:
    from omegaconf import OmegaConf

    from recsys_tapper.explain import run_explain

    jpath, ppath = run_explain(OmegaConf.to_object(cfg))
    print(f"wrote {ppath} and {jpath}")


def _register_serve() -> None:
    from recsys_tapper.http_service import register

    register()


def _register_explain() -> None:
    from recsys_tapper.explain import register

    register()


def _register_run() -> None:
    from recsys_tapper.config import register

    register()


def _register_user_ops() -> None:
    from recsys_tapper.user_ops import register

    register()


def _register_evaluate() -> None:
    from recsys_tapper.evaluate_saved import register

    register()


def _register_benchmark() -> None:
    from hydra.core.config_store import ConfigStore

    from recsys_tapper.benchmark import BenchmarkConfig

    _register_run()
    ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)


def _check_run(cfg) -> None:
    from recsys_tapper.checks import check_run_config

    check_run_config(cfg)


def _check_benchmark(cfg) -> None:
    from recsys_tapper.checks import check_benchmark_config

    check_benchmark_config(cfg)


def _check_evaluate(cfg) -> None:
    from recsys_tapper.checks import check_evaluate_config

    check_evaluate_config(cfg)


# name -> (config name, task function, schema registration, config check, one line of help)
COMMANDS = {
    "demo": ("demo", _demo, _register_run, _check_run,
             "Stage 1 + Stage 2 on a dataset, non-personalized vs TAP-PER; writes out_dir/metrics.json."),
    "evaluate": ("evaluate", _evaluate, _register_evaluate, _check_evaluate,
                 "Score a saved model on LaMP-format files, no training; writes out_dir/metrics.json."),
    "export": ("export", _export, _register_user_ops, None,
               "Export a saved model's user table (P_u rows) to parquet + safetensors."),
    "import": ("import", _import, _register_user_ops, None, "Import an export into a saved model's user table."),
    "update": ("update", _update, _register_user_ops, None,
               "Append new events to a saved model and fine-tune only the affected users' rows."),
    "benchmark": ("benchmark", _benchmark, _register_benchmark, _check_benchmark,
                  ("Every method side by side on a target (ml100k, or drift: see `tapper benchmark drift --help`); "
                  "writes results_dir/<target>.{json,md,png}.")),
    "serve": ("serve", _serve, _register_serve, None,
              "Serve a saved model over HTTP: batched answers, live events (durable log), users, explain, metrics."),
    "explain": ("explain", _explain, _register_explain, None,
                "What the time-aware attention read for one answer: writes <out>.png and <out>.json."),
}


# ``tapper benchmark <target>`` targets with a config of their own (the rest use configs/benchmark.yaml)
BENCHMARK_TARGETS = {
    "drift": ("benchmark_drift", _benchmark_drift, _register_drift, _check_drift,
              ("Each method's metric against the fraction of the profile after the drift point (SYNTHETIC tasks); "
              "writes results_dir/drift.{json,md,png}.")),
}


def _usage(file=None) -> None:
    print(__doc__, file=file)
    print("commands:", ", ".join([*COMMANDS, "params"]), file=file)


def command_help(name: str, spec: tuple | None = None) -> str:
    """One command's help: what it does, its options (the composed config) and the config groups it uses."""
    from omegaconf import OmegaConf

    from recsys_tapper.runner import compose_config

    config_name, _, register, _, summary = spec or COMMANDS[name]
    register()
    cfg = compose_config(config_name, [])
    groups = [f"  {k}: {', '.join(sorted(p.stem for p in (Path(CONFIG_DIR) / k).glob('*.yaml')))}"
              for k in cfg if (Path(CONFIG_DIR) / str(k)).is_dir()]
    lines = [f"usage: tapper {name} [key=value ...] [--debug]", "", summary, "",
             f"options (configs/{config_name}.yaml; override any key as key=value, nested as a.b=value):", "",
             OmegaConf.to_yaml(cfg).rstrip()]
    if groups:
        lines += ["", "config groups (choose one as group=option):", *groups]
    lines += ["", "--debug (or TAPPER_DEBUG=1): show the traceback of a bad-input error"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``tapper <command> ...``; exits 2 on bad input (see ``recsys_tapper.errors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "params":  # plain argparse: no training config involved
        from recsys_tapper.params import main as params_main

        sys.argv = ["tapper params", *argv[1:]]
        return params_main()
    debug, argv = debug_requested(argv)
    if not argv or argv[0] in ("-h", "--help"):
        _usage()
        raise SystemExit(0)
    if argv[0] not in COMMANDS:
        print(f"tapper: error: unknown command {argv[0]!r}", file=sys.stderr)
        _usage(sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    name, args = argv[0], argv[1:]
    spec = COMMANDS[name]
    if name == "benchmark" and args and args[0] in BENCHMARK_TARGETS:  # tapper benchmark drift: its own config
        spec, args = BENCHMARK_TARGETS[args[0]], args[1:]
        name = f"benchmark {spec[0].removeprefix('benchmark_')}"
    if "-h" in args or "--help" in args:
        print(command_help(name, spec))
        raise SystemExit(0)
    if name == "benchmark" and args and "=" not in args[0]:
        args = [f"target={args[0]}", *args[1:]]  # tapper benchmark ml100k -> target=ml100k
    flags = [a for a in args if a.startswith("-")]
    if flags:
        print(f"tapper {name}: error: unknown option {flags[0]!r} (options are key=value; see --help)",
              file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    config_name, fn, register, check, _ = spec
    sys.argv = [f"tapper {name}", *args]
    code = execute(f"tapper {name}", config_name, args, fn, register=register, check=check, debug=debug)
    if code:
        raise SystemExit(code)
