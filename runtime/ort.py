"""edgemeta's one ONNX Runtime layer: providers, session settings, and opening a session.

Everything that opens an ``onnxruntime.InferenceSession`` (the runtime's :class:`~edgemeta.runtime.session.Session`,
the exporters' checks, the benchmark, the scripts) goes through this module, so every session is opened the same
way: provider names resolved in one place (:func:`resolve_providers`, :func:`provider_name`), settings built by one
class (:class:`SessionOptions`), CUDA / cuDNN preloaded before a GPU session (:func:`preload_cuda_libraries`), and
the same optimizers turned off (:func:`open_session`). numpy and onnxruntime only, like the rest of the runtime.

Example:
    >>> from edgemeta.runtime.ort import SessionOptions, open_session            # doctest: +SKIP
    >>> options = SessionOptions(intra_op_threads=2, allow_spinning=False)       # doctest: +SKIP
    >>> sess, said = open_session("model.onnx", options.to_ort(), ["CPUExecutionProvider"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Union

import onnxruntime as ort

from edgemeta.runtime.errors import InputError
from edgemeta.runtime.spec import METADATA_KEY, ModelMetadata

__all__ = [
    "AUTO_ORDER",
    "DISABLED_OPTIMIZERS",
    "GPU_PROVIDERS",
    "NHWC_STEM_DISABLED_OPTIMIZERS",
    "ORT_LEVELS",
    "ExecutionMode",
    "GraphOptimization",
    "Provider",
    "ProvidersArg",
    "SessionOptions",
    "display_name",
    "open_session",
    "preload_cuda_libraries",
    "provider_name",
    "resolve_providers",
    "stored_metadata",
    "wants_nhwc_stem",
]


class Provider(str, Enum):
    """The execution providers edgemeta knows by short name ("cpu", "cuda", "tensorrt")."""

    TENSORRT = "TensorrtExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    CPU = "CPUExecutionProvider"


#: The order ``providers="auto"`` tries, among those this onnxruntime build has.
AUTO_ORDER = (Provider.TENSORRT.value, Provider.CUDA.value, Provider.CPU.value)
GPU_PROVIDERS = (Provider.TENSORRT.value, Provider.CUDA.value)  #: those that run on a CUDA device
_SHORT_NAMES = {
    "cpu": Provider.CPU,
    "cuda": Provider.CUDA,
    "gpu": Provider.CUDA,
    "tensorrt": Provider.TENSORRT,
    "trt": Provider.TENSORRT,
}

ProvidersArg = Union[str, Provider, Sequence[Union[str, Provider]]]


class GraphOptimization(str, Enum):
    """ONNX Runtime's graph optimization levels."""

    DISABLE = "disable"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


