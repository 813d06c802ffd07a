"""An ONNX Runtime session for an exported edgemeta model.

:class:`Session` loads one ``.onnx`` file, picks the execution providers, reads the
model's :class:`~edgemeta.runtime.spec.ModelMetadata`, checks the input/output
contract (``images``, ``prototypes`` -> ``embeddings``, ``logits``), and runs batches.

Providers are never silently different from what was asked: after the ONNX Runtime
session is created, :attr:`Session.providers` is read back from it. A provider that
was asked for by name and does not run raises :class:`ProviderError`, unless
``allow_fallback=True``; every fallback (also under ``"auto"``) is recorded in
:attr:`Session.fallbacks` and reported with a :class:`ProviderFallbackWarning`.

Example:
    >>> s = Session("model.onnx", providers="auto")          # doctest: +SKIP
    >>> emb, logits = s.run(batch, prototypes)                 # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgemeta.runtime.errors import InputError, ModelMismatchError, ProviderError
from edgemeta.runtime.ort import (
    GPU_PROVIDERS,
    GraphOptimization,
    Provider,
    ProvidersArg,
    SessionOptions,
    open_session,
    resolve_providers,
    stored_metadata,
)
from edgemeta.runtime.preprocess import check_batch_finite, first_nonfinite
from edgemeta.runtime.spec import (
    INPUT_IMAGES,
    INPUT_PIXELS,
    INPUT_PROTOTYPES,
    INPUT_SQNORMS,
    OUTPUT_EMBEDDINGS,
    OUTPUT_LOGITS,
    Metric,
    ModelMetadata,
    Normalization,
    PreprocessSpec,
)

__all__ = [
    "Provider",
    "GraphOptimization",
    "SessionOptions",
    "Session",
    "ProviderFallbackWarning",
    "ProvidersArg",
    "resolve_providers",
]

_FLOAT_TYPES = ("tensor(float)", "tensor(float16)")


class ProviderFallbackWarning(RuntimeWarning):
    """A provider that was asked for (or offered by ``"auto"``) does not run."""


def _ort_error_kind(e: Exception) -> str:
    """'model' for errors that say the file is not a loadable model, else 'provider'."""
    name = type(e).__name__
    if name in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NotImplemented", "InvalidArgument"):
        return "model"
    return "provider"


def _value_bounds(spec: PreprocessSpec) -> tuple[float, float, float]:
    """``(the highest mean a preprocessed batch may have, lowest, highest value preprocessing
    gives)``: pixels 0..1 through ``(x - mean) / std``. A batch whose mean lies more than that
    range above it holds raw 0-255 pixels (their mean is in the tens or hundreds); noise,
    augmented or unnormalized 0-1 inputs average well inside it. The mean, not the extremes:
    standard-normal test inputs reach beyond any margin at their extremes."""
    lo = min((0.0 - m) / s for m, s in zip(spec.mean, spec.std))
    hi = max((1.0 - m) / s for m, s in zip(spec.mean, spec.std))
    return hi + (hi - lo), lo, hi


def feeds_prototype_norms(session: ort.InferenceSession) -> bool:
    """Whether an edgemeta model's session is fed the prototypes' squared norms: the model
    takes the optional ``prototype_sqnorms`` input, and the session does not run on
    TensorRT (that path has not been measured with the input fed; the graph computes the
    norms itself when they are not). The one rule for the runtime, the benchmark and the
    exporters' checks."""
    takes = INPUT_SQNORMS in {i.name for i in session.get_overridable_initializers()}
    return takes and session.get_providers()[0] != Provider.TENSORRT.value


def takes_pixels(session: ort.InferenceSession) -> bool:
    """Whether an edgemeta model takes raw ``pixels`` (docs/pixels.md): then it is the required
    input, and ``images`` an optional one that ``get_inputs()`` does not list."""
    return INPUT_PIXELS in {i.name for i in session.get_inputs()}


def images_only_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """What a call that feeds only ``images`` must add: an empty ``pixels`` [0, 1, 1, 3] for a
    model with the raw-pixel entry (there ``pixels`` is required), nothing for an older one."""
    return {INPUT_PIXELS: np.zeros((0, 1, 1, 3), np.uint8)} if takes_pixels(session) else {}


_SCAN_PROTOTYPES = 4096  # prototype values checked directly, before the graph runs (a few us)


