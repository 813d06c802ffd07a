"""Export-side commands: ``export``, ``verify``, ``quantize`` and ``inspect``.

Each maps its options onto one :mod:`edgemeta.exporters` call. ``inspect`` needs only
onnxruntime (it runs on a device install); the others import torch and onnx when run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from edgemeta.cli._app import command, console, emit_json, out
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.spec import Metric, Normalization, Precision

DATA_HELP = (
    "Novel-class images to verify on: omniglot, tiny-imagenet, digits, "
    "or a folder of class folders (default: the checkpoint's data set)."
)
ACT_HELP = (
    "int8: activations as int8 (S8S8); uint8: as uint8 (U8S8), often faster for residual networks on x86. "
    "Compare with `edgemeta benchmark`. Default: the backbone's (efficientnet_lite*: uint8; others: int8)."
)
STEM_HELP = (
    "Keep the first convolution (1 or 3 input channels, slow in int8), with the activation and pooling right after it, "
    "in float32, or run it in int8. Default: as --stem-layout auto chooses."
)
KERNEL_HELP = (
    "int8 convolution kernel of ONNX Runtime's CPU provider: direct (VNNI direct convolution) or gemm (weights stored "
    "with zero point -1, lossless, so convolutions run as int8 GEMMs: AMX where the CPU has it; needs uint8 "
    "activations: --activations uint8, or the backbone's default). Wide layers gain from gemm, narrow ones lose: "
    "compare with `edgemeta benchmark`. gemm is for CPUs: TensorRT takes only zero points of 0."
)
ORT_LEVEL_HELP = (
    "Optimization baked into the --ort file (ONNX Runtime adds none when it loads one): basic (runs on every "
    "provider) or extended (the CPU provider's fusions, int8 kernels included, as chosen for this machine's CPU "
    "architecture: for devices of that architecture running the CPU provider; Conv-4 int8 about 5x faster than basic)."
)
LAYOUT_HELP = (
    "How the stem meets int8 on ONNX Runtime's CPU provider: auto (s2d where the stem fits it, else nchw with the "
    "float stem; the model's metadata records the choice and why), nchw (as quantized), nhwc (with the float stem "
    "alone, --float-first at most 1: an NHWC round trip after it, so that on x86-64 it writes NHWC directly and no "
    "int8 transpose runs) or s2d (the stem in int8: a stem of convolution, activation and 2x2 max pooling rewritten, "
    "exactly, as a space-to-depth convolution that runs in int8 with its pooling; Conv-4's fastest). Compare with "
    "`edgemeta benchmark`."
)
FLOAT_FIRST_HELP = (
    "Keep the first N convolutions (the stem counts as one), each with the activation and pooling after it, in "
    "float32: for a model whose int8 decisions differ from torch's (docs/int8.md). Default: 0 (the backbone's; "
    "the stem is float32 where --stem-layout auto chooses it)."
)
BIAS_HELP = (
    "Empirical bias correction after int8 quantization: each int8 convolution's bias takes, per output channel, the "
    "float32 model's mean output minus the int8 model's over the calibration images, in graph order. It undoes the "
    "shift int8 rounding puts in every embedding, bringing int8 decisions closer to torch's; the graph and its speed "
    "do not change, export takes one int8 pass over the calibration images per convolution (docs/int8.md). "
    "Default: on."
)
DISTILL_HELP = (
    "Distill the int8 model after quantization for N steps: its int8 convolutions' weights and biases are "
    "fine-tuned (in torch, rounding as ONNX Runtime rounds) until its embeddings match the float32 model's on "
    "base-class images; the float32 model, the graph and its speed do not change (docs/int8.md). A photo model "
    "takes about a second a step on 2 CPU cores. Default: 0 (off)."
)
DISTILL_IMAGES_HELP = "Base-class images for --distill-steps (mirrored at random); calibration takes the first of them."
FLOAT_NODES_HELP = (
    "Keep these backbone nodes in float32, by name, comma-separated (a name the model lacks is refused with the "
    "names it has)."
)
CALIB_HELP = (
    "Base-class images for int8 calibration (default: Omniglot "
    "background / Tiny-ImageNet train; never evaluation classes)."
)
DATA_DIR_HELP = "Data folder (default: $EDGEMETA_DATA_DIR)."
REFERENCE_HELP = (
    "What the model came from: its checkpoint, the --weights of an `export --module` model (none if it had none; "
    "such a model also needs --rebuild-module), or the original ONNX file of a wrapped model."
)
REBUILD_HELP = (
    "An `export --module` model, with its weights (-c) or without: rebuild the module from the code its metadata "
    "names (imports and runs it; only for a model file you trust; matching weights do not vouch for the code)."
)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress display on stderr fed by the exporters' ``progress(task, done, total)``.

    Only on a terminal: elsewhere rich draws nothing but still ends the display with a
    newline, which put a blank line before every ``error:`` line of a script's log; there,
    plain lines say each stage and a heartbeat while it runs."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        from edgemeta.progress import StageLog, plain_progress_wanted

        if not plain_progress_wanted():
            yield None
            return
        with StageLog() as log:
            yield log
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total)
            bar.update(tasks[task], completed=done, total=total)

        yield update


def _floats(text: Optional[str], what: str) -> list[float] | float:
    if text is None:
        return 0.0 if what == "--mean" else 1.0
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} must be numbers separated by commas, got {text!r}") from None
    return values[0] if len(values) == 1 else values


PIXELS_HELP = "Add the raw-pixel input (uint8 [batch, H, W, C], preprocessed in the graph; docs/pixels.md)."


def _int8(
    calibration_images: int,
    activations: Optional[str] = None,
    float_stem: Optional[bool] = None,
    conv_kernel: str = "direct",
    stem_layout: str = "auto",
    float_first: Optional[int] = None,
    float_nodes: Optional[str] = None,
    bias_correction: Optional[bool] = None,
    distill_steps: Optional[int] = None,
    distill_images: int = 1024,
):
    """The int8 options of export and quantize as one QuantizeSpec."""
    from edgemeta.exporters import QuantizeSpec

    return QuantizeSpec(
        calibration_images=calibration_images,
        activations=activations,
        float_stem=float_stem,
        conv_kernel=conv_kernel,
        stem_layout=stem_layout,
        float_first=float_first,
        float_nodes=tuple(n.strip() for n in (float_nodes or "").split(",") if n.strip()),
        bias_correction=bias_correction,
        distill_steps=distill_steps,
        distill_images=distill_images,
    )


def _options(
    precision: Precision,
    *,
    verify: bool,
    episodes: int,
    data: Optional[str],
    data_dir: Optional[Path],
    calibration_data: Optional[str] = None,
    quantize=None,
    opset: int = 18,
    optimize: bool = False,
    ort: bool = False,
    ort_level: str = "basic",
    pixels: bool = True,
):
    from edgemeta.exporters import ExportOptions, ExportSpec, QuantizeSpec, VerifySpec

    return ExportOptions(
        precision=precision,
        spec=ExportSpec(opset=opset, optimize=optimize),
        ort_format=ort,
        ort_level=ort_level,
        pixels=pixels,
        verify=VerifySpec(episodes=episodes) if verify else None,
        data=data,
        calibration_data=calibration_data,
        data_dir=str(data_dir) if data_dir else None,
        quantize=quantize or QuantizeSpec(),
    )


def _module_ref(
    module: str,
    weights: Optional[Path],
    size: Optional[int],
    channels: int,
    mean: Optional[str],
    std: Optional[str],
    metric: Metric,
    normalization: Normalization,
    pool: Optional[str],
    options,
):
    """The :class:`ModuleRef` the options give; every missing or bad option in one message."""
    from edgemeta.exporters import ModuleRef
    from edgemeta.runtime.spec import PreprocessSpec

    problems = []
    if size is None:
        problems.append("--size (the input side in pixels)")
    if mean is None or std is None:
        problems.append("--mean and --std (the per-channel normalization of [0, 1] pixels; --mean 0 --std 1 if none)")
    if pool not in (None, "avg", "max"):
        problems.append(f"--pool avg or max (got {pool!r})")
    if options.verify is not None and not options.data:
        problems.append("--data (novel-class images to verify on: a folder, tiny-imagenet or omniglot; or --no-verify)")
    if options.precision is Precision.INT8 and not options.calibration_data:
        problems.append("--calibration-data (base-class images for int8)")
    if problems:
        raise InputError("--module needs " + "; ".join(problems))
    pp = PreprocessSpec.create(size, channels, _floats(mean, "--mean"), _floats(std, "--std"))
    return ModuleRef(module, str(weights) if weights else None, pp, metric, normalization, pool=pool)


def _show_outcome(outcome, json_out: bool) -> None:
    if json_out:
        emit_json({"ok": True, **outcome.to_dict()})
        return
    d = outcome.to_dict()
    extra = f", {d['export']['exporter']} exporter" if d.get("export") else ""
    out.print(
        f"wrote {d['path']} ({d['precision']}, opset {d['opset']}, "
        f"{d['size_bytes'] / 1e6:.2f} MB{extra}; fingerprint {d['fingerprint']})"
    )
    if d.get("export") and d["export"].get("fallback_reason"):
        out.print(f"[yellow]TorchScript exporter used: {d['export']['fallback_reason']}[/]")
    stem = _stem_line(outcome.metadata)
    if stem:
        out.print(stem)
    if outcome.verification is not None:
        _show_report(outcome.verification)
    if d.get("ort_path"):
        out.print(f"wrote {d['ort_path']} (ORT format; loads in an InferenceSession)")


def _stem_line(meta) -> str | None:
    """How an int8 model runs its stem, and why, as one line."""
    how = meta.int8_stem
    if how is None:
        return None
    c = meta.extra["calibration"]
    if c.get("stem_note"):
        return f"stem: {how} ({c['stem_note']})"
    if c.get("float_stem_asked") is not None:
        return f"stem: {how} (--{'' if c['float_stem_asked'] else 'no-'}float-stem)"
    return f"stem: {how}" + (" (chosen by --stem-layout auto)" if c.get("stem_layout_asked") == "auto" else "")


def _show_report(report) -> None:
    table = Table(title=f"verification ({report.precision.value}, {report.seconds:.1f} s)")
    for col in ("check", "result", ""):
        table.add_column(col)
    for c in report.checks:
        table.add_row(c.name, c.detail, "[green]ok[/]" if c.passed else "[red]FAILED[/]")
    out.print(table)


@command("export")
def export_cmd(
    checkpoint: Optional[Path] = typer.Argument(None, help="edgemeta checkpoint (.safetensors); omit with --module."),
    output: Path = typer.Option(..., "--output", "-o", help="ONNX model to write."),
    precision: Precision = typer.Option(
        Precision.FP32, help="fp32, fp16 (float32 inputs/outputs) or int8 (QDQ, calibrated on base classes)."
    ),
    opset: int = typer.Option(18, help="ONNX opset (18: ONNX Runtime 1.17 and later load the model)."),
    optimize: bool = typer.Option(False, help="Store ONNX Runtime's basic (provider-independent) graph optimizations."),
    ort: bool = typer.Option(False, "--ort", help="Also write the ORT format (.ort) next to the model."),
    ort_optimization: str = typer.Option("basic", help=ORT_LEVEL_HELP),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify against torch on real novel-class images."),
    episodes: int = typer.Option(200, help="Verification episodes (5-way 1-shot)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    calibration_data: Optional[str] = typer.Option(None, help=CALIB_HELP),
    calibration_images: int = typer.Option(256, help="Images for int8 calibration."),
    activations: Optional[str] = typer.Option(None, help=ACT_HELP, show_default=False),
    float_stem: Optional[bool] = typer.Option(None, "--float-stem/--no-float-stem", help=STEM_HELP, show_default=False),
    conv_kernel: str = typer.Option("direct", help=KERNEL_HELP),
    stem_layout: str = typer.Option("auto", help=LAYOUT_HELP),
    float_first: Optional[int] = typer.Option(None, help=FLOAT_FIRST_HELP, show_default=False),
    float_nodes: Optional[str] = typer.Option(None, help=FLOAT_NODES_HELP),
    bias_correction: bool = typer.Option(True, "--bias-correction/--no-bias-correction", help=BIAS_HELP),
    distill_steps: Optional[int] = typer.Option(None, help=DISTILL_HELP, show_default=False),
    distill_images: int = typer.Option(1024, help=DISTILL_IMAGES_HELP),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    module: Optional[str] = typer.Option(
        None, help="Export your own module instead: package.module:factory or path/to/file.py:factory."
    ),
    weights: Optional[Path] = typer.Option(None, help="safetensors weights for --module."),
    size: Optional[int] = typer.Option(None, help="--module input side in pixels."),
    channels: int = typer.Option(3, help="--module input channels (1 or 3)."),
    mean: Optional[str] = typer.Option(None, help="--module per-channel mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, help="--module per-channel std."),
    metric: Metric = typer.Option(Metric.SQEUCLIDEAN, help="--module metric."),
    normalization: Normalization = typer.Option(Normalization.NONE, help="--module embedding normalization."),
    pool: Optional[str] = typer.Option(
        None, help="--module returning a feature map: pool it into a vector (avg or max)."
    ),
    pixels: bool = typer.Option(True, "--pixels/--no-pixels", help=PIXELS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a checkpoint (or your own module) to ONNX, verified against torch on real images."""
    from edgemeta.exporters import export_checkpoint, export_module

    options = _options(
        precision,
        verify=verify,
        episodes=episodes,
        data=data,
        data_dir=data_dir,
        calibration_data=calibration_data,
        quantize=_int8(
            calibration_images,
            activations,
            float_stem,
            conv_kernel,
            stem_layout,
            float_first,
            float_nodes,
            bias_correction,
            distill_steps,
            distill_images,
        ),
        opset=opset,
        optimize=optimize,
        ort=ort,
        ort_level=ort_optimization,
        pixels=pixels,
    )
    with _progress(not json_out) as progress:
        if module:
            ref = _module_ref(module, weights, size, channels, mean, std, metric, normalization, pool, options)
            outcome = export_module(ref, output, options, progress)
        elif checkpoint is None:
            raise InputError("give a checkpoint to export, or --module package.module:factory")
        else:
            outcome = export_checkpoint(checkpoint, output, options, progress)
    _show_outcome(outcome, json_out)


