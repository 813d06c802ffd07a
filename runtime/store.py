"""The prototype store: what a device has learned, as class label -> (sum, count).

A class's prototype is the mean of its enrolled embeddings, kept as a running sum
(float64) and a count, so enrolling more examples is incremental and never
re-embeds anything. With ``keep_embeddings=True`` the individual embeddings are kept
too, for k-NN classification, open-set calibration and re-computation.

The file format (safetensors, never pickle, with a checksummed JSON header) is
:mod:`edgemeta.runtime.store_format`'s; writes and locks are :mod:`edgemeta.runtime.files`'s
(atomic, serialized between processes, temp files of crashed writers cleaned).

Example:
    >>> store = PrototypeStore(embedding_dim=64, fingerprint="3fa2...")   # doctest: +SKIP
    >>> store.add("cat", cat_embeddings)                                 # doctest: +SKIP
    >>> store.save("device.store")                                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgemeta.runtime.errors import InputError, ModelMismatchError, StoreWriteError
from edgemeta.runtime.files import atomic_write, check_readable, locked, read_limited, resolve_target
from edgemeta.runtime.spec import Metric
from edgemeta.runtime.store_format import (
    CHECKSUM_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    StoreData,
    is_store,
    parse,
    read_metadata,
    serialize,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PrototypeStore", "StoreConflictWarning", "StoreSnapshot", "check_label"]


class StoreConflictWarning(UserWarning):
    """A save replaced a store file that another writer changed since this store read it."""


def check_label(label: object, *, new: bool = True) -> str:
    """Return ``label`` as a plain ``str`` if it is a non-empty string, else raise
    :class:`InputError`. A ``new`` label (one being enrolled or renamed to) must not hold
    control characters either: they would break every table and log it appears in; and it
    is returned in Unicode's composed form (NFC), so "café" typed on a keyboard and "café"
    from a folder name written decomposed (as macOS writes them) name one class. Labels
    already stored are read as they are."""
    if type(label) is not str:
        if not isinstance(label, str):
            raise InputError(f"label must be a string, got {type(label).__name__} {label!r}; pass e.g. str(label)")
        label = str(label)  # a str subclass (numpy's str_, an enum's value): stored and returned as a plain str
    if not label.strip():
        raise InputError(f"label must be a non-empty string, got {label!r}; name the class")
    if not new or (
        label.isprintable() and label.isascii()
    ):  # the common label, checked in C (enrolment's hot path runs this twice)
        return label
    if any(unicodedata.category(ch) == "Cc" for ch in label):
        raise InputError(
            f"label {label!r} contains control characters (newline, tab, escape, ...); name the class without them"
        )
    if not _utf8(label):
        raise InputError(
            f"label {label!r} cannot be written as UTF-8 (a lone surrogate: a file or "
            "folder name in another encoding?); rename the class (or its folder) in UTF-8"
        )
    return _composed(label)


def _composed(label: str) -> str:
    """``label`` in Unicode's composed form (NFC), as :func:`check_label` stores new labels."""
    return label if label.isascii() else unicodedata.normalize("NFC", label)


