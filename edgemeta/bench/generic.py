"""``edgemeta benchmark`` on any ONNX model: inputs generated from the graph's declared types and
shapes, as ``onnxruntime_perf_test`` does, so a model edgemeta did not make can be measured too.

The few-shot rows of the benchmark (enrolment, class scaling, the backprop and torch baselines)
need the edgemeta contract (the ``images``/``prototypes`` inputs and the metadata); for any
other model the report says which rows it skipped and why. Needs numpy and onnxruntime only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from edgemeta.runtime.errors import InputError
from edgemeta.runtime.ort import (
    ORT_LEVELS,
    GraphOptimization,
    resolve_providers,
    stored_metadata,
)
from edgemeta.runtime.ort import (
    open_session as open_ort_session,
)

__all__ = [
    "GenericConfig",
    "GenericReport",
    "parse_dims",
    "has_edgemeta_contract",
    "run_generic",
    "render_generic",
    "FEW_SHOT_ROWS",
]

# the rows only a model with the edgemeta contract has
FEW_SHOT_ROWS = ("enrolment", "class scaling", "backprop baseline", "torch baseline")
DEFAULT_BATCH = 1
# defaults for free dimensions by their name; any other free dimension needs --dim
_NAMED_DEFAULTS = (
    (re.compile(r"seq|len|token|time|step", re.I), 128),
    (re.compile(r"^(height|width|h|w)$", re.I), 224),
)
_INT_HIGH = 10  # integer inputs (token ids, indices) are drawn from 0..9: inside any vocabulary
_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class GenericConfig:
    """How a model is measured. ``dims``: values of free dimensions by name (``batch=8``) or by
    input and axis (``input_ids:1=128``); ``batch_sizes``: the values tried for a free first axis
    that ``dims`` does not set."""

    providers: str = "auto"
    threads: int = 0
    optimization: GraphOptimization = GraphOptimization.ALL
    warmup: int = 10
    runs: int = 100
    dims: tuple[tuple[str, int], ...] = ()
    batch_sizes: tuple[int, ...] = (DEFAULT_BATCH,)
    profile: bool = False
    top_ops: int = 10
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.warmup < 0:
            problems.append(f"--warmup {self.warmup} (must be >= 0)")
        if self.runs < 1:
            problems.append(f"--runs {self.runs} (must be >= 1)")
        if self.threads < 0:
            problems.append(f"--threads {self.threads} (must be >= 0; 0 lets ONNX Runtime choose)")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            problems.append(f"--batch-sizes {','.join(map(str, self.batch_sizes))} (each must be >= 1)")
        if problems:
            raise InputError("bad benchmark options: " + "; ".join(problems))


def parse_dims(items: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``["batch=8", "input_ids:1=128"]`` -> ``(("batch", 8), ("input_ids:1", 128))``; every bad item in one error."""
    found, bad = [], []
    for item in items:
        key, sep, value = item.partition("=")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not sep or not key.strip() or n < 1:
            bad.append(repr(item))
        else:
            found.append((key.strip(), n))
    if bad:
        raise InputError(
            f"--dim takes NAME=N or INPUT:AXIS=N with N >= 1 (such as batch=8 or input_ids:1=128); got {', '.join(bad)}"
        )
    return tuple(found)


@dataclass
class Tensor:
    name: str
    type: str
    declared: list[Any]
    shape: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "declared_shape": self.declared, "shape": self.shape}


@dataclass
class Measurement:
    """Latency of one input shape, in milliseconds."""

    shapes: dict[str, list[int]]
    batch: int | None
    latency_ms: dict[str, float]
    samples_ms: list[float]

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {"shapes": self.shapes, "batch": self.batch, "latency_ms": self.latency_ms}
        if self.batch:
            doc["throughput_per_s"] = round(1000.0 * self.batch / self.latency_ms["mean"], 2)
        if samples:
            doc["samples_ms"] = self.samples_ms
        return doc


