"""The project's own errors: bad input the user can fix, reported as plain lines, not as a crash.

Every error a user causes by what they pass (a file, a record, a field, a config value) is an
:class:`InputError`, or one of the few types from packages that may not import ``recsys_tapper``
(``embeddings.export.ExportError``). The CLI prints their message on stderr and exits with
``EXIT_BAD_INPUT``; any other exception is a bug and keeps its traceback::

    $ tapper update model_dir=runs/demo/model events=new.parquet
    tapper update: error: new.parquet: row 3: record ('u1', 'r7') is already in the model (records are immutable)
    (run with --debug or TAPPER_DEBUG=1 for the traceback)
    $ echo $?
    2

This module imports nothing heavy (no torch): ``tapper --help`` reads it.
"""

from __future__ import annotations

import os
import sys

EXIT_BAD_INPUT = 2
DEBUG_ENV = "TAPPER_DEBUG"

# (module, class) of input errors defined where recsys_tapper may not be imported (embeddings/ is below it).
_FOREIGN = (("embeddings.export", "ExportError"),)


class InputError(ValueError):
    """Bad input the user can fix; the message names the file, record and field (or the config key)."""


def input_error_types() -> tuple[type[BaseException], ...]:
    """:class:`InputError` and the foreign input-error types whose modules are imported (an exception of a
    type whose module was never imported cannot have been raised)."""
    foreign = [getattr(sys.modules[m], name, None) for m, name in _FOREIGN if m in sys.modules]
    return (InputError, *[t for t in foreign if isinstance(t, type)])


def is_input_error(err: BaseException) -> bool:
    return isinstance(err, input_error_types())


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``(debug, argv without --debug)``: ``--debug`` anywhere in argv or ``TAPPER_DEBUG`` set to a true value."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or "--debug" in argv, [a for a in argv if a != "--debug"]


def report(prog: str, err: BaseException, file=None) -> None:
    """Print ``err`` as a few plain lines on stderr: ``<prog>: error: <message>`` and how to see the traceback."""
    file = file or sys.stderr
    message = str(err).strip() or type(err).__name__
    lines = message.splitlines()
    print(f"{prog}: error: {lines[0]}", *lines[1:], sep="\n", file=file)
    print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=file)