def _same_model(recorded: str, fingerprint: str, what: str) -> None:
    """Raise :class:`ModelMismatchError` if a store records a model other than ``fingerprint``
    (one that records none, made by hand, fits any)."""
    if recorded and recorded != fingerprint:
        raise ModelMismatchError(
            f"{what} was made with model {recorded}, this model is {fingerprint}; re-enrol or load the matching model"
        )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class StoreSnapshot:
    """An immutable view of a store, consistent at one instant (what a prediction uses).

    ``examples`` and ``owners`` (row -> class index) are set only when asked for and kept.
    """

    labels: tuple[str, ...]
    counts: tuple[int, ...]
    prototypes: np.ndarray
    examples: np.ndarray | None = None
    owners: np.ndarray | None = None


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class PrototypeStore:
    """Class label -> running sum (float64) and count; optionally every embedding.

    Thread-safe: every method takes the store's lock, and :meth:`snapshot` /
    :meth:`prototypes` return read-only arrays that later changes never touch.

    Args:
        embedding_dim: D, the width of the model's embeddings.
        metric: the model's metric (recorded; a store is refused by a model of another).
        fingerprint: the model's fingerprint (``ModelMetadata.fingerprint``).
        keep_embeddings: also keep each enrolled embedding (k-NN, calibration).
    """

    def __init__(
        self,
        embedding_dim: int,
        *,
        metric: Metric | str = Metric.SQEUCLIDEAN,
        fingerprint: str = "",
        keep_embeddings: bool = False,
    ) -> None:
        if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim < 1:
            raise InputError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        try:
            self.metric = Metric(metric)
        except ValueError:
            raise InputError(
                f"unknown metric {metric!r}; choose one of: {', '.join(m.value for m in Metric)}"
            ) from None
        self.embedding_dim = int(embedding_dim)
        self.fingerprint = str(fingerprint)
        self.keep_embeddings = bool(keep_embeddings)
        self._lock = threading.RLock()
        self._labels: list[str] = []
        self._index: dict[str, int] = {}
        self._sums = np.zeros((8, self.embedding_dim), np.float64)
        self._counts = np.zeros(8, np.int64)
        self._examples: dict[str, list[np.ndarray]] = {}
        self._cache: dict[str, object] = {}
        self._origins: dict[str, str] = {}  # file -> checksum of the version this store read or wrote

    # ---- reading -----------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        """Class labels in enrolment order (the row order of :meth:`prototypes`)."""
        with self._lock:
            return list(self._labels)

    @property
    def counts(self) -> dict[str, int]:
        """Label -> number of enrolled examples."""
        with self._lock:
            return {lab: int(self._counts[i]) for i, lab in enumerate(self._labels)}

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, label: object) -> bool:
        return label in self._index or (isinstance(label, str) and _composed(label) in self._index)

    def __repr__(self) -> str:
        return (
            f"PrototypeStore({len(self)} classes, dim={self.embedding_dim}, metric={self.metric.value}, "
            f"fingerprint={self.fingerprint!r}, keep_embeddings={self.keep_embeddings})"
        )

    def prototypes(self) -> np.ndarray:
        """Class means as one read-only float32 [C, D] matrix in label order (cached)."""
        with self._lock:
            protos = self._cache.get("prototypes")
            if protos is None:
                n = len(self._labels)
                protos = _readonly((self._sums[:n] / self._counts[:n, None]).astype(np.float32))
                self._cache["prototypes"] = protos
            return protos  # type: ignore[return-value]

    def examples(self, label: str | None = None) -> np.ndarray:
        """The kept embeddings of one class, or of all (grouped in label order); read-only float32."""
        with self._lock:
            self._need_examples("examples()")
            if label is not None:
                parts = self._examples[self._row_label(label)]
                return _readonly(np.concatenate(parts)) if parts else np.zeros((0, self.embedding_dim), np.float32)
            return self._examples_matrix()[0]

    def _examples_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        cached = self._cache.get("examples")
        if cached is None:
            parts = [p for lab in self._labels for p in self._examples[lab]]
            mat = np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)
            owners = np.repeat(np.arange(len(self._labels)), self._counts[: len(self._labels)])
            cached = (_readonly(mat), _readonly(owners))
            self._cache["examples"] = cached
        return cached  # type: ignore[return-value]

    def snapshot(self, *, examples: bool = False) -> StoreSnapshot:
        """A consistent, immutable view: labels, counts and prototypes (and examples if asked)."""
        with self._lock:
            key = "snapshot+examples" if examples else "snapshot"
            snap = self._cache.get(key)
            if snap is None:  # cached: a prediction costs O(1) here, not O(classes)
                n = len(self._labels)
                ex = owners = None
                if examples:
                    self._need_examples("k-NN")
                    ex, owners = self._examples_matrix()
                counts = tuple(self._counts[:n].tolist())
                snap = StoreSnapshot(tuple(self._labels), counts, self.prototypes(), ex, owners)
                self._cache[key] = snap
            return snap  # type: ignore[return-value]

    def sums(self) -> np.ndarray:
        """Per-class float64 sums [C, D] (a copy)."""
        with self._lock:
            return self._sums[: len(self._labels)].copy()

    def _need_examples(self, what: str) -> None:
        if not self.keep_embeddings:
            raise InputError(
                f"{what} needs the individual embeddings; create the store with keep_embeddings=True and re-enrol"
            )

    def _row_label(self, label: object) -> str:
        label = check_label(label, new=False)  # an existing label, as it was stored
        if (
            label not in self._index and _composed(label) in self._index
        ):  # as enrolled: in composed form (see check_label)
            label = _composed(label)
        if label not in self._index:
            shown = ", ".join(repr(x if len(x) <= 40 else x[:37] + "...") for x in self._labels[:10]) + (
                ", ..." if len(self._labels) > 10 else ""
            )
            raise InputError(f"unknown label {label!r}; enrolled labels: {shown or 'none'}")
        return label  # type: ignore[return-value]

    # ---- changing ------------------------------------------------------------------

    def _changed(self) -> None:
        self._cache = {}

    def _check_embeddings(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings [n, D], their float64 sum over n)``, or :class:`InputError`."""
        e = np.asarray(embeddings)
        if e.ndim == 1:
            e = e[None]
        if e.ndim != 2 or e.shape[1] != self.embedding_dim:
            raise InputError(
                f"embeddings of shape {e.shape} do not fit [n, {self.embedding_dim}]; use this model's embeddings"
            )
        if e.shape[0] == 0:
            raise InputError("no embeddings given; enrol at least one example")
        if e.dtype.kind not in "fiu":
            raise InputError("embeddings must be finite numbers; check the model's output")
        if (
            e.dtype != np.float32
        ):  # as a model gives them: float64 values beyond float32's range become inf, refused below
            with np.errstate(over="ignore", invalid="ignore"):
                e = e.astype(np.float32)
        # the sums are what the store keeps, so the reduction that makes them is also the check:
        # a float32 batch's float64 sum (and the sum of that) is finite exactly when every value
        # is (other types were made float32 above, so no sum can overflow). As few numpy calls as
        # possible: right after the embedding run each one starts cache-cold
        total = e.sum(axis=0, dtype=np.float64)
        if not math.isfinite(total.sum()):
            raise InputError("embeddings must be finite numbers; check the model's output")
        return e, total

    def add(self, label: str, embeddings: np.ndarray) -> int:
        """Add embeddings [n, D] (or one [D]) to ``label``, creating it if new; returns its count."""
        label = check_label(label)
        e, total = self._check_embeddings(embeddings)  # outside the lock: predictions wait less
        with self._lock:
            row = self._index.get(label)
            if row is None:
                row = self._append_row(label)
            self._sums[row] += total
            self._counts[row] += e.shape[0]
            if self.keep_embeddings:
                self._examples[label].append(_readonly(np.array(e, dtype=np.float32)))
            self._changed()
            return int(self._counts[row])

    def _append_row(self, label: str) -> int:
        n = len(self._labels)
        if n == len(self._counts):  # grow by doubling: amortized O(D) per new class
            self._sums = np.concatenate([self._sums, np.zeros_like(self._sums)])
            self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
        self._labels.append(label)
        self._index[label] = n
        self._examples[label] = []
        return n

    def forget(self, label: str) -> None:
        """Remove a class and everything enrolled for it."""
        with self._lock:
            label = self._row_label(label)
            row = self._index[label]
            n = len(self._labels)
            self._sums[row : n - 1] = self._sums[row + 1 : n]
            self._counts[row : n - 1] = self._counts[row + 1 : n]
            self._sums[n - 1] = 0.0
            self._counts[n - 1] = 0
            del self._labels[row]
            del self._examples[label]
            self._index = {lab: i for i, lab in enumerate(self._labels)}
            self._changed()

    def rename(self, old: str, new: str, *, merge: bool = False) -> None:
        """Rename a class; with ``merge=True`` an existing ``new`` absorbs ``old``'s examples."""
        new = check_label(new)
        with self._lock:
            old = self._row_label(old)
            if old == new:
                return
            if new in self._index:
                if not merge:
                    raise InputError(
                        f"label {new!r} already exists; pass merge=True (`edgemeta "
                        f"store rename --merge`) to combine {old!r} into it"
                    )
                self._absorb(
                    new, self._sums[self._index[old]].copy(), int(self._counts[self._index[old]]), self._examples[old]
                )
                self.forget(old)
                return
            row = self._index.pop(old)
            self._labels[row] = new
            self._index[new] = row
            self._examples[new] = self._examples.pop(old)
            self._changed()

    def _absorb(self, label: str, total: np.ndarray, count: int, parts: list[np.ndarray]) -> None:
        row = self._index.get(label)
        if row is None:
            row = self._append_row(label)
        self._sums[row] += total
        self._counts[row] += count
        if self.keep_embeddings:
            self._examples[label].extend(parts)
        self._changed()

    def claim(self, fingerprint: str, embedding_dim: int, metric: Metric) -> None:
        """Check that the store comes from the model with this fingerprint, embedding width and
        metric, else raise :class:`ModelMismatchError`. A store that records no model (made by
        hand) is taken as this one's and records its fingerprint from then on, so that it saves
        and loads again like any other; checked and recorded at once, under the store's lock."""
        with self._lock:
            _same_model(self.fingerprint, fingerprint, "store")
            if self.embedding_dim != embedding_dim or self.metric is not metric:
                raise ModelMismatchError(
                    f"store holds {self.embedding_dim}-D {self.metric.value} prototypes, this model gives "
                    f"{embedding_dim}-D {metric.value}; re-enrol or load the matching model"
                )
            self.fingerprint = self.fingerprint or fingerprint

    def merge(self, other: PrototypeStore) -> None:
        """Add every class of ``other`` (same model) into this store; shared labels are combined."""
        if other.embedding_dim != self.embedding_dim or other.metric is not self.metric:
            raise ModelMismatchError(
                f"cannot merge a store of dim {other.embedding_dim} / {other.metric.value} into one of dim "
                f"{self.embedding_dim} / {self.metric.value}; both must come from the same model"
            )
        if self.fingerprint and other.fingerprint and other.fingerprint != self.fingerprint:
            raise ModelMismatchError(
                f"cannot merge a store made with model {other.fingerprint} into one made with model "
                f"{self.fingerprint}; re-enrol with one model"
            )
        if self.keep_embeddings and not other.keep_embeddings:
            raise InputError(
                "this store keeps individual embeddings and the other "
                "does not; re-enrol the other with keep_embeddings=True"
            )
        if other is self:
            raise InputError("cannot merge a store into itself")
        with other._lock:
            items = [
                (lab, other._sums[i].copy(), int(other._counts[i]), list(other._examples[lab]))
                for i, lab in enumerate(other._labels)
            ]
        with self._lock:
            for lab, total, count, parts in items:
                self._absorb(lab, total, count, parts)

    def recompute(self) -> None:
        """Rebuild the sums from the kept embeddings (drops accumulated rounding)."""
        with self._lock:
            self._need_examples("recompute()")
            for lab, i in self._index.items():
                self._sums[i] = np.concatenate(self._examples[lab]).sum(axis=0, dtype=np.float64)
            self._changed()

    def copy(self) -> PrototypeStore:
        """An independent copy (the arrays of kept embeddings are shared: they are read-only)."""
        with self._lock:
            new = PrototypeStore(
                self.embedding_dim,
                metric=self.metric,
                fingerprint=self.fingerprint,
                keep_embeddings=self.keep_embeddings,
            )
            new._labels = list(self._labels)
            new._index = dict(self._index)
            new._sums = self._sums.copy()
            new._counts = self._counts.copy()
            new._examples = {k: list(v) for k, v in self._examples.items()}
            return new

    # ---- files ---------------------------------------------------------------------

    def data(self) -> StoreData:
        """A consistent copy of the store as its file holds it, taken under the lock (a save
        serializes this copy, so another thread's enrolment cannot change it halfway)."""
        with self._lock:
            n = len(self._labels)
            return StoreData(
                fingerprint=self.fingerprint,
                embedding_dim=self.embedding_dim,
                metric=self.metric,
                labels=tuple(self._labels),
                counts=tuple(int(c) for c in self._counts[:n]),
                keep_embeddings=self.keep_embeddings,
                sums=_readonly(self._sums[:n].copy()),
                embeddings=self._examples_matrix()[0] if self.keep_embeddings else None,  # read-only, rebuilt on change
            )

    def to_bytes(self) -> bytes:
        """The store as safetensors bytes (see :mod:`edgemeta.runtime.store_format`)."""
        return serialize(self.data())

    def save(
        self, path: str | os.PathLike, *, timeout: float | None = None, on_wait: Callable[[str], None] | None = None
    ) -> Path:
        """Write the store atomically; concurrent savers of the same path take turns.

        The store is copied under the file's lock, so files are written in the order their
        contents were taken. Saving over a file that another process changed since this
        store loaded (or last saved) it warns with :class:`StoreConflictWarning`: that
        process's changes are replaced; :meth:`edit` (or ``FewShotClassifier.editing``)
        is the route that merges.

        Args:
            timeout: seconds to wait for another writer's lock (None: for ever).
            on_wait: called with a "waiting for the lock ..." line when the lock is taken.

        Returns the path written: a symlink's target when ``path`` is a link.

        Raises:
            InputError: ``path`` is a file other than a store (a model, an image, a FIFO): it is left alone.
            StoreWriteError: the file could not be written; the previous one is intact.
        """
        path = _store_path(path)
        with locked(path, timeout=timeout, on_wait=on_wait):
            on_disk = _existing_store(path)
            key = os.path.normcase(str(path))
            with self._lock:
                seen = self._origins.get(key)
                data = self.to_bytes()
            if seen is not None and on_disk is not None and on_disk != seen:
                warnings.warn(
                    f"{path} was changed by another writer since this store read it; this save replaces those changes. "
                    "Enrol from several processes with PrototypeStore.edit() or FewShotClassifier.editing()",
                    StoreConflictWarning,
                    stacklevel=2,
                )
            atomic_write(path, data, lock=False, error=StoreWriteError)
            self._origins[key] = _checksum_of(data)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "store", fingerprint: str | None = None) -> PrototypeStore:
        """Parse and verify store bytes; ``fingerprint`` (if given) must match the store's model
        when the store records one (a store made by hand may not: it is accepted)."""
        store = cls._from_data(parse(data, source))
        if fingerprint is not None:
            _same_model(store.fingerprint, fingerprint, f"store {source}")
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, *, fingerprint: str | None = None) -> PrototypeStore:
        """Read a store file, verifying format, schema, checksum and (if given) the model fingerprint.

        Raises:
            InputError: the file does not exist, or is a folder, a FIFO, a device or a symlink loop.
            StoreCorruptError: damaged, edited, not a store, or a newer format.
            ModelMismatchError: the store was made with another model.
        """
        path = Path(path)
        if check_readable(path, "store file") is None:
            raise InputError(f"store file not found: {path}; enrol classes first to create it")
        data = read_limited(path, MAX_STORE_BYTES, "store file")
        store = cls.from_bytes(data, source=str(path), fingerprint=fingerprint)
        with contextlib.suppress(InputError):
            store._origins[os.path.normcase(str(resolve_target(path)))] = _checksum_of(data)
        return store

    @classmethod
    @contextlib.contextmanager
    def edit(
        cls,
        path: str | os.PathLike,
        *,
        default: PrototypeStore | None = None,
        fingerprint: str | None = None,
        timeout: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> Iterator[PrototypeStore]:
        """Lock ``path``, load it (or start from ``default`` if it does not exist), yield, then save.

        Holding the lock from load to save means two processes enrolling into the same
        file never lose each other's classes. Nothing is saved if the block raises.
        ``timeout`` and ``on_wait``: as for :meth:`save`.
        """
        path = _store_path(path)  # before the lock: a bad path leaves no lock file behind
        if default is None and not path.exists():
            cls.load(path)  # says the store is missing
        with locked(path, timeout=timeout, on_wait=on_wait):
            if path.exists() or default is None:
                store = cls.load(path, fingerprint=fingerprint)
            else:
                store = default
            yield store
            store.save(path)

    @classmethod
    def _from_data(cls, data: StoreData) -> PrototypeStore:
        store = cls(
            data.embedding_dim, metric=data.metric, fingerprint=data.fingerprint, keep_embeddings=data.keep_embeddings
        )
        n = len(data.labels)
        if n:
            store._sums = np.array(data.sums, dtype=np.float64)
            store._counts = np.array(data.counts, dtype=np.int64)
        store._labels = list(data.labels)
        store._index = {lab: i for i, lab in enumerate(data.labels)}
        offsets = np.cumsum([0, *data.counts])
        emb = data.embeddings
        store._examples = {
            lab: ([_readonly(np.array(emb[offsets[i] : offsets[i + 1]], np.float32))] if emb is not None else [])
            for i, lab in enumerate(data.labels)
        }
        return store


MAX_STORE_BYTES = 1 << 36  # 64 GiB: far above any store, far below what a device file would stream


def _checksum_of(data: bytes) -> str:
    return read_metadata(data, "store")[1].get(CHECKSUM_KEY, "")


def _store_path(path: str | os.PathLike) -> Path:
    """``path`` once a store file can be written there: not a folder, in a folder that exists.
    A symlink is written through (its target is the store, and its lock is beside it)."""
    path = Path(path)
    try:
        target = resolve_target(path)
    except InputError as e:
        if path.is_dir() or (path.is_symlink() and Path(os.path.realpath(path)).is_dir()):
            example = path / "store.safetensors"
            raise InputError(f"{path} is a folder; give a store file path such as {example}") from None
        raise InputError(f"{e}") from None
    if not target.parent.is_dir():
        raise InputError(f"folder {target.parent} does not exist; create it first")
    return target


def _existing_store(path: Path) -> str | None:
    """The checksum recorded in the store at ``path`` ("" for a damaged one), None when there
    is no file or an empty one. Anything that is not a store is refused, judged by parsing
    its safetensors header: saving over the session's own model is an easy slip."""
    st = check_readable(path, "store file")
    if st is None or st.st_size == 0:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            head += f.read(n) if n <= MAX_HEADER_BYTES else b""
    except OSError as e:
        why = e.strerror or e
        raise StoreWriteError(f"cannot check {path} before replacing it ({why}); choose another path") from None
    if not is_store(head):
        raise InputError(
            f"{path} exists and is not an edgemeta store (a model, an image, ...); save the store to another path, "
            "or remove that file first"
        )
    return read_metadata(head, str(path))[1].get(CHECKSUM_KEY, "")


MAX_HEADER_BYTES = 1 << 28