ORT_LEVELS = {
    GraphOptimization.DISABLE: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    GraphOptimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    GraphOptimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    GraphOptimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ExecutionMode(str, Enum):
    """ONNX Runtime's execution mode: operators one after another, or independent ones in parallel."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


@dataclass(frozen=True)
class SessionOptions:
    """How the ONNX Runtime session runs.

    Attributes:
        intra_op_threads: threads inside one operator; 0 lets ONNX Runtime choose
            (one per physical core).
        inter_op_threads: threads across independent operators; 0 lets ONNX Runtime choose.
        graph_optimization: ONNX Runtime's graph optimization level.
        io_binding: bind inputs and outputs as ``OrtValue`` so the prototypes stay on the
            device between calls; ``None`` turns it on when the session runs on a GPU.
        batch_size: inputs larger than this run in chunks (bounds memory).
        device_id: the GPU used by CUDA / TensorRT and IO binding.
        allow_spinning: whether idle intra-op threads spin after a call, waiting for the
            next; ``None`` keeps ONNX Runtime's default (they spin). Spinning saves the
            threads' wake-up on back-to-back calls (each call is faster); turning it off
            saves power on a battery and leaves the cores to the app's own work between
            calls (on a 2-core machine the input checks and store update of an enrolment
            took 3x longer beside spinning threads, though the calls themselves were slower
            without them).
        execution_mode: sequential suits chain-shaped CNNs; parallel only adds scheduling.
        memory_arena: keep freed buffers in ONNX Runtime's arena for the next call.
        pin_threads: pin the intra-op worker threads to distinct logical CPUs.

    Example:
        >>> SessionOptions(intra_op_threads=2, allow_spinning=False).to_ort().intra_op_num_threads  # doctest: +SKIP
        2
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: GraphOptimization = GraphOptimization.ALL
    io_binding: bool | None = None
    batch_size: int = 64
    device_id: int = 0
    allow_spinning: bool | None = None
    execution_mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    memory_arena: bool = True
    pin_threads: bool = False

    def __post_init__(self) -> None:
        if self.allow_spinning is not None and not isinstance(self.allow_spinning, bool):
            raise InputError(
                f"allow_spinning must be True, False or None (ONNX Runtime's default), got {self.allow_spinning!r}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise InputError(
                f"thread counts must be >= 0 (0 = ONNX Runtime's default), got "
                f"intra_op_threads={self.intra_op_threads}, inter_op_threads={self.inter_op_threads}"
            )
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        for name, cls in (("graph_optimization", GraphOptimization), ("execution_mode", ExecutionMode)):
            if not isinstance(getattr(self, name), cls):
                try:
                    object.__setattr__(self, name, cls(getattr(self, name)))
                except ValueError:
                    choices = ", ".join(m.value for m in cls)
                    raise InputError(f"unknown {name} {getattr(self, name)!r}; choose one of: {choices}") from None

    def to_ort(self) -> ort.SessionOptions:
        """The ``onnxruntime.SessionOptions`` these settings make (a new object each call)."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.graph_optimization_level = ORT_LEVELS[self.graph_optimization]
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if self.execution_mode is ExecutionMode.PARALLEL
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        so.enable_cpu_mem_arena = self.memory_arena
        if self.allow_spinning is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        threads = self.intra_op_threads
        if self.pin_threads and threads > 1:
            # One entry per worker thread (the calling thread is the first of the pool and
            # is not pinned); logical processors are numbered from 1.
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(threads))
            so.add_session_config_entry(
                "session.intra_op_thread_affinities", ";".join(str(cpus[i % len(cpus)] + 1) for i in range(1, threads))
            )
        return so


def provider_name(p: str | Provider) -> str:
    """ONNX Runtime's name for ``p``: a :class:`Provider`, a short name (cpu, cuda, gpu, tensorrt, trt) or a
    full name."""
    if isinstance(p, Provider):
        return p.value
    if not isinstance(p, str) or not p.strip():
        raise InputError(f"provider {p!r} is not a provider name; use cpu, cuda, tensorrt or a full ONNX Runtime name")
    key = p.strip()
    if key.lower() in _SHORT_NAMES:
        return _SHORT_NAMES[key.lower()].value
    if key.endswith("ExecutionProvider"):
        return key  # any other ONNX Runtime provider, by its full name
    raise InputError(
        f"unknown provider {p!r}; use auto, cpu, cuda, tensorrt, or a full ONNX Runtime name "
        "such as CUDAExecutionProvider"
    )


def resolve_providers(providers: ProvidersArg) -> tuple[list[str], bool]:
    """Turn the user's ``providers`` into ONNX Runtime names; returns ``(names, is_auto)``.

    Accepts ``"auto"``, one name, a comma-separated string (``"cuda,cpu"``), or a list.
    """
    if isinstance(providers, str) and "," in providers:
        providers = [p for p in providers.split(",") if p.strip()]
    if isinstance(providers, (str, Provider)):
        if isinstance(providers, str) and providers.strip().lower() == "auto":
            return list(AUTO_ORDER), True
        return [provider_name(providers)], False
    names = [provider_name(p) for p in providers]
    if not names:
        raise InputError("empty provider list; pass 'auto' or at least one provider")
    return list(dict.fromkeys(names)), False


def display_name(provider: str) -> str:
    """The name a report shows for an ONNX Runtime provider: CPU, CUDA, TensorRT, or the full name of any other."""
    return {Provider.CPU.value: "CPU", Provider.CUDA.value: "CUDA", Provider.TENSORRT.value: "TensorRT"}.get(
        provider, provider
    )


_preloaded = False


def preload_cuda_libraries() -> None:
    """Load CUDA / cuDNN from the ``nvidia-*`` pip packages (or torch) before a GPU session.

    onnxruntime-gpu needs those libraries on the loader path; ``onnxruntime.preload_dlls``
    (ONNX Runtime >= 1.21) finds them where pip put them, so ``pip install
    onnxruntime-gpu[cuda,cudnn]`` works without setting ``LD_LIBRARY_PATH``. Best effort:
    libraries it cannot find are left to the system loader, and a provider that still
    cannot load is reported as a fallback by the session.
    """
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls") or os.environ.get("EDGEMETA_NO_PRELOAD"):
        return
    _preloaded = True
    try:  # it prints its warnings; keep them off stdout, where --json output goes
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            ort.preload_dlls()
    except Exception:  # noqa: BLE001 - whatever is missing shows up as a provider fallback
        pass


# ONNX Runtime optimizers every edgemeta session turns off. QDQ propagation moves an int8
# model's QuantizeLinear above the float pooling that follows a float32 stem, so the pooling
# runs on int8 NCHW tensors, which the CPU provider does far slower than in float (Conv-4,
# batch 32: 5.5 ms against 0.2 ms). It only moves quantization nodes: no result changes.
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)
# ... and these two (ONNX Runtime's transpose optimizer at its levels 1 and 2) for an int8
# model exported with ``stem_layout="nhwc"``, in a session that runs it on the CPU provider
# of an x86-64 CPU with every optimization level on: they would remove the NHWC round trip
# after the float stem (a Transpose pair: a no-op), which is what lets the NCHWc layout pass
# (level "all" only) write the stem's output in NHWC directly, as the int8 convolutions read
# it, instead of writing NCHW and transposing the int8 tensor after its quantization (Conv-4,
# batch 32: 7-10% faster). Every other session keeps the optimizer, which removes the pair:
# on GPU providers, on other CPUs, at lower optimization levels, and where an optimized model
# is written (an ``.ort`` file must not keep two real transposes) or a profile is taken.
NHWC_STEM_DISABLED_OPTIMIZERS = ("TransposeOptimizer", "TransposeOptimizer_CPUExecutionProvider")
_NCHWC_MACHINES = {"x86_64", "amd64"}  # where ONNX Runtime has its NCHWc kernels (AVX2 and later)


def open_session(
    path: str | os.PathLike | bytes, options: ort.SessionOptions, providers: list[str]
) -> tuple[ort.InferenceSession, str]:
    """An ``onnxruntime.InferenceSession`` on ``providers``, as every edgemeta session opens one.
    ``path`` is a model file or a serialized model.

    For a GPU provider, CUDA / cuDNN are preloaded first (see :func:`preload_cuda_libraries`),
    and what ONNX Runtime prints and logs while such a provider fails to load is kept off
    stdout (where ``--json`` goes) and stderr: it is returned instead (its "EP Error" lines),
    for the caller to report. ONNX Runtime's own fallback inside ``run()`` is disabled, so a
    session never changes provider silently. The optimizers in :data:`DISABLED_OPTIMIZERS`
    are off, and for a model that asks for it (:func:`wants_nhwc_stem`) on a CPU-only
    session with every optimization level, not writing an optimized model or a profile,
    those in :data:`NHWC_STEM_DISABLED_OPTIMIZERS` too: the session is then opened a second
    time (the metadata is known only once a session has read the model). Note: ONNX Runtime's default logger severity is
    set back to its default (warning) afterwards. Returns ``(session, what ONNX Runtime said)``.
    """
    gpu = any(p in GPU_PROVIDERS for p in providers)
    # errors only: ONNX Runtime warns on every load that the optional prototype_sqnorms input
    # is an initializer a caller may override, which is what it is for
    options.log_severity_level = max(options.log_severity_level, 3)
    out = io.StringIO()
    if gpu:
        preload_cuda_libraries()
        ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(out) if gpu else contextlib.nullcontext():
            model = path if isinstance(path, bytes) else str(path)
            sess = ort.InferenceSession(
                model, sess_options=options, providers=providers, disabled_optimizers=list(DISABLED_OPTIMIZERS)
            )
            if _nhwc_stem_pays(options, gpu) and wants_nhwc_stem(sess):
                disabled = [*DISABLED_OPTIMIZERS, *NHWC_STEM_DISABLED_OPTIMIZERS]
                sess = ort.InferenceSession(
                    model, sess_options=options, providers=providers, disabled_optimizers=disabled
                )
    finally:
        if gpu:
            ort.set_default_logger_severity(2)  # ONNX Runtime's default
    said = " ".join(line.strip() for line in out.getvalue().splitlines() if line.strip().startswith("EP Error"))[:300]
    sess.disable_fallback()
    return sess, said


def _nhwc_stem_pays(options: ort.SessionOptions, gpu: bool) -> bool:
    """Whether a session with these settings would run an NHWC stem hand-over faster (see
    :data:`NHWC_STEM_DISABLED_OPTIMIZERS`): no GPU provider asked for (one that fails to load
    would be tried twice), ONNX Runtime's NCHWc pass on (level "all"), and neither an
    optimized model (an ``.ort`` file) nor a profile written."""
    return (
        not gpu
        and options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        and not options.optimized_model_filepath
        and not options.enable_profiling
    )


def wants_nhwc_stem(session: ort.InferenceSession) -> bool:
    """Whether ``session``'s model was exported with an NHWC stem hand-over (int8,
    ``stem_layout="nhwc"``) and the session runs where that pays: on the CPU provider (it
    comes first) of an x86-64 machine (see :data:`NHWC_STEM_DISABLED_OPTIMIZERS`)."""
    providers = session.get_providers()
    if not providers or providers[0] != Provider.CPU.value or platform.machine().lower() not in _NCHWC_MACHINES:
        return False
    try:
        meta = stored_metadata(session)
        return meta is not None and meta.extra.get("calibration", {}).get("stem_layout") == "nhwc"
    except Exception:  # noqa: BLE001 - bad metadata is reported where the session reads it
        return False


def stored_metadata(session: ort.InferenceSession) -> ModelMetadata | None:
    """The edgemeta metadata stored in ``session``'s model, or None (a model from elsewhere)."""
    custom = session.get_modelmeta().custom_metadata_map
    return ModelMetadata.from_json(custom[METADATA_KEY]) if METADATA_KEY in custom else None
