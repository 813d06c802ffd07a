"""Latency users can trust: an exported model on ONNX Runtime against the alternatives, in one run.

:func:`run_benchmark` measures, for every execution provider and precision asked for:

* **embedding latency** at each batch size (mean, p50, p90, p99, max; images/s), in
  rounds that time every precision and the torch lines in turn (one session alive at a
  time), so the ratios between them hold even when the machine drifts; the p50s of the
  first and second half of the calls are compared, so the report can say whether the
  machine was quiet enough;
* the **torch eager baseline** from the checkpoint, in the same process, with the same
  thread count, in eval and inference mode; channels-last is timed too, and ratios are
  taken against the faster torch line, so the baseline is never the crippled one;
* **FLOPs** counted from the ONNX graph (needs the ``onnx`` package; not from an ``.ort`` file) and the achieved
  FLOP/s as a fraction of the machine's peak, measured in the same run by a large
  float32 MatMul on ONNX Runtime with the same threads; for CUDA and TensorRT rows, by a
  large MatMul on the CUDA provider with its inputs on the GPU;
* **adaptation**: enrolling one class from K shots with the runtime's
  :class:`~edgemeta.runtime.classifier.FewShotClassifier` vs embedding the K images alone;
* **classification** latency at batch 1 with 1 ... 10,000 (or more) enrolled classes;
* **cold start** in a fresh process: interpreter, imports, session creation, first
  prediction, each apart, and that process's peak RSS.

:func:`backprop_baseline` is the skeptic's comparison: on the same seeded episodes of
novel classes (those of the data set the model records, when it is Omniglot or
Tiny-ImageNet; else Omniglot's for a grey model; or any data named, see
:func:`backprop_data`), a last linear layer trained by backprop vs prototype enrolment, on
the embeddings of each precision benchmarked.

Only numpy and onnxruntime are needed for the ONNX Runtime figures: torch is imported
for the torch and backprop baselines only, ``onnx`` for FLOP counting only, rich and
matplotlib only to render.

Example:
    >>> cfg = BenchConfig(batch_sizes=(1, 32), threads=2)              # doctest: +SKIP
    >>> report = run_benchmark("conv4.onnx", cfg, checkpoint="conv4.safetensors")  # doctest: +SKIP
    >>> report.to_dict()["embedding"][0]["latency"]["p50_ms"]          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from edgemeta.runtime.errors import CheckpointError, EdgemetaError, InputError, ModelMismatchError, ProviderError
from edgemeta.runtime.session import (
    GPU_PROVIDERS,
    ORT_LEVELS,
    GraphOptimization,
    Provider,
    Session,
    SessionOptions,
    feeds_prototype_norms,
    open_ort_session,
    prototype_sqnorms,
    resolve_providers,
    run_bound,
)
from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES, INPUT_SQNORMS, OUTPUT_EMBEDDINGS, OUTPUT_LOGITS, Precision, PreprocessSpec

__all__ = [
    "ExecutionMode",
    "OrtTuning",
    "BenchConfig",
    "LatencyStats",
    "time_fn",
    "time_pair",
    "FlopCount",
    "count_flops",
    "measure_gpu_peak_flops",
    "measure_int8_peak",
    "measure_peak_flops",
    "machine_info",
    "ModelVariant",
    "EmbeddingRow",
    "ClassesRow",
    "AdaptationRow",
    "ColdStartRow",
    "BenchReport",
    "run_benchmark",
    "BackpropResult",
    "backprop_baseline",
    "render_report",
    "check_plot_path",
    "plot_report",
    "is_ort_format",
    "REPORT_FORMAT",
]

REPORT_FORMAT = "edgemeta.benchmark"
REPORT_VERSION = 1

# Bounds of what a benchmark may be asked for; beyond them the request is a typo.
MAX_BATCH = 4096
MAX_RUNS = 1_000_000
MAX_CLASSES = 1_000_000
MAX_DURATION_S = 3600.0
GPU_PEAK_SIZE = 8192  # n of the n x n MatMul that measures a GPU's peak (0.8 GB on the device)
REPEAT_TOLERANCE = 0.10  # the p50s of the first and the second half of the calls must agree within 10%
# Calls a measurement needs for a repeatability verdict: a p50 of one or two calls says
# little, so with fewer than 5 per half the row reports both halves and judges nothing.
MIN_REPEAT_CALLS = 10
MAX_THREADS_PER_CORE = 4  # more threads than this per logical core is a typo (1,000 on 2 cores all but hangs)
BUSY_CORES = 0.2  # other processes using this many cores on average make the run "busy"
# torch threads of the backprop baseline's SGD steps. A 64 x 5 layer's tensors are far below
# torch's parallel grain, so more threads only add a team to wake: on 2 quiet cores one
# thread was about as fast (17.0 vs 17.7 ms per 100 steps in an isolated A/B, well inside
# the 16-45 ms the steps take from run to run), and far steadier under load: while another
# process held a core, a 2-thread team took 35 ms to 2.4 s (its barriers waiting on a
# preempted thread), one thread 22-50 ms.
SGD_THREADS = 1
BACKPROP_SHOTS, BACKPROP_WAYS, BACKPROP_QUERIES = (1, 5), 5, 15  # the issue's protocol: 5-way 1- and 5-shot, 15 queries
REMOTE_PROVIDERS = ("AzureExecutionProvider",)  # in ONNX Runtime's CPU builds; it calls a cloud endpoint
# the start-of-run check: at least this long a sample, and this many cores of other load. On
# 2 quiet cores 0.1 s samples read up to 0.3 cores (single 10 ms ticks); a process holding a
# core reads about 1.0
BUSY_SAMPLE_S, BUSY_START_CORES = 0.2, 0.5

ProgressFn = Callable[[int, int, str], None]  # (done, total, what is running now)


# ============================================================================ configuration


class ExecutionMode(str, Enum):
    """ONNX Runtime's execution mode: operators one after another, or independent ones in parallel."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


