"""Timing calls: latency statistics, two calls timed in turn, and the first-half / second-half repeatability check."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from edgemeta.bench.config import MAX_RUNS, REPEAT_TOLERANCE
from edgemeta.runtime.errors import InputError


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one call, in milliseconds, over ``runs`` timed calls."""

    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    min_ms: float
    std_ms: float
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise InputError("no timings to summarize")
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        return cls(
            int(a.size),
            float(a.mean()),
            p50,
            p90,
            p99,
            float(a.max()),
            float(a.min()),
            float(a.std()),
            tuple(a.tolist()),
        )

    def throughput(self, batch: int) -> float:
        """Images per second at this batch size (from the mean latency)."""
        return batch / (self.mean_ms / 1e3) if self.mean_ms > 0 else float("inf")

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if samples:
            d["samples_ms"] = list(self.samples_ms)
        else:
            d.pop("samples_ms")
        return d


def time_fn(fn: Callable[[], Any], warmup: int = 10, runs: int = 100, duration: float | None = None) -> LatencyStats:
    """Call ``fn`` ``warmup`` times untimed, then time each call.

    With ``duration`` (seconds), calls are timed until that much time has passed (at least
    3 calls) instead of ``runs`` times. The garbage collector is paused while timing, as
    :mod:`timeit` does, so a collection does not land in one sample.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    clock = time.perf_counter_ns
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if duration is None:
            for _ in range(runs):
                t0 = clock()
                fn()
                samples.append((clock() - t0) / 1e6)
        else:
            end = clock() + int(duration * 1e9)
            while len(samples) < 3 or (clock() < end and len(samples) < MAX_RUNS):
                t0 = clock()
                fn()
                samples.append((clock() - t0) / 1e6)
    finally:
        if was_enabled:
            gc.enable()
    return LatencyStats.from_samples(samples)


def time_pair(
    a: Callable[[], Any],
    b: Callable[[], Any],
    warmup: int = 10,
    runs: int = 100,
    duration: float | None = None,
    after: Callable[[], Any] | None = None,
) -> tuple[LatencyStats, LatencyStats]:
    """Time two calls side by side, in pairs: a ratio of the two is then immune to the
    machine getting slower or faster during the measurement. Every second pair runs the
    other way round (a b, b a, a b, ...), so neither call always runs first: of two
    back-to-back calls of the same function the first was 1-2% slower here, which a fixed
    order would have charged to one side. ``duration`` covers both. ``after``, untimed,
    follows each pair (warm-up pairs too): to undo what the pair did."""
    undo = after or (lambda: None)
    for i in range(warmup):
        for fn in (b, a) if i % 2 else (a, b):
            fn()
        undo()

    def pair(i: int) -> tuple[float, float]:
        if i % 2:
            t_b = _timed(b)
            timed = _timed(a), t_b
        else:
            timed = _timed(a), _timed(b)
        undo()
        return timed

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if duration is None:
            samples = [pair(i) for i in range(runs)]
        else:
            end, samples = time.perf_counter() + duration, []
            while len(samples) < 3 or (time.perf_counter() < end and len(samples) < MAX_RUNS):
                samples.append(pair(len(samples)))
    finally:
        if was_enabled:
            gc.enable()
    return LatencyStats.from_samples([s[0] for s in samples]), LatencyStats.from_samples([s[1] for s in samples])


def paired_ratio(a: LatencyStats, b: LatencyStats) -> float:
    """The median of ``a_i / b_i`` over the calls :func:`time_pair` timed side by side."""
    return float(np.median(np.asarray(a.samples_ms) / np.asarray(b.samples_ms)))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def halves_agree(a: float, b: float, tolerance: float = REPEAT_TOLERANCE) -> bool:
    return abs(a - b) <= tolerance * min(a, b)
