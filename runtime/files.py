"""Files at the lowest layer: atomic writes, locks, reading untrusted files, output checks.

Every writer in edgemeta (the store, checkpoints, models, reports, episode files) goes
through :func:`atomic_write`, so they share one behaviour:

- a reader sees the old file or the new one, never a mix: the bytes go to a temporary
  file in the same folder (``.<name>.<pid>.<random>.tmp``), which is fsynced, renamed over
  the target, and the folder is fsynced so the rename survives a power cut;
- a new file follows the umask (``0666 & ~umask``), a replaced file keeps its mode, and a
  symlink is written through (its target is replaced, the link stays a link);
- the write holds :func:`locked` on the target, and under it the temporary files left by
  writers that crashed (kill -9, power cut) are removed; a live writer's are not (each
  writer holds an advisory lock on its own temporary file while it exists);
- special files (a FIFO, a device, a socket) and symlink loops are refused with one line.

The lock file ``<name>.lock`` is removed by each writer as it leaves, so no lock file
stays beside the data once nobody writes (a waiting writer checks that the file it locked
is still the one in the folder, and starts over if not).

Only the standard library: the runtime's lowest layer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable, Union

from edgemeta.runtime.errors import InputError, LockTimeout, StoreWriteError

try:  # POSIX advisory locks; elsewhere writes stay atomic but are not serialized between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LockTimeout",
    "file_sha256",
    "atomic_write",
    "locked",
    "lock_path",
    "clean_stale_temps",
    "check_readable",
    "read_limited",
    "same_file",
    "refuse_overwrite",
    "check_output",
    "json_document",
    "resolve_target",
    "new_file_mode",
]

PathLike = Union[str, os.PathLike]
Writer = Callable[[str], None]

_TMP_SUFFIX = ".tmp"


# ---- reading files that may be anything --------------------------------------------


def _kind(mode: int) -> str | None:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return None


def check_readable(path: PathLike, what: str = "file") -> os.stat_result | None:
    """``path``'s stat when it is a regular file, None when it does not exist.

    Raises:
        InputError: a folder, FIFO, device or socket (reading it would hang or never end),
            or a symlink loop; the message names the path and the fix.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(
                f"{path} is a symlink loop, not a {what}; point it at a real file or pass another path"
            ) from None
        if e.errno == errno.ENOTDIR:
            return None
        raise InputError(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise InputError(f"{path} is {kind}, not a {what}; pass a regular file")
    return st


def read_limited(path: PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of regular file ``path``, refused before reading when longer than ``limit``.

    Opened without blocking and checked again on the open descriptor, so a FIFO swapped in
    after the first check cannot hang the reader.

    Raises:
        InputError: missing, not a regular file (see :func:`check_readable`), or too large.
    """
    if check_readable(path, what) is None:
        raise InputError(f"{what} not found: {path}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise InputError(f"cannot read {what} {path} ({e.strerror or e}); check the path and its permissions") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        kind = _kind(st.st_mode)
        if kind is not None:
            raise InputError(f"{path} is {kind}, not a {what}; pass a regular file")
        if st.st_size > limit:
            raise InputError(
                f"{what} {path} is {st.st_size:,} bytes, over the {limit:,}-byte limit; is it the right file?"
            )
        chunks = [f.read(min(limit, st.st_size) + 1)]  # a regular file: its size is known, so the buffer fits it
        size = len(chunks[0])
        while size <= limit and chunks[-1]:  # it may grow while being read
            chunks.append(f.read(min(1 << 24, limit + 1 - size)))
            size += len(chunks[-1])
    if size > limit:
        raise InputError(f"{what} {path} is over the {limit:,}-byte limit; is it the right file?")
    return chunks[0] if not any(chunks[1:]) else b"".join(chunks)


# ---- targets and modes ----------------------------------------------------------------


def resolve_target(path: PathLike) -> Path:
    """The file a write to ``path`` replaces: a symlink's final target (written through).

    Raises:
        InputError: a symlink loop, or a folder.
    """
    path = Path(path)
    if path.is_symlink():
        try:
            path = Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:  # a dangling link: the file it names is created
            path = Path(os.path.realpath(path))
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputError(f"{path} is a symlink loop; point it at a real file or choose another path") from None
            raise
        if path.is_symlink():  # realpath leaves a loop as it is on some Pythons
            raise InputError(f"{path} is a symlink loop; point it at a real file or choose another path")
    if path.is_dir():
        raise InputError(f"{path} is a folder; name a file to write")
    return path


def new_file_mode() -> int:
    """The permission bits a new file gets: ``0666`` less the umask (read without changing it
    where the platform allows: changing it is process-wide and other threads create files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


_umask_lock = threading.Lock()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; folders cannot be opened or fsynced on some platforms."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- locks -----------------------------------------------------------------------------

_registry_lock = threading.Lock()
_thread_locks: dict[str, threading.RLock] = {}
_held: dict[str, list] = {}  # lock path -> [fd, depth]; touched only by the thread holding its RLock


def lock_path(path: PathLike) -> Path:
    """Where the lock of ``path`` lives while a writer holds it (``<path>.lock``)."""
    return Path(os.path.abspath(str(path) + ".lock"))


def _holder(key: str) -> str:
    try:
        with open(key, "rb") as f:
            pid = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def _open_and_lock(key: str, deadline: float | None, on_wait: Callable[[str], None] | None, what: Path) -> int:
    """A descriptor of ``key`` holding its exclusive lock, the file still being the one in the folder."""
    told = False
    while True:
        try:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreWriteError(
                f"cannot create the lock file {key} ({e.strerror or e}); check the folder's permissions"
            ) from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"{what} is locked by {_holder(key)} (another enrolment or save); wait for it to finish or "
                            "raise the lock timeout"
                        ) from None
                    if not told and on_wait is not None:
                        on_wait(f"waiting for the lock on {what} held by {_holder(key)} ...")
                        told = True
                    time.sleep(0.02)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(key))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the last holder removed it while we waited: lock the new one


@contextlib.contextmanager
def locked(
    path: PathLike, *, timeout: float | None = None, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold ``path``'s lock exclusively: re-entrant within a thread, exclusive across threads and processes.

    Args:
        path: the file the lock protects (it need not exist).
        timeout: seconds to wait for another holder; None waits for ever.
        on_wait: called once with a "waiting for the lock ... held by process N" line when
            the lock is taken, so a user is never left waiting in silence.

    Raises:
        LockTimeout: the lock was not free within ``timeout``.
        StoreWriteError: the lock file cannot be created (a read-only folder).
    """
    key = str(lock_path(path))
    with _registry_lock:
        rlock = _thread_locks.setdefault(key, threading.RLock())
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    if not rlock.acquire(blocking=False):
        if on_wait is not None:
            on_wait(f"waiting for the lock on {path} held by another thread of this process ...")
        if not rlock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise LockTimeout(
                f"{path} is locked by another thread of this process; wait for it or raise the lock timeout"
            )
    try:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
            try:
                yield
            finally:
                entry[1] -= 1
            return
        fd = -1
        if fcntl is not None:
            fd = _open_and_lock(key, deadline, on_wait, Path(path))
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            del _held[key]
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(key)  # while still held: a waiter sees the file change and locks a fresh one
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
    finally:
        rlock.release()


# ---- temporary files -----------------------------------------------------------------


# mkstemp's 8 random characters, as earlier versions named temporary files (no pid, no lock):
# one untouched for 10 minutes is a crashed writer's (no save takes that long)
_LEGACY_TEMP = re.compile(r"[a-z0-9_]{8}\.tmp(\.ort)?")
_LEGACY_AGE = 600.0


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def clean_stale_temps(path: PathLike) -> list[Path]:
    """Remove the temporary files that crashed writers of ``path`` left; returns them.

    A temporary file is taken as a crashed writer's only when its lock is free (a live
    writer holds it for as long as the file exists) and the process id in its name is not
    running (a writer that went through another route keeps its file); one named as earlier
    versions named them (no process id) when it is also over 10 minutes old. Call it under
    :func:`locked` (:func:`atomic_write` does).
    """
    path = Path(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    prefix = _temp_prefix(path)
    for name in names:
        if not name.startswith(prefix) or not (name.endswith(_TMP_SUFFIX) or ".tmp." in name[len(prefix) :]):
            continue
        rest = name[len(prefix) :]
        pid_text = rest.split(".", 1)[0]
        legacy = _LEGACY_TEMP.fullmatch(rest) is not None  # written before temp names held a pid
        if not legacy and (not pid_text.isdigit() or _alive(int(pid_text))):
            continue
        tmp = path.parent / name
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (legacy and time.time() - st.st_mtime < _LEGACY_AGE):
                continue
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
            with contextlib.suppress(OSError):
                os.unlink(tmp)
                removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# ---- atomic writes -------------------------------------------------------------------


def atomic_write(
    path: PathLike,
    data: bytes | Writer,
    *,
    suffix: str = _TMP_SUFFIX,
    lock: bool = True,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    error: type[Exception] | None = None,
) -> Path:
    """Write ``data`` (bytes, or a callable that writes the file whose path it is given) to
    ``path`` so that a reader sees the old file or the new one, never a mix; returns the
    path written (a symlink's target).

    Args:
        suffix: the temporary file's ending, for writers that go by the extension (``.tmp.ort``).
        lock: hold :func:`locked` on the target (re-entrant: a caller that holds it already,
            as the store's ``edit`` does, keeps it); ``timeout`` and ``on_wait`` go to it.
        error: the exception a failed write becomes (one line naming the path; the old
            file is intact); None re-raises the :class:`OSError` for the caller to word.
            A callable's own :class:`EdgemetaError` passes unchanged.

    Raises:
        InputError: ``path`` is a folder, a symlink loop, or a special file.
        LockTimeout: another writer held the lock past ``timeout``.
    """
    target = resolve_target(path)
    if not target.parent.is_dir():
        raise InputError(f"folder {target.parent} does not exist; create it first or choose another path")
    ctx = locked(target, timeout=timeout, on_wait=on_wait) if lock else contextlib.nullcontext()
    with ctx:
        check_readable(target)  # a FIFO or a device is never replaced
        clean_stale_temps(target)
        _write_replace(target, data, suffix, error)
    return target


def _write_replace(target: Path, data: bytes | Writer, suffix: str, error: type[Exception] | None) -> None:
    from edgemeta.runtime.errors import EdgemetaError

    if not suffix.startswith(_TMP_SUFFIX):
        suffix = _TMP_SUFFIX + suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=suffix, dir=target.parent)
    except OSError as e:
        if error is None:
            raise
        raise error(f"cannot write in folder {target.parent} ({e.strerror or e}); choose a writable folder") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # tells clean_stale_temps this writer is alive
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = new_file_mode()  # mkstemp makes 0600
        os.chmod(tmp, mode)  # after the fsync: a 0444 file could not be opened for it
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if error is not None and isinstance(e, OSError) and not isinstance(e, EdgemetaError):
            raise error(
                f"could not write {target} ({e.strerror or e}); the previous file is unchanged - "
                "free space or fix permissions and retry"
            ) from None
        raise
    finally:
        os.close(fd)
    _fsync_dir(target.parent)


# ---- output checks (before any work) ----------------------------------------------------


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file (through ``./``, ``..``, symlinks or hard links)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def refuse_overwrite(outputs: Iterable[PathLike], inputs: Iterable[PathLike | None], option: str = "-o") -> None:
    """Refuse, before any work, to write a file that is one of the command's inputs."""
    inputs = [src for src in inputs if src is not None and os.path.exists(src)]
    for dst in outputs:
        for src in inputs:
            if same_file(dst, src):
                raise InputError(f"output {dst} is the input {src} and would overwrite it; choose another {option}")


def check_output(
    path: PathLike,
    *,
    option: str = "-o",
    what: str = "file",
    inputs: Iterable[PathLike | None] = (),
    is_own: Callable[[Path], bool] | None = None,
) -> Path:
    """``path`` as a :class:`Path`, once it is safe to write: not a folder, a special file or a
    symlink loop, in a folder that exists and takes a new file (tried with a temporary file,
    which tells what permission bits do not: a read-only file system, ``/proc``, a root
    user), not one of ``inputs``, and, when it exists, a file of the command's own kind
    (``is_own(path)`` parses it, e.g. an earlier report), which is replaced.

    A symlink is followed: the writers replace its target, so the target's folder is the one
    checked, and the returned path (where files written beside it go) is the target's.

    Raises:
        InputError: one of these does not hold (the message names ``option`` and the fix).
    """
    given = Path(path)
    if given.is_dir():
        shown = Path(os.path.realpath(given)) if given.is_symlink() else given
        raise InputError(f"{option} {shown} is a folder; name the {what} to write")
    try:
        path = resolve_target(given)
    except InputError as e:
        raise InputError(f"{option}: {e}") from None
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{option}: {path.parent} is a file, not a folder; choose another {option}")
    if not path.parent.is_dir():
        raise InputError(f"{option}: folder {path.parent} does not exist; create it first or choose another {option}")
    try:
        check_readable(path, what)
    except InputError as e:
        raise InputError(f"{option}: {e}") from None
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise InputError(
            f"{option}: cannot write in folder {path.parent} ({e.strerror or e}); choose a writable folder"
        ) from None
    refuse_overwrite([given], inputs, option)  # named as the user gave it
    if path.exists() and is_own is not None and not is_own(path):
        raise InputError(
            f"{option} {path} exists and is not a {what}; choose another {option}, or delete it if it is not needed"
        )
    return path


def json_document(path: Path, limit: int = 1 << 26) -> object | None:
    """The JSON document ``path`` holds, or None when it holds none or is not a regular file
    (for an ``is_own`` check: a command's own reports and episode files are JSON documents
    of a known shape). Parsed with :func:`edgemeta.runtime.schema.loads` (depth-limited)."""
    from edgemeta.runtime.errors import EdgemetaError
    from edgemeta.runtime.schema import loads

    try:
        return loads(read_limited(path, limit))
    except EdgemetaError:
        return None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (read in blocks): what checkpoints, wrapped models and `export --module`
    record of the files they came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