@dataclass
class GenericReport:
    model: str
    size_bytes: int
    producer: str
    providers: list[str]
    threads: int
    optimization: str
    warmup: int
    runs: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    defaults: dict[str, int]
    measurements: list[Measurement]
    profile: list[dict[str, Any]] | None
    skipped: dict[str, str]

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        return {
            "model": self.model,
            "size_bytes": self.size_bytes,
            "producer": self.producer,
            "edgemeta_contract": False,
            "providers": self.providers,
            "threads": self.threads,
            "optimization": self.optimization,
            "warmup": self.warmup,
            "runs": self.runs,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "free_dimension_defaults": self.defaults,
            "measurements": [m.to_dict(samples) for m in self.measurements],
            "profile_top_operators": self.profile,
            "skipped": self.skipped,
        }


def _ort_message(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _session(path: Path, config: GenericConfig, profile_dir: str | None = None) -> ort.InferenceSession:
    """A session as every edgemeta session opens one (the providers asked for, no silent fallback),
    with the model's errors turned into one line that says what is wrong with the file."""
    if not path.is_file():
        raise InputError(
            f"model not found: {path}; check the path"
            if not path.exists()
            else f"{path} is a folder; pass an .onnx file"
        )
    names, auto = resolve_providers(config.providers)
    if auto:
        names = [p for p in names if p in ort.get_available_providers()]
    missing = [p for p in names if p not in ort.get_available_providers()]
    if missing:
        raise InputError(
            f"provider {', '.join(missing)} is not in this onnxruntime build "
            f"(it has {', '.join(ort.get_available_providers())}); pass --providers auto or one it has"
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.threads
    so.graph_optimization_level = ORT_LEVELS[GraphOptimization(config.optimization)]
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "profile")
    try:
        sess, _ = open_ort_session(path, so, names)
    except Exception as e:  # ONNX Runtime raises its own classes, by kind of failure
        kind = type(e).__name__
        text = _ort_message(e)
        if (
            kind == "NotImplemented"
            or "Could not find an implementation" in text
            or "is not a registered function/op" in text
        ):
            raise InputError(
                f"{path.name} uses an operator this ONNX Runtime {ort.__version__} cannot run ({text}); "
                "export it with a supported opset or operator, or use a newer onnxruntime"
            ) from None
        if kind in ("InvalidProtobuf", "InvalidGraph", "Fail", "InvalidArgument", "NoSuchFile"):
            raise InputError(
                f"{path.name} is not a loadable ONNX model ({text}); "
                "pass a complete .onnx file (re-export or re-copy a truncated one)"
            ) from None
        raise
    return sess


def has_edgemeta_contract(path: str | os.PathLike) -> bool:
    """Whether the model carries edgemeta's metadata (so the few-shot rows apply)."""
    sess = _session(Path(path), GenericConfig(providers="cpu"))
    return stored_metadata(sess) is not None


def _resolve_shapes(
    sess: ort.InferenceSession, dims: dict[str, int], batch: int
) -> tuple[list[Tensor], dict[str, int], bool]:
    """The shape each input gets: declared sizes, ``dims`` for free ones, defaults where the name
    says what it is; a free dimension with no default is an error naming the ``--dim`` to pass.
    Returns (inputs, defaults used, whether a free first axis took ``batch``)."""
    inputs, defaults, problems, used = [], {}, [], set()
    batched = False
    for arg in sess.get_inputs():
        if arg.type not in _TYPES:
            problems.append(f"input {arg.name!r} is {arg.type}, which the benchmark cannot generate")
            continue
        t = Tensor(arg.name, arg.type, list(arg.shape))
        for axis, d in enumerate(arg.shape):
            if isinstance(d, int) and d > 0:
                t.shape.append(d)
                continue
            by_axis = f"{arg.name}:{axis}"
            name = d if isinstance(d, str) and d else None
            if by_axis in dims:
                t.shape.append(dims[by_axis])
                used.add(by_axis)
            elif name in dims:
                t.shape.append(dims[name])
                used.add(name)
            elif axis == 0:
                t.shape.append(batch)
                batched = True
            elif name and any(rx.search(name) for rx, _ in _NAMED_DEFAULTS):
                value = next(v for rx, v in _NAMED_DEFAULTS if rx.search(name))
                t.shape.append(value)
                defaults[name] = value
            else:
                what = f"{name!r}" if name else "unnamed"
                fix = f"--dim {name}=N" if name else f"--dim {by_axis}=N"
                problems.append(
                    f"input {arg.name!r} axis {axis} is a free dimension ({what}) with no default: pass {fix}"
                )
                t.shape.append(0)
        inputs.append(t)
    unknown = sorted(set(dims) - used)
    if unknown:
        free = sorted({str(d) for a in sess.get_inputs() for d in a.shape if isinstance(d, str) and d})
        problems.append(
            f"--dim {', '.join(unknown)}: no such free dimension (the model's named ones: {', '.join(free) or 'none'}; "
            "name an unnamed one as INPUT:AXIS)"
        )
    if problems:
        raise InputError("; ".join(problems))
    return inputs, defaults, batched


def _feeds(inputs: list[Tensor], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in inputs:
        dtype = _TYPES[t.type]
        if np.issubdtype(dtype, np.floating):
            feeds[t.name] = rng.standard_normal(t.shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[t.name] = rng.random(t.shape) < 0.5
        elif "mask" in t.name.lower():
            feeds[t.name] = np.ones(t.shape, dtype=dtype)
        else:
            feeds[t.name] = rng.integers(0, _INT_HIGH, t.shape).astype(dtype)
    return feeds


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], path: Path) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as e:  # ONNX Runtime's own error classes
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items())
        raise InputError(
            f"{path.name} does not run on generated inputs ({shapes}): {_ort_message(e)}; set the free dimensions "
            f"with --dim (integer inputs are drawn from 0..{_INT_HIGH - 1}, masks are ones)"
        ) from None


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples)
    pct = {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)}
    return {
        k: round(v, 4)
        for k, v in {
            "mean": float(a.mean()),
            "std": float(a.std()),
            "min": float(a.min()),
            **pct,
            "max": float(a.max()),
        }.items()
    }


