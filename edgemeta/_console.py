"""The ``edgemeta`` console script: Ctrl-C while the CLI is still importing ends in one line.

Importing the CLI (typer, rich, numpy, the command modules) takes a few tenths of a
second; a Ctrl-C then would print a KeyboardInterrupt traceback, since the CLI's own
error boundary is not yet in place. This module imports nothing heavy itself.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Import the CLI and run it; an interrupt during the imports (or outside a command) exits 130 with one line."""
    interrupted = []

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        from edgemeta.cli import main as cli_main

        cli_main()  # its commands catch an interrupt themselves; this catches one between them
    except KeyboardInterrupt:
        _say_interrupted()
    except ImportError:
        # an interrupt inside a compiled module's initialisation (onnxruntime's) surfaces as
        # "ImportError: initialization failed"
        if not interrupted:
            raise
        _say_interrupted()


def _say_interrupted() -> None:
    app_module = sys.modules.get("edgemeta.cli._app")  # not imported here: the interrupt may have stopped its import
    if not getattr(app_module, "_told_interrupted", False):
        sys.stderr.write("error: interrupted\n")
    sys.exit(130)
