"""Output files: what a command checks before any work, so that nothing saved is lost.

Every command that writes a file calls :func:`check_output` first: the path must be a file
name in an existing folder, not one of the command's inputs (an atomic rename would
replace the input), and not an existing file of another kind (a checkpoint, an image)
that the command would silently turn into its own.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from edgemeta.runtime.errors import InputError

__all__ = ["same_file", "refuse_overwrite", "check_output", "json_document"]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file (through ``./``, ``..``, symlinks or hard links)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def refuse_overwrite(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None], option: str = "-o") -> None:
    """Refuse, before any work, to write a file that is one of the command's inputs."""
    inputs = [src for src in inputs if src is not None and os.path.exists(src)]
    for dst in outputs:
        for src in inputs:
            if same_file(dst, src):
                raise InputError(f"output {dst} is the input {src} and would overwrite it; choose another {option}")


def check_output(
    path: str | os.PathLike,
    *,
    option: str = "-o",
    what: str = "file",
    inputs: Iterable[str | os.PathLike | None] = (),
    is_own: Callable[[Path], bool] | None = None,
) -> Path:
    """``path`` as a :class:`Path`, once it is safe to write: not a folder, in a folder that
    exists and takes a new file (tried with a temporary file, which tells what permission
    bits do not: a read-only file system, ``/proc``, a root user), not one of ``inputs``, and,
    when it exists, a file of the command's own kind (``is_own(path)``, e.g. an earlier
    report), which is replaced.

    A symlink is followed: the writers replace its target, so the target's folder is the one
    checked, and the returned path (where files written beside it go) is the target's.

    Raises:
        InputError: one of these does not hold (the message names ``option`` and the fix).
    """
    given = path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; name the {what} to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{option}: {path.parent} is a file, not a folder; choose another {option}")
    if not path.parent.is_dir():
        raise InputError(f"{option}: folder {path.parent} does not exist; create it first or choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise InputError(f"{option}: cannot write in folder {path.parent} ({e.strerror or e}); choose a writable folder") from None
    refuse_overwrite([given], inputs, option)  # named as the user gave it
    if path.exists() and is_own is not None and not is_own(path):
        raise InputError(f"{option} {path} exists and is not a {what}; choose another {option}, or delete it if it is not needed")
    return path


def json_document(path: Path) -> object | None:
    """The JSON document ``path`` holds, or None when it holds none (for an ``is_own`` check:
    a command's own reports and episode files are JSON documents of a known shape)."""
    import json

    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None