def _measure(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], config: GenericConfig) -> list[float]:
    for _ in range(config.warmup):
        sess.run(None, feeds)
    samples = []
    for _ in range(config.runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        samples.append(1000.0 * (time.perf_counter() - t0))
    return samples


def _profile(path: Path, config: GenericConfig, feeds: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """ONNX Runtime's profile of ``runs`` calls (after the warm-up, in a session of its own so the
    timed session carries no profiling cost): the operator types that took the most time."""
    with tempfile.TemporaryDirectory(prefix="edgemeta-profile-") as tmp:
        sess = _session(path, config, profile_dir=tmp)
        for _ in range(config.warmup):
            sess.run(None, feeds)
        start_us = sess.get_profiling_start_time_ns() / 1000.0
        t_first = time.time_ns() / 1000.0
        for _ in range(config.runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    offset = t_first - start_us  # events carry microseconds since the session started
    per_op: dict[str, list[float]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time") and ev.get("ts", 0) >= offset:
            per_op.setdefault(str(args.get("op_name", "?")), []).append(float(ev.get("dur", 0)))
    total = sum(sum(v) for v in per_op.values()) or 1.0
    rows = sorted(per_op.items(), key=lambda kv: -sum(kv[1]))[: config.top_ops]
    return [
        {
            "op": op,
            "calls": len(d),
            "total_ms": round(sum(d) / 1000.0, 3),
            "ms_per_run": round(sum(d) / 1000.0 / config.runs, 4),
            "share": round(sum(d) / total, 4),
        }
        for op, d in rows
    ]


def _skipped(path: Path) -> dict[str, str]:
    why = (
        f"{path.name} has no edgemeta metadata (an images/prototypes contract made by `edgemeta export`); "
        "the few-shot rows need it"
    )
    return {row: why for row in FEW_SHOT_ROWS}


def run_generic(
    model: str | os.PathLike,
    config: GenericConfig = GenericConfig(),
    progress: Callable[[int, int, str], None] | None = None,
) -> GenericReport:
    """Measure any ONNX model on generated inputs: latency percentiles per batch size, and with
    ``config.profile`` the top operators by time.

    Example:
        >>> report = run_generic("resnet18.onnx", GenericConfig(dims=(("batch", 8),), runs=50))
        >>> report.measurements[0].latency_ms["p50"]
    """
    config.check()
    path = Path(model)
    sess = _session(path, config)
    dims = dict(config.dims)
    plans = []
    for b in config.batch_sizes:
        inputs, defaults, batched = _resolve_shapes(sess, dims, b)
        plans.append((b if batched else None, inputs, defaults))
        if not batched:
            break  # no free first axis: one shape only
    measurements, profile, outs = [], None, []
    for i, (batch, inputs, _) in enumerate(plans):
        if progress:
            progress(i, len(plans), f"{path.name}: batch {batch}" if batch else path.name)
        feeds = _feeds(inputs, config.seed)
        produced = _run(sess, feeds, path)
        outs = outs if i else produced  # the report shows the first shape's inputs and outputs
        samples = _measure(sess, feeds, config)
        measurements.append(
            Measurement({t.name: t.shape for t in inputs}, batch, _stats(samples), [round(s, 4) for s in samples])
        )
        if config.profile and profile is None:
            profile = _profile(path, config, feeds)
    outputs = [Tensor(o.name, o.type, list(o.shape), list(v.shape)) for o, v in zip(sess.get_outputs(), outs)]
    meta = sess.get_modelmeta()
    return GenericReport(
        model=str(path),
        size_bytes=path.stat().st_size,
        producer=meta.producer_name,
        providers=sess.get_providers(),
        threads=config.threads,
        optimization=GraphOptimization(config.optimization).value,
        warmup=config.warmup,
        runs=config.runs,
        inputs=plans[0][1],
        outputs=outputs,
        defaults=plans[0][2],
        measurements=measurements,
        profile=profile,
        skipped=_skipped(path),
    )


def render_generic(report: GenericReport, console: Any) -> None:
    """The report as rich tables (names fold, never cut)."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console.print(
        escape(
            f"{report.model}: {report.size_bytes / 1e6:.2f} MB, producer {report.producer or 'unknown'}, "
            f"{', '.join(report.providers)}, threads {report.threads or 'auto'}, optimization {report.optimization}, "
            f"{report.warmup} warm-up + {report.runs} timed runs"
        )
    )
    io = Table(title="inputs and outputs")
    for col in ("", "name", "type", "declared", "used"):
        io.add_column(col, overflow="fold")
    for kind, ts in (("in", report.inputs), ("out", report.outputs)):
        for t in ts:
            io.add_row(kind, Text(t.name), t.type.replace("tensor(", "").rstrip(")"), str(t.declared), str(t.shape))
    console.print(io)
    lat = Table(title="latency (ms)")
    for col in ("batch", "mean", "p50", "p90", "p95", "p99", "per s"):
        lat.add_column(col, justify="right")
    for m in report.measurements:
        s = m.latency_ms
        per_s = f"{1000.0 * m.batch / s['mean']:.1f}" if m.batch else f"{1000.0 / s['mean']:.1f}"
        lat.add_row(str(m.batch or "fixed"), *(f"{s[k]:.3f}" for k in ("mean", "p50", "p90", "p95", "p99")), per_s)
    console.print(lat)
    if report.profile:
        prof = Table(title="top operators by time (ONNX Runtime profile)")
        for col in ("operator", "calls", "ms per run", "share"):
            prof.add_column(col, justify="left" if col == "operator" else "right", overflow="fold")
        for row in report.profile:
            prof.add_row(Text(row["op"]), str(row["calls"]), f"{row['ms_per_run']:.4f}", f"{100 * row['share']:.1f}%")
        console.print(prof)
    reasons = sorted(set(report.skipped.values()))
    console.print(escape(f"skipped: {', '.join(report.skipped)} ({'; '.join(reasons)})"))
