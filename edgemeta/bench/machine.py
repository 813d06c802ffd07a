"""The machine a benchmark runs on: cores, CPU model and flags, library versions, memory, other processes' load."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import warnings
from typing import Any

import numpy as np
import onnxruntime as ort

BUSY_CORES = 0.2  # other processes using this many cores on average make the run "busy"

# the start-of-run check: at least this long a sample, and this many cores of other load. On
# 2 quiet cores 0.1 s samples read up to 0.3 cores (single 10 ms ticks); a process holding a
# core reads about 1.0
BUSY_SAMPLE_S, BUSY_START_CORES = 0.2, 0.5


def logical_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores this process may run on (the default thread count)."""
    usable = logical_cores()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(physical, usable))


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    )
    return model, [f for f in wanted if f in flags]


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed, or broken metadata
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, vector extensions, OS and library versions (torch without importing it)."""
    model, flags = _cpu_model_and_flags()
    try:
        import psutil

        logical, memory = psutil.cpu_count(logical=True), psutil.virtual_memory().total
    except ImportError:
        logical, memory = os.cpu_count(), None
    return {
        "cpu": model,
        "physical_cores": physical_cores(),
        "logical_cores": logical,
        "cpu_flags": flags,
        "memory_gb": round(memory / 2**30, 1) if memory else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "edgemeta": _version("edgemeta"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def process_peak_rss_mb() -> float | None:
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 2**20
        except Exception:  # noqa: BLE001
            return None


def cpu_ticks() -> tuple[float, float] | None:
    """(seconds of CPU busy on the whole machine, seconds used by this process and its
    waited-for children), from /proc/stat and os.times; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf(
        "SC_CLK_TCK"
    ), own.user + own.system + own.children_user + own.children_system


class OtherLoad:
    """How many cores other processes (and the hypervisor) took while the benchmark ran."""

    def __init__(self) -> None:
        self.start, self.t0 = cpu_ticks(), time.monotonic()

    def cores(self) -> float | None:
        end = cpu_ticks()
        if self.start is None or end is None:
            return None
        wall = max(time.monotonic() - self.t0, 1e-9)
        return max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / wall)


def busy_note(
    other_cores: float | None, logical_cores: int, threads: int | None = None, when: str = "during the run"
) -> str | None:
    """A warning when other work shared the CPU (0.2 cores on average or more), with the
    thread count that would leave the other work its cores: a thread team larger than the
    free cores waits on its preempted threads at every step (torch's most: 100x seen)."""
    if other_cores is None or other_cores < BUSY_CORES:
        return None
    free = max(1, logical_cores - math.ceil(other_cores - BUSY_CORES))
    fewer = f", or leave them their cores with --threads {free}" if threads is not None and free < threads else ""
    return (
        f"the machine was busy: other processes used {other_cores:.2f} of {logical_cores} cores on average {when}, "
        f"so these timings (torch's most) are not trustworthy: rerun on a quiet machine{fewer}"
    )


def warn_if_busy(others: OtherLoad, threads: int) -> None:
    """Say now, when the user can still stop and rerun, that other processes hold cores (the
    note at the end says it again if they kept on). Sampled for at least BUSY_SAMPLE_S, and
    only a load that 10 ms ticks cannot fake counts (BUSY_START_CORES)."""
    if others.start is None:  # no /proc/stat: nothing to sample
        return
    time.sleep(max(0.0, BUSY_SAMPLE_S - (time.monotonic() - others.t0)))
    cores = others.cores()
    if cores is not None and cores >= BUSY_START_CORES:
        busy = busy_note(cores, logical_cores(), threads, when="as the benchmark started")
        warnings.warn(busy.replace("these timings", "the timings"), RuntimeWarning, stacklevel=2)