def _refuse_nonfinite(prototypes: np.ndarray, dtype: np.dtype) -> None:
    """Raise :class:`InputError` naming the first prototype row with a NaN or an infinity, if
    any, in the ``dtype`` the graph takes them in (a value beyond its range becomes one)."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(prototypes, dtype)
    bad = first_nonfinite(cast)
    if bad is not None:
        raise InputError(
            f"prototype {bad} contains NaN or infinite values (or values beyond {np.dtype(dtype).name}'s range); "
            "build prototypes from finite embeddings"
        )


def prototype_sqnorms(prototypes: np.ndarray) -> np.ndarray:
    """What is fed as ``prototype_sqnorms``: each prototype row's squared L2 norm, float32."""
    p = np.asarray(prototypes, np.float32)
    return np.einsum("nd,nd->n", p, p)


def run_bound(
    session: ort.InferenceSession,
    images: np.ndarray,
    bound: dict[str, ort.OrtValue],
    outputs: list[str],
    device: tuple[str, int],
) -> list[np.ndarray]:
    """One graph call with IO binding: ``images`` (or uint8 ``pixels``) copied to ``device``, the other inputs
    already there (``bound``: name -> OrtValue), the outputs made there and copied back."""
    binding = session.io_binding()
    name = INPUT_PIXELS if images.dtype == np.uint8 else INPUT_IMAGES
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(images, *device))
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, *device)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


def _available_memory() -> int:
    """Bytes of memory free now (Linux, macOS); a generous 16 GiB where it cannot be told."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _check_fixed_batch(batch: int | None, shape: Sequence, source: str) -> None:
    """Refuse, before any allocation, a graph whose fixed batch of images (padded with zeros
    on every call) would not fit in memory: a batch dimension of 2**40 is a damaged or
    hostile model, not a request for petabytes."""
    if not batch:
        return
    per_image = 4
    for d in list(shape)[1:]:
        per_image *= d if isinstance(d, int) and d > 0 else 1
    need = batch * per_image
    if need > _available_memory() // 2:
        raise ModelMismatchError(
            f"{source}: the model fixes a batch of {batch:,} images ({need / 2**30:,.1f} GiB per call), more than this "
            "machine's free memory; re-export it with a dynamic batch"
        )


def graph_batch(sess: ort.InferenceSession) -> int | None:
    """The batch size of a session's ``images`` input when the graph fixes it, else None."""
    shape = next((i.shape for i in sess.get_inputs() if i.name == INPUT_IMAGES), None)
    batch = shape[0] if shape else None
    return batch if isinstance(batch, int) and batch > 0 else None


def _frozen(a: np.ndarray) -> bool:
    """True when no one can change ``a``'s values: it and every array it views are read-only."""
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return True