@command("verify")
def verify_cmd(
    model: Path = typer.Argument(..., help="Exported ONNX model."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=REFERENCE_HELP),
    episodes: int = typer.Option(1000, help="Episodes (5-way 1-shot)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    write_figures: bool = typer.Option(
        False, "--write-figures", help="Store the figures in the model's metadata when it passes (rewrites MODEL)."
    ),
    rebuild_module: bool = typer.Option(False, "--rebuild-module", help=REBUILD_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check an exported model against its checkpoint on real images; the model file is left as it is."""
    from edgemeta.exporters import verify_model

    options = _options(Precision.FP32, verify=True, episodes=episodes, data=data, data_dir=data_dir)
    with _progress(not json_out) as progress:
        report = verify_model(
            model, checkpoint, options, progress, write_figures=write_figures, rebuild_module=rebuild_module
        )
    if json_out:
        emit_json({"ok": True, **report.to_dict()})
    else:
        _show_report(report)
        if write_figures:
            out.print(f"figures stored in {model}")


@command("quantize")
def quantize_cmd(
    model: Path = typer.Argument(..., help="Exported fp32 ONNX model."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help=REFERENCE_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="int8 model to write, e.g. model.int8.onnx."),
    calibration_data: Optional[str] = typer.Option(None, help=CALIB_HELP),
    calibration_images: int = typer.Option(256, help="Images for calibration."),
    activations: Optional[str] = typer.Option(None, help=ACT_HELP, show_default=False),
    float_stem: Optional[bool] = typer.Option(None, "--float-stem/--no-float-stem", help=STEM_HELP, show_default=False),
    conv_kernel: str = typer.Option("direct", help=KERNEL_HELP),
    stem_layout: str = typer.Option("auto", help=LAYOUT_HELP),
    float_first: Optional[int] = typer.Option(None, help=FLOAT_FIRST_HELP, show_default=False),
    float_nodes: Optional[str] = typer.Option(None, help=FLOAT_NODES_HELP),
    bias_correction: bool = typer.Option(True, "--bias-correction/--no-bias-correction", help=BIAS_HELP),
    distill_steps: Optional[int] = typer.Option(None, help=DISTILL_HELP, show_default=False),
    distill_images: int = typer.Option(1024, help=DISTILL_IMAGES_HELP),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify against torch on real novel-class images."),
    episodes: int = typer.Option(200, help="Verification episodes (5-way 1-shot)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    ort: bool = typer.Option(False, "--ort", help="Also write the ORT format (.ort)."),
    ort_optimization: str = typer.Option("basic", help=ORT_LEVEL_HELP),
    pixels: bool = typer.Option(True, "--pixels/--no-pixels", help=PIXELS_HELP),
    rebuild_module: bool = typer.Option(False, "--rebuild-module", help=REBUILD_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """int8 static quantization (QDQ), calibrated on base-class images, verified on novel classes."""
    from edgemeta.exporters import quantize_model

    options = _options(
        Precision.INT8,
        verify=verify,
        episodes=episodes,
        data=data,
        data_dir=data_dir,
        calibration_data=calibration_data,
        quantize=_int8(
            calibration_images,
            activations,
            float_stem,
            conv_kernel,
            stem_layout,
            float_first,
            float_nodes,
            bias_correction,
            distill_steps,
            distill_images,
        ),
        ort=ort,
        ort_level=ort_optimization,
        pixels=pixels,
    )
    with _progress(not json_out) as progress:
        outcome = quantize_model(model, checkpoint, output, options, progress, rebuild_module=rebuild_module)
    _show_outcome(outcome, json_out)


def _opsets(opset: dict[str, int] | None) -> str:
    return ", ".join(f"{d} {v}" for d, v in opset.items()) if opset else "?"


def _inspect_tables(info: dict[str, Any]) -> list[Table]:
    summary = Table(title=Path(info["path"]).name, show_header=False)
    meta = info.get("metadata") or {}
    rows = {
        "format / size": f"{info['format']}, {info['size_bytes'] / 1e6:.2f} MB",
        "precision": info.get("precision") or "?",
        "opset / IR": f"{_opsets(info.get('opset'))} / {info.get('ir_version') or '?'}",
        "parameters": f"{info['parameters']:,}" if info.get("parameters") is not None else "?",
        "raw pixels in": (
            "yes (pixels: uint8 \\[batch, H, W, C])" if info.get("pixels") else "no (images only; re-export to add it)"
        ),
        "producer": info.get("producer") or "",
        **{
            k: str(meta[k])
            for k in ("backbone", "embedding_dim", "metric", "normalization", "fingerprint")
            if k in meta
        },
        **(
            {"preprocess": ", ".join(f"{k}={v}" for k, v in meta["preprocess"].items())}
            if meta.get("preprocess")
            else {}
        ),
    }
    for k, v in rows.items():
        summary.add_row(k, v)
    io = Table(title="inputs / outputs")
    for col in ("", "name", "type", "shape"):
        io.add_column(col)
    for kind, shown in (("inputs", "input"), ("optional_inputs", "input (optional)"), ("outputs", "output")):
        for t in info.get(kind, []):
            io.add_row(shown, t["name"], t["type"], str(t["shape"]))
    tables = [summary, io]
    ver = info.get("verification") or {}
    if ver:
        vt = Table(title="verification", show_header=False)
        ep = ver.get("episodes") or {}
        vt.add_row("passed", str(ver.get("passed")))
        vt.add_row(
            "embeddings / logits max rel. error",
            f"{ver.get('embeddings_max_rel_error', 0):.2e} / {ver.get('logits_max_rel_error', 0):.2e}",
        )
        if ep:
            vt.add_row("episodes", f"{ep['count']} x {ep['n_way']}-way {ep['k_shot']}-shot on {ep['dataset']}")
            vt.add_row(
                "agreement / accuracy",
                f"{100 * ep['agreement']:.2f}% / torch {100 * ep['torch_accuracy']:.2f}% vs ONNX "
                f"{100 * ep['onnx_accuracy']:.2f}%",
            )
        tables.append(vt)
    if info.get("operators"):
        ops = Table(title="operators")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for op, n in info["operators"].items():
            ops.add_row(op, str(n))
        tables.append(ops)
    return tables


@command("inspect")
def inspect_cmd(
    model: Path = typer.Argument(..., help="ONNX (.onnx) or ORT-format (.ort) model."),
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Show a model's inputs, outputs, opset, precision, operators, metadata and verification figures."""
    from edgemeta.exporters.inspection import inspect

    info = inspect(model)
    if json_out:
        emit_json(info)
        return
    for table in _inspect_tables(info):
        out.print(table)
    for note in info["notes"]:
        out.print(f"[dim]note: {note}[/]")


def _loose(values: tuple[float, ...]) -> list[float] | float:
    """Values read from a file, shaped as :func:`_floats` shapes an option's."""
    return values[0] if len(values) == 1 else list(values)


def _wrap_spec(
    model: Path,
    size: Optional[str],
    channels: Optional[int],
    mean: Optional[str],
    std: Optional[str],
    interpolation: str,
    color_order: str,
    output_name: Optional[str],
    pool: Optional[str],
    metric: Metric,
    normalization: Normalization,
    scale: float,
):
    """The :class:`WrapSpec` the options give, every missing or bad option reported at once;
    what they leave out comes from the file where it says: size and channels from the graph's
    input (the size also from an image processor config in its metadata), mean and std from its
    metadata (edgemeta.exporters.vendor_metadata)."""
    from edgemeta.exporters.vendor_metadata import metadata_normalization, metadata_size
    from edgemeta.exporters.wrap import WrapSpec, declared_preprocess, load_foreign
    from edgemeta.runtime.spec import PreprocessSpec

    foreign = load_foreign(model)
    declared = declared_preprocess(foreign)
    problems, sources = [], []
    hw = declared["size"]
    if size is None and hw is None:
        try:
            read = metadata_size(foreign)
        except InputError as e:
            problems.append(f"--size: {e}")
            read = None
        if read is not None:
            hw = read[0]
            sources.append(f"size {hw[0]}x{hw[1]} from the model's {read[1]}")
    if size is not None:
        try:
            parts = [int(v) for v in size.split(",")]
            hw = (parts[0], parts[-1]) if len(parts) in (1, 2) else None
        except ValueError:
            hw = None
        if hw is None:
            problems.append(f"--size must be one number or H,W, got {size!r}")
    elif hw is None:
        problems.append("--size (the model's input size is not fixed in the file)")
    channels = channels or declared["channels"] or 3
    stated = None
    if mean is None or std is None:  # options win: the file is read only for what they leave out
        try:
            stated = metadata_normalization(foreign, channels)
        except InputError as e:
            problems.append(f"--mean and --std: {e}")
        else:
            if stated is None:
                problems.append(
                    "--mean and --std (the model's per-channel normalization; its metadata states none; "
                    "pass --mean 0 --std 1 if it takes [0, 1] pixels as they are)"
                )
            else:
                which = "mean/std" if mean is None and std is None else "mean" if mean is None else "std"
                sources.append(f"{which} from the model's {stated.source}")
    if color_order not in ("rgb", "bgr"):
        problems.append(f"--color-order must be rgb or bgr, got {color_order!r}")
    if pool not in (None, "avg", "max"):
        problems.append(f"--pool must be avg or max, got {pool!r}")
    if problems:
        raise InputError("wrap needs " + "; ".join(problems))
    m = _floats(mean, "--mean") if mean is not None else _loose(stated.mean)
    s = _floats(std, "--std") if std is not None else _loose(stated.std)
    if color_order == "bgr":  # given in the model's channel order; the spec holds them in RGB order
        m, s = (m[::-1] if isinstance(m, list) else m), (s[::-1] if isinstance(s, list) else s)
    pp = PreprocessSpec.create(hw, channels, m, s, interpolation)
    return WrapSpec(pp, output_name, pool, metric, normalization, color_order == "bgr", scale, "; ".join(sources))


@command("wrap")
def wrap_cmd(
    model: Path = typer.Argument(..., help="ONNX image-embedding model (one float32 [batch, C, H, W] input)."),
    output: Path = typer.Option(..., "--output", "-o", help="edgemeta model to write."),
    size: Optional[str] = typer.Option(None, help="Input side (or H,W); default: as the file declares."),
    channels: Optional[int] = typer.Option(None, help="Input channels (1 or 3); default: as the file declares."),
    mean: Optional[str] = typer.Option(
        None, help="Per-channel mean of [0, 1] pixels, e.g. 0.485,0.456,0.406 (required)."
    ),
    std: Optional[str] = typer.Option(None, help="Per-channel std, e.g. 0.229,0.224,0.225 (required)."),
    interpolation: str = typer.Option(
        "bilinear",
        "--interpolation",
        "--resize",
        help="Resize filter: bilinear, bicubic, nearest, box, lanczos, hamming.",
    ),
    color_order: str = typer.Option(
        "rgb", help="Channel order the model reads: rgb or bgr (--mean/--std in that order)."
    ),
    embedding: Optional[str] = typer.Option(
        None, "--embedding", help="The embedding tensor (any tensor name) when the model has several outputs."
    ),
    pool: Optional[str] = typer.Option(
        None, help="Pool a feature map [batch, C, ...] into a vector: avg or max (a map is refused without it)."
    ),
    metric: Metric = typer.Option(Metric.SQEUCLIDEAN, help="Few-shot metric."),
    normalization: Normalization = typer.Option(Normalization.NONE, help="Embedding normalization: none or l2."),
    scale: float = typer.Option(10.0, help="Cosine logit scale."),
    precision: Precision = typer.Option(Precision.FP32, help="fp32, fp16, or int8 (calibrated on --calibration-data)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify against the original model on real images."),
    episodes: int = typer.Option(200, help="Verification episodes (5-way 1-shot)."),
    data: Optional[str] = typer.Option(
        None, help="Images to verify on: a folder of class folders, tiny-imagenet or omniglot."
    ),
    calibration_data: Optional[str] = typer.Option(
        None, help="Your base-class images (a folder of class folders): int8 calibration and the open-set threshold."
    ),
    calibration_images: int = typer.Option(256, help="Images for int8 calibration."),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    pixels: bool = typer.Option(True, "--pixels/--no-pixels", help=PIXELS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Turn any ONNX image-embedding model into an edgemeta model, verified against the original."""
    from edgemeta.exporters.wrap import wrap_model

    spec = _wrap_spec(
        model, size, channels, mean, std, interpolation, color_order, embedding, pool, metric, normalization, scale
    )
    if spec.preprocess_source:  # on stderr, so that --json output stays one document
        console.print(spec.preprocess_source, markup=False, highlight=False, soft_wrap=True)
    options = _options(
        precision,
        verify=verify,
        episodes=episodes,
        data=data,
        data_dir=data_dir,
        calibration_data=calibration_data,
        quantize=_int8(calibration_images),
        pixels=pixels,
    )
    with _progress(not json_out) as progress:
        outcome = wrap_model(model, output, spec, options, progress)
    _show_outcome(outcome, json_out)