@dataclass(frozen=True)
class OrtTuning:
    """ONNX Runtime session settings used for every timed session (recorded in the report).

    Attributes:
        graph_optimization: graph optimization level (``all`` fuses Conv+BN+activation).
        execution_mode: sequential suits chain-shaped CNNs; parallel only adds scheduling.
        inter_op_threads: threads across independent operators (1: there are none to overlap).
        allow_spinning: idle intra-op threads spin instead of sleeping; lower latency at batch 1,
            at the price of CPU time burnt between calls.
        memory_arena: keep freed buffers in ONNX Runtime's arena for the next call.
        pin_threads: pin the intra-op worker threads to distinct logical CPUs.
    """

    graph_optimization: GraphOptimization = GraphOptimization.ALL
    execution_mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    inter_op_threads: int = 1
    allow_spinning: bool = True
    memory_arena: bool = True
    pin_threads: bool = False

    def __post_init__(self) -> None:
        for name, cls in (("graph_optimization", GraphOptimization), ("execution_mode", ExecutionMode)):
            try:
                object.__setattr__(self, name, cls(getattr(self, name)))
            except ValueError:
                choices = ", ".join(m.value for m in cls)
                raise InputError(f"unknown {name} {getattr(self, name)!r}; choose one of: {choices}") from None
        if self.inter_op_threads < 0:
            raise InputError(f"inter_op_threads must be >= 0, got {self.inter_op_threads}")

    def session_options(self, threads: int) -> ort.SessionOptions:
        """The ``onnxruntime.SessionOptions`` for ``threads`` intra-op threads."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = self.inter_op_threads
        so.graph_optimization_level = ORT_LEVELS[self.graph_optimization]
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if self.execution_mode is ExecutionMode.PARALLEL else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        so.enable_cpu_mem_arena = self.memory_arena
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.pin_threads and threads > 1:
            # One entry per worker thread (the calling thread is the first of the pool and
            # is not pinned); logical processors are numbered from 1.
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(threads))
            so.add_session_config_entry(
                "session.intra_op_thread_affinities", ";".join(str(cpus[i % len(cpus)] + 1) for i in range(1, threads))
            )
        return so

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["graph_optimization"] = self.graph_optimization.value
        d["execution_mode"] = self.execution_mode.value
        return d


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
        seed: seed of the random inputs.
        ort: ONNX Runtime session settings.
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
    seed: int = 0
    ort: OrtTuning = field(default_factory=OrtTuning)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("providers", tuple([self.providers] if isinstance(self.providers, str) else self.providers))
        set_("batch_sizes", _int_tuple(self.batch_sizes))
        set_("class_counts", _int_tuple(self.class_counts))
        problems = []
        try:
            set_("precisions", tuple(Precision(p) for p in ([self.precisions] if isinstance(self.precisions, str) else self.precisions)))
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
                problems.append(_unknown_data(self.backprop_data))
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            problems.append(f"data folder {self.data_dir} does not exist; pass the folder that holds the data sets")
        if self.duration is not None and not (isinstance(self.duration, (int, float)) and 0 < self.duration <= MAX_DURATION_S):
            problems.append(f"duration must be more than 0 and at most {MAX_DURATION_S:g} seconds, got {self.duration!r}")
        cores = logical_cores()
        if isinstance(self.threads, (int, np.integer)) and MAX_THREADS_PER_CORE * cores < self.threads <= 1024:
            problems.append(
                f"threads {self.threads} is more than {MAX_THREADS_PER_CORE}x the {cores} logical cores this process may use "
                f"(at most {MAX_THREADS_PER_CORE * cores}; 0 = one per physical core)"
            )
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
            f"{self.resolved_threads} threads on {cores} logical cores: the threads wait for each other, so the timings "
            f"measure oversubscription more than the model; use --threads {cores} or fewer (0 = one per physical core)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precisions"] = [p.value for p in self.precisions]
        d["threads"] = self.resolved_threads
        if self.duration is not None:  # the calls per measurement were set by the duration (each row says how many)
            d["runs"] = None
        d["ort"] = self.ort.to_dict()
        return d


def _range_problems(what: str, values: Sequence[Any], lo: int, hi: int) -> list[str]:
    bad = [v for v in values if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi]
    return [f"{what} {v!r} is out of range (allowed {lo} to {hi:,})" for v in bad]


# ============================================================================ timing


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
        return cls(int(a.size), float(a.mean()), p50, p90, p99, float(a.max()), float(a.min()), float(a.std()), tuple(a.tolist()))

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
    a: Callable[[], Any], b: Callable[[], Any], warmup: int = 10, runs: int = 100, duration: float | None = None,
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


def _agree(a: float, b: float, tolerance: float = REPEAT_TOLERANCE) -> bool:
    return abs(a - b) <= tolerance * min(a, b)


# ============================================================================ the machine


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
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
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


def _peak_rss_mb() -> float | None:
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


# ============================================================================ FLOPs


@dataclass(frozen=True)
class FlopCount:
    """Multiply-accumulate work of a graph, as FLOPs (2 per MAC); integer ops count alike.

    ``uncounted`` names the MAC nodes whose shapes shape inference could not resolve.
    Element-wise operators (activations, pooling, normalization) are not counted: they
    are a small share of a CNN's work and of its achievable FLOP/s.
    """

    total: int
    by_op: dict[str, int]
    uncounted: tuple[str, ...] = ()


# op type -> index of the weight input (conv-like) ; matmul-like ops take A at 0
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1, "NhwcConv": 1}
_MATMUL_B = {"MatMul": 1, "Gemm": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "MatMulIntegerToFloat": 1, "FusedMatMul": 1}


def _set_batch(model: Any, batch: int, n_classes: int) -> None:
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name == INPUT_IMAGES and len(dims):
            dims[0].dim_value = batch
        elif inp.name == INPUT_PROTOTYPES and len(dims):
            dims[0].dim_value = n_classes
    del model.graph.value_info[:]  # stale symbolic shapes would only get in the way
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def _shapes(model: Any) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _node_flops(node: Any, shapes: dict[str, list[int | None]]) -> int | None:
    """FLOPs of one conv- or matmul-like node, or None when a shape is unknown."""
    out = shapes.get(node.output[0])
    if node.op_type in _CONV_WEIGHT or node.op_type == "ConvTranspose":
        w = shapes.get(node.input[1 if node.op_type == "ConvTranspose" else _CONV_WEIGHT[node.op_type]])
        # Conv: each output element is a dot product over W[1:]; ConvTranspose: each input element
        ref = shapes.get(node.input[0]) if node.op_type == "ConvTranspose" else out
        if not (_known(w) and _known(ref)):
            return None
        return 2 * math.prod(ref) * math.prod(w[1:])  # type: ignore[arg-type]
    a = shapes.get(node.input[0])
    if not (_known(a) and _known(out)) or not a:
        return None
    k = a[-1]
    if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
        k = a[0]
    return 2 * math.prod(out) * k  # type: ignore[arg-type,operator]


def count_flops(model: str | os.PathLike | Any, batch: int = 1, n_classes: int = 0) -> FlopCount:
    """Count the FLOPs of Conv, ConvTranspose, Gemm, MatMul (and their integer and fused forms).

    The graph's ``images`` batch and ``prototypes`` count are fixed to ``batch`` and
    ``n_classes``, then ONNX shape inference gives every tensor's shape.

    Args:
        model: an ``.onnx`` path or an ``onnx.ModelProto`` (not modified).
        batch: images per call.
        n_classes: prototypes fed (0: the embedding alone).

    Raises:
        InputError: the ``onnx`` package is not installed (``pip install onnx``), or ``model``
            is an ORT-format file (``.ort``), which the ``onnx`` package cannot read.

    Example:
        >>> count_flops("conv4.onnx", batch=32).total        # doctest: +SKIP
        627572736
    """
    if isinstance(model, (str, os.PathLike)) and is_ort_format(model):
        raise InputError(f"{Path(model).name} is an ORT-format model, whose graph the onnx package cannot read; count (or benchmark) the .onnx it was made from")
    try:
        import onnx
    except ImportError:
        raise InputError("counting FLOPs needs the onnx package: pip install onnx") from None
    proto = onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else model
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    _set_batch(m, batch, n_classes)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; nodes left unresolved are reported
        pass
    shapes = _shapes(m)
    total, by_op, uncounted = 0, {}, []
    for node in m.graph.node:
        if node.op_type not in _CONV_WEIGHT and node.op_type not in _MATMUL_B and node.op_type != "ConvTranspose":
            continue
        flops = _node_flops(node, shapes)
        if flops is None:
            uncounted.append(node.name or node.op_type)
            continue
        total += flops
        by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
    return FlopCount(int(total), by_op, tuple(uncounted))


def is_ort_format(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ORT-format model (``edgemeta export --ort``): a FlatBuffer with the
    file identifier ``ORTM``, which ONNX Runtime loads and the ``onnx`` package cannot parse."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"ORTM"
    except OSError:
        return False


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb(field_no: int, value: int | bytes) -> bytes:
    """One protobuf field: a varint (int) or length-delimited bytes."""
    if isinstance(value, int):
        return _varint(field_no << 3) + _varint(value)
    return _varint(field_no << 3 | 2) + _varint(len(value)) + value


def matmul_model_bytes(n: int) -> bytes:
    """A serialized ONNX model ``c = a @ b`` for float32 [n, n] inputs.

    Written field by field (ModelProto, GraphProto, NodeProto, ValueInfoProto), so the
    peak measurement needs no ``onnx`` package: the device side has only onnxruntime.
    """
    dims = _pb(1, _pb(1, n)) * 2  # TensorShapeProto.dim x2, Dimension.dim_value = n
    tensor = _pb(1, _pb(1, 1) + _pb(2, dims))  # TypeProto.tensor_type {elem_type FLOAT, shape}
    value_info = lambda name: _pb(1, name.encode()) + _pb(2, tensor)  # noqa: E731
    node = _pb(1, b"a") + _pb(1, b"b") + _pb(2, b"c") + _pb(3, b"peak") + _pb(4, b"MatMul")
    graph = _pb(1, node) + _pb(2, b"peak") + _pb(11, value_info("a")) + _pb(11, value_info("b")) + _pb(12, value_info("c"))
    return _pb(1, 8) + _pb(2, b"edgemeta") + _pb(7, graph) + _pb(8, _pb(2, 17))  # ir_version 8, opset 17


def int8_matmul_model_bytes(n: int, weights: np.ndarray) -> bytes:
    """A serialized ONNX model ``c = MatMulInteger(a, w)``: uint8 input ``a`` [n, n], int8
    weights ``w`` [n, n] stored in the model (so ONNX Runtime prepacks them, as it does a
    quantized layer's), int32 output. Written field by field, as :func:`matmul_model_bytes`."""
    dims = _pb(1, _pb(1, n)) * 2
    value_info = lambda name, elem: _pb(1, name.encode()) + _pb(2, _pb(1, _pb(1, elem) + _pb(2, dims)))  # noqa: E731
    w = np.ascontiguousarray(weights, dtype=np.int8)
    tensor = _pb(1, n) + _pb(1, n) + _pb(2, 3) + _pb(8, b"w") + _pb(9, w.tobytes())  # TensorProto: dims, INT8, name, raw_data
    node = _pb(1, b"a") + _pb(1, b"w") + _pb(2, b"c") + _pb(3, b"peak") + _pb(4, b"MatMulInteger")
    graph = _pb(1, node) + _pb(2, b"peak") + _pb(5, tensor) + _pb(11, value_info("a", 2)) + _pb(12, value_info("c", 6))  # UINT8 in, INT32 out
    return _pb(1, 8) + _pb(2, b"edgemeta") + _pb(7, graph) + _pb(8, _pb(2, 17))


def measure_int8_peak(threads: int, tuning: OrtTuning | None = None, sizes: Sequence[int] = (512, 1024, 2048), runs: int = 5) -> dict[str, Any]:
    """The CPU's int8 peak as ONNX Runtime reaches it: u8 x s8 ``MatMulInteger`` with
    prepacked weights (the kernels its quantized layers use: VNNI, AMX where the CPU has
    them), the best over ``sizes`` (which size runs fastest depends on the caches)."""
    rng = np.random.default_rng(0)
    best: dict[int, float] = {}
    for n in sizes:
        model = int8_matmul_model_bytes(n, rng.integers(-127, 128, (n, n), dtype=np.int8))
        sess = ort.InferenceSession(model, (tuning or OrtTuning()).session_options(threads), providers=["CPUExecutionProvider"])
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        best[n] = 2 * n**3 / time_fn(lambda: sess.run(None, {"a": a}), warmup=1, runs=runs).min_ms / 1e6
    return {"int8_peak_gops": max(best.values()), "int8_gops_by_size": best, "threads": threads}


def measure_peak_flops(threads: int, tuning: OrtTuning | None = None, n: int = 2048, runs: int = 5) -> dict[str, Any]:
    """The machine's float32 peak: the best of ``runs`` large MatMuls on ONNX Runtime and numpy.

    ONNX Runtime runs with ``threads`` intra-op threads; numpy's BLAS is limited to the same
    count when ``threadpoolctl`` is installed (else its result is reported, not used).
    """
    flops = 2 * n**3
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    sess = ort.InferenceSession(matmul_model_bytes(n), (tuning or OrtTuning()).session_options(threads), providers=["CPUExecutionProvider"])
    ort_best = time_fn(lambda: sess.run(None, {"a": a, "b": b}), warmup=1, runs=runs).min_ms
    result: dict[str, Any] = {"n": n, "threads": threads, "ort_gflops": flops / ort_best / 1e6}
    try:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads):
            np_best = time_fn(lambda: a @ b, warmup=1, runs=runs).min_ms
        result["numpy_gflops"], numpy_counts = flops / np_best / 1e6, True
    except ImportError:
        np_best = time_fn(lambda: a @ b, warmup=1, runs=runs).min_ms
        result["numpy_gflops"], numpy_counts = flops / np_best / 1e6, False
        result["numpy_note"] = "numpy's thread count is not controlled (no threadpoolctl); not used for the peak"
    result["peak_gflops"] = max(result["ort_gflops"], result["numpy_gflops"] if numpy_counts else 0.0)
    return result


def measure_gpu_peak_flops(provider: str = Provider.CUDA.value, n: int = GPU_PEAK_SIZE, runs: int = 5) -> dict[str, Any]:
    """The GPU's float32 MatMul peak as ONNX Runtime reaches it on ``provider`` (with that
    provider's default settings, under which the CUDA provider computes float32 MatMul and
    convolutions on TF32 tensor cores: about 410 TFLOP/s on an H200): inputs and output bound
    on the device with IO binding, so no copy is timed; the best of ``runs``.

    Raises:
        ProviderError: ``provider`` does not run the MatMul.
    """
    try:
        sess, said = open_ort_session(matmul_model_bytes(n), ort.SessionOptions(), [provider, Provider.CPU.value])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own pybind types
        raise ProviderError(f"{_short(provider)} cannot run the peak MatMul: {' '.join(str(e).split())[:200]}") from None
    if sess.get_providers()[0] != provider:
        raise ProviderError(f"{_short(provider)} did not load for the peak MatMul{'; ONNX Runtime said: ' + said if said else ''}")
    rng = np.random.default_rng(0)
    device = ("cuda", 0)
    binding = sess.io_binding()
    for name in ("a", "b"):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((n, n), dtype=np.float32), *device))
    binding.bind_output("c", *device)

    def call() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    best = time_fn(call, warmup=2, runs=runs).min_ms
    gflops = 2 * n**3 / best / 1e6
    return {"provider": _short(provider), "n": n, "ort_gflops": gflops, "peak_gflops": gflops}


# ============================================================================ models


@dataclass(frozen=True)
class ModelVariant:
    """One exported model file of the benchmarked model, at one precision."""

    precision: Precision
    path: Path
    origin: str  # "given", "found next to the model", "made from ..." (with the exporters)
    fingerprint: str
    backbone: str
    input_shape: tuple[int, int, int]  # C, H, W
    embedding_dim: int
    size_bytes: int
    fixed_batch: int | None = None  # the graph's batch size when it is fixed (it runs no other)
    dataset: str = ""  # the data set the model records it was trained on ("" if none)
    int8_stem: str | None = None  # an int8 model: how it runs its stem (ModelMetadata.int8_stem)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision.value,
            "path": str(self.path),
            "origin": self.origin,
            "fingerprint": self.fingerprint,
            "backbone": self.backbone,
            "input_shape": list(self.input_shape),
            "embedding_dim": self.embedding_dim,
            "size_mb": round(self.size_bytes / 1e6, 3),  # MB, as `edgemeta export` reports it
            "fixed_batch": self.fixed_batch,
            "dataset": self.dataset,
            "int8_stem": self.int8_stem,
        }


