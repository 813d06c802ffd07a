"""The ``edgemeta`` console script: Ctrl-C while the CLI is still importing ends in one line.

Importing the CLI (typer, rich, numpy, onnxruntime, the command modules) takes a few tenths
of a second; a Ctrl-C then would print a KeyboardInterrupt traceback, since the CLI's own
error boundary is not yet in place. This module imports nothing heavy itself, and from the
moment it is imported a Ctrl-C is held until :func:`main` can turn it into one line.
"""

from __future__ import annotations

import os
import signal
import sys

_interrupts: list[int] = []
_armed = False
_importing = False


def _on_sigint(signum: int, frame: object) -> None:
    _interrupts.append(signum)
    if _importing:
        # nothing is written while the CLI imports; raising here could land in one of importlib's
        # callbacks, where Python prints "Exception ignored" with a traceback instead: leave at once
        os.write(2, b"error: interrupted\n")
        os._exit(130)
    if _armed:  # inside main's error boundary: interrupt whatever runs
        raise KeyboardInterrupt
    # before it (between this import and main's first line): held, and raised by main


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # only where Python's own handler is in place
    signal.signal(signal.SIGINT, _on_sigint)


def main() -> None:
    """Import the CLI and run it; an interrupt during the imports (or outside a command) exits 130 with one line."""
    global _armed, _importing
    try:
        _armed = True
        if _interrupts:
            raise KeyboardInterrupt
        _importing = True
        try:
            from edgemeta.cli import main as cli_main
        finally:
            _importing = False

        cli_main()  # its commands catch an interrupt themselves; this catches one between them
    except KeyboardInterrupt:
        _armed = False  # a second Ctrl-C while saying so is held, not a traceback
        _say_interrupted()
    except ImportError:
        _armed = False
        # an interrupt inside a compiled module's initialisation (onnxruntime's) surfaces as
        # "ImportError: initialization failed"
        if not _interrupts:
            raise
        _say_interrupted()
    finally:
        _armed = False  # the command is over: a Ctrl-C during the interpreter's shutdown is held


def _say_interrupted() -> None:
    app_module = sys.modules.get("edgemeta.cli._app")  # not imported here: the interrupt may have stopped its import
    if not getattr(app_module, "_told_interrupted", False):
        sys.stderr.write("error: interrupted\n")
    sys.exit(130)
