"""What a benchmark measures and how: :class:`BenchConfig`, its bounds, and the timed sessions'
ONNX Runtime settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgemeta.bench.machine import logical_cores, physical_cores
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.ort import SessionOptions
from edgemeta.runtime.spec import Precision

# Bounds of what a benchmark may be asked for; beyond them the request is a typo.
MAX_BATCH = 4096
MAX_RUNS = 1_000_000
MAX_CLASSES = 1_000_000
MAX_DURATION_S = 3600.0
GPU_PEAK_SIZE = 8192  # n of the n x n MatMul that measures a GPU's peak (0.8 GB on the device)
REPEAT_TOLERANCE = 0.10  # the p50s of the first and the second half of the calls must agree within 10%

MAX_FRAME_SIDE = 8192  # width or height of a decoded frame: beyond 8K a typo
# The frames of one predict() call in the "predict on frames" row: past 1 GiB the row would measure
# swapping, so its largest batch stops where the frames fit (the other rows are not held to it).
MAX_FRAME_BATCH_BYTES = 1 << 30
FRAME_CHANNELS = (1, 3, 4)  # what the pixels entry takes: grey, RGB, RGBA

MAX_THREADS_PER_CORE = 4  # more threads than this per logical core is a typo (1,000 on 2 cores all but hangs)

#: The benchmark's ONNX Runtime settings unless told otherwise (the intra-op threads are the
#: config's ``threads``): one inter-op thread, as a chain-shaped CNN has no independent operators
#: to overlap, and idle threads spinning (ONNX Runtime's default, named so the report records it).
BENCH_SESSION_OPTIONS = SessionOptions(inter_op_threads=1, allow_spinning=True)


def ort_settings(options: SessionOptions) -> dict[str, Any]:
    """The ONNX Runtime settings a report records (the ``config.ort`` object of ``--json``)."""
    return {
        "graph_optimization": options.graph_optimization.value,
        "execution_mode": options.execution_mode.value,
        "inter_op_threads": options.inter_op_threads,
        "allow_spinning": options.allow_spinning,
        "memory_arena": options.memory_arena,
        "pin_threads": options.pin_threads,
    }


def timed_options(options: SessionOptions, threads: int) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` of a timed session: ``options`` with ``threads`` intra-op threads."""
    return replace(options, intra_op_threads=threads).to_ort()


