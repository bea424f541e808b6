"""Run one Hydra-configured command: compose its config, write its run files, report bad input plainly.

``execute`` is what ``@hydra.main`` did for us, minus the parts that made a bad input look like a crash::

    code = execute("tapper demo", "demo", ["model=tiny", "out_dir=runs/x"], task_fn, register=register)

1. Compose ``configs/<config_name>.yaml`` with the overrides (Hydra's compose API; the schema in the
   ConfigStore rejects a mistyped key or a wrong type) and convert it to its dataclass (a missing ``???``
   value fails here). ``check`` then looks at the values (``recsys_tapper.checks``).
2. Run files: when the config has an ``out_dir`` and ``run_files`` is true, ``out_dir/.hydra/config.yaml``
   (the composed config) and ``out_dir/.hydra/overrides.yaml`` are written before the task runs, as Hydra
   would. No log file: the log goes to stdout.
3. ``task_fn(cfg)`` runs on the composed DictConfig.

On bad input (config errors, :class:`~recsys_tapper.errors.InputError` and the other input-error types)
the out dir is put back as it was: removed if this command created it, else the run files restored. The
message goes to stderr as a few plain lines and the exit code is 2. ``debug=True`` (``--debug`` or
``TAPPER_DEBUG=1``) re-raises instead, so the traceback shows. Any other exception propagates with its
traceback and leaves the run files in place for the post-mortem.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from recsys_tapper.errors import EXIT_BAD_INPUT, InputError, is_input_error, report

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format


def compose_config(config_name: str, overrides: list[str]):
    """The composed DictConfig; Hydra and OmegaConf errors become an :class:`InputError` naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise InputError(_config_message(e)) from e


def to_object(cfg):
    """The config's dataclass instance; a missing mandatory value (``???``) becomes an :class:`InputError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise InputError(_config_message(e)) from e


_DETAIL = re.compile(r"\s*(full_key|reference_type|object_type)[:=]|To append to your config use \+")


def _config_message(e: BaseException) -> str:
    """Hydra's message and its OmegaConf cause, without OmegaConf's detail lines, Hydra's ``+key`` hint (the
    schema refuses new keys anyway) and search path; an option list on one line."""
    lines: list[str] = []
    for err in (e, e.__cause__ or e.__context__):
        for line in str(err or "").strip().splitlines():
            if line.startswith("Config search path"):
                break
            if line.startswith("\t") and lines and lines[-1].endswith((":", ",")):  # an option list: one line
                lines[-1] += (" " if lines[-1].endswith(":") else "") + line.strip() + ","
            elif line.strip() and not _DETAIL.match(line) and line not in lines:
                lines.append(line)
    return "config: " + "\n".join(x.rstrip(",") for x in lines or [type(e).__name__])


class RunFiles:
    """Hydra-style run files under ``out_dir``, undone if the run fails on bad input.

    ``undo()`` leaves ``out_dir`` exactly as it was before ``write()``: the topmost directory that ``write``
    created is removed with everything in it (all of it came from this run), an existing one gets its
    earlier run files back (or loses the new ones).
    """

    def __init__(self, out_dir: str | Path, files: dict[str, str]):
        self.out = Path(out_dir)
        self.files = files  # path relative to out_dir -> text
        self.created: Path | None = None
        self.old: dict[str, bytes | None] = {}

    def write(self) -> None:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.created = missing[-1] if missing else None
        for rel, text in self.files.items():
            path = self.out / rel
            self.old[rel] = path.read_bytes() if path.is_file() else None
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def undo(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for rel, old in self.old.items():
            path = self.out / rel
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)
        for d in {(self.out / rel).parent for rel in self.old if self.old[rel] is None}:
            if d != self.out and d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def run_files(cfg, overrides: list[str]) -> RunFiles | None:
    """``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` for a config with an ``out_dir``, else None."""
    from omegaconf import OmegaConf

    if "out_dir" not in cfg or not cfg.out_dir:
        return None
    return RunFiles(cfg.out_dir, {".hydra/config.yaml": OmegaConf.to_yaml(cfg),
                                  ".hydra/overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(overrides)))})


def execute(prog: str, config_name: str, overrides: list[str], task_fn: Callable, *,
            register: Callable[[], None] | None = None, check: Callable | None = None, debug: bool = False,
            write_run_files: bool = True, log_level: int = logging.INFO) -> int:
    """Compose, check, write run files, run ``task_fn``; returns the exit code (0, or 2 for bad input).

    Args:
        prog: the name in messages (``tapper demo``).
        config_name: ``configs/<config_name>.yaml``.
        overrides: Hydra overrides (``key=value``, ``group=option``).
        task_fn: called with the composed DictConfig.
        register: stores the command's schema in Hydra's ConfigStore.
        check: called with the config's dataclass before anything is written; raises InputError.
        debug: re-raise bad-input errors (traceback) instead of reporting them.
        write_run_files: False on ranks other than 0 (one run directory, written once).
        log_level: root logging level (INFO as under Hydra; WARNING on ranks other than 0).
    """
    files = None
    try:
        if register is not None:
            register()
        cfg = compose_config(config_name, overrides)
        obj = to_object(cfg)
        if check is not None:
            check(obj)
        logging.basicConfig(level=log_level, format=LOG_FORMAT, stream=sys.stdout)
        files = run_files(cfg, overrides) if write_run_files else None
        if files is not None:
            files.write()
        task_fn(cfg)
        return 0
    except Exception as e:
        if not is_input_error(e):
            raise
        if files is not None:
            files.undo()
        if debug:
            raise
        report(prog, e)
        return EXIT_BAD_INPUT
