"""``edgemeta benchmark``: latency of an exported model against the alternatives, in one run.

The command maps its options onto :class:`edgemeta.bench.BenchConfig` and one
:func:`edgemeta.bench.run_benchmark` call; the library does the measuring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional

import typer

from edgemeta.cli._app import command, console, emit_json, out
from edgemeta.runtime.errors import InputError


def _ints(text: str, option: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{option} takes comma-separated integers such as {example}; got {text!r}") from None


def _frame_size(text: str) -> tuple[int, int]:
    """``640x480`` -> (640, 480); the range is the config's to check."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise InputError(f"--frame-size takes WIDTHxHEIGHT such as 640x480; got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """A progress bar on a terminal; elsewhere a line per stage and a heartbeat (edgemeta.progress)."""
    if not enabled:
        from edgemeta.progress import StageLog, plain_progress_wanted

        if not plain_progress_wanted():
            yield None
            return
        with StageLog() as log:
            yield lambda done, total, what: log.stage(what, done, total)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("benchmark", total=None)
        yield lambda done, total, what: bar.update(task, completed=done, total=total, description=what)


@command("benchmark")
def benchmark(
    models: List[Path] = typer.Argument(
        ...,
        help="Exported .onnx (or .ort) model(s); several = precision "
        "variants of one model, one per precision, side by side.",
    ),
    checkpoint: Optional[Path] = typer.Option(
        None,
        "--checkpoint",
        help="The checkpoint the model came from: torch eager baseline, and missing precisions. For an `export "
        "--module` model, its --weights (with --rebuild-module).",
    ),
    rebuild_module: bool = typer.Option(
        False,
        "--rebuild-module",
        help="Torch baseline of an `export --module` model, with its weights (--checkpoint) or without: rebuild the "
        "module from the code its metadata names (imports and runs it; only for a model file you trust; matching "
        "weights do not vouch for the code).",
    ),
    providers: str = typer.Option(
        "auto", help="auto (every provider this onnxruntime has; others reported unavailable) or e.g. cpu,cuda."
    ),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes (1 to 4096)."),
    precisions: str = typer.Option(
        "",
        help="Comma-separated fp32,fp16,int8; missing ones are found next to MODEL (MODEL.int8.onnx) or made: fp16 "
        "from the fp32 model, the others from --checkpoint.",
    ),
    threads: int = typer.Option(
        0,
        help="Threads for ONNX Runtime and torch alike (the backprop baseline's SGD steps: one); 0 = physical cores "
        "(more than the logical cores: a warning; more than 4x: refused).",
    ),
    spinning: bool = typer.Option(
        True,
        "--spinning/--no-spinning",
        help="Idle ONNX Runtime threads spin between calls (its default) or sleep (saves power and cores).",
    ),
    warmup: int = typer.Option(10, help="Untimed calls before each measurement."),
    runs: Optional[int] = typer.Option(
        None,
        help="Timed calls per measurement (100 unless --duration is given); a repeatability verdict needs 10 or more.",
    ),
    duration: Optional[float] = typer.Option(None, help="Seconds per measurement instead of --runs."),
    rounds: int = typer.Option(
        4,
        help="Embedding latency in this many rounds, each timing every engine in turn (a fresh session each), so "
        "ratios survive a drifting machine.",
    ),
    classes: str = typer.Option("1,100,10000", help="Enrolled class counts for classification latency at batch 1."),
    shots: int = typer.Option(5, help="K images per class for the enrolment measurement."),
    cold_start: bool = typer.Option(
        True, "--cold-start/--no-cold-start", help="Time a fresh process up to its first prediction."
    ),
    backprop_baseline: bool = typer.Option(
        False,
        "--backprop-baseline",
        help="Also compare prototypes with 100 SGD steps of last-layer backprop on seeded episodes of novel classes, "
        "on each precision's embeddings (needs torch).",
    ),
    episodes: Optional[int] = typer.Option(
        None, help="Episodes per shot count (5-way 1-shot and 5-shot) for --backprop-baseline (default 100)."
    ),
    backprop_data: Optional[str] = typer.Option(
        None,
        "--backprop-data",
        help="Images of classes the model never saw, for --backprop-baseline: omniglot (its evaluation "
        "classes), tiny-imagenet (its test classes), digits, or a folder/zip of class folders. Default: the "
        "novel classes of omniglot or tiny-imagenet when the model records it, else omniglot for a grey model.",
    ),
    data_dir: Optional[Path] = typer.Option(
        None,
        "--data-dir",
        help="Data folder of the named data sets, for --backprop-baseline and the int8 calibration of a model made "
        "from --checkpoint (default: $EDGEMETA_DATA_DIR, else ~/.cache/edgemeta/data).",
    ),
    frame_size: Optional[str] = typer.Option(
        None,
        "--frame-size",
        help="WIDTHxHEIGHT of the decoded uint8 frames (random pixels) that predict() is given in the 'predict on "
        "frames' row, timed against the model call on the preprocessed tensor, at batch 1 and the largest batch; "
        "models with the pixels entry only. Default 640x480, a VGA camera frame.",
    ),
    frame_channels: Optional[int] = typer.Option(
        None,
        "--frame-channels",
        help="Channels of those frames: 1 grey, 3 RGB (default), 4 RGBA as browsers and many cameras give them.",
    ),
    dim: Optional[List[str]] = typer.Option(
        None,
        "--dim",
        help="A model without the edgemeta contract: the size of a free input dimension, "
        "NAME=N or INPUT:AXIS=N (repeat: --dim batch=8 --dim seq=128). A free first axis "
        "takes --batch-sizes; names like seq or length 128, height or width 224.",
    ),
    optimization: str = typer.Option(
        "all",
        "--optimization",
        help="A model without the edgemeta contract: ONNX Runtime's "
        "graph optimization level, disable, basic, extended or all.",
    ),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="A model without the edgemeta contract: also profile it with "
        "ONNX Runtime and list the operators that take the most time.",
    ),
    generic: bool = typer.Option(
        False,
        "--generic",
        help="Measure an edgemeta model as any ONNX model (generated inputs; --dim, --optimization, --profile).",
    ),
    samples: bool = typer.Option(False, "--samples", help="Put every timing in the --json output."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Write latency distributions and the classes curve to this PNG."
    ),
) -> None:
    """Measure latency, throughput, FLOP/s, enrolment, predict() on frames and cold start; compare with torch."""
    from edgemeta.bench import (
        BENCH_SESSION_OPTIONS,
        BenchConfig,
        check_plot_path,
        plot_report,
        render_report,
        run_benchmark,
    )

    if _any_onnx(models, generic, dim, optimization, profile):
        generic_options = {
            "--checkpoint": checkpoint,
            "--rebuild-module": rebuild_module or None,
            "--precisions": precisions or None,
            "--backprop-baseline": backprop_baseline or None,
            "--episodes": episodes,
            "--backprop-data": backprop_data,
            "--data-dir": data_dir,
            "--plot": plot,
            "--duration": duration,
            "--frame-size": frame_size,
            "--frame-channels": frame_channels,
        }
        _benchmark_any(
            models,
            providers,
            batch_sizes,
            threads,
            warmup,
            runs,
            dim or [],
            optimization,
            profile,
            generic_options,
            samples,
            json_out,
        )
        return
    if runs is not None and duration is not None:
        raise InputError("give --runs or --duration, not both")
    if episodes is not None and not backprop_baseline:
        raise InputError(
            "--episodes sets the episodes of --backprop-baseline; add --backprop-baseline or leave --episodes out"
        )
    if data_dir is not None and not backprop_baseline and checkpoint is None:
        raise InputError(
            "--data-dir is where --backprop-baseline and the int8 calibration of a --checkpoint find their data; add "
            "one of them or leave --data-dir out"
        )
    if samples and not json_out:
        raise InputError("--samples adds every timing to the --json output; add --json or leave --samples out")
    episodes = 100 if episodes is None else episodes
    if backprop_baseline and episodes < 1:
        raise InputError(f"--episodes must be at least 1 with --backprop-baseline, got {episodes}")
    if plot is not None:
        check_plot_path(plot)  # now, not after minutes of measuring
    frames = {} if frame_size is None else {"frame_size": _frame_size(frame_size)}
    if frame_channels is not None:
        frames["frame_channels"] = frame_channels
    config = BenchConfig(
        providers=_words(providers),
        batch_sizes=_ints(batch_sizes, "--batch-sizes", "1,32"),
        precisions=_words(precisions),
        threads=threads,
        warmup=warmup,
        runs=100 if runs is None else runs,
        duration=duration,
        rounds=rounds,
        class_counts=_ints(classes, "--classes", "1,100,10000"),
        shots=shots,
        cold_start=cold_start,
        backprop_episodes=episodes if backprop_baseline else 0,
        backprop_data=backprop_data,
        data_dir=None if data_dir is None else str(data_dir),
        ort=replace(BENCH_SESSION_OPTIONS, allow_spinning=spinning),
        **frames,
    )
    with _progress_bar(console.is_terminal) as progress:
        report = run_benchmark(models, config, checkpoint=checkpoint, progress=progress, rebuild_module=rebuild_module)
    if json_out:
        emit_json(report.to_dict(samples=samples))
    else:
        render_report(report, out)
    if plot is not None:  # after the report: a plot that cannot be written loses nothing measured
        console.print(f"wrote {plot_report(report, plot)}", markup=False, highlight=False, soft_wrap=True)


