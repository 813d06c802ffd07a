"""Few-shot classification on the device: enrol classes from a few images, predict.

Enrolling a class embeds its images once and adds them to the class's running sum
(:class:`~edgemeta.runtime.store.PrototypeStore`); nothing already enrolled is
re-embedded. Predicting feeds the query images and the prototype matrix to the
model, whose graph computes the logits on the session's provider; the label is the
highest logit, the probability a softmax over the enrolled classes, and the
distance is read back from the logit (``-logit`` for squared euclidean,
``1 - logit/scale`` for cosine).

Open set. A prediction is ``unknown`` when its distance to the nearest class is over
the classifier's threshold. The default threshold (``threshold=None``) is:

* ``metadata.extra["open_set_threshold"]`` when the exporter wrote one: the 95th
  percentile of genuine queries' distances to 5-shot prototypes on held-out classes. It
  fits that setting (about 5% of genuine queries called unknown); with 1 shot or in k-NN
  mode genuine distances are larger (13-41% were called unknown on Omniglot), so there
  run :meth:`FewShotClassifier.calibrate_threshold` or set a threshold;
* cosine models: distance 0.5 (cosine similarity under 0.5, i.e. over 60 degrees);
* squared euclidean on L2-normalized embeddings (``l2``, ``centered_l2``): 1.0, the
  same angle for unit vectors (``|a-b|^2 = 2 - 2 cos``);
* otherwise (unnormalized embeddings) no default: nothing is ``unknown`` until
  :meth:`FewShotClassifier.calibrate_threshold` runs or a threshold is set.

:meth:`FewShotClassifier.calibrate_threshold` derives a threshold from the enrolled
examples themselves (needs ``keep_embeddings=True``): each example's leave-one-out
distance to its own class (the prototype of the other examples, or in k-NN mode
its k nearest other examples) is computed, and the threshold is the
``percentile``-th of those distances times ``margin``: about ``100 - percentile`` %
of genuine queries would be called unknown, before the margin.

k-NN mode (``ClassifierOptions(mode=Mode.KNN, knn_k=k)``) feeds the individual
enrolled embeddings to the graph instead of the prototypes; a class's logit is the
mean of the logits of its k nearest examples (k=1: nearest neighbour).

Thread safety: predictions read an immutable snapshot of the store, taken under the
store's lock, so a prediction running while another thread enrols sees the store
either before or after that enrolment, never half of it.

Example:
    >>> clf = FewShotClassifier("model.onnx", providers="auto")     # doctest: +SKIP
    >>> clf.enroll("mug", ["mug1.jpg", "mug2.jpg"])                 # doctest: +SKIP
    >>> clf.predict("query.jpg")[0].label                            # doctest: +SKIP
    'mug'
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from edgemeta.runtime.errors import InputError
from edgemeta.runtime.ort import ProvidersArg, SessionOptions
from edgemeta.runtime.preprocess import ImageLike, check_batch_finite, is_preprocessed, pixel_groups, preprocess
from edgemeta.runtime.session import Session
from edgemeta.runtime.spec import Metric, Normalization, PreprocessSpec
from edgemeta.runtime.store import PrototypeStore, StoreSnapshot, check_label

__all__ = [
    "Mode",
    "ClassifierOptions",
    "Candidate",
    "Prediction",
    "FewShotClassifier",
    "IMAGE_SUFFIXES",
    "scan_class_folders",
    "list_images",
]

#: File suffixes treated as images when scanning folders.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class Mode(str, Enum):
    """How classes are scored: against their prototype (mean) or their nearest examples."""

    PROTOTYPE = "prototype"
    KNN = "knn"


@dataclass(frozen=True)
class ClassifierOptions:
    """Rarely changed settings of :class:`FewShotClassifier`.

    Attributes:
        mode: prototype (class mean) or k-NN over the kept embeddings.
        knn_k: k for k-NN mode.
        keep_embeddings: keep each enrolled embedding in a new store (k-NN, calibration).
        open_set: give an ``unknown`` verdict over the threshold at all.
        threshold: the open-set distance threshold; ``None`` = the documented default.
        batch_size: images preprocessed and embedded per chunk (bounds memory).
        session: ONNX Runtime session settings.
    """

    mode: Mode = Mode.PROTOTYPE
    knn_k: int = 1
    keep_embeddings: bool = False
    open_set: bool = True
    threshold: float | None = None
    batch_size: int = 64
    session: SessionOptions = field(default_factory=SessionOptions)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise InputError(f"unknown mode {self.mode!r}; choose prototype or knn") from None
        for name in ("knn_k", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if self.mode is Mode.KNN and not self.keep_embeddings:
            object.__setattr__(self, "keep_embeddings", True)  # k-NN is impossible without them
        _check_threshold(self.threshold)


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k largest logits, best first; equal logits in class order, as
    ``argmax`` (top-1) and a stable sort (every class) order them, so the top-1 class never
    depends on ``top_k``. ``argpartition`` finds the k in O(N); only a row whose k-th value
    is tied beyond the k picked is redone exactly."""
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    rows = np.arange(len(logits))[:, None]
    kth = logits[rows, top].min(axis=1)
    for r in np.flatnonzero((logits == kth[:, None]).sum(axis=1) > (logits[rows, top] == kth[:, None]).sum(axis=1)):
        row = logits[r]
        above = np.flatnonzero(row > kth[r])
        top[r] = np.concatenate([above, np.flatnonzero(row == kth[r])[: k - len(above)]])
    vals = logits[rows, top]
    return np.take_along_axis(top, np.lexsort((top, -vals), axis=-1), axis=1)