def _open_variant(path: Path, origin: str, threads: int) -> ModelVariant:
    """Load ``path`` once on the CPU to check it is an edgemeta model and read its metadata."""
    sess = Session(path, "cpu", options=SessionOptions(intra_op_threads=threads))
    meta = sess.metadata
    pp = meta.preprocess
    dataset = meta.extra.get("dataset")
    return ModelVariant(
        meta.precision, path, origin, meta.fingerprint, meta.backbone, (pp.channels, *pp.size), meta.embedding_dim, path.stat().st_size,
        sess.fixed_batch, dataset if isinstance(dataset, str) else "", meta.int8_stem,
    )


def _check_batch_sizes(variants: Sequence[ModelVariant], batch_sizes: Sequence[int]) -> None:
    """A graph with a fixed batch size runs that batch only: other batch sizes are refused
    before any measuring (the runtime pads a smaller call; the benchmark times the graph)."""
    for v in variants:
        other = [b for b in batch_sizes if v.fixed_batch is not None and b != v.fixed_batch]
        if other:
            raise InputError(
                f"{v.path} takes a fixed batch of {v.fixed_batch}, so batch size {', '.join(map(str, other))} cannot be timed: "
                f"pass --batch-sizes {v.fixed_batch}, or re-export it with a dynamic batch (`edgemeta export`)"
            )


def _base_stem(path: Path) -> str:
    """``model`` for ``model.onnx``, ``model.int8.onnx`` and ``model.fp32.onnx`` alike."""
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
    for p in Precision:
        if stem.endswith(f".{p.value}"):
            return stem[: -len(p.value) - 1]
    return stem


def _sibling(path: Path, precision: Precision) -> Path | None:
    """``model.int8.onnx`` next to ``model.onnx`` (and back); ``model.fp32.onnx`` counts as fp32."""
    stem = _base_stem(path)
    names = [f"{stem}.{precision.value}.onnx"] + ([f"{stem}.onnx"] if precision is Precision.FP32 else [])
    for name in names:
        cand = path.with_name(name)
        if cand.is_file() and cand.resolve() != path.resolve():
            return cand
    return None


def _make_variant(
    precision: Precision, fp32: ModelVariant | None, checkpoint: Path | None, workdir: Path, data_dir: str | None = None
) -> tuple[Path, str]:
    """Make a missing precision with the exporters: fp16 from the fp32 model; int8 calibrated on
    the checkpoint's training images; anything from the checkpoint. Not verified: only timed.
    Returns the file and what it was made from (for the notes)."""
    try:
        from edgemeta.exporters import ExportOptions, export_checkpoint, quantize_model, to_fp16
    except ImportError as e:
        raise InputError(f"making a {precision.value} model needs the exporters: {e}") from None
    out = workdir / f"{_base_stem(fp32.path if fp32 else checkpoint or Path('model'))}.{precision.value}.onnx"
    if fp32 is not None and precision is Precision.FP16:
        to_fp16(fp32.path, out)
        return out, f"{fp32.path.name} (fp16 conversion)"
    if fp32 is not None and checkpoint is not None and precision is Precision.INT8:
        quantize_model(fp32.path, checkpoint, out, ExportOptions(verify=None, data_dir=data_dir))
        return out, f"{fp32.path.name} and the checkpoint (int8 calibration)"
    if checkpoint is not None:
        export_checkpoint(checkpoint, out, ExportOptions(precision=precision, verify=None, data_dir=data_dir))
        return out, "the checkpoint"
    raise InputError(f"making a {precision.value} model needs --checkpoint (int8 is calibrated on its training images)")


def resolve_variants(
    models: Sequence[Path], precisions: Sequence[Precision], checkpoint: Path | None, workdir: Path, threads: int,
    batch_sizes: Sequence[int] = (), data_dir: str | None = None,
) -> list[ModelVariant]:
    """The models to benchmark: the given ones, or one per requested precision.

    A requested precision comes from a given model, else from a sibling file
    (``model.int8.onnx``), else it is made with the exporters (int8 calibrated on the
    training images, from ``data_dir``). ``batch_sizes``: those to be timed, which a
    fixed-batch model must take (checked before any variant is made).
    """
    given = [_open_variant(Path(m), "given", threads) for m in models]
    _check_given(given, checkpoint)
    _check_batch_sizes(given, batch_sizes)
    if checkpoint is not None:
        _check_fingerprints(given, checkpoint)  # before any time is spent making variants
    if not precisions:
        return given
    by_precision = {v.precision: v for v in given}
    out = []
    for precision in precisions:
        if precision in by_precision:
            out.append(by_precision[precision])
            continue
        found = next((s for v in given if (s := _sibling(v.path, precision)) is not None), None)
        if found is not None:
            out.append(_open_sibling(found, precision, given[0], checkpoint, threads))
            continue
        fp32 = by_precision.get(Precision.FP32)
        if fp32 is None or is_ort_format(fp32.path):  # the exporters read ONNX, not the ORT format
            fp32 = next((_open_sibling(s, Precision.FP32, given[0], checkpoint, threads) for v in given if (s := _sibling(v.path, Precision.FP32))), None)
        if checkpoint is None and (fp32 is None or precision is not Precision.FP16):
            raise InputError(
                f"no {precision.value} model: pass one, put {_base_stem(given[0].path)}.{precision.value}.onnx next to "
                f"{given[0].path.name}, or give --checkpoint to make it"
            )
        made, source = _make_variant(precision, fp32, checkpoint, workdir, data_dir)
        out.append(_open_variant(made, f"made from {source}", threads))
    if checkpoint is not None:
        _check_fingerprints(out, checkpoint)
    _check_batch_sizes(out, batch_sizes)
    return out


def _variant_notes(given: Sequence[Path], variants: Sequence[ModelVariant], temporary: bool) -> list[str]:
    """Which files ran, where they did not all come from the command line: a given model that
    --precisions leaves out, and each precision found beside it or made."""
    timed = {v.path.resolve() for v in variants}
    notes = [
        f"{p.name} was given but not timed: --precisions ({', '.join(v.precision.value for v in variants)}) leaves its precision out"
        for p in dict.fromkeys(given) if p.resolve() not in timed
    ]
    for v in variants:
        if v.origin != "given":
            where = " in a temporary folder, removed after the run" if temporary and v.origin.startswith("made") else ""
            notes.append(f"{v.precision.value}: {v.path.name}, {v.origin}{where}")
    return notes


def _name_precision(path: Path) -> Precision | None:
    """The precision a file's name says (``model.int8.onnx``: int8), or None (``model.onnx``)."""
    return next((p for p in Precision if path.stem.endswith(f".{p.value}")), None)


def _remake(path: Path, precision: Precision, first: ModelVariant, checkpoint: Path | None) -> str:
    """How to replace a model file that is not what it should be."""
    ckpt = str(checkpoint) if checkpoint is not None else "CHECKPOINT"
    # an .ort file comes from export --ort, which writes it beside the .onnx that -o names
    how = f"`edgemeta export {ckpt} --precision {precision.value} " + (f"--ort -o {path.with_suffix('.onnx')}`" if path.suffix == ".ort" else f"-o {path}`")
    if precision is Precision.INT8 and not is_ort_format(first.path) and first.precision is Precision.FP32:
        how += f" or `edgemeta quantize {first.path} -c {ckpt} -o {path}`"
    return f"remake it from the checkpoint {first.path.name} was exported from ({how}), or delete it"


def _kind(v: ModelVariant) -> str:
    """What a model is, in words: its backbone and input (``conv4 1x28x28``)."""
    return _describe(v.backbone, v.input_shape)


def _describe(backbone: str, input_shape: Sequence[int]) -> str:
    return f"{backbone} {'x'.join(map(str, input_shape))}"


def _check_given(given: Sequence[ModelVariant], checkpoint: Path | None) -> None:
    """Several models are precision variants of one model: the first one's fingerprint, one file
    per precision, each of the precision its name says. Raises once with every problem found."""
    first, problems, seen = given[0], [], {}
    for v in given:
        if _kind(v) != _kind(first):  # plainly another model: nothing about it is worth remaking
            problems.append(f"{v.path} is a {_kind(v)} model and {first.path.name} a {_kind(first)} model: benchmark different models one at a time")
            continue
        if v.fingerprint != first.fingerprint:
            problems.append(
                f"{v.path} is model {v.fingerprint}, but {first.path.name} is model {first.fingerprint} (several models are precision "
                f"variants of one model): benchmark different models one at a time; if it should be {first.path.name}'s "
                f"{v.precision.value} variant, {_remake(v.path, v.precision, first, checkpoint)}"
            )
        named = _name_precision(v.path)
        if named is not None and named is not v.precision:
            problems.append(f"{v.path} is an {v.precision.value} model though its name says {named.value}: {_remake(v.path, named, first, checkpoint)}")
        if v.precision in seen and os.path.samefile(seen[v.precision].path, v.path):
            problems.append(f"{v.path} is given twice; pass each model once")
        elif v.precision in seen:
            ort = " (benchmark an .ort file on its own)" if is_ort_format(v.path) != is_ort_format(seen[v.precision].path) else ""
            problems.append(f"{seen[v.precision].path} and {v.path} are both {v.precision.value} models; pass one model per precision{ort}")
        seen.setdefault(v.precision, v)
    if problems:
        raise ModelMismatchError("; ".join(problems))


def _open_sibling(path: Path, precision: Precision, first: ModelVariant, checkpoint: Path | None, threads: int) -> ModelVariant:
    """A model file found next to ``first`` for ``precision``: it must be ``first``'s model at that
    precision. One left over from another model (or a copy of another precision) would be compared
    with ``first`` as if it were its variant; the error names the file and how to replace it."""
    v = _open_variant(path, "found next to the model", threads)
    problems = []
    if v.fingerprint != first.fingerprint:
        problems.append(f"is model {v.fingerprint}, but {first.path.name} is model {first.fingerprint}")
    if v.precision is not precision:
        problems.append(f"is an {v.precision.value} model")
    if problems:
        raise ModelMismatchError(
            f"{path}, found next to {first.path.name} as its {precision.value} model, {' and '.join(problems)}: "
            f"{_remake(path, precision, first, checkpoint)}"
        )
    return v


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """The model fingerprint recorded in a checkpoint's header, read without torch (the
    safetensors metadata, through safetensors' numpy side, holds edgemeta's JSON document)."""
    return _checkpoint_header(path)[0]