def _any_onnx(models: List[Path], generic: bool, dim: Optional[List[str]], optimization: str, profile: bool) -> bool:
    """Whether to measure the models as any ONNX model: asked for, or none has the edgemeta contract.
    A model that does not load goes the edgemeta way, which says what is wrong with it."""
    from edgemeta.bench.generic import has_edgemeta_contract

    if generic:
        return True

    def contract(m: Path) -> bool:
        try:
            return has_edgemeta_contract(m)
        except InputError:
            return True

    kinds = [contract(m) for m in models]
    if all(kinds):
        given = [o for o, v in (("--dim", dim), ("--optimization", optimization != "all"), ("--profile", profile)) if v]
        if given:
            raise InputError(
                f"{', '.join(given)} apply to models measured as any ONNX "
                "model; add --generic to measure an edgemeta model so"
            )
        return False
    if any(kinds):
        raise InputError(
            "some models have the edgemeta contract and some do not; benchmark them in separate runs (or add --generic)"
        )
    return True


def _benchmark_any(
    models: List[Path],
    providers: str,
    batch_sizes: str,
    threads: int,
    warmup: int,
    runs: Optional[int],
    dim: List[str],
    optimization: str,
    profile: bool,
    edgemeta_only: dict,
    samples: bool,
    json_out: bool,
) -> None:
    """``benchmark`` on models without the edgemeta contract: :func:`edgemeta.bench.generic.run_generic` on each."""
    from edgemeta.bench.generic import GenericConfig, parse_dims, render_generic, run_generic
    from edgemeta.runtime.session import GraphOptimization

    given = [o for o, v in edgemeta_only.items() if v is not None]
    if given:
        raise InputError(
            f"{', '.join(given)} need a model with the edgemeta contract "
            "(made by `edgemeta export`); leave them out for any ONNX model"
        )
    if samples and not json_out:
        raise InputError("--samples adds every timing to the --json output; add --json or leave --samples out")
    levels = [g.value for g in GraphOptimization]
    if optimization not in levels:
        raise InputError(f"--optimization {optimization!r}: use one of {', '.join(levels)}")
    config = GenericConfig(
        providers=providers,
        threads=threads,
        optimization=GraphOptimization(optimization),
        warmup=warmup,
        runs=100 if runs is None else runs,
        dims=parse_dims(dim),
        batch_sizes=_ints(batch_sizes, "--batch-sizes", "1,32"),
        profile=profile,
    )
    with _progress_bar(console.is_terminal) as progress:
        reports = [run_generic(m, config, progress) for m in models]
    if json_out:
        docs = [r.to_dict(samples=samples) for r in reports]
        emit_json(docs[0] if len(docs) == 1 else {"models": docs})
        return
    for r in reports:
        render_generic(r, out)
