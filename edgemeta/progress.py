"""Progress of long commands where no terminal shows a progress bar (a CI log, a pipe, ``nohup``).

On a terminal the commands draw rich progress bars; elsewhere rich draws nothing, and a
command that trains or calibrates for many minutes would print nothing at all. :class:`StageLog`
writes plain lines instead: one when a stage starts, and a heartbeat while a stage runs
(its name, how far it is, for how long), so a log shows the command is alive and where it is.

A command that ends within ``quiet_s`` seconds prints none of this, so quick commands and
refusals keep their output to the result or the one ``error:`` line. ``EDGEMETA_PROGRESS=off``
turns the lines off (the test suite does, where it asserts a command's whole output).

Stdlib only: the device runtime's commands use it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["StageLog", "heartbeat_seconds", "plain_progress_wanted", "stage_lines"]

QUIET_S = 3.0  # a command that finishes sooner prints no progress lines


def heartbeat_seconds() -> float:
    """Seconds between heartbeat lines: ``$EDGEMETA_HEARTBEAT`` (default 30)."""
    try:
        return max(float(os.environ.get("EDGEMETA_HEARTBEAT", "30")), 0.05)
    except ValueError:
        return 30.0


def plain_progress_wanted(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is not a terminal, so that plain progress lines stand
    in for progress bars; never with ``EDGEMETA_PROGRESS=off`` (a log that wants only results)."""
    if os.environ.get("EDGEMETA_PROGRESS", "").lower() in ("off", "0", "no"):
        return False
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StageLog:
    """Plain-text progress lines on ``stream`` (default stderr) with a heartbeat thread.

    Feed it through :meth:`update` (``update(stage, done, total)``, the exporters' progress
    callback) or rich's ``Progress`` calls (``add_task``, ``update``, ``advance``,
    ``remove_task``), so code written for a progress bar gets lines without change.

    Example:
        >>> with StageLog() as log:
        ...     log.stage("calibrating int8")
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        interval: float | None = None,
        quiet_s: float | None = None,
        prefix: str = "edgemeta",
    ):
        self.stream = stream
        self.interval = heartbeat_seconds() if interval is None else interval
        self.quiet_s = QUIET_S if quiet_s is None else quiet_s
        self.prefix = prefix
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._tasks: dict[int, dict[str, Any]] = {}
        self._current: int | None = None
        self._stage_t0 = self._t0
        self._printed: set[int] = set()

    # -- life cycle ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="edgemeta-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def __enter__(self) -> StageLog:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the exporters' callback: progress(stage, done, total) ---------------------
    def __call__(self, stage: str, done: int = 0, total: int | None = None) -> None:
        self.stage(stage, done, total)

    def stage(self, name: str, done: int = 0, total: int | None = None) -> None:
        """Start stage ``name`` (or update it, when it is the current one)."""
        with self._lock:
            found = next((tid for tid, t in self._tasks.items() if t["description"] == name), None)
            if found is None:
                found = len(self._tasks)
                self._tasks[found] = {"description": name, "total": total, "completed": done, "info": ""}
            else:
                self._tasks[found].update(completed=done, total=total)
            self._enter(found)

    # -- rich.progress.Progress's calls --------------------------------------------
    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        with self._lock:
            tid = len(self._tasks)
            self._tasks[tid] = {
                "description": description,
                "total": total,
                "completed": completed,
                "info": str(fields.get("info", "")),
            }
            self._enter(tid)
            return tid

    def update(
        self,
        task: Any,
        *args: Any,
        advance: float | None = None,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        if isinstance(task, str):  # the exporters' update(stage, done, total)
            self.stage(task, *args)
            return
        with self._lock:
            t = self._tasks.get(task)
            if t is None:
                return
            if advance is not None:
                t["completed"] += advance
            if completed is not None:
                t["completed"] = completed
            if total is not None:
                t["total"] = total
            if "info" in fields:
                t["info"] = str(fields["info"])
            if description is not None and description != t["description"]:
                t["description"] = description
                self._printed.discard(task)
                self._stage_t0 = time.monotonic()
                self._maybe_print(task)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def remove_task(self, task: int) -> None:
        with self._lock:
            if self._current == task:
                self._current = None

    # -- lines -----------------------------------------------------------------------
    def _enter(self, tid: int) -> None:
        if self._current != tid:
            self._current = tid
            self._stage_t0 = time.monotonic()
        self._maybe_print(tid)

    def _maybe_print(self, tid: int) -> None:
        """The stage's start line, once, as soon as the command has run past ``quiet_s``."""
        if tid in self._printed or time.monotonic() - self._t0 < self.quiet_s:
            return
        self._printed.add(tid)
        self._write(f"{self._tasks[tid]['description']} ...")

    def _status(self, tid: int) -> str:
        t = self._tasks[tid]
        parts = [t["description"]]
        if t["total"]:
            parts.append(f"{int(t['completed'])}/{int(t['total'])}")
        elif t["completed"]:
            parts.append(f"{int(t['completed'])} done")
        if t["info"]:
            parts.append(t["info"])
        parts.append(f"stage {_clock(time.monotonic() - self._stage_t0)}")
        return ", ".join(parts)

    def _beat(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(min(self.interval, 0.25)):
            now = time.monotonic()
            with self._lock:
                tid = self._current
                if tid is not None and tid not in self._printed:
                    self._maybe_print(tid)
                if now - last < self.interval:
                    continue
                last = now
                if now - self._t0 >= self.quiet_s:
                    self._write("still running: " + (self._status(tid) if tid is not None else "working"))

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(f"{self.prefix} [{_clock(time.monotonic() - self._t0)}] {text}\n")
        stream.flush()


@contextlib.contextmanager
def stage_lines(stage: str, enabled: bool = True) -> Iterator[StageLog | None]:
    """One stage, with its heartbeat, around a call that reports no progress of its own; only
    where no terminal shows progress (``None`` elsewhere)."""
    if not enabled or not plain_progress_wanted():
        yield None
        return
    with StageLog() as log:
        log.stage(stage)
        yield log
