"""Rendering a :class:`~edgemeta.bench.report.BenchReport`: rich tables for people, a matplotlib plot."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from edgemeta.bench.measure import ClassesRow, row_name
from edgemeta.bench.report import BenchReport
from edgemeta.runtime.errors import InputError


def _fmt(v: float | None, spec: str = "ms", suffix: str = "") -> str:
    """A table cell; ``spec="ms"`` keeps about four significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if spec == "ms":
        spec = ".3f" if v < 10 else ".2f" if v < 100 else ".1f" if v < 1000 else ",.0f"
    return f"{v:{spec}}{suffix}"


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
        console.print(
            f"peak float32: {p['peak_gflops']:.1f} GFLOP/s (MatMul {p['n']}², "
            f"ORT {p['ort_gflops']:.1f}, numpy {p['numpy_gflops']:.1f})"
        )
        if "int8_peak_gops" in p:
            console.print(
                f"peak int8: {p['int8_peak_gops']:.0f} GOP/s (MatMulInteger "
                "u8 x s8, weights prepacked; int8 rows' % peak is of this)"
            )
    if report.gpu_peak:
        p = report.gpu_peak
        console.print(
            f"GPU peak float32: {p['peak_gflops']:.0f} GFLOP/s (MatMul {p['n']}² on {p['provider']} with its default "
            "settings, TF32 where it allows; inputs on the GPU)"
        )
    for v in report.models:
        if v.int8_stem:
            console.print(f"{v.path.name}: stem {v.int8_stem}")
    best_torch = {(r.provider, r.batch): r.latency.p50_ms for r in report.embedding if r.engine == "torch eager"}
    shown = [
        r
        for r in report.embedding  # channels-last only when it is the faster torch line (the JSON has it always)
        if not (
            r.engine == "torch eager channels_last"
            and r.latency.p50_ms >= best_torch.get((r.provider, r.batch), float("inf"))
        )
    ]
    name = row_name
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
                name(r),
                str(r.batch),
                _fmt(r.flops and r.flops / 1e6, ",.1f"),
                _fmt(r.achieved_gflops, ".1f"),
                _fmt(
                    r.peak_fraction and 100 * r.peak_fraction, ".0f" if (r.peak_fraction or 0) >= 0.01 else ".2g", "%"
                ),
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
                f"{r.provider} {r.precision}",
                f"{r.n_classes:,}",
                _fmt(r.latency.p50_ms),
                _fmt(r.latency.p99_ms),
                _fmt(r.vs_fewest, ".2f", "x"),
                _fmt(r.predict and r.predict.p50_ms),
            )
        console.print(t)
    if report.adaptation:  # two narrow tables rather than one too wide for an 80-column terminal
        t = Table(title="Enrolment of K images vs embedding them (p50, ms)", box=box.SIMPLE_HEAD)
        for col in ("model", "K", "enrol", "embed", "ratio"):
            t.add_column(col, justify="right")
        for a in report.adaptation:
            t.add_row(
                f"{a.provider} {a.precision}",
                str(a.shots),
                _fmt(a.enroll.p50_ms),
                _fmt(a.embed.p50_ms),
                _fmt(a.ratio, ".2f", "x"),
            )
        console.print(t)
    if report.frames:
        f0 = report.frames[0]
        t = Table(
            title=f"predict() on decoded {f0.frame} uint8 frames vs the model call on the preprocessed tensor "
            "(p50, ms)",
            box=box.SIMPLE_HEAD,
        )
        for col in ("model", "batch", "predict()", "model call", "ratio", "rounds"):
            t.add_column(col, justify="right")
        for f in report.frames:
            t.add_row(
                f"{f.provider} {f.precision}",
                str(f.batch),
                _fmt(f.predict.p50_ms),
                _fmt(f.model.p50_ms),
                _fmt(f.ratio, ".2f", "x"),
                f"{f.ratio_min:.2f}-{f.ratio_max:.2f}x ({len(f.round_ratios)})",
            )
        console.print(t)
        console.print(
            f"ratio: median over the rounds of predict() p50 / model call p50 in the same round; "
            f"{f0.classes} classes enrolled; model call: {f0.baseline}",
            markup=False,
            highlight=False,
        )
        for note in dict.fromkeys(f.capped for f in report.frames if f.capped):
            console.print(f"batch: {note}", markup=False, highlight=False)
    if report.cold_start:
        t = Table(title="Cold start: a fresh process to its first prediction (ms)", box=box.SIMPLE_HEAD)
        for col in ("model", "interpreter", "imports", "session", "1st pred", "total", "RSS MB"):
            t.add_column(col, justify="right")
        for c in report.cold_start:
            t.add_row(
                f"{c.provider} {c.precision}",
                _fmt(c.interpreter_ms, ".0f"),
                _fmt(c.import_ms, ".0f"),
                _fmt(c.session_ms, ".0f"),
                _fmt(c.first_prediction_ms, ".1f"),
                _fmt(c.total_ms, ".0f"),
                _fmt(c.peak_rss_mb, ".0f"),
            )
        console.print(t)
    for b in report.backprop:
        console.print(
            f"{b.n_way}-way {b.k_shot}-shot, {b.episodes} episodes of {b.dataset}, {b.precision} embeddings: "
            f"prototypes {100 * b.prototype_accuracy:.2f}% in {b.embed_ms + b.prototype_ms:.2f} ms; backprop "
            f"({b.steps} SGD steps) {100 * b.backprop_accuracy:.2f}% in {b.embed_ms + b.backprop_ms:.2f} ms "
            f"per class set ({b.speedup:.0f}x end to end; learning step alone {b.learning_speedup:.0f}x)"
        )
    for row, why in report.skipped.items():
        console.print(f"skipped: {row}: {why}", markup=False, highlight=False)
    for why in report.unavailable.values():
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
        raise InputError(
            f"--plot: {path} does not end in .png (the plot is a PNG); give a name such as "
            f"{path.with_suffix('.png').name}"
        )
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
            [r.n_classes for r in rs],
            [r.latency.p50_ms for r in rs],
            yerr=[[0] * len(rs), [r.latency.p99_ms - r.latency.p50_ms for r in rs]],
            marker="o",
            capsize=3,
            label=f"{provider} {precision}: graph",
        )
        if all(r.predict for r in rs):
            right.plot(
                [r.n_classes for r in rs],
                [r.predict.p50_ms for r in rs],
                "--",
                marker="x",
                color=line[0].get_color(),
                label=f"{provider} {precision}: predict()",
            )
    right.set_xscale("log")
    right.set_xlabel("enrolled classes")
    right.set_ylabel("ms (p50; bar to the graph's p99)")
    right.set_title("Classification at batch 1 vs number of classes")
    if groups:
        right.legend()
    right.set_ylim(bottom=0)
    fig.suptitle(
        f"{report.machine['cpu']}, {report.config['threads']} threads, onnxruntime {report.machine['onnxruntime']}",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    except OSError as e:
        raise InputError(f"--plot: could not write {path} ({e.strerror or e}); choose another path") from None
    finally:
        plt.close(fig)
    return path