def _check_threshold(value: object) -> None:
    ok = value is None or (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
        and value >= 0
    )
    if not ok:
        raise InputError(f"threshold must be a finite distance >= 0 or None, got {value!r}")


class Candidate(NamedTuple):
    """One ranked class: ``(label, probability, distance)``."""

    label: str
    probability: float
    distance: float


@dataclass(frozen=True)
class Prediction:
    """The verdict for one image.

    ``label`` is the nearest enrolled class even when ``unknown`` is true (the
    distance was over the open-set threshold); ``top_k`` ranks the best classes.
    """

    label: str
    probability: float
    distance: float
    unknown: bool
    top_k: tuple[Candidate, ...]

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "probability": self.probability,
            "distance": self.distance,
            "unknown": self.unknown,
            "top_k": [c._asdict() for c in self.top_k],
        }


def _as_list(images: ImageLike | Sequence[ImageLike]) -> Sequence:
    """A sliceable sequence of images; a 4-D array stays one array, so that a batch already
    preprocessed (:func:`is_preprocessed`) goes to the session as it is, checked once."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _frames(items: Sequence) -> bool:
    """Whether ``items`` is one uint8 [B, H, W, C] array of frames (C = 1, 3 or 4)."""
    return isinstance(items, np.ndarray) and items.dtype == np.uint8 and items.ndim == 4 and items.shape[3] in (1, 3, 4)


def _same_shape_frames(items: Sequence) -> np.ndarray | None:
    """uint8 HW or HWC arrays of one shape as one [B, H, W, C] batch, else None (the lean path of
    a camera loop: nothing to decode, convert or group)."""
    first = items[0]
    if not isinstance(first, np.ndarray) or first.dtype != np.uint8 or first.ndim not in (2, 3) or 0 in first.shape:
        return None
    if any(not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.shape != first.shape for a in items[1:]):
        return None
    batch = first[None] if len(items) == 1 else np.stack(items)
    return batch[..., None] if first.ndim == 2 else batch


class FewShotClassifier:
    """Enrol classes from a few images and classify new ones, without backprop.

    Args:
        model: an exported ``.onnx`` path, or an open :class:`Session`.
        providers: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or a list (see :class:`Session`).
        store: start from this store (it must come from the same model).
        preprocess: preprocessing for a model without edgemeta metadata.
        options: mode, k, open-set threshold, batching, session settings.
        allow_fallback: run on what loads when a named provider does not (reported).

    Example:
        >>> clf = FewShotClassifier("model.onnx")                 # doctest: +SKIP
        >>> clf.enroll("cat", ["cat1.png", "cat2.png"])             # doctest: +SKIP
        >>> [p.label for p in clf.predict(["q1.png", "q2.png"])]   # doctest: +SKIP
        >>> clf.save("device.store")                                # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | os.PathLike | Session,
        providers: ProvidersArg = "auto",
        *,
        store: PrototypeStore | None = None,
        preprocess: PreprocessSpec | None = None,
        options: ClassifierOptions | None = None,
        allow_fallback: bool = False,
    ) -> None:
        self.options = options or ClassifierOptions()
        if isinstance(model, Session):
            self.session = model
        else:
            self.session = Session(
                model, providers, preprocess=preprocess, options=self.options.session, allow_fallback=allow_fallback
            )
        self._store = self._checked(store) if store is not None else self._new_store()
        self._threshold = self.options.threshold if self.options.threshold is not None else self.default_threshold()

    # ---- model and store ----------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        """The execution providers that actually run the model."""
        return self.session.providers

    @property
    def fingerprint(self) -> str:
        return self.session.fingerprint

    @property
    def store(self) -> PrototypeStore:
        return self._store

    @property
    def labels(self) -> list[str]:
        return self._store.labels

    @property
    def counts(self) -> dict[str, int]:
        return self._store.counts

    def _new_store(self) -> PrototypeStore:
        s = self.session
        return PrototypeStore(
            s.embedding_dim, metric=s.metric, fingerprint=s.fingerprint, keep_embeddings=self.options.keep_embeddings
        )

    def _checked(self, store: PrototypeStore) -> PrototypeStore:
        """``store`` if it fits this model (see :meth:`PrototypeStore.claim`: one made by hand,
        which records no model, is taken as this model's from then on)."""
        if self.options.mode is Mode.KNN and not store.keep_embeddings:
            raise InputError(
                "k-NN mode needs a store that keeps embeddings; re-enrol into a new store with keep_embeddings=True "
                "(`edgemeta enroll --keep-embeddings --store NEW`)"
            )
        s = self.session
        store.claim(s.fingerprint, s.embedding_dim, s.metric)
        return store

    def use_store(self, store: PrototypeStore) -> None:
        """Replace the classifier's store (after checking it comes from this model)."""
        self._store = self._checked(store)

    def save(
        self, path: str | os.PathLike, *, timeout: float | None = None, on_wait: Callable[[str], None] | None = None
    ) -> Path:
        """Save what was enrolled, atomically (see :meth:`PrototypeStore.save`: it warns when
        another process changed the file since it was loaded; :meth:`editing` merges)."""
        return self._store.save(path, timeout=timeout, on_wait=on_wait)

    def load(self, path: str | os.PathLike) -> FewShotClassifier:
        """Replace the enrolled classes by those of a store file made with this model; returns self."""
        self._store = self._checked(PrototypeStore.load(path, fingerprint=self.fingerprint))
        return self

    @contextlib.contextmanager
    def editing(
        self, path: str | os.PathLike, *, timeout: float | None = None, on_wait: Callable[[str], None] | None = None
    ) -> Iterator[FewShotClassifier]:
        """Lock the store file, load it (or start empty), yield, and save on success.

        Two processes enrolling into the same file this way never lose each other's
        classes. The in-memory store is replaced by the file's, with the block's changes;
        if the block or the save fails, the file is left as it was and the classifier keeps
        the store it had before. ``timeout`` (seconds) and ``on_wait`` (told once when
        another writer holds the lock): as for :meth:`PrototypeStore.save`.
        """
        before = self._store
        try:
            with PrototypeStore.edit(
                path, default=self._new_store(), fingerprint=self.fingerprint, timeout=timeout, on_wait=on_wait
            ) as store:
                self._store = self._checked(store)
                yield self
        except BaseException:  # the block or the save failed: the file is as it was, and so is the memory
            self._store = before
            raise

    # ---- embedding and enrolment ---------------------------------------------------

    def embed(
        self, images: ImageLike | Sequence[ImageLike], on_progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Images (paths, PIL images, arrays, or a 4-D array) -> embeddings float32 [n, D]."""
        items = _as_list(images)
        if len(items) == 0:
            raise InputError("no images given; pass at least one image")
        spec, bs = self.session.preprocess, self.options.batch_size
        ready = self._ready(items, spec, bs)
        parts = []
        for i in range(0, len(items), bs):  # batch by batch: images are decoded, and memory bounded, per batch
            parts.append(self._call(items[i : i + bs], ready, None)[0])
            if on_progress is not None:
                on_progress(len(parts[-1]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _call(
        self, items: Sequence, ready: bool, prototypes: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch of images through the session: (embeddings, logits or None when ``prototypes`` is None).

        A model that takes ``pixels`` gets decoded images as uint8 frames (one call per frame
        size, :func:`pixel_groups`; the graph resizes and normalizes them) and preprocessed
        arrays through ``images``; an older model gets everything preprocessed by Pillow."""
        session = self.session
        if ready or not session.takes_pixels:
            x = items if ready else preprocess(items, session.preprocess)
            return (session.embed(x), None) if prototypes is None else session.run(x, prototypes)
        frames = items if _frames(items) else _same_shape_frames(items)
        if frames is not None:  # uint8 arrays of one shape: one call, no per-image work (the session checks C)
            return (session.embed(frames), None) if prototypes is None else session.run(frames, prototypes)
        groups, floats, float_at = pixel_groups(items, session.preprocess)
        if floats is not None:
            groups.append((float_at, floats))
        if len(groups) == 1:
            x = groups[0][1]
            return (session.embed(x), None) if prototypes is None else session.run(x, prototypes)
        emb = logits = None
        for at, x in groups:
            e, lg = (session.embed(x), None) if prototypes is None else session.run(x, prototypes)
            if emb is None:
                emb = np.empty((len(items), e.shape[1]), np.float32)
                logits = None if lg is None else np.empty((len(items), lg.shape[1]), np.float32)
            emb[at] = e
            if logits is not None:
                logits[at] = lg
        return emb, logits

    @staticmethod
    def _ready(items: Sequence, spec: PreprocessSpec, bs: int) -> bool:
        """Whether ``items`` is an already-preprocessed batch (:func:`is_preprocessed`), which goes
        to the session as it is: checked there once per call, not also by :func:`preprocess`.
        One larger than a call (``bs``) is checked whole first, so that a bad image is named
        by its place in the whole batch."""
        if not is_preprocessed(items, spec):
            return False
        if len(items) > bs:
            check_batch_finite(items)
        return True

    def enroll(
        self, label: str, images: ImageLike | Sequence[ImageLike], *, on_progress: Callable[[int], None] | None = None
    ) -> int:
        """Add images of class ``label`` (new or existing); returns its example count.

        Only the new images are embedded. All images are embedded before the store
        changes, so a bad image leaves the store as it was.
        """
        label = check_label(label)
        items = _as_list(images)
        if len(items) == 0:
            raise InputError(f"no images given for label {label!r}; pass at least one image")
        return self._store.add(label, self.embed(items, on_progress))

    def enroll_folder(
        self, folder: str | os.PathLike, *, on_progress: Callable[[int], None] | None = None
    ) -> dict[str, int]:
        """Enrol every class subfolder of ``folder`` (label = subfolder name); returns label -> images added."""
        classes = scan_class_folders(folder)
        named: dict[str, str] = {}
        for name in classes:  # a folder name no store can hold is refused before any image is embedded
            label = check_label(name)
            if label in named:
                raise InputError(
                    f"folders {named[label]!r} and {name!r} in {folder} name the same class "
                    f"{label!r} (one written decomposed); merge the two folders into one"
                )
            named[label] = name
        embedded = {label: self.embed(classes[name], on_progress) for label, name in named.items()}
        for label, emb in embedded.items():  # every image decoded before the store changes
            self._store.add(label, emb)
        return {label: len(emb) for label, emb in embedded.items()}

    def forget(self, label: str) -> None:
        self._store.forget(label)

    def rename(self, old: str, new: str, *, merge: bool = False) -> None:
        self._store.rename(old, new, merge=merge)

    # ---- prediction -------------------------------------------------------------------

    @property
    def threshold(self) -> float | None:
        """The open-set distance threshold in use (``None``: no ``unknown`` verdicts)."""
        return self._threshold if self.options.open_set else None

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        _check_threshold(value)
        self._threshold = None if value is None else float(value)

    def default_threshold(self) -> float | None:
        """The documented default open-set threshold for this model (see the module docstring)."""
        meta = self.session.metadata
        given = meta.extra.get("open_set_threshold")
        if isinstance(given, (int, float)) and given >= 0:
            return float(given)
        if meta.metric is Metric.COSINE:
            return 0.5
        if meta.normalization in (Normalization.L2, Normalization.CENTERED_L2):
            return 1.0
        return None

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 1) -> list[Prediction]:
        """Classify images; one :class:`Prediction` per image, in order.

        Raises:
            InputError: nothing is enrolled yet, ``top_k`` < 1, or an image is bad.
        """
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InputError(f"top_k must be an integer >= 1, got {top_k!r}")
        knn = self.options.mode is Mode.KNN
        snap = self._store.snapshot(examples=knn)
        if not snap.labels:
            raise InputError(
                "nothing is enrolled yet; call enroll(label, images) (`edgemeta enroll`) for at least one class first"
            )
        items = _as_list(images)
        if len(items) == 0:
            raise InputError("no images given; pass at least one image")
        scores = snap.examples if knn else snap.prototypes
        spec, bs = self.session.preprocess, self.options.batch_size
        threshold = self.threshold
        out: list[Prediction] = []
        ready = self._ready(items, spec, bs)
        for i in range(0, len(items), bs):
            logits = self._call(items[i : i + bs], ready, scores)[1]
            if knn:
                logits = self._knn_logits(logits, snap)
            out.extend(self._verdicts(logits, snap.labels, min(int(top_k), len(snap.labels)), threshold))
        return out

    def _knn_logits(self, example_logits: np.ndarray, snap: StoreSnapshot) -> np.ndarray:
        """Per-example logits [B, N] -> per-class logits [B, C]: mean of each class's k best.

        Vectorized (a loop over 20,000 classes took 100 ms a query): the examples are stored
        class by class, so k=1 is one ``maximum.reduceat``; otherwise the classes with the same
        number of examples are gathered into one [B, classes, n] block and partitioned at once."""
        k = self.options.knn_k
        counts = np.asarray(snap.counts, np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        x = np.asarray(example_logits, np.float64)
        if k == 1:  # nearest neighbour: each block's maximum
            return np.maximum.reduceat(x, starts, axis=1)
        out = np.empty((x.shape[0], len(counts)), np.float64)
        for n in np.unique(counts):
            classes = np.flatnonzero(counts == n)
            block = x[:, starts[classes][:, None] + np.arange(n)]  # [B, classes, n]
            best = block if k >= n else np.partition(block, n - k, axis=-1)[..., n - k :]
            out[:, classes] = best.mean(axis=-1)
        return out

    def _verdicts(
        self, logits: np.ndarray, labels: tuple[str, ...], k: int, threshold: float | None
    ) -> list[Prediction]:
        """Top-``k`` candidates per row. Probabilities and distances are computed for those
        only (the softmax denominator still sums over every class): with 10,000 classes,
        the full arrays cost more than the graph's whole metric."""
        logits = np.asarray(logits, dtype=np.float32)
        if k == 1 and len(logits) == 1:  # one frame of a camera loop: the same sums on scalars
            row = logits[0]
            j = int(row.argmax())
            prob = 1.0 / float(np.exp(row - row[j]).sum(dtype=np.float64))
            dist = float(self.session.distances(row[j]))
            top1 = Candidate(labels[j], prob, dist)
            return [Prediction(labels[j], prob, dist, threshold is not None and dist > threshold, (top1,))]
        rows = np.arange(logits.shape[0])[:, None]
        if k == 1:
            top = logits.argmax(axis=1)[:, None]
        elif k < logits.shape[1]:
            top = _top_k(logits, k)
        else:
            top = np.argsort(-logits, axis=1, kind="stable")
        best = logits[rows, top]
        # exp in float32 over every class (relative error ~1e-7), summed in float64
        denom = np.exp(logits - best[:, :1]).sum(axis=1, keepdims=True, dtype=np.float64)
        best = best.astype(np.float64)
        probs = np.exp(best - best[:, :1]) / denom
        dists = self.session.distances(best)
        # plain Python numbers made in one call each: per-element float() made this loop the
        # largest Python cost of a batch of predictions
        unknown = [False] * len(dists) if threshold is None else (dists[:, 0] > threshold).tolist()
        preds = []
        for t, p, d, u in zip(top.tolist(), probs.tolist(), dists.tolist(), unknown):
            cands = tuple(map(Candidate, [labels[j] for j in t], p, d))
            preds.append(Prediction(cands[0].label, p[0], d[0], u, cands))
        return preds

    # ---- open-set calibration ---------------------------------------------------------

    def calibrate_threshold(self, percentile: float = 95.0, margin: float = 1.25, *, apply: bool = True) -> float:
        """Set the open-set threshold from the enrolled examples (leave-one-out); returns it.

        For each kept example of a class with 2+ examples, its distance to the
        prototype of the class's *other* examples (k-NN mode: the mean distance to its
        k nearest other examples) is computed; the threshold is the ``percentile``-th
        of these distances times ``margin``. The metric is evaluated in numpy here
        (the graph takes images, not embeddings), with the same definition as the graph.

        Raises:
            InputError: the store does not keep embeddings, or no class has 2+ examples.
        """
        if not (0 < percentile <= 100) or not margin > 0:
            raise InputError(f"percentile must be in (0, 100] and margin > 0, got {percentile} and {margin}")
        store = self._store
        if not store.keep_embeddings:
            raise InputError(
                "calibrate_threshold() needs the enrolled embeddings; "
                "use ClassifierOptions(keep_embeddings=True) and re-enrol"
            )
        snap = store.snapshot(examples=True)  # one consistent view, even while another thread enrols
        dists = []
        start = 0
        for n in snap.counts:
            ex = snap.examples[start : start + n].astype(np.float64)
            start += n
            if n < 2:
                continue
            if self.options.mode is Mode.KNN:
                d = self._pairwise(ex, ex)
                np.fill_diagonal(d, np.inf)
                k = min(self.options.knn_k, n - 1)
                dists.append(np.sort(d, axis=1)[:, :k].mean(axis=1))
            else:
                loo = (ex.sum(axis=0)[None] - ex) / (n - 1)
                dists.append(self._rowwise(ex, loo))
        if not dists:
            raise InputError(
                "calibrate_threshold() needs at least one class with 2 or more enrolled examples; enrol more"
            )
        value = float(np.percentile(np.concatenate(dists), percentile) * margin)
        if apply:
            self.threshold = value
        return value

    def _rowwise(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.session.metric is Metric.COSINE:
            den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            return 1.0 - (a * b).sum(axis=1) / np.maximum(den, 1e-12)
        return ((a - b) ** 2).sum(axis=1)

    def _pairwise(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.session.metric is Metric.COSINE:
            an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
            bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
            return 1.0 - an @ bn.T
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)

    def __repr__(self) -> str:
        return f"FewShotClassifier({self.session!r}, {len(self._store)} classes, mode={self.options.mode.value})"


# ---- folders ------------------------------------------------------------------------


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (their image files, sorted, not recursive) into image paths."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found and any(q.is_dir() for q in p.iterdir()):
                raise InputError(
                    f"{p} holds no image files, only subfolders (not searched); "
                    "pass the image files or the subfolders themselves"
                )
            out.extend(found)
        else:
            out.append(p)  # a missing file is reported by the decoder, with its name
    return out


def scan_class_folders(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """``folder/<label>/*.png`` -> {label: [paths]}, labels sorted; empty subfolders are an error."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"folder not found: {root}; pass a folder with one subfolder of images per class")
    classes = {d.name: list_images([d]) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not classes:
        raise InputError(f"{root} has no class subfolders; lay it out as {root}/<label>/<image files>")
    empty = [label for label, paths in classes.items() if not paths]
    if empty:
        raise InputError(f"class folder(s) without images in {root}: {', '.join(empty)}; add images or remove them")
    return classes