def _checkpoint_header(path: str | os.PathLike) -> tuple[str, str]:
    """``(fingerprint, what the model is in words)`` from a checkpoint's header, without torch."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .safetensors file `edgemeta train` wrote")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    try:
        with safe_open(str(path), framework="numpy") as f:
            doc = json.loads((f.metadata() or {})["edgemeta"])
        fingerprint = str(doc["fingerprint"])
    except Exception:  # noqa: BLE001 - safetensors raises its own types for files that are not safetensors
        raise CheckpointError(f"{path} is not an edgemeta checkpoint (no readable edgemeta header); pass one written by `edgemeta train`") from None
    try:  # the words are a courtesy: a header without them still names the model by its fingerprint
        spec = doc["spec"]
        pp = spec["preprocess"]
        size = pp["size"] if isinstance(pp["size"], list) else [pp["size"], pp["size"]]
        kind = f" ({_describe(spec['backbone'], [pp['channels'], *size])})"
    except (KeyError, TypeError):
        kind = ""
    return fingerprint, kind


def _check_fingerprints(variants: Sequence[ModelVariant], checkpoint: Path) -> None:
    want, kind = _checkpoint_header(checkpoint)
    bad = [v for v in variants if v.fingerprint != want]
    if bad:
        raise ModelMismatchError(
            f"checkpoint {checkpoint.name} is model {want}{kind}, but "
            + ", ".join(f"{v.path.name} is model {v.fingerprint} ({_kind(v)})" for v in bad)
            + "; pass the checkpoint the model was exported from"
        )


def _providers(requested: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """ONNX Runtime provider names to benchmark, and the unavailable ones with the reason.

    ``auto`` keeps what this build has and reports the rest; a provider named
    explicitly that this build lacks is an error (the benchmark never runs elsewhere).
    """
    available = ort.get_available_providers()
    auto = any(p.strip().lower() == "auto" for p in requested)
    names, _ = resolve_providers("auto" if auto else list(requested))
    remote = [p for p in names if p in REMOTE_PROVIDERS]
    if remote:  # its sessions run every node on the CPU provider: rows under its name would be the CPU's
        raise ProviderError(f"{', '.join(remote)} sends requests to a remote endpoint and runs nothing on this machine; benchmark cpu (or cuda, tensorrt)")
    missing = [p for p in names if p not in available]
    if missing and not auto:
        raise ProviderError(
            f"provider(s) {', '.join(missing)} not available in this onnxruntime build (it has {', '.join(available)}); "
            "install onnxruntime-gpu for CUDA/TensorRT, or use --providers auto to report them as unavailable"
        )
    unavailable = {p: f"{_short(p)} unavailable (not in this onnxruntime build)" for p in missing}
    return [p for p in names if p in available], unavailable


def _short(provider: str) -> str:
    return {Provider.CPU.value: "CPU", Provider.CUDA.value: "CUDA", Provider.TENSORRT.value: "TensorRT"}.get(provider, provider)


def _bind_device(provider: str) -> tuple[str, int] | None:
    """Where a provider's inputs are bound for the timed calls: the CUDA device for CUDA and
    TensorRT, None (plain ``run`` with numpy arrays) for the CPU and any other provider, which
    this onnxruntime may not be able to allocate device memory for (AzureExecutionProvider)."""
    return ("cuda", 0) if provider in GPU_PROVIDERS else None


# ============================================================================ measurements


@dataclass(frozen=True)
class EmbeddingRow:
    """Embedding latency of one engine at one batch size."""

    provider: str
    precision: str
    engine: str  # "onnxruntime", "torch eager", "torch eager channels_last"
    batch: int
    latency: LatencyStats
    throughput_ips: float
    flops: int | None = None
    achieved_gflops: float | None = None
    peak_fraction: float | None = None
    speedup_vs_torch: float | None = None  # torch p50 (the faster torch line) / this p50
    speedup_vs_fp32: float | None = None  # ORT fp32 p50 / this p50
    repeat_p50_ms: float | None = None  # p50 of the second half of the calls (in the order they ran)
    repeatable: bool | None = None  # the two halves' p50s agree within REPEAT_TOLERANCE (None: under MIN_REPEAT_CALLS calls)
    first_half_p50_ms: float | None = None  # p50 of the first half of the calls

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = self.latency.to_dict(samples)
        return d


@dataclass(frozen=True)
class ClassesRow:
    """Classification latency at batch 1 with ``n_classes`` prototypes in the graph."""

    provider: str
    precision: str
    n_classes: int
    latency: LatencyStats
    vs_fewest: float  # p50 / p50 with the fewest classes measured
    predict: LatencyStats | None = None  # FewShotClassifier.predict: graph + softmax, top-1, verdict

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = self.latency.to_dict(samples)
        d["predict"] = self.predict.to_dict(samples) if self.predict else None
        return d


@dataclass(frozen=True)
class AdaptationRow:
    """Enrolling one class from K shots vs embedding the K images alone (same session)."""

    provider: str
    precision: str
    shots: int
    enroll: LatencyStats
    embed: LatencyStats
    ratio: float  # median over the timed pairs of enroll / the embed timed beside it
    method: str

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["enroll"], d["embed"] = self.enroll.to_dict(samples), self.embed.to_dict(samples)
        return d


@dataclass(frozen=True)
class ColdStartRow:
    """A fresh process: start -> imports -> session -> first prediction, in ms; its peak RSS."""

    provider: str
    precision: str
    interpreter_ms: float
    import_ms: float
    session_ms: float
    first_prediction_ms: float
    total_ms: float
    peak_rss_mb: float | None
    peak_rss_batch_mb: float | None  # after one more call at the largest batch size
    largest_batch: int

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        return asdict(self)


def _input_dtype(sess: ort.InferenceSession, name: str) -> type:
    t = next(i.type for i in sess.get_inputs() if i.name == name)
    return np.float16 if t == "tensor(float16)" else np.float32


def _ort_session(variant: ModelVariant, provider: str, config: BenchConfig) -> ort.InferenceSession:
    """The timed session: the benchmark's tuning, opened as the runtime opens its sessions
    (CUDA libraries preloaded, ONNX Runtime's fallback notices off stdout); the provider is
    checked to really run."""
    so = config.ort.session_options(config.resolved_threads)
    chain = [provider] if provider == Provider.CPU.value else [provider, Provider.CPU.value]
    try:
        sess, said = open_ort_session(variant.path, so, chain)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own pybind types
        raise ProviderError(f"{_short(provider)} cannot run {variant.path.name}: {' '.join(str(e).split())[:300]}") from None
    if sess.get_providers()[0] != provider:
        said = f"; ONNX Runtime said: {said}" if said else ""
        raise ProviderError(f"{_short(provider)} did not load for {variant.path.name} (the session runs {sess.get_providers()}){said}")
    return sess


def _images(variant: ModelVariant, batch: int, dtype: type, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, batch]).standard_normal((batch, *variant.input_shape)).astype(dtype)


def _measure(fn: Callable[[], Any], config: BenchConfig) -> LatencyStats:
    return time_fn(fn, config.warmup, config.runs, config.duration)


def _ort_embedding_fn(sess: ort.InferenceSession, variant: ModelVariant, batch: int, config: BenchConfig) -> Callable[[], Any]:
    """One call of ``embeddings`` at ``batch`` (no prototypes fed)."""
    feeds = {
        INPUT_IMAGES: _images(variant, batch, _input_dtype(sess, INPUT_IMAGES), config.seed),
        INPUT_PROTOTYPES: np.zeros((0, variant.embedding_dim), _input_dtype(sess, INPUT_PROTOTYPES)),
    }
    return lambda: sess.run([OUTPUT_EMBEDDINGS], feeds)


def _ort_classes(sess: ort.InferenceSession, variant: ModelVariant, n_classes: int, config: BenchConfig) -> LatencyStats:
    """The graph at batch 1 with ``n_classes`` prototypes, fed as the runtime feeds them: with
    their squared norms (kept with the store) when the model takes them, except on TensorRT;
    on CUDA and TensorRT bound once on the device (:func:`_bound_call`, :func:`_bind_device`)."""
    rng = np.random.default_rng([config.seed, n_classes])
    protos = rng.standard_normal((n_classes, variant.embedding_dim)).astype(_input_dtype(sess, INPUT_PROTOTYPES))
    batch = variant.fixed_batch or 1  # a fixed-batch graph: the call the runtime makes for one image, padded
    feeds = {INPUT_IMAGES: _images(variant, batch, _input_dtype(sess, INPUT_IMAGES), config.seed), INPUT_PROTOTYPES: protos}
    if feeds_prototype_norms(sess) and n_classes:
        feeds[INPUT_SQNORMS] = prototype_sqnorms(protos)
    device = _bind_device(sess.get_providers()[0])
    if device is None:
        return _measure(lambda: sess.run([OUTPUT_EMBEDDINGS, OUTPUT_LOGITS], feeds), config)
    return _measure(_bound_call(sess, feeds, device), config)


def _bound_call(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], device: tuple[str, int]) -> Callable[[], list[np.ndarray]]:
    """A graph call with IO binding, as the runtime makes it on a GPU: every input but the
    images is copied to ``device`` once (the store's prototypes stay there between calls);
    each call copies the images in and the outputs out. Without this, a 10,000-class row
    on a GPU would time the upload of the prototypes, which the runtime does not repeat."""
    fixed = {name: ort.OrtValue.ortvalue_from_numpy(value, *device) for name, value in feeds.items() if name != INPUT_IMAGES}
    images = feeds[INPUT_IMAGES]
    return lambda: run_bound(sess, images, fixed, [OUTPUT_EMBEDDINGS, OUTPUT_LOGITS], device)


def _runtime_options(config: BenchConfig, batch: int = 64) -> SessionOptions:
    """The benchmark's ONNX Runtime settings, as far as the runtime's sessions have them."""
    return SessionOptions(
        intra_op_threads=config.resolved_threads, inter_op_threads=config.ort.inter_op_threads, batch_size=batch,
        graph_optimization=config.ort.graph_optimization, allow_spinning=config.ort.allow_spinning,
    )


def _classifier(variant: ModelVariant, provider: str, config: BenchConfig) -> Any:
    from edgemeta.runtime.classifier import ClassifierOptions, FewShotClassifier

    batch = max(64, config.shots)  # K shots in one call: the session chunks at its own batch size too
    opts = ClassifierOptions(batch_size=batch, session=_runtime_options(config, batch))
    return FewShotClassifier(variant.path, providers=[provider], options=opts)


def _predict_latencies(variant: ModelVariant, provider: str, config: BenchConfig) -> dict[int, LatencyStats]:
    """``FewShotClassifier.predict`` on one image with 1 ... N enrolled classes (random prototypes)."""
    clf = _classifier(variant, provider, config)
    x = _images(variant, 1, np.float32, config.seed)
    rng = np.random.default_rng(config.seed)
    out = {}
    for n in sorted(config.class_counts):
        for i in range(len(clf.labels), n):
            clf.store.add(f"class{i}", rng.standard_normal((1, variant.embedding_dim)).astype(np.float32))
        out[n] = _measure(lambda: clf.predict(x), config)
    return out


def _adaptation(variant: ModelVariant, provider: str, config: BenchConfig) -> AdaptationRow:
    """Enrol K preprocessed images as a new class vs embed them, on the classifier's own session.

    Both start from the same preprocessed float tensors, so the ratio is the cost of
    enrolment itself (input checks, store update) over the embedding it needs. The two
    are timed alternately and the ratio is the median of each pair's: a change in the
    machine's speed hits both calls of a pair alike, where a ratio of the two p50s
    compares calls from different moments (on a shared 2-core machine the embedding's
    p50 alone moved by 20-40% between runs). Each enrolment adds a new class to a store
    of one class, and is forgotten (untimed) after its pair: the store does not grow
    with the number of calls.
    """
    clf = _classifier(variant, provider, config)
    clf.enroll("enrolled", x := _images(variant, config.shots, np.float32, config.seed))
    enroll, embed = time_pair(
        lambda: clf.enroll("new class", x), lambda: clf.session.embed(x), config.warmup, config.runs, config.duration,
        after=lambda: clf.forget("new class"),
    )
    return AdaptationRow(
        _short(provider), variant.precision.value, config.shots, enroll, embed, paired_ratio(enroll, embed),
        "FewShotClassifier.enroll vs Session.embed",
    )


_COLD_START = r"""
import sys, time
t0 = time.monotonic()
import json
import numpy as np
import onnxruntime
from edgemeta.runtime.session import Session, SessionOptions
t1 = time.monotonic()
path, provider, threads, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = Session(path, [provider], options=SessionOptions(intra_op_threads=threads, batch_size=max(big, 1)))
t2 = time.monotonic()
pp = s.preprocess
x = np.zeros((1, pp.channels, *pp.size), np.float32)
s.run(x, np.zeros((1, s.embedding_dim), np.float32))
t3 = time.monotonic()
def rss():
    # VmHWM: the peak RSS of this process image. getrusage's ru_maxrss would not do: Linux
    # carries it over from the spawning parent across exec.
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        try:
            import psutil
            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss) / 2**20
        except ImportError:
            return None
first = rss()
s.run(np.zeros((big, pp.channels, *pp.size), np.float32), np.zeros((1, s.embedding_dim), np.float32))
print(json.dumps({"t0": t0, "t1": t1, "t2": t2, "t3": t3, "rss": first, "rss_batch": rss()}))
"""


def _cold_start(variant: ModelVariant, provider: str, config: BenchConfig) -> ColdStartRow:
    """Start a fresh interpreter that imports the runtime, opens the model and predicts once.

    ``time.monotonic`` reads the same system-wide clock in both processes, so the
    child's timestamps are measured from the parent's moment of spawning it.
    """
    big = max(config.batch_sizes)
    args = [sys.executable, "-c", _COLD_START, str(variant.path), provider, str(config.resolved_threads), str(big)]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-300:]
        raise EdgemetaError(f"the cold-start process failed for {variant.path.name} on {_short(provider)}: {tail}")
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    ms = lambda a, b: (b - a) * 1e3  # noqa: E731
    return ColdStartRow(
        _short(provider), variant.precision.value, ms(start, t["t0"]), ms(t["t0"], t["t1"]), ms(t["t1"], t["t2"]),
        ms(t["t2"], t["t3"]), ms(start, t["t3"]), t["rss"], t["rss_batch"], big,
    )


class _TorchBaseline:
    """torch eager from the checkpoint: eval mode, inference mode, the benchmark's thread count.

    On CUDA its input and output stay on the GPU, while each ONNX Runtime call copies the
    images in and the embeddings out: the ratio to torch on a GPU favours torch."""

    def __init__(self, checkpoint: Path, threads: int) -> None:
        try:
            import torch
        except ImportError:
            raise InputError("the torch baseline needs torch (pip install 'edgemeta[train]'); or leave out --checkpoint") from None
        from edgemeta.checkpoint import load_checkpoint

        self.torch = torch
        self.saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.model = load_checkpoint(checkpoint).model.eval()
        self.models: dict[tuple[str, bool], Any] = {}

    def embed_fn(self, batch: int, channels_last: bool, device: str, config: BenchConfig, shape: tuple[int, ...]) -> Callable[[], Any]:
        """One call of the embedding at ``batch`` (run it inside :meth:`timing`)."""
        torch = self.torch
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        key = (device, channels_last)
        if key not in self.models:  # one copy per device and memory format, made once
            self.models[key] = copy.deepcopy(self.model).to(device=device, memory_format=memory_format)
        model = self.models[key]
        g = torch.Generator().manual_seed(config.seed)
        x = torch.randn((batch, *shape), generator=g).to(device=device, memory_format=memory_format)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def fn() -> None:
            model.embed(x)
            sync()

        return fn

    def timing(self) -> Any:
        """The context torch's calls are timed in: ``torch.inference_mode()``."""
        return self.torch.inference_mode()

    def device_for(self, provider: str) -> str | None:
        """torch's device for ``provider``'s rows: the CPU's, CUDA for CUDA and TensorRT; None
        where torch has no such device (no CUDA in this build) or no match (any other provider)."""
        if provider == Provider.CPU.value:
            return "cpu"
        return "cuda" if provider in GPU_PROVIDERS and self.torch.cuda.is_available() else None

    def close(self) -> None:
        self.torch.set_num_threads(self.saved_threads)


# ============================================================================ the report


@dataclass
class BenchReport:
    """Everything one :func:`run_benchmark` call measured; :meth:`to_dict` is the ``--json`` document."""

    machine: dict[str, Any]
    config: dict[str, Any]
    models: list[ModelVariant]
    embedding: list[EmbeddingRow] = field(default_factory=list)
    classes: list[ClassesRow] = field(default_factory=list)
    adaptation: list[AdaptationRow] = field(default_factory=list)
    cold_start: list[ColdStartRow] = field(default_factory=list)
    peak: dict[str, Any] | None = None  # the CPU's (measured when the CPU provider is benchmarked)
    gpu_peak: dict[str, Any] | None = None  # the GPU's (when a GPU provider is)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    backprop: list[BackpropResult] = field(default_factory=list)
    benchmark_peak_rss_mb: float | None = None

    @property
    def repeatability(self) -> dict[str, Any]:
        rows = [r for r in self.embedding if r.repeatable is not None]
        unjudged = len(self.embedding) - len(rows)
        noisy = [
            f"{_name(r)} batch {r.batch}: {r.first_half_p50_ms:.3f} vs {r.repeat_p50_ms:.3f} ms" for r in rows if not r.repeatable
        ]
        few = f"use --runs {MIN_REPEAT_CALLS} or more, or a longer --duration"
        if not rows:  # too few timed calls per measurement: no halves worth comparing
            verdict = (
                "repeatability not measured: it compares the p50s of the first and the second half of each measurement's "
                "calls, and " + (f"each embedding measurement timed fewer than {MIN_REPEAT_CALLS} calls; {few}" if self.embedding
                                 else "no embedding latency was measured")
            )
        elif noisy:
            verdict = (
                f"the machine was too noisy: {len(noisy)} of {len(rows)} p50s moved more than "
                f"{REPEAT_TOLERANCE:.0%} between the first and the second half of their calls"
            )
        else:
            verdict = f"repeatable: every p50 agreed within {REPEAT_TOLERANCE:.0%} between the first and the second half of its calls"
        if rows and unjudged:
            verdict += f" ({unjudged} measurement(s) timed fewer than {MIN_REPEAT_CALLS} calls and were not judged; {few})"
        return {"agree": bool(rows) and not noisy, "tolerance": REPEAT_TOLERANCE, "verdict": verdict, "noisy": noisy}

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        rows = lambda items: [r.to_dict(samples) for r in items]  # noqa: E731
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "machine": self.machine,
            "config": self.config,
            "models": [m.to_dict() for m in self.models],
            "unavailable": self.unavailable,
            "peak": self.peak,
            "gpu_peak": self.gpu_peak,
            "embedding": rows(self.embedding),
            "classes": rows(self.classes),
            "adaptation": rows(self.adaptation),
            "cold_start": rows(self.cold_start),
            "repeatability": self.repeatability,
            "backprop": [b.to_dict() for b in self.backprop],
            "benchmark_peak_rss_mb": self.benchmark_peak_rss_mb,
            "notes": self.notes,
        }


