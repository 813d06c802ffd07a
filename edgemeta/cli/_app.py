"""The typer app object and the error boundary shared by every command module."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand

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


_json_documents = 0  # printed by the running command: a failure after its report adds none


def emit_json(obj: Any) -> None:
    """Print one JSON document to stdout (for ``--json``)."""
    global _json_documents
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
    _json_documents += 1


def fail(message: str) -> None:
    """Print a one-line reason to stderr and exit 1."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    raise typer.Exit(1)


def _json_failure(e: EdgemetaError) -> None:
    """A failure as the JSON document a ``--json`` caller parses: ``ok`` false, the one-line
    error, and a failed verification's report when there is one."""
    doc: dict[str, Any] = {"ok": False, "error": " ".join(str(e).split())}
    report = getattr(e, "report", None)
    if report is not None and callable(getattr(report, "to_dict", None)):
        doc["report"] = report.to_dict()
    emit_json(doc)


# typer's rich help lays options out in a table that cuts long option names (--calibration-…)
# when the terminal is narrower than this; below it, click's plain help wraps and cuts nothing
RICH_HELP_MIN_COLUMNS = 100


class _Command(TyperCommand):
    """A typer command whose ``--help`` stays whole at any width: rich panels on a wide terminal,
    click's plain layout (every option name in full, the help wrapped beside it) on a narrow one."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if shutil.get_terminal_size().columns >= RICH_HELP_MIN_COLUMNS or self.rich_markup_mode is None:
            return super().format_help(ctx, formatter)
        mode, self.rich_markup_mode = self.rich_markup_mode, None
        try:
            return super().format_help(ctx, formatter)
        finally:
            self.rich_markup_mode = mode


def command(*args: Any, target: typer.Typer | None = None, **kwargs: Any):
    """``app.command`` (or ``target.command`` for a sub-app) that turns an
    :class:`EdgemetaError` into one line on stderr and exit 1; a command run with ``--json``
    also prints ``{"ok": false, "error": ...}`` on stdout, so its output is always JSON."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            global _json_documents
            _json_documents = 0
            try:
                return fn(*a, **k)
            except EdgemetaError as e:
                # stdout holds one JSON document: the report when it was printed before the
                # failure (a plot that could not be written), else the failure itself
                if k.get("json_out") and not _json_documents:
                    _json_failure(e)
                fail(str(e))
            except OSError as e:  # a write the library did not foresee (disk full, permissions)
                where = f"{e.filename}: " if e.filename else ""
                message = f"{where}{e.strerror or e}; check the path and the free space"
                if k.get("json_out") and not _json_documents:
                    emit_json({"ok": False, "error": message})
                fail(message)
            except KeyboardInterrupt:
                _interrupted()
                raise typer.Exit(130) from None

        kwargs.setdefault("cls", _Command)
        return (target or app).command(*args, **kwargs)(wrapper)

    return decorate


_told_interrupted = False


def _interrupted() -> None:
    """Say "interrupted" once, whichever layer caught the Ctrl-C first."""
    global _told_interrupted
    if not _told_interrupted:
        sys.stderr.write("error: interrupted\n")
        _told_interrupted = True


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Warnings as one ``warning: ...`` line on stderr (a provider fallback, say), not Python's two-line form."""
    (file or sys.stderr).write(f"warning: {' '.join(str(message).split())}\n")


def _usage_error(e: BaseException) -> str | None:
    """The one-line form of a command-line usage error (an unknown option, a value of the
    wrong type, a missing argument), or None when ``e`` is not one. Typer raises its own or
    click's exception classes depending on its version, so they are recognised by shape."""
    message = getattr(e, "format_message", None)
    if getattr(e, "exit_code", None) != 2 or not callable(message):
        return None
    text = " ".join(str(message()).split())
    if not text:  # no arguments at all: the help has been shown
        return None
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None) or "edgemeta"
    return f"{text.rstrip('.')}; see '{path} --help'"


def main() -> None:
    """Console entry point. Every bad input ends the same way: one ``error:`` line on stderr
    and exit 1, usage errors included (which click would show in a box and exit 2 for)."""
    import warnings

    warnings.showwarning = _show_warning
    try:
        code = app(prog_name="edgemeta", standalone_mode=False)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a usage error
        line = _usage_error(e)
        if line is not None:
            sys.stderr.write(f"error: {line}\n")
            sys.exit(1)
        if type(e).__name__ == "Abort":  # Ctrl-C outside a command
            _interrupted()
            sys.exit(130)
        if hasattr(e, "exit_code") and callable(getattr(e, "show", None)):  # any other click error, as click shows it
            e.show()
            sys.exit(e.exit_code)
        raise
    if code == 130:  # typer turns a Ctrl-C outside a command (while parsing) into a silent 130
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)