class Session:
    """One exported edgemeta model, loaded in ONNX Runtime.

    Args:
        model: path to the ``.onnx`` file.
        providers: ``"auto"`` (TensorRT, CUDA, CPU: the first that load), one provider
            (``"cpu"``, ``"cuda"``, ``"tensorrt"`` or a full ONNX Runtime name), or a list.
        preprocess: the preprocessing of a model without edgemeta metadata (required
            then; embedding dim and metric are inferred by probing the model).
        options: threads, optimization level, IO binding, chunk size.
        allow_fallback: run on what loads instead of raising when a named provider does not.

    Raises:
        ProviderError: a provider named explicitly does not run (and no fallback allowed).
        InputError: the file is missing, not an ONNX model, or breaks the I/O contract.
        ModelMismatchError: the model's edgemeta metadata is unreadable or too new.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        providers: ProvidersArg = "auto",
        *,
        preprocess: PreprocessSpec | None = None,
        options: SessionOptions | None = None,
        allow_fallback: bool = False,
    ) -> None:
        self.path = Path(model)
        if self.path.is_dir():
            raise InputError(f"{self.path} is a folder, not a model file; pass the .onnx (or .ort) file")
        if not self.path.is_file():
            raise InputError(f"model file not found: {self.path}; check the path")
        self.options = options or SessionOptions()
        self.allow_fallback = allow_fallback
        self.fallbacks: list[str] = []
        self.requested_providers, self._auto = resolve_providers(providers)
        self.io_binding = False  # decided once the providers are known (probes run unbound)
        self.prototype_uploads = 0  # how many times prototypes were copied to the device
        self._proto_cache: tuple[np.ndarray, object] | None = None
        self._norms_cache: tuple[np.ndarray, np.ndarray, object | None] | None = None  # (prototypes, norms, on device)
        self._no_prototypes_value = None  # the empty prototypes input of embed(), on the device
        self._ort_said = ""  # what ONNX Runtime printed while a GPU provider failed to load
        self._sess = self._create_session()
        self._check_contract()
        self.feeds_norms = feeds_prototype_norms(self._sess)
        try:
            meta = stored_metadata(self._sess)
        except ModelMismatchError as e:  # the metadata's own message does not know the file
            raise ModelMismatchError(f"{self.path}: {e}") from None
        spec = preprocess or (meta.preprocess if meta else None)
        if spec is None:
            raise InputError(
                f"{self.path} carries no edgemeta metadata, so its preprocessing is unknown; re-export the model with "
                "`edgemeta export` (from Python: pass preprocess=PreprocessSpec(...))"
            )
        self._check_input_shape(spec)
        self.metadata = meta.with_(preprocess=spec) if meta else self._infer_metadata(spec)
        self._check_embedding_dim(self.metadata)
        self._logit_scale = self._find_logit_scale()
        self.io_binding = self.options.io_binding if self.options.io_binding is not None else self.on_gpu
        self._value_bounds = _value_bounds(spec)

    # ---- providers -------------------------------------------------------------

    def _fallback(self, lost: list[str], reason: str) -> None:
        if not (self._auto or self.allow_fallback):
            raise ProviderError(
                f"provider(s) {', '.join(lost)} asked for but {reason}; install onnxruntime-gpu "
                "with matching CUDA/TensorRT libraries, or pass providers='auto' or "
                "allow_fallback=True (`--providers auto` on the command line)"
            )
        for p in lost:
            self.fallbacks.append(f"{p}: {reason}")
        warnings.warn(
            f"{', '.join(lost)} not used ({reason}); running on the next provider",
            ProviderFallbackWarning,
            stacklevel=4,
        )

    def _create_session(self) -> ort.InferenceSession:
        available = ort.get_available_providers()
        wanted = list(self.requested_providers)
        missing = [p for p in wanted if p not in available]
        if missing and not self._auto:
            self._fallback(missing, f"not in this onnxruntime build (it has {', '.join(available)})")
        wanted = [p for p in wanted if p in available]
        if not wanted or (self.allow_fallback and Provider.CPU.value not in wanted):
            wanted.append(Provider.CPU.value)
        try:
            sess = self._open(wanted)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own pybind types
            if wanted == [Provider.CPU.value]:
                raise InputError(f"{self.path}: ONNX Runtime cannot load this model ({e}); re-export it") from None
            gpu = [p for p in wanted if p != Provider.CPU.value]
            self._fallback(gpu, f"session creation failed ({' '.join(str(e).split())[:300]})")
            wanted = [Provider.CPU.value]
            sess = self._open(wanted)
        actual = sess.get_providers()
        lost = [p for p in wanted if p not in actual]
        if lost:
            said = f"; ONNX Runtime said: {self._ort_said}" if self._ort_said else ""
            self._fallback(lost, f"ONNX Runtime could not load it (the session runs {', '.join(actual)}){said}")
        return sess

    def _open(self, providers: list[str]) -> ort.InferenceSession:
        try:
            sess, self._ort_said = open_session(self.path, self.options.to_ort(), providers)
            return sess
        except Exception as e:  # noqa: BLE001
            if _ort_error_kind(e) == "model":
                raise InputError(
                    f"{self.path}: not an ONNX model ONNX Runtime can load "
                    f"({' '.join(str(e).split())[:300]}); re-export it"
                ) from None
            raise

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on, in priority order."""
        return list(self._sess.get_providers())

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] in GPU_PROVIDERS

    # ---- the model contract ------------------------------------------------------

    def _check_contract(self) -> None:
        inputs = {i.name: i for i in self._sess.get_inputs()}
        outputs = {o.name: o for o in self._sess.get_outputs()}
        self.takes_pixels = INPUT_PIXELS in inputs
        """Whether the model takes raw uint8 frames (``pixels``; docs/pixels.md)."""
        if self.takes_pixels:
            pixels = inputs.pop(INPUT_PIXELS)
            if pixels.type != "tensor(uint8)" or (pixels.shape is not None and len(pixels.shape) != 4):
                raise InputError(
                    f"{self.path}: input 'pixels' is {pixels.type} {pixels.shape}, expected uint8 [batch, H, W, C]; "
                    "re-export the model"
                )
            # with pixels, `images` is an overridable initializer (optional input): not in get_inputs()
            inputs.update({i.name: i for i in self._sess.get_overridable_initializers() if i.name == INPUT_IMAGES})
        problems = [f"input '{n}'" for n in (INPUT_IMAGES, INPUT_PROTOTYPES) if n not in inputs]
        problems += [f"output '{n}'" for n in (OUTPUT_EMBEDDINGS, OUTPUT_LOGITS) if n not in outputs]
        if problems:
            raise InputError(
                f"{self.path} is not an edgemeta model: missing {', '.join(problems)} "
                f"(it has inputs {sorted(inputs)}, outputs {sorted(outputs)}); export it with `edgemeta export`"
            )
        extra = sorted(set(inputs) - {INPUT_IMAGES, INPUT_PROTOTYPES})
        if extra:
            raise InputError(f"{self.path} has extra inputs {extra} that edgemeta cannot feed; re-export the model")
        ranks = []
        for name, want in ((INPUT_IMAGES, 4), (INPUT_PROTOTYPES, 2)):
            shape = inputs[name].shape
            if shape is not None and len(shape) != want:
                ranks.append(f"input '{name}' has rank {len(shape)}, expected {want}")
        if ranks:
            raise InputError(f"{self.path} breaks the edgemeta contract: {'; '.join(ranks)}; re-export the model")
        # inputs are fed float32 or float16; outputs of any float type are read as float32
        types = [
            f"input '{n}' is {inputs[n].type}, expected float or float16"
            for n in inputs
            if inputs[n].type not in _FLOAT_TYPES
        ]
        types += [
            f"output '{n}' is {outputs[n].type}, expected float, float16 or double"
            for n in (OUTPUT_EMBEDDINGS, OUTPUT_LOGITS)
            if outputs[n].type not in (*_FLOAT_TYPES, "tensor(double)")
        ]
        if types:
            raise InputError(f"{self.path} breaks the edgemeta contract: {'; '.join(types)}; re-export the model")
        count = inputs[INPUT_PROTOTYPES].shape[0] if inputs[INPUT_PROTOTYPES].shape else None
        if isinstance(count, int):
            raise InputError(
                f"{self.path} takes a fixed number of prototypes ({count}), so classes cannot be enrolled; "
                "re-export it with `edgemeta export` (a dynamic class count)"
            )
        self._in_types = {n: np.float16 if inputs[n].type == "tensor(float16)" else np.float32 for n in inputs}
        self._images_shape = inputs[INPUT_IMAGES].shape
        self._no_pixels = images_only_feeds(self._sess)
        self._no_pixels_value = None
        self.fixed_batch: int | None = graph_batch(self._sess)
        """The batch size the graph was exported with when it is fixed, else None: calls then
        go in chunks of exactly that size, the last one padded with zero images (their
        outputs dropped)."""
        _check_fixed_batch(self.fixed_batch, self._images_shape, str(self.path))

    def _check_embedding_dim(self, metadata: ModelMetadata) -> None:
        """The metadata's embedding size against the graph's, where the graph fixes it."""
        graph = {self._output_dim(), self._prototypes_dim()} - {None}
        if graph and graph != {metadata.embedding_dim}:
            raise InputError(
                f"{self.path}: its metadata says {metadata.embedding_dim}-d embeddings but the graph's are "
                f"{'/'.join(map(str, sorted(graph)))}-d; re-export the model with `edgemeta export`"
            )

    def _norms_entry(self, protos: np.ndarray) -> tuple[np.ndarray, np.ndarray, object | None] | None:
        """``(protos, their squared norms, those on the device or None)`` for read-only
        ``protos`` (the norms computed once per array), else None.

        A store's prototypes are a read-only array that is replaced when a class changes,
        so the norms cost one pass over the prototypes per enrolment instead of one per
        call. An array that could change between calls (writable, or a read-only view of
        writable memory): the graph computes its norms.
        One tuple is read and written at a time, so threads sharing a session never pair
        one array's norms with another array.
        """
        if not self.feeds_norms or not _frozen(protos) or len(protos) == 0:
            return None
        cached = self._norms_cache
        if cached is not None and cached[0] is protos:
            return cached
        with np.errstate(over="ignore", invalid="ignore"):
            norms = prototype_sqnorms(protos)
        if not math.isfinite(float(norms.sum())):  # a NaN or infinity in a row makes its norm one
            _refuse_nonfinite(protos, np.float32)
        entry = self._norms_cache = (protos, norms, None)
        return entry

    def _norms(self, protos: np.ndarray) -> np.ndarray | None:
        entry = self._norms_entry(protos)
        return None if entry is None else entry[1]

    def _norms_value(self, protos: np.ndarray):
        """The norms of :meth:`_norms_entry` as an OrtValue on the device (IO binding), else None."""
        entry = self._norms_entry(protos)
        if entry is None:
            return None
        if entry[2] is None:
            entry = self._norms_cache = (
                entry[0],
                entry[1],
                ort.OrtValue.ortvalue_from_numpy(entry[1], *self._device()),
            )
        return entry[2]

    def _check_input_shape(self, spec: PreprocessSpec) -> None:
        want = (spec.channels, *spec.size)
        got = tuple(self._images_shape[1:]) if self._images_shape else ()
        if any(isinstance(g, int) and g != w for w, g in zip(want, got)):
            raise InputError(
                f"{self.path}: the model input is {list(self._images_shape)} but the preprocessing gives "
                f"[batch, {', '.join(map(str, want))}]; fix the PreprocessSpec or re-export the model"
            )

    def _probe(self, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
        """Embed one fixed pseudo-image; score it against itself and twice itself."""
        x = np.random.default_rng(0).standard_normal((1, spec.channels, *spec.size)).astype(np.float32)
        try:
            emb = self._raw_run(x, np.zeros((0, self._output_dim() or 1), np.float32), logits=False)[0]
            protos = np.concatenate([emb, 2.0 * emb]).astype(np.float32)
            return emb, self._raw_run(x, protos)[1][0]
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own pybind types
            raise InputError(
                f"{self.path}: probing the model failed ({e}); re-export it with edgemeta metadata"
            ) from None

    def _output_dim(self) -> int | None:
        shape = next(o.shape for o in self._sess.get_outputs() if o.name == OUTPUT_EMBEDDINGS)
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    def _prototypes_dim(self) -> int | None:
        shape = next(i.shape for i in self._sess.get_inputs() if i.name == INPUT_PROTOTYPES)
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    def _infer_metadata(self, preprocess: PreprocessSpec) -> ModelMetadata:
        emb, (same, double) = self._probe(preprocess)
        sq = float((emb.astype(np.float64) ** 2).sum())
        if sq <= 1e-12:
            raise InputError(
                f"{self.path}: cannot infer the metric (zero embedding); re-export it with edgemeta metadata"
            )
        if abs(same) <= 1e-3 * max(sq, 1.0) and abs(double + sq) <= 1e-2 * sq:
            metric = Metric.SQEUCLIDEAN
        elif same > 0 and abs(same - double) <= 1e-2 * abs(same):
            metric = Metric.COSINE
        else:
            raise InputError(
                f"{self.path}: logits match neither -squared-euclidean nor scaled cosine; "
                "re-export the model with edgemeta metadata"
            )
        norm = Normalization.L2 if abs(np.sqrt(sq) - 1.0) < 1e-3 else Normalization.NONE
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        extra = {"logit_scale": float(same)} if metric is Metric.COSINE else {}
        return ModelMetadata(preprocess, int(emb.shape[1]), metric, norm, f"sha256:{digest}", extra=extra)

    def _find_logit_scale(self) -> float:
        """Cosine models: logits are ``scale * cos``; read the scale or measure it once."""
        if self.metadata.metric is not Metric.COSINE:
            return 1.0
        scale = self.metadata.extra.get("logit_scale")
        if isinstance(scale, (int, float)) and scale > 0:
            return float(scale)
        _, (same, _) = self._probe(self.metadata.preprocess)
        if not same > 0:
            raise InputError(f"{self.path}: cannot measure the cosine logit scale; re-export the model")
        return float(same)

    # ---- metadata shortcuts ------------------------------------------------------

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.metadata.preprocess

    @property
    def embedding_dim(self) -> int:
        return self.metadata.embedding_dim

    @property
    def metric(self) -> Metric:
        return self.metadata.metric

    @property
    def fingerprint(self) -> str:
        return self.metadata.fingerprint

    @property
    def logit_scale(self) -> float:
        """``logits = scale * cos`` for cosine models; 1.0 for squared euclidean."""
        return self._logit_scale

    def distances(self, logits: np.ndarray) -> np.ndarray:
        """Logits from the graph -> distances: ``-logit`` (sq. euclidean), ``1 - logit/scale`` (cosine)."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.metric is Metric.COSINE:
            return 1.0 - logits / self._logit_scale
        return -logits

    # ---- running ---------------------------------------------------------------------

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames for ``pixels``: only the shape is checked (every byte is a valid pixel)."""
        if frames.ndim != 4 or frames.shape[3] not in (1, 3, 4) or min(frames.shape[:3]) < 1:
            raise InputError(
                f"frames of shape {frames.shape} do not fit the model's pixels input: expected uint8 "
                "[batch>=1, H>=1, W>=1, C] with C = 1 (grey), 3 (RGB) or 4 (RGBA)"
            )
        return frames

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        if self.takes_pixels and getattr(images, "dtype", None) == np.uint8:
            return self._check_frames(np.asarray(images))
        x = np.asarray(images)
        want = (self.preprocess.channels, *self.preprocess.size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
            raise InputError(
                f"images of shape {x.shape} do not fit the model input [batch>=1, {', '.join(map(str, want))}]; "
                "preprocess them with edgemeta.runtime.preprocess"
            )
        if x.dtype.kind != "f":
            raise InputError(f"images must be a float array, got {x.dtype}; preprocess them first")
        # one pass, which also finds NaN and infinities; a sum, not mean(): mean's Python
        # wrapper cost 5 us more a call at batch 1. float16 is summed in float32 (no overflow)
        mean = float(x.sum(dtype=np.float32 if x.dtype.itemsize < 4 else None)) / x.size
        if not math.isfinite(mean):
            check_batch_finite(x)  # names the first bad image
        if mean > self._value_bounds[0]:
            lo, hi = self._value_bounds[1:]
            raise InputError(
                f"images average {mean:.4g}, far above what this model's preprocessing gives ({lo:.3g} "
                f"to {hi:.3g}): 0-255 pixels are not preprocessed; pass the images themselves (paths, "
                "PIL images, uint8 arrays) or run them through edgemeta.runtime.preprocess"
            )
        return x

    def _check_prototypes(self, prototypes: np.ndarray) -> np.ndarray:
        p = np.asarray(prototypes)
        if p.ndim != 2 or p.shape[1] != self.embedding_dim:
            raise InputError(
                f"prototypes of shape {p.shape} do not fit [n_classes, {self.embedding_dim}]; "
                "build them from this model's embeddings"
            )
        return p

    @functools.cached_property
    def _no_prototypes(self) -> np.ndarray:
        empty = np.zeros((0, self.embedding_dim), self._in_types[INPUT_PROTOTYPES])
        empty.flags.writeable = False
        return empty

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed float images [B, C, H, W] -> embeddings float32 [B, D]. A model that takes
        ``pixels`` also takes uint8 frames [B, H, W, C] (one size per call) here."""
        x = self._check_images(images)
        return self._chunked(x, self._no_prototypes, logits=False)[0]

    def run(self, images: np.ndarray, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images and prototypes [N, D] -> (embeddings [B, D], logits [B, N]).

        A model that takes ``pixels`` also takes uint8 frames [B, H, W, C] as ``images``: they
        are fed to ``pixels`` and preprocessed in the graph.

        The logits are computed by the graph, on the session's provider. Pass a
        read-only array (as :meth:`PrototypeStore.prototypes` returns) to let IO binding
        keep it on the device between calls.
        """
        x = self._check_images(images)
        p = self._check_prototypes(prototypes)
        # prototypes whose norms are fed are checked once, with them (_norms_entry); a few
        # others directly (ONNX Runtime before 1.19 let Min(NaN, 0) give 0 with one class);
        # more by one pass over the logits, and the rows themselves only when that finds one
        scan = self._norms_entry(p) is None
        if scan and p.size <= _SCAN_PROTOTYPES:
            _refuse_nonfinite(p, self._in_types[INPUT_PROTOTYPES])
        emb, logits = self._chunked(x, p, logits=True)
        if scan and p.size > _SCAN_PROTOTYPES and not math.isfinite(float(logits.sum())):
            _refuse_nonfinite(p, self._in_types[INPUT_PROTOTYPES])
        return emb, logits

    def _chunked(self, x: np.ndarray, protos: np.ndarray, logits: bool) -> tuple[np.ndarray, np.ndarray | None]:
        bs = self.fixed_batch or self.options.batch_size
        parts = [self._raw_run(x[i : i + bs], protos, logits) for i in range(0, len(x), bs)]
        emb = parts[0][0] if len(parts) == 1 else np.concatenate([e for e, _ in parts])
        if not logits:
            return emb, None
        lg = parts[0][1] if len(parts) == 1 else np.concatenate([g for _, g in parts])
        return emb, lg

    def _raw_run(self, x: np.ndarray, protos: np.ndarray, logits: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(x)
        pixels = x.dtype == np.uint8  # frames (only a model that takes pixels gets them: _check_images)
        if pixels:
            x = np.ascontiguousarray(x)
        else:
            if self.fixed_batch and n < self.fixed_batch:  # the graph takes exactly that many images
                x = np.concatenate([x, np.zeros((self.fixed_batch - n, *x.shape[1:]), x.dtype)])
            x = np.ascontiguousarray(x, dtype=self._in_types[INPUT_IMAGES])
        names = [OUTPUT_EMBEDDINGS, OUTPUT_LOGITS] if logits else [OUTPUT_EMBEDDINGS]
        if self.io_binding:
            outs = self._run_bound(x, protos, names)
        else:
            feed = {INPUT_PROTOTYPES: np.ascontiguousarray(protos, dtype=self._in_types[INPUT_PROTOTYPES])}
            feed.update({INPUT_PIXELS: x} if pixels else {INPUT_IMAGES: x, **self._no_pixels})
            norms = self._norms(protos) if logits else None
            if norms is not None:
                feed[INPUT_SQNORMS] = norms
            outs = self._sess.run(names, feed)
        outs = [np.asarray(o, dtype=np.float32) for o in outs]
        if len(outs[0]) != n:
            outs = [o[:n] for o in outs]
        return outs[0], (outs[1] if logits else None)

    def _device(self) -> tuple[str, int]:
        return ("cuda", self.options.device_id) if self.on_gpu else ("cpu", 0)

    def _prototype_value(self, protos: np.ndarray):
        """An OrtValue on the device for ``protos``; reused while the same read-only array comes back."""
        cached = self._proto_cache
        if cached is not None and cached[0] is protos:
            return cached[1]
        p = np.ascontiguousarray(protos, dtype=self._in_types[INPUT_PROTOTYPES])
        value = ort.OrtValue.ortvalue_from_numpy(p, *self._device())
        self.prototype_uploads += 1
        if _frozen(protos):  # an array that can change could do so under the cached copy
            self._proto_cache = (protos, value)
        return value

    def _run_bound(self, x: np.ndarray, protos: np.ndarray, names: list[str]) -> list[np.ndarray]:
        device = self._device()
        if OUTPUT_LOGITS in names:
            norms = self._norms_value(protos)  # first: it refuses non-finite prototypes before any upload
            bound = {INPUT_PROTOTYPES: self._prototype_value(protos)}
            if norms is not None:
                bound[INPUT_SQNORMS] = norms
        else:  # embedding only: a fixed empty input, so the cached prototypes stay on the device
            if self._no_prototypes_value is None:
                self._no_prototypes_value = ort.OrtValue.ortvalue_from_numpy(self._no_prototypes, *device)
            bound = {INPUT_PROTOTYPES: self._no_prototypes_value}
        if self._no_pixels and x.dtype != np.uint8:
            if self._no_pixels_value is None:
                self._no_pixels_value = ort.OrtValue.ortvalue_from_numpy(self._no_pixels[INPUT_PIXELS], *device)
            bound[INPUT_PIXELS] = self._no_pixels_value
        return run_bound(self._sess, x, bound, names, device)

    def __repr__(self) -> str:
        return (
            f"Session({str(self.path)!r}, providers={self.providers}, "
            f"dim={self.embedding_dim}, metric={self.metric.value})"
        )