class _Steps:
    """Counts the steps of a run for the progress callback."""

    def __init__(self, total: int, progress: ProgressFn | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, what: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, what)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.total, self.total, "done")


def _n_steps(config: BenchConfig, providers: Sequence[str], n_variants: int) -> int:
    per_variant = 1 + len(config.class_counts) + 2 + int(config.cold_start)
    per_provider = n_variants * per_variant + len(config.batch_sizes)
    peaks = 2 * int(Provider.CPU.value in providers) + int(any(p in GPU_PROVIDERS for p in providers))
    return int(config.flops) * peaks + len(providers) * per_provider + n_variants * int(config.backprop_episodes > 0)


def _flops_for(variant: ModelVariant, batch: int, cache: dict, notes: list[str]) -> int | None:
    """The FLOPs of ``variant`` at ``batch``, or None with a note saying why: whatever goes wrong
    in counting, the latencies measured stand."""
    key = (variant.path, batch)
    if key not in cache:
        note = None
        try:
            count = count_flops(variant.path, batch)
        except InputError as e:  # no onnx package, or an .ort file: every other figure still stands
            note = f"FLOPs and % of peak not counted: {e}"
        except Exception as e:  # noqa: BLE001 - onnx raises its own types (protobuf, shape inference); the timings must survive
            note = f"FLOPs not counted for {variant.path.name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if note is not None:
            cache[key] = None
            if note not in notes:
                notes.append(note)
            return None
        if count.uncounted:
            notes.append(f"{variant.path.name}: {len(count.uncounted)} MAC node(s) of unknown shape not counted")
        cache[key] = count.total
    return cache[key]


SETTLE_S = 0.02  # pause before each block: the previous engine's idle threads stop spinning


