"""The typer app object and the error boundary shared by every command module."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import typer
from rich.console import Console

from edgemeta.runtime.errors import EdgemetaError

app = typer.Typer(
    name="edgemeta",
    help="Few-shot image recognition from PyTorch meta-training to ONNX Runtime on the edge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console(stderr=True)
out = Console(soft_wrap=True)  # one line per result, even when piped


def emit_json(obj: Any) -> None:
    """Print one JSON document to stdout (for ``--json``)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def fail(message: str) -> None:
    """Print a one-line reason to stderr and exit 1."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    raise typer.Exit(1)


def command(*args: Any, target: typer.Typer | None = None, **kwargs: Any):
    """``app.command`` (or ``target.command`` for a sub-app) that turns an
    :class:`EdgemetaError` into one line on stderr and exit 1."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except EdgemetaError as e:
                fail(str(e))
            except KeyboardInterrupt:
                sys.stderr.write("error: interrupted\n")
                raise typer.Exit(130) from None

        return (target or app).command(*args, **kwargs)(wrapper)

    return decorate


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings as one ``warning: ...`` line on stderr (a provider fallback, say), not Python's two-line form."""
    (file or sys.stderr).write(f"warning: {' '.join(str(message).split())}\n")


def main() -> None:
    """Console entry point."""
    import warnings

    warnings.showwarning = _show_warning
    app(prog_name="edgemeta")