def _int_tuple(values: Any) -> tuple:
    """The values as a tuple, each once, in the order given (a repeated batch size would be two identical rows)."""
    if isinstance(values, (int, np.integer)):
        return (int(values),)
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long.

    Attributes:
        providers: ``("auto",)`` benchmarks every provider this onnxruntime build can run and
            reports the others as unavailable; named providers must run.
        batch_sizes: batch sizes of the embedding measurements (1 .. 4096).
        precisions: precisions to compare (fp32, fp16, int8); empty = the given models' own.
        threads: intra-op threads for ONNX Runtime, torch and the peak measurement;
            0 = the number of physical cores this process may use.
        warmup: untimed calls before each measurement (and before each round's block).
        runs: timed calls per measurement (ignored when ``duration`` is set).
        duration: seconds per measurement instead of a fixed count (at least 3 calls).
        rounds: embedding latency is measured in this many rounds; each round times every
            precision and torch line in turn, one block of ``runs / rounds`` calls each, on a
            freshly opened session (one session alive at a time: idle sessions' spinning
            threads would slow the timed one), so a machine that drifts hits all alike.
        class_counts: enrolled classes for the classification-latency curve (batch 1).
        shots: K, the images per class of the enrolment measurement.
        torch_baseline: time torch eager from the checkpoint (when one is given).
        cold_start: time a fresh process from start to first prediction.
        flops: count FLOPs and measure the machine's peak.
        peak_size: n of the n x n float32 MatMul that measures the peak.
        backprop_episodes: also run :func:`backprop_baseline` on this many episodes per
            shot count, once per precision (0: not at all; needs torch and the data; a
            precision it cannot run on gets a note instead).
        backprop_data: the novel-class images of the backprop baseline: omniglot,
            tiny-imagenet, digits or a folder/zip of class folders; None: see
            :func:`backprop_data`.
        data_dir: where the named data sets are, for the backprop baseline and the int8
            calibration of a variant made on the fly (None: ``$EDGEMETA_DATA_DIR``, else
            ``~/.cache/edgemeta/data``).
        frame_size: (width, height) of the decoded uint8 frames of the "predict on frames" row
            (models with the ``pixels`` entry); a VGA camera frame by default. The row's largest
            batch is capped at :attr:`frame_batch_cap` frames (see :attr:`frame_cap_note`).
        frame_channels: their channels: 1 grey, 3 RGB, 4 RGBA.
        seed: seed of the random inputs.
        ort: ONNX Runtime session settings (:data:`BENCH_SESSION_OPTIONS` unless given; their
            ``intra_op_threads`` are ``threads``); spinning left to ONNX Runtime (None) is recorded as on.
    """

    providers: tuple[str, ...] = ("auto",)
    batch_sizes: tuple[int, ...] = (1, 32)
    precisions: tuple[Precision, ...] = ()
    threads: int = 0
    warmup: int = 10
    runs: int = 100
    duration: float | None = None
    rounds: int = 4
    class_counts: tuple[int, ...] = (1, 100, 10_000)
    shots: int = 5
    torch_baseline: bool = True
    cold_start: bool = True
    flops: bool = True
    peak_size: int = 2048
    backprop_episodes: int = 0
    backprop_data: str | None = None
    data_dir: str | None = None
    frame_size: tuple[int, int] = (640, 480)
    frame_channels: int = 3
    seed: int = 0
    ort: SessionOptions = BENCH_SESSION_OPTIONS

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("providers", tuple([self.providers] if isinstance(self.providers, str) else self.providers))
        set_("batch_sizes", _int_tuple(self.batch_sizes))
        set_("class_counts", _int_tuple(self.class_counts))
        if isinstance(self.frame_size, list):
            set_("frame_size", tuple(self.frame_size))
        if (
            isinstance(self.ort, SessionOptions) and self.ort.allow_spinning is None
        ):  # ONNX Runtime's default: they spin
            set_("ort", replace(self.ort, allow_spinning=True))
        problems = []
        try:
            set_(
                "precisions",
                tuple(
                    Precision(p) for p in ([self.precisions] if isinstance(self.precisions, str) else self.precisions)
                ),
            )
        except ValueError:
            problems.append(f"unknown precision in {self.precisions!r} (choose fp32, fp16, int8)")
        twice = sorted({p.value for p in self.precisions if isinstance(p, Precision) and self.precisions.count(p) > 1})
        if twice:
            problems.append(f"precision {', '.join(twice)} given twice (each precision is one model)")
        problems += _range_problems("batch size", self.batch_sizes, 1, MAX_BATCH)
        problems += _range_problems("class count", self.class_counts, 1, MAX_CLASSES)
        if not self.batch_sizes:
            problems.append("no batch sizes given")
        if not self.class_counts:
            problems.append("no class counts given")
        if not self.providers:
            problems.append("no providers given (use auto)")
        for name, value, lo, hi in (
            ("runs", self.runs, 1, MAX_RUNS),
            ("warmup", self.warmup, 0, MAX_RUNS),
            ("rounds", self.rounds, 1, 100),
            ("threads", self.threads, 0, 1024),
            ("shots", self.shots, 1, MAX_BATCH),
            ("backprop_episodes", self.backprop_episodes, 0, 100_000),
            ("peak_size", self.peak_size, 16, 16384),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
                problems.append(f"{name} must be an integer from {lo} to {hi:,}, got {value!r}")
        if self.backprop_data is not None and not self.backprop_episodes:
            problems.append("backprop data given without the backprop baseline (add --backprop-baseline)")
        elif self.backprop_data is not None:
            from edgemeta.data import is_data_name

            if not is_data_name(self.backprop_data):
                problems.append(unknown_data(self.backprop_data))
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            problems.append(f"data folder {self.data_dir} does not exist; pass the folder that holds the data sets")
        if self.duration is not None and not (
            isinstance(self.duration, (int, float)) and 0 < self.duration <= MAX_DURATION_S
        ):
            problems.append(
                f"duration must be more than 0 and at most {MAX_DURATION_S:g} seconds, got {self.duration!r}"
            )
        cores = logical_cores()
        if isinstance(self.threads, (int, np.integer)) and MAX_THREADS_PER_CORE * cores < self.threads <= 1024:
            problems.append(
                f"threads {self.threads} is more than {MAX_THREADS_PER_CORE}x the {cores} logical cores "
                f"this process may use (at most {MAX_THREADS_PER_CORE * cores}; 0 = one per physical core)"
            )
        problems += _frame_problems(self.frame_size, self.frame_channels)
        if problems:
            raise InputError("bad benchmark settings: " + "; ".join(problems))

    @property
    def resolved_threads(self) -> int:
        return self.threads or physical_cores()

    @property
    def oversubscribed(self) -> str | None:
        """Why the thread count asked for would distort the timings, or None: more threads than
        logical cores make them wait for each other, and the timings show the waiting."""
        cores = logical_cores()
        if self.resolved_threads <= cores:
            return None
        return (
            f"{self.resolved_threads} threads on {cores} logical cores: the threads "
            "wait for each other, so the timings measure oversubscription more than "
            f"the model; use --threads {cores} or fewer (0 = one per physical core)"
        )

    @property
    def frame_batch_cap(self) -> int:
        """The most frames of one predict() call that fit :data:`MAX_FRAME_BATCH_BYTES` (at least
        one: a frame of the largest size allowed takes 256 MiB)."""
        w, h = self.frame_size
        return max(1, MAX_FRAME_BATCH_BYTES // (w * h * self.frame_channels))

    @property
    def frame_batches(self) -> tuple[int, ...]:
        """Batch sizes of the "predict on frames" row: one frame, and the largest batch measured,
        capped at :attr:`frame_batch_cap`."""
        return tuple(sorted({1, min(max(self.batch_sizes), self.frame_batch_cap)}))

    @property
    def frame_cap_note(self) -> str | None:
        """Why the frames row's largest batch is smaller than the largest batch measured, or None."""
        largest, cap = max(self.batch_sizes), self.frame_batch_cap
        if largest <= cap:
            return None
        w, h = self.frame_size
        gb = w * h * self.frame_channels * largest / 2**30
        return (
            f"{largest} frames of {w}x{h}x{self.frame_channels} would take {gb:.1f} GiB in one predict() call "
            f"(at most {MAX_FRAME_BATCH_BYTES / 2**30:g} GiB), so the frames row stops at batch {cap}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["frame_size"] = list(self.frame_size)
        d["precisions"] = [p.value for p in self.precisions]
        d["threads"] = self.resolved_threads
        if self.duration is not None:  # the calls per measurement were set by the duration (each row says how many)
            d["runs"] = None
        d["ort"] = ort_settings(self.ort)
        return d


def _range_problems(what: str, values: Sequence[Any], lo: int, hi: int) -> list[str]:
    bad = [v for v in values if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi]
    return [f"{what} {v!r} is out of range (allowed {lo} to {hi:,})" for v in bad]


def _frame_problems(size: Any, channels: Any) -> list[str]:
    is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
    problems = []
    if not (isinstance(size, tuple) and len(size) == 2 and all(is_int(v) and 1 <= v <= MAX_FRAME_SIDE for v in size)):
        shown = "x".join(map(str, size)) if isinstance(size, tuple) else repr(size)
        problems.append(f"frame size {shown} must be a width and a height from 1 to {MAX_FRAME_SIDE} (e.g. 640x480)")
    if not is_int(channels) or channels not in FRAME_CHANNELS:
        problems.append(f"frame channels must be 1 (grey), 3 (RGB) or 4 (RGBA), got {channels!r}")
    return problems


def unknown_data(name: str) -> str:
    return (
        f"--backprop-data {name!r} is neither omniglot, tiny-imagenet, "
        "digits nor an existing folder or zip of class folders"
    )