def _embedding_rows(
    variants: list[ModelVariant], baseline: _TorchBaseline | None, provider: str, config: BenchConfig, report: BenchReport,
    steps: _Steps, flops_cache: dict,
) -> None:
    """Embedding latency at each batch size, in ``config.rounds`` rounds: each round times
    every precision and both torch lines in turn, a block of calls each, each ONNX Runtime
    session opened for its block and closed after it. Ratios between engines then hold even
    if the machine drifts. The p50s of the first and second half of each engine's calls (with
    several rounds, the first and the later rounds) are compared."""
    device = baseline.device_for(provider) if baseline is not None else None
    if baseline is not None and device is None:
        why = "this torch build has no CUDA" if provider in GPU_PROVIDERS else "torch has no device that matches this provider"
        report.notes.append(f"torch baseline skipped on {_short(provider)}: {why}")
    engines: list[ModelVariant | str] = [*variants, *(("torch eager", "torch eager channels_last") if device is not None else ())]
    rounds = config.rounds if config.duration is not None else min(config.rounds, config.runs)
    runs = [config.runs // rounds + int(r < config.runs % rounds) for r in range(rounds)]  # runs in all, spread over the rounds
    duration = None if config.duration is None else config.duration / rounds
    shape = variants[0].input_shape
    for batch in config.batch_sizes:
        steps(f"{_short(provider)} embedding, batch {batch}: " + (f"{len(engines)} engines in turn, {rounds} round(s)" if len(engines) > 1 else f"{rounds} round(s)"))
        blocks: list[list[LatencyStats]] = [[] for _ in engines]
        for r in range(rounds):
            for i, engine in enumerate(engines):
                time.sleep(SETTLE_S)
                if isinstance(engine, str):
                    fn = baseline.embed_fn(batch, engine.endswith("channels_last"), device, config, shape)
                    with baseline.timing():
                        blocks[i].append(time_fn(fn, config.warmup, runs[r], duration))
                    continue
                sess = _ort_session(engine, provider, config)
                blocks[i].append(time_fn(_ort_embedding_fn(sess, engine, batch, config), config.warmup, runs[r], duration))
                del sess
        for engine, mine in zip(engines, blocks):
            samples = [t for b in mine for t in b.samples_ms]  # in the order they ran
            lat, half = LatencyStats.from_samples(samples), len(samples) // 2
            first, second = (float(np.median(samples[:half])), float(np.median(samples[half:]))) if half else (None, None)
            judged = len(samples) >= MIN_REPEAT_CALLS
            common = dict(repeat_p50_ms=second, repeatable=_agree(first, second) if judged else None, first_half_p50_ms=first)
            if isinstance(engine, str):
                report.embedding.append(EmbeddingRow(_short(provider), "fp32", engine, batch, lat, lat.throughput(batch), **common))
                continue
            flops = _flops_for(engine, batch, flops_cache, report.notes) if config.flops else None
            achieved = flops / (lat.p50_ms / 1e3) / 1e9 if flops else None
            report.embedding.append(EmbeddingRow(
                _short(provider), engine.precision.value, "onnxruntime", batch, lat, lat.throughput(batch), flops, achieved, None, **common,
            ))  # share of peak: set in _wrap_up


def _class_rows(variant: ModelVariant, provider: str, config: BenchConfig, report: BenchReport, steps: _Steps) -> None:
    sess = _ort_session(variant, provider, config)
    graph = {}
    for n in sorted(config.class_counts):
        steps(f"{_short(provider)} {variant.precision.value} classification, {n:,} classes")
        graph[n] = _ort_classes(sess, variant, n, config)
    del sess
    steps(f"{_short(provider)} {variant.precision.value} FewShotClassifier.predict, {len(graph)} class counts")
    predict = _predict_latencies(variant, provider, config)
    fewest = graph[min(graph)].p50_ms
    for n, stats in graph.items():
        report.classes.append(ClassesRow(_short(provider), variant.precision.value, n, stats, stats.p50_ms / fewest, predict[n]))


def _cpu_peak(config: BenchConfig, variants: Sequence[ModelVariant]) -> dict[str, Any]:
    """The float32 peak, and the int8 one when an int8 model is benchmarked."""
    peak = measure_peak_flops(config.resolved_threads, config.ort, n=config.peak_size)
    if any(v.precision is Precision.INT8 for v in variants):
        peak.update(measure_int8_peak(config.resolved_threads, config.ort))
    return peak


def _best_peak(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    if first is None:
        return second
    best = dict(first if first["peak_gflops"] >= second["peak_gflops"] else second)
    best["measurements_gflops"] = [first["peak_gflops"], second["peak_gflops"]]
    if "int8_peak_gops" in first and "int8_peak_gops" in second:
        best["int8_peak_gops"] = max(first["int8_peak_gops"], second["int8_peak_gops"])
        best["int8_measurements_gops"] = [first["int8_peak_gops"], second["int8_peak_gops"]]
    return best


def _with_peak(row: EmbeddingRow, report: BenchReport) -> EmbeddingRow:
    """The row's share of its own processor's peak: the CPU's for CPU rows (its int8 peak
    for int8 models, when measured), the GPU's for CUDA and TensorRT rows; none for others."""
    peak = {_short(Provider.CPU.value): report.peak, **{_short(p): report.gpu_peak for p in GPU_PROVIDERS}}.get(row.provider)
    if row.achieved_gflops is None or peak is None:
        return row
    key = "int8_peak_gops" if row.precision == Precision.INT8.value and "int8_peak_gops" in peak else "peak_gflops"
    return replace(row, peak_fraction=row.achieved_gflops / peak[key])


def _add_ratios(report: BenchReport) -> None:
    """Fill ``speedup_vs_torch`` (vs the faster torch line) and ``speedup_vs_fp32`` on the ORT rows."""
    rows = report.embedding
    for i, r in enumerate(rows):
        if r.engine != "onnxruntime":
            continue
        same = [t for t in rows if t.provider == r.provider and t.batch == r.batch]
        torch_p50 = [t.latency.p50_ms for t in same if t.engine.startswith("torch")]
        fp32 = [t.latency.p50_ms for t in same if t.engine == "onnxruntime" and t.precision == "fp32"]
        rows[i] = replace(
            r,
            speedup_vs_torch=min(torch_p50) / r.latency.p50_ms if torch_p50 else None,
            speedup_vs_fp32=fp32[0] / r.latency.p50_ms if fp32 else None,
        )


def _work_notes(rows: Sequence[EmbeddingRow]) -> list[str]:
    """A note for each precision whose graph counts more work than the fp32 graph of the same
    model (an int8 space-to-depth stem computes its zero weights too): its GFLOP/s and % peak
    are of its own graph's count, so they overstate the useful work."""
    fp32 = {(r.provider, r.batch): r.flops for r in rows if r.engine == "onnxruntime" and r.precision == "fp32" and r.flops}
    notes = {}
    for r in rows:
        base = fp32.get((r.provider, r.batch))
        if r.engine == "onnxruntime" and r.precision != "fp32" and r.flops and base and r.flops > base * 1.005:
            notes.setdefault(r.precision, (
                f"the {r.precision} graph counts {r.flops / base - 1:.0%} more FLOPs than the fp32 graph (its stem, written as a "
                "space-to-depth convolution, multiplies zero weights too): its GFLOP/s and % peak are of its own count, not of the "
                "model's useful work"
            ))
    return list(notes.values())


_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")  # x86 VNNI / AMX, Arm dot product / int8 matmul


def _precision_notes(rows: Sequence[EmbeddingRow], threads: int, cpu_flags: Sequence[str] = ()) -> list[str]:
    """What to try where a reduced precision ran clearly slower than fp32 (one note per
    provider and precision).

    On many cores the int8 models' layout conversions (ONNX Runtime's transposes into and
    out of its NHWC int8 kernels) stop scaling before fp32 convolutions do: on a 16-core
    Xeon the shipped Conv-4 in int8 (float stem) was 1.8x fp32 at 2 threads and 0.34x at 16.
    On an H200 the CUDA provider ran the shipped Conv-4 in int8 at 0.44-0.86x fp32 (three
    runs, batch 1-256): it has no int8 convolutions, so a QDQ model runs in float with
    quantize and dequantize steps added. Other providers get a note without a diagnosis."""
    slow: dict[tuple[str, str], list[EmbeddingRow]] = {}
    for r in rows:
        ratio = r.speedup_vs_fp32
        if r.engine == "onnxruntime" and r.precision != "fp32" and ratio is not None and ratio < 1 / (1 + REPEAT_TOLERANCE):
            slow.setdefault((r.provider, r.precision), []).append(r)
    notes = []
    for (provider, precision), found in slow.items():
        int8 = precision == Precision.INT8.value
        these = "these batch sizes" if len(found) > 1 else "this batch size"
        if provider == "TensorRT":
            advice = ("TensorRT builds its own kernels per precision and GPU: compare with --providers cuda, "
                      "and check that this GPU has fast kernels for it")
        elif provider == "CUDA":
            advice = ("ONNX Runtime's CUDA provider has no int8 convolutions: it runs a QDQ model in float with quantize "
                      "and dequantize steps added, so use fp32 or fp16 on CUDA, or the TensorRT provider for int8"
                      if int8 else
                      f"at {these} the GPU waits on kernel launches and copies more than on arithmetic, "
                      "so a reduced precision cannot pay off; compare larger batches (--batch-sizes)")
        elif provider != "CPU":
            advice = f"this provider runs it slower than fp32 here; keep fp32 on {provider}, or compare another provider (--providers)"
        elif not int8:
            advice = "fp16 pays off on GPUs; ONNX Runtime's CPU provider lacks fast fp16 kernels for many operators"
        elif threads > 4:
            advice = ("int8 gains most on few cores; with many threads its layout conversions stop scaling: "
                      "compare both precisions at fewer threads (--threads 4, 8)")
        elif not any(f in cpu_flags for f in _INT8_FLAGS):
            advice = "this CPU reports no fast int8 instructions (VNNI, AMX, Arm dot product)"
        else:
            advice = "for so small a model the quantize and layout conversions outweigh the faster int8 convolutions"
        at = ", ".join(f"{r.speedup_vs_fp32:.2f}x at batch {r.batch}" for r in found)
        on = f" with {threads} threads" if provider == "CPU" else ""
        notes.append(f"{provider} {precision} ran slower than fp32{on} ({at}): {advice}")
    return notes


def run_benchmark(
    models: str | os.PathLike | Sequence[str | os.PathLike],
    config: BenchConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> BenchReport:
    """Benchmark exported models on every requested provider and precision (see the module doc).

    Args:
        models: one ``.onnx`` file, or several (precision variants of one model, side by side).
        config: what to measure; the defaults suit a quick run.
        checkpoint: the checkpoint the models were exported from: enables the torch eager
            baseline, and lets missing precisions be made. Its fingerprint must match.
        workdir: where precision variants made on the fly are written (default: a temp folder).
        progress: called as ``progress(done, total, what)`` before each step.

    Raises:
        InputError: a model file is missing, not ONNX, or breaks the edgemeta contract; bad settings.
        ProviderError: a provider asked for by name does not run.
        ModelMismatchError: the checkpoint is not the models' source; the models (or a file found
            next to them) are not one model's precision variants, one per precision.
    """
    config = config or BenchConfig()
    paths = [Path(models)] if isinstance(models, (str, os.PathLike)) else [Path(m) for m in models]
    if not paths:
        raise InputError("no model given; pass an .onnx file")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    providers, unavailable = _providers(config.providers)
    threads = config.resolved_threads
    if config.oversubscribed:  # said now, before the minutes of measuring; the report keeps it as a note
        warnings.warn(config.oversubscribed, RuntimeWarning, stacklevel=2)
    others = _OtherLoad()
    with _sigterm_exits(), tempfile.TemporaryDirectory(prefix="edgemeta-bench-") as tmp:
        if config.backprop_episodes:
            _check_backprop(config, paths[0])
        variants = resolve_variants(paths, config.precisions, ckpt, Path(workdir) if workdir else Path(tmp), threads, config.batch_sizes, config.data_dir)
        _warn_if_busy(others, threads)
        report = BenchReport(machine_info(), config.to_dict(), variants, unavailable=unavailable)
        report.notes += _variant_notes(paths, variants, workdir is None)
        report.notes += [
            f"{v.path.name} takes a fixed batch of {v.fixed_batch}: its classification latency is of a call of {v.fixed_batch} "
            "images (one image padded, as the runtime sends it)" for v in variants if v.fixed_batch and v.fixed_batch > 1
        ]
        baseline = _TorchBaseline(ckpt, threads) if ckpt is not None and config.torch_baseline else None
        steps = _Steps(_n_steps(config, providers, len(variants)), progress)
        try:
            _run_all(providers, variants, config, report, steps, baseline)
        finally:
            if baseline is not None:
                baseline.close()
        _wrap_up(report, providers, variants, config, steps)
    if baseline is None:
        report.notes.append("no torch baseline: pass --checkpoint (the checkpoint the model was exported from)")
    if config.oversubscribed:
        report.notes.append(config.oversubscribed)
    report.machine["other_processes_cores"] = others.cores()
    busy = _busy_note(report.machine["other_processes_cores"], report.machine["logical_cores"] or 1, threads)
    if busy:
        report.notes.append(busy)
    steps.finish()
    return report


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While a benchmark runs, SIGTERM (``timeout``, ``kill``) exits through ``SystemExit`` as
    Ctrl-C does through ``KeyboardInterrupt``, so the folder of made variants is removed and
    torch's thread count restored. Python's default for SIGTERM is to die on the spot. Only in
    the main thread, and only over that default (an application's own handler is left alone);
    the default comes back afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wrap_up(report: BenchReport, providers: list[str], variants: list[ModelVariant], config: BenchConfig, steps: _Steps) -> None:
    """The peaks (the CPU's again), the ratios, the backprop baseline, memory and load at the end."""
    threads = config.resolved_threads
    if config.flops and Provider.CPU.value in providers:  # again at the end: a busy moment at the start must not inflate the fractions
        steps("peak FLOP/s again")
        report.peak = _best_peak(report.peak, _cpu_peak(config, variants))
    if config.flops and any(p in GPU_PROVIDERS for p in providers):
        steps("GPU peak FLOP/s (large float32 MatMul on CUDA)")
        if any(r.provider in {_short(p) for p in GPU_PROVIDERS} for r in report.embedding):  # not when no GPU provider ran
            try:
                report.gpu_peak = measure_gpu_peak_flops(n=max(config.peak_size, GPU_PEAK_SIZE))
            except (ProviderError, RuntimeError) as e:  # RuntimeError: ONNX Runtime's own failures (out of memory, ...)
                report.notes.append(f"GPU peak not measured: {' '.join(str(e).split())[:200]}")
    report.embedding = [_with_peak(r, report) for r in report.embedding]
    _add_ratios(report)
    report.notes.extend(_precision_notes(report.embedding, threads, report.machine.get("cpu_flags") or ()))
    report.notes.extend(_work_notes(report.embedding))
    for variant in variants if config.backprop_episodes else ():  # each precision: both methods learn from its embeddings
        steps(f"backprop baseline on {variant.precision.value} embeddings, {config.backprop_episodes} episodes per shot count")
        try:
            report.backprop += backprop_baseline(
                variant.path, data=config.backprop_data, episodes=config.backprop_episodes, threads=threads, data_dir=config.data_dir,
                seed=config.seed, options=_runtime_options(config),
            )
        except (EdgemetaError, RuntimeError) as e:  # the timings above stay: a note says what is missing and why
            report.notes.append(f"backprop baseline on {variant.precision.value} embeddings not run: {' '.join(str(e).split())[:300]}")
    report.benchmark_peak_rss_mb = _peak_rss_mb()
    report.machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_ticks() -> tuple[float, float] | None:
    """(seconds of CPU busy on the whole machine, seconds used by this process and its
    waited-for children), from /proc/stat and os.times; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system + own.children_user + own.children_system


class _OtherLoad:
    """How many cores other processes (and the hypervisor) took while the benchmark ran."""

    def __init__(self) -> None:
        self.start, self.t0 = _cpu_ticks(), time.monotonic()

    def cores(self) -> float | None:
        end = _cpu_ticks()
        if self.start is None or end is None:
            return None
        wall = max(time.monotonic() - self.t0, 1e-9)
        return max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / wall)


def _busy_note(other_cores: float | None, logical_cores: int, threads: int | None = None, when: str = "during the run") -> str | None:
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


def _warn_if_busy(others: _OtherLoad, threads: int) -> None:
    """Say now, when the user can still stop and rerun, that other processes hold cores (the
    note at the end says it again if they kept on). Sampled for at least BUSY_SAMPLE_S, and
    only a load that 10 ms ticks cannot fake counts (BUSY_START_CORES)."""
    if others.start is None:  # no /proc/stat: nothing to sample
        return
    time.sleep(max(0.0, BUSY_SAMPLE_S - (time.monotonic() - others.t0)))
    cores = others.cores()
    if cores is not None and cores >= BUSY_START_CORES:
        busy = _busy_note(cores, logical_cores(), threads, when="as the benchmark started")
        warnings.warn(busy.replace("these timings", "the timings"), RuntimeWarning, stacklevel=2)


def _run_all(
    providers: list[str], variants: list[ModelVariant], config: BenchConfig, report: BenchReport, steps: _Steps, baseline: _TorchBaseline | None
) -> None:
    if config.flops and Provider.CPU.value in providers:
        steps("peak FLOP/s (large float32 MatMul; int8 too for int8 models)")
        report.peak = _cpu_peak(config, variants)
    flops_cache: dict = {}
    for provider in providers:
        running: list[ModelVariant] = []
        for variant in variants:
            steps(f"{_short(provider)} {variant.precision.value}: opening the session")
            try:
                _ort_session(variant, provider, config)  # does the provider run it? (timed sessions open later, one at a time)
            except ProviderError as e:
                if provider == Provider.CPU.value or "auto" not in [p.lower() for p in config.providers]:
                    raise
                if running:  # the provider runs, only not this precision
                    report.notes.append(f"{_short(provider)} {variant.precision.value} not measured: {e}")
                    continue
                report.unavailable[provider] = f"{_short(provider)} unavailable ({e})"
                break
            running.append(variant)
        if not running:
            continue
        _embedding_rows(running, baseline, provider, config, report, steps, flops_cache)
        for variant in running:
            _class_rows(variant, provider, config, report, steps)
            steps(f"{_short(provider)} {variant.precision.value}: enrolment vs embedding")
            report.adaptation.append(_adaptation(variant, provider, config))
            if config.cold_start:
                steps(f"{_short(provider)} {variant.precision.value}: cold start")
                try:
                    report.cold_start.append(_cold_start(variant, provider, config))
                except (EdgemetaError, subprocess.TimeoutExpired, ValueError, IndexError, KeyError) as e:  # the timings so far stand; no or bad JSON line
                    report.notes.append(f"cold start not measured for {variant.path.name} on {_short(provider)}: {' '.join(str(e).split())[:400]}")


# ============================================================================ backprop baseline


@dataclass(frozen=True)
class BackpropResult:
    """Prototype enrolment vs a last linear layer trained by backprop, on the same episodes.

    Times are per new class set (one episode's N classes), in ms: the embedding of the
    support images (shared by both) and each method's own adaptation step.
    """

    n_way: int
    k_shot: int
    episodes: int
    steps: int
    lr: float
    embed_ms: float
    prototype_ms: float
    backprop_ms: float
    prototype_accuracy: float
    prototype_ci95: float
    backprop_accuracy: float
    backprop_ci95: float
    precision: str  # of the exported model that embeds the images for both methods
    dataset: str = "omniglot-evaluation"  # where the episodes' classes come from (never the model's training classes)
    sgd_threads: int = SGD_THREADS  # torch threads of the SGD steps (see SGD_THREADS)

    @property
    def speedup(self) -> float:
        """How many times faster a class set is learned by prototypes, end to end (the
        support embedding, which both need, included)."""
        return (self.embed_ms + self.backprop_ms) / (self.embed_ms + self.prototype_ms)

    @property
    def learning_speedup(self) -> float:
        """How many times faster the learning step alone is: class means against the SGD
        steps, both from the same support embeddings."""
        return self.backprop_ms / self.prototype_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup, "learning_speedup": self.learning_speedup}


def _ci95(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    return 1.96 * float(a.std(ddof=1)) / math.sqrt(len(a)) if len(a) > 1 else float("nan")


def _train_linear(torch: Any, support: Any, labels: Any, n_way: int, steps: int, lr: float) -> Any:
    """Coral-style on-device training of the last layer: full-batch SGD on frozen embeddings.

    Embeddings are scaled to unit mean norm first, so one learning rate suits any backbone.
    """
    scale = support.norm(dim=1).mean().clamp_min(1e-12)
    x = support / scale
    layer = torch.nn.Linear(x.shape[1], n_way)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(layer(x), labels).backward()
        opt.step()
    return lambda q: layer(q / scale)


def _unknown_data(name: str) -> str:
    return f"--backprop-data {name!r} is neither omniglot, tiny-imagenet, digits nor an existing folder or zip of class folders"


def backprop_data(given: str | None, recorded: object, channels: int) -> str:
    """Which images the backprop baseline's episodes come from: ``given``
    (``--backprop-data``: the user vouches that the model never saw its classes), else the
    novel classes of the data set the model records, when it is one whose novel split
    edgemeta's training never touches (Omniglot's evaluation alphabets, Tiny-ImageNet's test
    classes), else Omniglot's evaluation classes for a grey model. A folder or the digits
    the model records are not followed: training used most of their classes. A colour model
    without such a record must be told."""
    from edgemeta.data import NOVEL_SPLITS, is_data_name

    if given is not None:
        if not is_data_name(given):
            raise InputError(_unknown_data(given))
        return given
    if recorded in NOVEL_SPLITS:
        return str(recorded)
    if channels == 1:
        return "omniglot"
    raise InputError(
        f"the backprop baseline needs images of classes the model was not trained on, and this {channels}-channel model records no "
        "data set with such a split; pass --backprop-data tiny-imagenet or a folder (or zip) of classes it never saw"
    )


def _backprop_episodes(
    spec: PreprocessSpec, data: str | None, recorded: object, data_dir: str | os.PathLike | None, shots: Sequence[int], n_way: int, queries: int, seed: int
) -> tuple[Any, list[Any]]:
    """The images and one episode sampler per shot count; every problem with the data (a
    missing set, images the model cannot take, too few images for the largest shot count)
    is raised here, before any episode runs."""
    from edgemeta.data import novel_images
    from edgemeta.episodes import EpisodeSampler

    images = novel_images(backprop_data(data, recorded, spec.channels), spec, data_dir, option="--backprop-data")
    remedy = "pass --backprop-data with more classes or more images per class"
    return images, [EpisodeSampler(images.labels, n_way, k, queries, seed, images.name, remedy=remedy) for k in shots]


def _check_backprop(config: BenchConfig, model: Path) -> None:
    """What the backprop baseline needs, checked before the minutes of measuring (and of
    making variants): torch, and episodes of the data for every shot count (the data is
    decoded now, and cached for the baseline)."""
    if importlib.util.find_spec("torch") is None:
        raise InputError("--backprop-baseline trains the last layer in torch, which is not installed: pip install 'edgemeta[train]'")
    sess = Session(model, "cpu", options=SessionOptions(intra_op_threads=1))
    recorded = sess.metadata.extra.get("dataset")
    _backprop_episodes(sess.preprocess, config.backprop_data, recorded, config.data_dir, BACKPROP_SHOTS, BACKPROP_WAYS, BACKPROP_QUERIES, config.seed)


def backprop_baseline(
    model: str | os.PathLike,
    *,
    data: str | None = None,
    shots: Sequence[int] = BACKPROP_SHOTS,
    n_way: int = BACKPROP_WAYS,
    queries: int = BACKPROP_QUERIES,
    episodes: int = 100,
    steps: int = 100,
    lr: float = 0.5,
    threads: int = 0,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    options: SessionOptions | None = None,
) -> list[BackpropResult]:
    """The skeptic's comparison on seeded episodes of novel classes (needs torch and the data).

    ``data`` names the images (see :func:`backprop_data`): by default the novel classes of the
    data set the model records (Omniglot, Tiny-ImageNet), else Omniglot's for a grey model.

    For each episode the support images are embedded by the exported model on ONNX
    Runtime; then (a) prototypes are the class means and queries are classified by the
    graph's logits, and (b) a linear layer is trained by ``steps`` SGD steps in torch
    (zero-initialised, momentum 0.9; on :data:`SGD_THREADS` thread) and queries
    are classified by it. ``threads``: ONNX Runtime's intra-op threads. With an int8
    model both methods learn from int8 embeddings, as on an int8 accelerator with
    on-device last-layer training (Coral's Edge TPU).

    Example:
        >>> [r.to_dict() for r in backprop_baseline("conv4.onnx", episodes=100)]   # doctest: +SKIP
    """
    try:
        import torch
    except ImportError:
        raise InputError("the backprop baseline needs torch: pip install 'edgemeta[train]'") from None
    from edgemeta.runtime.preprocess import normalize

    threads = threads or physical_cores()
    sess = Session(model, "cpu", options=options or SessionOptions(intra_op_threads=threads))
    images, samplers = _backprop_episodes(sess.preprocess, data, sess.metadata.extra.get("dataset"), data_dir, shots, n_way, queries, seed)
    saved = torch.get_num_threads()
    torch.set_num_threads(SGD_THREADS)
    try:
        return [_backprop_shots(torch, sess, images, normalize, sampler, episodes, steps, lr) for sampler in samplers]
    finally:
        torch.set_num_threads(saved)


def _backprop_shots(torch: Any, sess: Session, data: Any, normalize: Callable, sampler: Any, episodes: int, steps: int, lr: float) -> BackpropResult:
    """Two phases over the same episodes: ONNX Runtime only, then torch only.

    Interleaving them would time each engine while the other's idle threads still spin
    (ONNX Runtime's intra-op pool, torch's OpenMP team): on 2 cores that slowed the SGD
    steps 2.5-4x and the support embedding 3x, and flattered neither side honestly.
    """
    n, k = sampler.n_way, sampler.k_shot
    eps = list(sampler(episodes))
    t_embed, t_proto, t_bp, acc_proto, acc_bp, embedded = [], [], [], [], [], []
    for ep in eps:
        support_x = normalize(data.images[ep.support], sess.preprocess)
        query_x = normalize(data.images[ep.query], sess.preprocess)
        t0 = time.perf_counter()
        support = sess.embed(support_x)
        t1 = time.perf_counter()
        protos = support.reshape(n, k, -1).mean(axis=1)
        t2 = time.perf_counter()
        query, logits = sess.run(query_x, protos)
        acc_proto.append(float((logits.argmax(axis=1) == ep.query_labels).mean()))
        t_embed.append(t1 - t0)
        t_proto.append(t2 - t1)
        embedded.append((support, query))
    for ep, (support, query) in zip(eps, embedded):
        t3 = time.perf_counter()
        classify = _train_linear(torch, torch.from_numpy(support), torch.from_numpy(ep.support_labels), n, steps, lr)
        t4 = time.perf_counter()
        with torch.inference_mode():
            pred = classify(torch.from_numpy(query)).argmax(dim=1).numpy()
        acc_bp.append(float((pred == ep.query_labels).mean()))
        t_bp.append(t4 - t3)
    ms = lambda v: 1e3 * float(np.median(v))  # noqa: E731
    return BackpropResult(
        n, k, episodes, steps, lr, ms(t_embed), ms(t_proto), ms(t_bp),
        float(np.mean(acc_proto)), _ci95(acc_proto), float(np.mean(acc_bp)), _ci95(acc_bp), sess.metadata.precision.value,
        str(getattr(data, "name", "")),
    )


# ============================================================================ rendering


def _fmt(v: float | None, spec: str = "ms", suffix: str = "") -> str:
    """A table cell; ``spec="ms"`` keeps about four significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if spec == "ms":
        spec = ".3f" if v < 10 else ".2f" if v < 100 else ".1f" if v < 1000 else ",.0f"
    return f"{v:{spec}}{suffix}"


def _name(r: EmbeddingRow) -> str:
    engine = "ORT " + r.precision if r.engine == "onnxruntime" else r.engine.replace("torch eager", "torch").replace("channels_last", "CL")
    return engine if r.provider == "CPU" else f"{r.provider} {engine}"


def render_report(report: BenchReport, console: Any) -> None:
    """Print the report as rich tables on ``console`` (a ``rich.console.Console``)."""
    from rich import box
    from rich.table import Table

    m = report.machine
    console.print(
        f"[bold]{m['cpu']}[/], {m['physical_cores']} cores ({', '.join(m['cpu_flags']) or 'no vector flags read'}); "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch'] or 'not installed'}; threads {report.config['threads']}"
    )
    if report.peak:
        p = report.peak
        console.print(f"peak float32: {p['peak_gflops']:.1f} GFLOP/s (MatMul {p['n']}², ORT {p['ort_gflops']:.1f}, numpy {p['numpy_gflops']:.1f})")
        if "int8_peak_gops" in p:
            console.print(f"peak int8: {p['int8_peak_gops']:.0f} GOP/s (MatMulInteger u8 x s8, weights prepacked; int8 rows' % peak is of this)")
    if report.gpu_peak:
        p = report.gpu_peak
        console.print(f"GPU peak float32: {p['peak_gflops']:.0f} GFLOP/s (MatMul {p['n']}² on {p['provider']} with its default settings, TF32 where it allows; inputs on the GPU)")
    for v in report.models:
        if v.int8_stem:
            console.print(f"{v.path.name}: stem {v.int8_stem}")
    best_torch = {(r.provider, r.batch): r.latency.p50_ms for r in report.embedding if r.engine == "torch eager"}
    shown = [
        r for r in report.embedding  # channels-last only when it is the faster torch line (the JSON has it always)
        if not (r.engine == "torch eager channels_last" and r.latency.p50_ms >= best_torch.get((r.provider, r.batch), float("inf")))
    ]
    name = _name
    t = Table(title="Embedding latency (ms)", box=box.SIMPLE_HEAD)
    for col in ("model", "batch", "mean", "p50", "p90", "p99", "max", "img/s", "p50 again"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in shown:
        s = r.latency
        verdict = {True: "", False: " [red]noisy[/]", None: " [dim]too few calls[/]"}[r.repeatable]
        again = "-" if r.repeat_p50_ms is None else _fmt(r.repeat_p50_ms) + verdict
        cells = (s.mean_ms, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms)
        t.add_row(name(r), str(r.batch), *map(_fmt, cells), _fmt(r.throughput_ips, ",.0f"), again)
    console.print(t)
    t = Table(title="Embedding: work and ratios (p50)", box=box.SIMPLE_HEAD)
    for col in ("model", "batch", "MFLOP", "GFLOP/s", "% peak", "vs torch", "vs fp32"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in shown:
        if r.engine == "onnxruntime":
            t.add_row(
                name(r), str(r.batch), _fmt(r.flops and r.flops / 1e6, ",.1f"), _fmt(r.achieved_gflops, ".1f"),
                _fmt(r.peak_fraction and 100 * r.peak_fraction, ".0f" if (r.peak_fraction or 0) >= 0.01 else ".2g", "%"),
                _fmt(r.speedup_vs_torch, ".2f", "x"),
                _fmt(r.speedup_vs_fp32, ".2f", "x"),
            )
    console.print(t)
    if report.classes:
        t = Table(title="Classification latency at batch 1 (ms)", box=box.SIMPLE_HEAD)
        for col in ("model", "classes", "p50", "p99", "vs fewest", "predict() p50"):
            t.add_column(col, justify="right")
        for r in report.classes:
            t.add_row(
                f"{r.provider} {r.precision}", f"{r.n_classes:,}", _fmt(r.latency.p50_ms), _fmt(r.latency.p99_ms), _fmt(r.vs_fewest, ".2f", "x"),
                _fmt(r.predict and r.predict.p50_ms),
            )
        console.print(t)
    if report.adaptation:  # two narrow tables rather than one too wide for an 80-column terminal
        t = Table(title="Enrolment of K images vs embedding them (p50, ms)", box=box.SIMPLE_HEAD)
        for col in ("model", "K", "enrol", "embed", "ratio"):
            t.add_column(col, justify="right")
        for a in report.adaptation:
            t.add_row(f"{a.provider} {a.precision}", str(a.shots), _fmt(a.enroll.p50_ms), _fmt(a.embed.p50_ms), _fmt(a.ratio, ".2f", "x"))
        console.print(t)
    if report.cold_start:
        t = Table(title="Cold start: a fresh process to its first prediction (ms)", box=box.SIMPLE_HEAD)
        for col in ("model", "interpreter", "imports", "session", "1st pred", "total", "RSS MB"):
            t.add_column(col, justify="right")
        for c in report.cold_start:
            t.add_row(f"{c.provider} {c.precision}", _fmt(c.interpreter_ms, ".0f"), _fmt(c.import_ms, ".0f"), _fmt(c.session_ms, ".0f"),
                      _fmt(c.first_prediction_ms, ".1f"), _fmt(c.total_ms, ".0f"), _fmt(c.peak_rss_mb, ".0f"))
        console.print(t)
    for b in report.backprop:
        console.print(
            f"{b.n_way}-way {b.k_shot}-shot, {b.episodes} episodes of {b.dataset}, {b.precision} embeddings: "
            f"prototypes {100 * b.prototype_accuracy:.2f}% in {b.embed_ms + b.prototype_ms:.2f} ms; "
            f"backprop ({b.steps} SGD steps) {100 * b.backprop_accuracy:.2f}% in {b.embed_ms + b.backprop_ms:.2f} ms per class set "
            f"({b.speedup:.0f}x end to end; learning step alone {b.learning_speedup:.0f}x)"
        )
    for provider, why in report.unavailable.items():
        console.print(f"[yellow]{why}[/]")
    console.print(report.repeatability["verdict"])
    for note in report.notes:
        console.print(f"note: {note}")


def check_plot_path(path: str | os.PathLike) -> Path:
    """Check, before any measuring, that :func:`plot_report` can write ``path``: matplotlib is
    installed, the name ends in ``.png``, it is not a folder, and its folder exists and takes a
    new file (tried with a temporary file, which tells what permission bits do not: a read-only
    file system, ``/proc``, a root user).

    Raises:
        InputError: one of these does not hold (the message says which, and what to do).
    """
    import importlib.util

    from edgemeta.runtime.files import check_output

    path = Path(path)
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install matplotlib")
    if not path.is_dir() and path.suffix.lower() != ".png":
        raise InputError(f"--plot: {path} does not end in .png (the plot is a PNG); give a name such as {path.with_suffix('.png').name}")
    return check_output(path, option="--plot", what="PNG file")


def plot_report(report: BenchReport, path: str | os.PathLike) -> Path:
    """Write a PNG: latency distributions per configuration, and latency vs number of classes.

    Raises:
        InputError: ``path`` fails :func:`check_plot_path`, or the file cannot be written.
    """
    path = check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    rows = [r for r in report.embedding if r.latency.samples_ms]
    if rows:
        left.boxplot([[s / r.batch for s in r.latency.samples_ms] for r in rows], whis=(1, 99), showfliers=False)
        ticks = [f"{r.engine.replace('torch eager', 'torch')}\n{r.provider} {r.precision}\nb={r.batch}" for r in rows]
        left.set_xticks(range(1, len(rows) + 1), ticks, fontsize=7)
        left.set_yscale("log")
        left.set_ylabel("ms per image (box: p25-p75, whiskers: p1-p99)")
        left.set_title("Embedding latency per image")
    groups: dict[tuple[str, str], list[ClassesRow]] = {}
    for r in report.classes:
        groups.setdefault((r.provider, r.precision), []).append(r)
    for (provider, precision), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.n_classes)
        line = right.errorbar(
            [r.n_classes for r in rs], [r.latency.p50_ms for r in rs],
            yerr=[[0] * len(rs), [r.latency.p99_ms - r.latency.p50_ms for r in rs]], marker="o", capsize=3, label=f"{provider} {precision}: graph",
        )
        if all(r.predict for r in rs):
            right.plot(
                [r.n_classes for r in rs], [r.predict.p50_ms for r in rs], "--", marker="x",
                color=line[0].get_color(), label=f"{provider} {precision}: predict()",
            )
    right.set_xscale("log")
    right.set_xlabel("enrolled classes")
    right.set_ylabel("ms (p50; bar to the graph's p99)")
    right.set_title("Classification at batch 1 vs number of classes")
    if groups:
        right.legend()
    right.set_ylim(bottom=0)
    fig.suptitle(f"{report.machine['cpu']}, {report.config['threads']} threads, onnxruntime {report.machine['onnxruntime']}", fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    except OSError as e:
        raise InputError(f"--plot: could not write {path} ({e.strerror or e}); choose another path") from None
    finally:
        plt.close(fig)
    return path
