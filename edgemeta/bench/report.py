"""The benchmark run: :func:`run_benchmark` puts every measurement into one :class:`BenchReport`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemeta.bench.backprop import BackpropResult, backprop_baseline, check_backprop
from edgemeta.bench.config import GPU_PEAK_SIZE, REPEAT_TOLERANCE, BenchConfig
from edgemeta.bench.flops import count_flops, measure_gpu_peak_flops, measure_int8_peak, measure_peak_flops
from edgemeta.bench.frames import FRAMES_ROW, FramesRow, frames_skip_reason, measure_frames
from edgemeta.bench.machine import OtherLoad, busy_note, machine_info, process_peak_rss_mb, warn_if_busy
from edgemeta.bench.measure import (
    AdaptationRow,
    ClassesRow,
    ColdStartRow,
    EmbeddingRow,
    TorchBaseline,
    embedding_call,
    measure_adaptation,
    measure_cold_start,
    predict_latencies,
    row_name,
    runtime_options,
    time_classes,
    timed_session,
)
from edgemeta.bench.models import ModelVariant, providers_to_run, resolve_variants, variant_notes
from edgemeta.bench.timing import LatencyStats, halves_agree, time_fn
from edgemeta.runtime.errors import EdgemetaError, InputError, ProviderError
from edgemeta.runtime.ort import GPU_PROVIDERS, Provider, display_name
from edgemeta.runtime.session import takes_pixels
from edgemeta.runtime.spec import Precision

REPORT_FORMAT = "edgemeta.benchmark"
REPORT_VERSION = 1

# Calls a measurement needs for a repeatability verdict: a p50 of one or two calls says
# little, so with fewer than 5 per half the row reports both halves and judges nothing.
MIN_REPEAT_CALLS = 10

ProgressFn = Callable[[int, int, str], None]  # (done, total, what is running now)


@dataclass
class BenchReport:
    """Everything one :func:`run_benchmark` call measured; :meth:`to_dict` is the ``--json`` document."""

    machine: dict[str, Any]
    config: dict[str, Any]
    models: list[ModelVariant]
    embedding: list[EmbeddingRow] = field(default_factory=list)
    classes: list[ClassesRow] = field(default_factory=list)
    adaptation: list[AdaptationRow] = field(default_factory=list)
    frames: list[FramesRow] = field(default_factory=list)
    cold_start: list[ColdStartRow] = field(default_factory=list)
    peak: dict[str, Any] | None = None  # the CPU's (measured when the CPU provider is benchmarked)
    gpu_peak: dict[str, Any] | None = None  # the GPU's (when a GPU provider is)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # "row (model file)" -> why it was not measured
    backprop: list[BackpropResult] = field(default_factory=list)
    benchmark_peak_rss_mb: float | None = None

    @property
    def repeatability(self) -> dict[str, Any]:
        rows = [r for r in self.embedding if r.repeatable is not None]
        unjudged = len(self.embedding) - len(rows)
        noisy = [
            f"{row_name(r)} batch {r.batch}: {r.first_half_p50_ms:.3f} vs {r.repeat_p50_ms:.3f} ms"
            for r in rows
            if not r.repeatable
        ]
        few = f"use --runs {MIN_REPEAT_CALLS} or more, or a longer --duration"
        if not rows:  # too few timed calls per measurement: no halves worth comparing
            verdict = (
                "repeatability not measured: it compares the p50s of the "
                "first and the second half of each measurement's calls, and "
                + (
                    f"each embedding measurement timed fewer than {MIN_REPEAT_CALLS} calls; {few}"
                    if self.embedding
                    else "no embedding latency was measured"
                )
            )
        elif noisy:
            verdict = (
                f"the machine was too noisy: {len(noisy)} of {len(rows)} p50s moved more than "
                f"{REPEAT_TOLERANCE:.0%} between the first and the second half of their calls"
            )
        else:
            verdict = (
                f"repeatable: every p50 agreed within {REPEAT_TOLERANCE:.0%} "
                "between the first and the second half of its calls"
            )
        if rows and unjudged:
            verdict += (
                f" ({unjudged} measurement(s) timed fewer than {MIN_REPEAT_CALLS} calls and were not judged; {few})"
            )
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
            "frames": rows(self.frames),
            "cold_start": rows(self.cold_start),
            "repeatability": self.repeatability,
            "backprop": [b.to_dict() for b in self.backprop],
            "benchmark_peak_rss_mb": self.benchmark_peak_rss_mb,
            "notes": self.notes,
            "skipped": self.skipped,
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
    per_variant = 1 + len(config.class_counts) + 3 + int(config.cold_start)
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
    variants: list[ModelVariant],
    baseline: TorchBaseline | None,
    provider: str,
    config: BenchConfig,
    report: BenchReport,
    steps: _Steps,
    flops_cache: dict,
) -> None:
    """Embedding latency at each batch size, in ``config.rounds`` rounds: each round times
    every precision and both torch lines in turn, a block of calls each, each ONNX Runtime
    session opened for its block and closed after it. Ratios between engines then hold even
    if the machine drifts. The p50s of the first and second half of each engine's calls (with
    several rounds, the first and the later rounds) are compared."""
    device = baseline.device_for(provider) if baseline is not None else None
    if baseline is not None and device is None:
        why = (
            "this torch build has no CUDA"
            if provider in GPU_PROVIDERS
            else "torch has no device that matches this provider"
        )
        report.notes.append(f"torch baseline skipped on {display_name(provider)}: {why}")
    engines: list[ModelVariant | str] = [
        *variants,
        *(("torch eager", "torch eager channels_last") if device is not None else ()),
    ]
    rounds = config.rounds if config.duration is not None else min(config.rounds, config.runs)
    runs = [
        config.runs // rounds + int(r < config.runs % rounds) for r in range(rounds)
    ]  # runs in all, spread over the rounds
    duration = None if config.duration is None else config.duration / rounds
    shape = variants[0].input_shape
    for batch in config.batch_sizes:
        steps(
            f"{display_name(provider)} embedding, batch {batch}: "
            + (f"{len(engines)} engines in turn, {rounds} round(s)" if len(engines) > 1 else f"{rounds} round(s)")
        )
        blocks: list[list[LatencyStats]] = [[] for _ in engines]
        for r in range(rounds):
            for i, engine in enumerate(engines):
                time.sleep(SETTLE_S)
                if isinstance(engine, str):
                    fn = baseline.embed_fn(batch, engine.endswith("channels_last"), device, config, shape)
                    with baseline.timing():
                        blocks[i].append(time_fn(fn, config.warmup, runs[r], duration))
                    continue
                sess = timed_session(engine, provider, config)
                blocks[i].append(time_fn(embedding_call(sess, engine, batch, config), config.warmup, runs[r], duration))
                del sess
        for engine, mine in zip(engines, blocks):
            samples = [t for b in mine for t in b.samples_ms]  # in the order they ran
            lat, half = LatencyStats.from_samples(samples), len(samples) // 2
            first, second = (
                (float(np.median(samples[:half])), float(np.median(samples[half:]))) if half else (None, None)
            )
            judged = len(samples) >= MIN_REPEAT_CALLS
            common = dict(
                repeat_p50_ms=second,
                repeatable=halves_agree(first, second) if judged else None,
                first_half_p50_ms=first,
            )
            if isinstance(engine, str):
                report.embedding.append(
                    EmbeddingRow(display_name(provider), "fp32", engine, batch, lat, lat.throughput(batch), **common)
                )
                continue
            flops = _flops_for(engine, batch, flops_cache, report.notes) if config.flops else None
            achieved = flops / (lat.p50_ms / 1e3) / 1e9 if flops else None
            report.embedding.append(
                EmbeddingRow(
                    display_name(provider),
                    engine.precision.value,
                    "onnxruntime",
                    batch,
                    lat,
                    lat.throughput(batch),
                    flops,
                    achieved,
                    None,
                    **common,
                )
            )  # share of peak: set in _wrap_up


def _class_rows(variant: ModelVariant, provider: str, config: BenchConfig, report: BenchReport, steps: _Steps) -> None:
    sess = timed_session(variant, provider, config)
    graph = {}
    for n in sorted(config.class_counts):
        steps(f"{display_name(provider)} {variant.precision.value} classification, {n:,} classes")
        graph[n] = time_classes(sess, variant, n, config)
    del sess
    steps(f"{display_name(provider)} {variant.precision.value} FewShotClassifier.predict, {len(graph)} class counts")
    predict = predict_latencies(variant, provider, config)
    fewest = graph[min(graph)].p50_ms
    for n, stats in graph.items():
        report.classes.append(
            ClassesRow(display_name(provider), variant.precision.value, n, stats, stats.p50_ms / fewest, predict[n])
        )


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
    peak = {
        display_name(Provider.CPU.value): report.peak,
        **{display_name(p): report.gpu_peak for p in GPU_PROVIDERS},
    }.get(row.provider)
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
    fp32 = {
        (r.provider, r.batch): r.flops for r in rows if r.engine == "onnxruntime" and r.precision == "fp32" and r.flops
    }
    notes = {}
    for r in rows:
        base = fp32.get((r.provider, r.batch))
        if r.engine == "onnxruntime" and r.precision != "fp32" and r.flops and base and r.flops > base * 1.005:
            notes.setdefault(
                r.precision,
                (
                    f"the {r.precision} graph counts {r.flops / base - 1:.0%} more FLOPs than the fp32 "
                    "graph (its stem, written as a space-to-depth convolution, multiplies zero weights "
                    "too): its GFLOP/s and % peak are of its own count, not of the model's useful work"
                ),
            )
    return list(notes.values())


_INT8_FLAGS = (
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "asimddp",
    "i8mm",
)  # x86 VNNI / AMX, Arm dot product / int8 matmul


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
        if (
            r.engine == "onnxruntime"
            and r.precision != "fp32"
            and ratio is not None
            and ratio < 1 / (1 + REPEAT_TOLERANCE)
        ):
            slow.setdefault((r.provider, r.precision), []).append(r)
    notes = []
    for (provider, precision), found in slow.items():
        int8 = precision == Precision.INT8.value
        these = "these batch sizes" if len(found) > 1 else "this batch size"
        if provider == "TensorRT":
            advice = (
                "TensorRT builds its own kernels per precision and GPU: compare with --providers cuda, "
                "and check that this GPU has fast kernels for it"
            )
        elif provider == "CUDA":
            advice = (
                "ONNX Runtime's CUDA provider has no int8 convolutions: it runs a QDQ model in float with quantize "
                "and dequantize steps added, so use fp32 or fp16 on CUDA, or the TensorRT provider for int8"
                if int8
                else f"at {these} the GPU waits on kernel launches and copies more than on arithmetic, "
                "so a reduced precision cannot pay off; compare larger batches (--batch-sizes)"
            )
        elif provider != "CPU":
            advice = (
                "this provider runs it slower than fp32 here; keep fp32 "
                f"on {provider}, or compare another provider (--providers)"
            )
        elif not int8:
            advice = "fp16 pays off on GPUs; ONNX Runtime's CPU provider lacks fast fp16 kernels for many operators"
        elif threads > 4:
            advice = (
                "int8 gains most on few cores; with many threads its layout conversions stop scaling: "
                "compare both precisions at fewer threads (--threads 4, 8)"
            )
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
    rebuild_module: bool = False,
) -> BenchReport:
    """Benchmark exported models on every requested provider and precision (see the module doc).

    Args:
        models: one ``.onnx`` file, or several (precision variants of one model, side by side).
        config: what to measure; the defaults suit a quick run.
        checkpoint: the checkpoint the models were exported from: enables the torch eager
            baseline, and lets missing precisions be made. Its fingerprint must match.
        workdir: where precision variants made on the fly are written (default: a temp folder).
        progress: called as ``progress(done, total, what)`` before each step.
        rebuild_module: an `export --module` model: rebuild its module from the code its metadata
            names for the torch baseline (the user's consent to run that code; never done unasked,
            with --checkpoint or without: the weights' recorded hash does not vouch for the code).

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
    providers, unavailable = providers_to_run(config.providers)
    threads = config.resolved_threads
    if config.oversubscribed:  # said now, before the minutes of measuring; the report keeps it as a note
        warnings.warn(config.oversubscribed, RuntimeWarning, stacklevel=2)
    others = OtherLoad()
    with _sigterm_exits(), tempfile.TemporaryDirectory(prefix="edgemeta-bench-") as tmp:
        if config.backprop_episodes:
            check_backprop(config, paths[0])
        variants = resolve_variants(
            paths,
            config.precisions,
            ckpt,
            Path(workdir) if workdir else Path(tmp),
            threads,
            config.batch_sizes,
            config.data_dir,
        )
        _check_rebuild(variants[0], ckpt, rebuild_module, config.torch_baseline)
        warn_if_busy(others, threads)
        report = BenchReport(machine_info(), config.to_dict(), variants, unavailable=unavailable)
        report.notes += variant_notes(paths, variants, workdir is None)
        report.notes += [
            f"{v.path.name} takes a fixed batch of {v.fixed_batch}: its classification latency "
            f"is of a call of {v.fixed_batch} images (one image padded, as the runtime sends it)"
            for v in variants
            if v.fixed_batch and v.fixed_batch > 1
        ]
        baseline, no_baseline = _torch_baseline(ckpt, variants[0], config, rebuild_module) if variants else (None, "")
        steps = _Steps(_n_steps(config, providers, len(variants)), progress)
        try:
            _run_all(providers, variants, config, report, steps, baseline)
        finally:
            if baseline is not None:
                baseline.close()
        _wrap_up(report, providers, variants, config, steps)
    if baseline is None and no_baseline:
        report.notes.append(no_baseline)
    if config.oversubscribed:
        report.notes.append(config.oversubscribed)
    report.machine["other_processes_cores"] = others.cores()
    busy = busy_note(report.machine["other_processes_cores"], report.machine["logical_cores"] or 1, threads)
    if busy:
        report.notes.append(busy)
    steps.finish()
    return report


def _check_rebuild(first: ModelVariant, checkpoint: Path | None, rebuild_module: bool, baseline: bool) -> None:
    """Before any measuring: ``--rebuild-module`` is for an `export --module` model only, with its
    weights where it has some; and ``--checkpoint`` of such a model (whose only use is the torch
    baseline) needs ``--rebuild-module`` too, as the baseline runs the code its metadata names."""
    if rebuild_module and not first.module:
        raise InputError(
            "--rebuild-module is for a model `edgemeta export --module` made; "
            f"{first.path.name} is not one; leave --rebuild-module out"
        )
    if rebuild_module and first.weights_sha256 and checkpoint is None:
        raise InputError(
            f"{first.path.name} was exported from {first.module} with weights {first.weights_sha256[:12]}...: "
            "pass them with --checkpoint too (or leave --rebuild-module out)"
        )
    if first.module and checkpoint is not None and not rebuild_module and baseline:
        raise InputError(
            f"{first.path.name} was exported from {first.module}: its torch baseline imports and runs the code its "
            "metadata names, which matching weights do not vouch for; add --rebuild-module if you trust that code, "
            "or leave out --checkpoint"
        )


def _torch_baseline(
    checkpoint: Path | None, first: ModelVariant, config: BenchConfig, rebuild_module: bool = False
) -> tuple[TorchBaseline | None, str]:
    """The torch eager baseline, or None and the note that says why there is none.

    A checkpoint's model needs ``--checkpoint``. An `export --module` model is rebuilt from its
    metadata (as `edgemeta verify` does), which imports and runs the code the metadata names: the
    model file is untrusted, so only when the user asks. ``--checkpoint`` names its weights,
    checked against the recorded hash; either way it needs ``rebuild_module`` (``--rebuild-module``,
    checked before measuring), and a note says why not where it cannot be rebuilt."""
    if not config.torch_baseline:
        return None, ""
    threads = config.resolved_threads
    if first.module and checkpoint is None and not first.weights_sha256:
        if not rebuild_module:
            return None, (
                f"no torch baseline: {first.path.name} was exported from {first.module} without weights; rebuilding "
                "it imports and runs the code its metadata names: add --rebuild-module if you trust that code"
            )
        try:
            return TorchBaseline(None, threads, first, rebuild_module=True), ""
        except EdgemetaError as e:
            return None, f"no torch baseline: {first.module} could not be rebuilt ({' '.join(str(e).split())[:200]})"
    if first.wrapped_from:  # it came from an ONNX file, not from torch: --checkpoint is refused for it
        return None, (
            f"no torch baseline: {first.path.name} was wrapped from the ONNX file {first.wrapped_from}, "
            "which is its reference (`edgemeta verify -c` checks against it); it has no torch module"
        )
    if checkpoint is None:
        if first.module:
            return None, (
                f"no torch baseline: pass --checkpoint with the weights {first.module} was exported with, and "
                "--rebuild-module if you trust the code its metadata names"
            )
        return None, "no torch baseline: pass --checkpoint (the checkpoint the model was exported from)"
    return TorchBaseline(checkpoint, threads, first, rebuild_module), ""


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While a benchmark runs, SIGTERM (``timeout``, ``kill``) exits through ``SystemExit`` as
    Ctrl-C does through ``KeyboardInterrupt``, so the folder of made variants is removed and
    torch's thread count restored. Python's default for SIGTERM is to die on the spot. Only in
    the main thread, and only over that default (an application's own handler is left alone);
    the default comes back afterwards."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wrap_up(
    report: BenchReport, providers: list[str], variants: list[ModelVariant], config: BenchConfig, steps: _Steps
) -> None:
    """The peaks (the CPU's again), the ratios, the backprop baseline, memory and load at the end."""
    threads = config.resolved_threads
    if (
        config.flops and Provider.CPU.value in providers
    ):  # again at the end: a busy moment at the start must not inflate the fractions
        steps("peak FLOP/s again")
        report.peak = _best_peak(report.peak, _cpu_peak(config, variants))
    if config.flops and any(p in GPU_PROVIDERS for p in providers):
        steps("GPU peak FLOP/s (large float32 MatMul on CUDA)")
        if any(
            r.provider in {display_name(p) for p in GPU_PROVIDERS} for r in report.embedding
        ):  # not when no GPU provider ran
            try:
                report.gpu_peak = measure_gpu_peak_flops(n=max(config.peak_size, GPU_PEAK_SIZE))
            except (ProviderError, RuntimeError) as e:  # RuntimeError: ONNX Runtime's own failures (out of memory, ...)
                report.notes.append(f"GPU peak not measured: {' '.join(str(e).split())[:200]}")
    report.embedding = [_with_peak(r, report) for r in report.embedding]
    _add_ratios(report)
    report.notes.extend(_precision_notes(report.embedding, threads, report.machine.get("cpu_flags") or ()))
    report.notes.extend(_work_notes(report.embedding))
    for variant in (
        variants if config.backprop_episodes else ()
    ):  # each precision: both methods learn from its embeddings
        steps(
            f"backprop baseline on {variant.precision.value} embeddings, "
            f"{config.backprop_episodes} episodes per shot count"
        )
        try:
            report.backprop += backprop_baseline(
                variant.path,
                data=config.backprop_data,
                episodes=config.backprop_episodes,
                threads=threads,
                data_dir=config.data_dir,
                seed=config.seed,
                options=runtime_options(config),
            )
        except (EdgemetaError, RuntimeError) as e:  # the timings above stay: a note says what is missing and why
            report.notes.append(
                f"backprop baseline on {variant.precision.value} embeddings not run: {' '.join(str(e).split())[:300]}"
            )
    report.benchmark_peak_rss_mb = process_peak_rss_mb()
    report.machine["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _run_all(
    providers: list[str],
    variants: list[ModelVariant],
    config: BenchConfig,
    report: BenchReport,
    steps: _Steps,
    baseline: TorchBaseline | None,
) -> None:
    if config.flops and Provider.CPU.value in providers:
        steps("peak FLOP/s (large float32 MatMul; int8 too for int8 models)")
        report.peak = _cpu_peak(config, variants)
    flops_cache: dict = {}
    pixels: dict[ModelVariant, bool] = {}
    for provider in providers:
        running: list[ModelVariant] = []
        for variant in variants:
            steps(f"{display_name(provider)} {variant.precision.value}: opening the session")
            try:
                # does the provider run it? (timed sessions open later, one at a time)
                pixels[variant] = takes_pixels(timed_session(variant, provider, config))
            except ProviderError as e:
                if provider == Provider.CPU.value or "auto" not in [p.lower() for p in config.providers]:
                    raise
                if running:  # the provider runs, only not this precision
                    report.notes.append(f"{display_name(provider)} {variant.precision.value} not measured: {e}")
                    continue
                report.unavailable[provider] = f"{display_name(provider)} unavailable ({e})"
                break
            running.append(variant)
        if not running:
            continue
        _embedding_rows(running, baseline, provider, config, report, steps, flops_cache)
        for variant in running:
            _class_rows(variant, provider, config, report, steps)
            steps(f"{display_name(provider)} {variant.precision.value}: enrolment vs embedding")
            report.adaptation.append(measure_adaptation(variant, provider, config))
            steps(f"{display_name(provider)} {variant.precision.value}: predict on decoded frames vs the model call")
            skip = frames_skip_reason(variant, pixels[variant])
            if skip is None:
                report.frames += measure_frames(variant, provider, config)
            else:
                report.skipped[f"{FRAMES_ROW} ({variant.path.name})"] = skip
            if config.cold_start:
                steps(f"{display_name(provider)} {variant.precision.value}: cold start")
                try:
                    report.cold_start.append(measure_cold_start(variant, provider, config))
                except (
                    EdgemetaError,
                    subprocess.TimeoutExpired,
                    ValueError,
                    IndexError,
                    KeyError,
                ) as e:  # the timings so far stand; no or bad JSON line
                    report.notes.append(
                        f"cold start not measured for {variant.path.name} on {display_name(provider)}: "
                        f"{' '.join(str(e).split())[:400]}"
                    )
