"""The prototype store: what a device has learned, as class label -> (sum, count).

A class's prototype is the mean of its enrolled embeddings, kept as a running sum
(float64) and a count, so enrolling more examples is incremental and never
re-embeds anything. With ``keep_embeddings=True`` the individual embeddings are kept
too, for k-NN classification, open-set calibration and re-computation.

File format (``.safetensors``, never pickle): tensors ``sums`` float64 [C, D],
``counts`` int64 [C] and, when kept, ``embeddings`` float32 [N, D] (grouped by class,
in label order). The safetensors metadata holds a JSON header (``edgemeta.store``:
format name and version, model fingerprint, embedding dim, metric, labels, counts)
and ``sha256``, a checksum over the header and every tensor's bytes, so a damaged or
edited file is refused with :class:`StoreCorruptError`.

Writes are atomic (temp file in the same folder, fsync, ``os.replace``, fsync of the
folder) and serialized between processes by an advisory lock on ``<store>.lock``.

Example:
    >>> store = PrototypeStore(embedding_dim=64, fingerprint="3fa2...")   # doctest: +SKIP
    >>> store.add("cat", cat_embeddings)                                 # doctest: +SKIP
    >>> store.save("device.store")                                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgemeta.runtime.errors import InputError, ModelMismatchError, StoreCorruptError, StoreWriteError
from edgemeta.runtime.spec import Metric

try:  # POSIX advisory locks; elsewhere saves are atomic but not serialized
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PrototypeStore", "StoreSnapshot", "check_label"]

FORMAT_NAME = "edgemeta.prototype_store"
FORMAT_VERSION = 1
_HEADER_KEY = "edgemeta.store"
_CHECKSUM_KEY = "sha256"


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
    if not new or (label.isprintable() and label.isascii()):  # the common label, checked in C (enrolment's hot path runs this twice)
        return label
    if any(unicodedata.category(ch) == "Cc" for ch in label):
        raise InputError(f"label {label!r} contains control characters (newline, tab, escape, ...); name the class without them")
    if not _utf8(label):
        raise InputError(
            f"label {label!r} cannot be written as UTF-8 (a lone surrogate: a file or folder name in another encoding?); "
            "rename the class (or its folder) in UTF-8"
        )
    return _composed(label)


def _composed(label: str) -> str:
    """``label`` in Unicode's composed form (NFC), as :func:`check_label` stores new labels."""
    return label if label.isascii() else unicodedata.normalize("NFC", label)


def _same_model(recorded: str, fingerprint: str, what: str) -> None:
    """Raise :class:`ModelMismatchError` if a store records a model other than ``fingerprint``
    (one that records none, made by hand, fits any)."""
    if recorded and recorded != fingerprint:
        raise ModelMismatchError(f"{what} was made with model {recorded}, this model is {fingerprint}; re-enrol or load the matching model")


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


# ---- inter-process lock ---------------------------------------------------------

_registry_lock = threading.Lock()
_thread_locks: dict[str, threading.RLock] = {}
_held: dict[str, list] = {}  # lock path -> [fd, depth]; touched only by the thread holding the RLock


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` exclusively: re-entrant within a thread, exclusive across threads and processes."""
    key = os.path.abspath(str(path) + ".lock")
    with _registry_lock:
        rlock = _thread_locks.setdefault(key, threading.RLock())
    with rlock:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
            try:
                yield
            finally:
                entry[1] -= 1
            return
        fd = -1
        if fcntl is not None:
            try:
                fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StoreWriteError(f"cannot create the lock file {key} ({e}); check the folder's permissions") from e
            fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            del _held[key]
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; folders cannot be opened or fsynced on some platforms."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _store_path(path: str | os.PathLike) -> Path:
    """``path`` once a store file can be written there: not a folder, in a folder that exists.
    A symlink is written through (its target is the store, and its lock is beside it)."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a store file path such as {path / 'store.safetensors'}")
    if not path.parent.is_dir():
        raise InputError(f"folder {path.parent} does not exist; create it first")
    return path


def _refuse_other_file(path: Path) -> None:
    """A store may replace an earlier store (also one with damaged tensors or checksum) or an
    empty file, never another kind of file: saving over the session's own model is an easy
    slip. A store's safetensors header opens with its metadata, whose keys (the store header
    and the checksum) come first, so the first 64 KiB of it tell."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read below; a device is no store
        raise InputError(f"{path} exists and is not a regular file; save the store to another path")
    if st.st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            text = f.read(min(n, 1 << 16)).decode("utf-8", "replace")
    except OSError as e:
        raise StoreWriteError(f"cannot check {path} before replacing it ({e.strerror or e}); choose another path") from None
    if f'"{_HEADER_KEY}"' not in text:
        raise InputError(f"{path} exists and is not an edgemeta store (a model, an image, ...); save the store to another path, or remove that file first")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, (path.stat().st_mode & 0o777) if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise StoreWriteError(
                f"could not save the store to {path} ({e}); the previous file is unchanged - free space or fix permissions and retry"
            ) from e
        raise
    _fsync_dir(path.parent)


def _checksum(header: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(header.encode("utf-8"))
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{t.dtype.str}\0{list(t.shape)}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()


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
            raise InputError(f"unknown metric {metric!r}; choose one of: {', '.join(m.value for m in Metric)}") from None
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
            raise InputError(f"{what} needs the individual embeddings; create the store with keep_embeddings=True and re-enrol")

    def _row_label(self, label: object) -> str:
        label = check_label(label, new=False)  # an existing label, as it was stored
        if label not in self._index and _composed(label) in self._index:  # as enrolled: in composed form (see check_label)
            label = _composed(label)
        if label not in self._index:
            shown = ", ".join(repr(x if len(x) <= 40 else x[:37] + "...") for x in self._labels[:10]) + (", ..." if len(self._labels) > 10 else "")
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
            raise InputError(f"embeddings of shape {e.shape} do not fit [n, {self.embedding_dim}]; use this model's embeddings")
        if e.shape[0] == 0:
            raise InputError("no embeddings given; enrol at least one example")
        if e.dtype.kind not in "fiu":
            raise InputError("embeddings must be finite numbers; check the model's output")
        if e.dtype != np.float32:  # as a model gives them: float64 values beyond float32's range become inf, refused below
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
                    raise InputError(f"label {new!r} already exists; pass merge=True (`edgemeta store rename --merge`) to combine {old!r} into it")
                self._absorb(new, self._sums[self._index[old]].copy(), int(self._counts[self._index[old]]), self._examples[old])
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
            raise InputError("this store keeps individual embeddings and the other does not; re-enrol the other with keep_embeddings=True")
        if other is self:
            raise InputError("cannot merge a store into itself")
        with other._lock:
            items = [(lab, other._sums[i].copy(), int(other._counts[i]), list(other._examples[lab])) for i, lab in enumerate(other._labels)]
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
            new = PrototypeStore(self.embedding_dim, metric=self.metric, fingerprint=self.fingerprint, keep_embeddings=self.keep_embeddings)
            new._labels = list(self._labels)
            new._index = dict(self._index)
            new._sums = self._sums.copy()
            new._counts = self._counts.copy()
            new._examples = {k: list(v) for k, v in self._examples.items()}
            return new

    # ---- files ---------------------------------------------------------------------

    def _header(self) -> dict:
        n = len(self._labels)
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "embedding_dim": self.embedding_dim,
            "metric": self.metric.value,
            "labels": list(self._labels),
            "counts": [int(c) for c in self._counts[:n]],
            "keep_embeddings": self.keep_embeddings,
        }

    def to_bytes(self) -> bytes:
        """The store as safetensors bytes (header and checksum in the metadata)."""
        from safetensors.numpy import save

        with self._lock:
            n = len(self._labels)
            tensors = {"sums": np.ascontiguousarray(self._sums[:n]), "counts": np.ascontiguousarray(self._counts[:n])}
            if self.keep_embeddings:
                tensors["embeddings"] = np.ascontiguousarray(self._examples_matrix()[0])
            header = json.dumps(self._header(), sort_keys=True, ensure_ascii=False)
        return save(tensors, metadata={_HEADER_KEY: header, _CHECKSUM_KEY: _checksum(header, tensors)})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the store atomically; concurrent savers of the same path take turns.

        Returns the path written: a symlink's target when ``path`` is a link.

        Raises:
            InputError: ``path`` is a file other than a store (a model, an image): it is left alone.
            StoreWriteError: the file could not be written; the previous one is intact.
        """
        path = _store_path(path)
        data = self.to_bytes()
        with _locked(path):
            _refuse_other_file(path)
            _atomic_write(path, data)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "store", fingerprint: str | None = None) -> PrototypeStore:
        """Parse and verify store bytes; ``fingerprint`` (if given) must match the store's model
        when the store records one (a store made by hand may not: it is accepted)."""
        header_text, tensors = _read_safetensors(data, source)
        header = _parse_header(header_text, source)
        store = cls._from_parts(header, tensors, source)
        if fingerprint is not None:
            _same_model(store.fingerprint, fingerprint, f"store {source}")
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, *, fingerprint: str | None = None) -> PrototypeStore:
        """Read a store file, verifying format, checksum and (if given) the model fingerprint.

        Raises:
            InputError: the file does not exist.
            StoreCorruptError: damaged, edited, not a store, or a newer format.
            ModelMismatchError: the store was made with another model.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"store file not found: {path}; enrol classes first to create it") from None
        except IsADirectoryError:
            raise InputError(f"{path} is a folder, not a store file") from None
        except OSError as e:
            raise InputError(f"cannot read store {path} ({e})") from None
        return cls.from_bytes(data, source=str(path), fingerprint=fingerprint)

    @classmethod
    @contextlib.contextmanager
    def edit(
        cls, path: str | os.PathLike, *, default: PrototypeStore | None = None, fingerprint: str | None = None
    ) -> Iterator[PrototypeStore]:
        """Lock ``path``, load it (or start from ``default`` if it does not exist), yield, then save.

        Holding the lock from load to save means two processes enrolling into the same
        file never lose each other's classes. Nothing is saved if the block raises.
        """
        path = _store_path(path)  # before the lock: a bad path leaves no lock file behind
        if default is None and not path.exists():
            cls.load(path)  # says the store is missing
        with _locked(path):
            if path.exists() or default is None:
                store = cls.load(path, fingerprint=fingerprint)
            else:
                store = default
            yield store
            store.save(path)

    @classmethod
    def _from_parts(cls, header: dict, tensors: dict[str, np.ndarray], source: str) -> PrototypeStore:
        try:
            labels = [check_label(x, new=False) for x in header["labels"]]
            composed = [_composed(x) for x in labels]
            if len(set(composed)) == len(composed):  # a store written before labels were composed: as they are now
                labels = composed
            counts = [int(c) for c in header["counts"]]
            store = cls(
                int(header["embedding_dim"]),
                metric=Metric(header["metric"]),
                fingerprint=str(header["fingerprint"]),
                keep_embeddings=bool(header.get("keep_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorruptError(f"store {source} has a bad header ({e}); restore it from a backup or re-enrol") from None
        n, d = len(labels), store.embedding_dim
        sums, cnt = tensors.get("sums"), tensors.get("counts")
        problems = []
        if len(set(labels)) != n or len(counts) != n:
            problems.append("labels/counts disagree")
        if sums is None or sums.shape != (n, d) or sums.dtype != np.float64:
            problems.append(f"sums tensor is not float64 [{n}, {d}]")
        elif not np.isfinite(sums).all():
            problems.append("sums tensor holds values that are not finite")
        if cnt is None or cnt.shape != (n,) or cnt.tolist() != counts or (n and cnt.min() < 1):
            problems.append("counts tensor does not match the header")
        emb = tensors.get("embeddings")
        if store.keep_embeddings and (emb is None or emb.shape != (sum(counts), d)):
            problems.append(f"embeddings tensor is not [{sum(counts)}, {d}]")
        if problems:
            raise StoreCorruptError(f"store {source} is inconsistent: {'; '.join(problems)}; restore it from a backup or re-enrol")
        store._sums = np.array(sums, dtype=np.float64) if n else store._sums
        store._counts = np.array(cnt, dtype=np.int64) if n else store._counts
        store._labels = labels
        store._index = {lab: i for i, lab in enumerate(labels)}
        offsets = np.cumsum([0, *counts])
        store._examples = {
            lab: ([_readonly(np.array(emb[offsets[i] : offsets[i + 1]], np.float32))] if store.keep_embeddings else [])
            for i, lab in enumerate(labels)
        }
        return store


def _read_safetensors(data: bytes, source: str) -> tuple[str, dict[str, np.ndarray]]:
    """Split safetensors bytes into our header text and the tensors, verifying the checksum."""
    from safetensors.numpy import load

    bad = f"store {source} is not a readable edgemeta store"
    if len(data) < 8:
        raise StoreCorruptError(f"{bad} (only {len(data)} bytes); restore it from a backup or re-enrol")
    n = int.from_bytes(data[:8], "little")
    try:
        if n > len(data) - 8:
            raise ValueError("header runs past the end of the file (truncated)")
        meta = json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise StoreCorruptError(f"{bad} ({e}); restore it from a backup or re-enrol") from None
    if _HEADER_KEY not in meta:
        raise StoreCorruptError(f"{bad}: a safetensors file without an edgemeta store header; pass a store file")
    header_text = str(meta[_HEADER_KEY])
    _parse_header(header_text, source)  # format and version first: a newer file may checksum differently
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise StoreCorruptError(f"{bad} (damaged tensors: {e}); restore it from a backup or re-enrol") from None
    if meta.get(_CHECKSUM_KEY) != _checksum(header_text, tensors):
        raise StoreCorruptError(
            f"store {source} failed its checksum: the file was damaged or edited; restore it from a backup or re-enrol"
        )
    return header_text, tensors


def _parse_header(text: str, source: str) -> dict:
    try:
        header = json.loads(text)
    except ValueError as e:
        raise StoreCorruptError(f"store {source} has an unreadable header ({e}); restore it from a backup or re-enrol") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise StoreCorruptError(f"{source} is not an edgemeta prototype store (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise StoreCorruptError(f"store {source} has an invalid format version {version!r}; restore it from a backup or re-enrol")
    if version > FORMAT_VERSION:
        raise StoreCorruptError(
            f"store {source} has format version {version}, newer than this edgemeta reads ({FORMAT_VERSION}); upgrade edgemeta"
        )
    return header

