"""The prototype store's file format: serialize and parse, with a strict schema.

A store file is a safetensors file (no pickle, ever); ``docs/store-format.md`` gives the
byte layout for readers in other languages. Tensors: ``sums`` float64 [C, D], ``counts``
int64 [C] and, when kept, ``embeddings`` float32 [N, D] (grouped by class, in label order).
The safetensors ``__metadata__`` holds two strings: ``edgemeta.store``, a JSON header
(format name and version, model fingerprint, embedding dim, metric, labels, counts,
keep_embeddings), and ``sha256``, a checksum over the header text and every tensor's bytes.

A file may come from anyone (and the checksum is public), so :func:`parse` checks, before
it allocates anything: the file's size against what the header declares, every header
field's type (``true`` is not a count, ``64.9`` is not a dim) and range, the labels'
text (Unicode's composed form, no control characters, no lone surrogates, no two
spellings of one label), and the JSON's nesting depth. Every failure is one
:class:`StoreCorruptError` line.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass

import numpy as np

from edgemeta.runtime.errors import StoreCorruptError
from edgemeta.runtime.schema import SchemaError, as_int, check_text, loads, need_bool, need_int, need_list, need_str
from edgemeta.runtime.spec import Metric

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEADER_KEY",
    "CHECKSUM_KEY",
    "MAX_EMBEDDING_DIM",
    "MAX_LABEL_LENGTH",
    "StoreData",
    "checksum",
    "serialize",
    "parse",
    "is_store",
    "read_metadata",
]

FORMAT_NAME = "edgemeta.prototype_store"
FORMAT_VERSION = 1
HEADER_KEY = "edgemeta.store"
CHECKSUM_KEY = "sha256"
MAX_EMBEDDING_DIM = 1 << 16  # the widest embedding of any backbone is a few thousand
MAX_LABEL_LENGTH = 1024
MAX_COUNT = 1 << 40
_MAX_OUTER_HEADER = 1 << 28  # safetensors' own limit is 100 MB; labels of a million classes fit
_DTYPES = {"F64": np.float64, "I64": np.int64, "F32": np.float32}


@dataclass(frozen=True)
class StoreData:
    """One store, as a file holds it: the header fields and the tensors (read-only)."""

    fingerprint: str
    embedding_dim: int
    metric: Metric
    labels: tuple[str, ...]
    counts: tuple[int, ...]
    keep_embeddings: bool
    sums: np.ndarray
    embeddings: np.ndarray | None = None

    def header(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "embedding_dim": self.embedding_dim,
            "metric": self.metric.value,
            "labels": list(self.labels),
            "counts": list(self.counts),
            "keep_embeddings": self.keep_embeddings,
        }


def checksum(header: str, tensors: dict[str, np.ndarray]) -> str:
    """sha256 over the header text, then each tensor (sorted by name): name, dtype, shape, bytes."""
    h = hashlib.sha256(header.encode("utf-8"))
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{t.dtype.str}\0{list(t.shape)}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def serialize(data: StoreData) -> bytes:
    """The store as safetensors bytes (header and checksum in the metadata)."""
    from safetensors.numpy import save

    tensors = {
        "sums": np.ascontiguousarray(data.sums, dtype=np.float64),
        "counts": np.asarray(data.counts, dtype=np.int64).reshape(len(data.counts)),
    }
    if data.keep_embeddings:
        emb = data.embeddings if data.embeddings is not None else np.zeros((0, data.embedding_dim), np.float32)
        tensors["embeddings"] = np.ascontiguousarray(emb, dtype=np.float32)
    header = json.dumps(data.header(), sort_keys=True, ensure_ascii=False)
    return save(tensors, metadata={HEADER_KEY: header, CHECKSUM_KEY: checksum(header, tensors)})


# ---- parsing ------------------------------------------------------------------------------


def _bad(source: str, why: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"store {source} is not a readable edgemeta store ({why}); restore it from a backup or re-enrol"
    )


def read_metadata(data: bytes, source: str, *, what: str = "safetensors file") -> tuple[dict, dict[str, str], int]:
    """The tensor table, the ``__metadata__`` strings and the header length of safetensors ``data``,
    read with the strict JSON rules (the table is at most 3 levels deep)."""
    if len(data) < 8:
        raise _bad(source, f"only {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise _bad(source, "header runs past the end of the file (truncated)")
    if n > _MAX_OUTER_HEADER:
        raise _bad(source, f"a {n:,}-byte header, over the limit of {_MAX_OUTER_HEADER:,}")
    try:
        outer = loads(bytes(data[8 : 8 + n]), limit=_MAX_OUTER_HEADER, max_depth=3, max_string=_MAX_OUTER_HEADER)
    except SchemaError as e:
        raise _bad(source, f"header: {e}") from None
    if type(outer) is not dict:
        raise _bad(source, "the header is not a JSON object")
    meta = outer.pop("__metadata__", {})
    if type(meta) is not dict or not all(type(v) is str for v in meta.values()):
        raise _bad(source, f"the {what}'s __metadata__ must map names to strings")
    return outer, meta, n


def _header(text: str, source: str) -> dict:
    """Our header, as far as the format and version: what decides how the rest is read."""
    try:
        header = loads(text, max_depth=2, max_string=MAX_LABEL_LENGTH * 4)
    except SchemaError as e:
        raise StoreCorruptError(
            f"store {source} has an unreadable header ({e}); restore it from a backup or re-enrol"
        ) from None
    if type(header) is not dict or header.get("format") != FORMAT_NAME:
        fmt = header.get("format") if type(header) is dict else None
        raise StoreCorruptError(f"{source} is not an edgemeta prototype store (format {str(fmt)[:60]!r})")
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise StoreCorruptError(
            f"store {source} has an invalid format version {str(version)[:20]}; restore it from a backup or re-enrol"
        )
    if version > FORMAT_VERSION:
        raise StoreCorruptError(
            f"store {source} has format version {version}, newer than this edgemeta reads ({FORMAT_VERSION}); "
            "upgrade edgemeta"
        )
    return header


def _labels(raw: list, source: str) -> tuple[str, ...]:
    """Labels as stored: text with no control characters; written before labels were
    composed (NFC), a label is read composed, and two spellings of one label are refused."""
    labels = []
    for i, x in enumerate(raw):
        if type(x) is not str:
            raise SchemaError(f"labels[{i}] must be a string")
        check_text(x, f"labels[{i}]", max_len=MAX_LABEL_LENGTH)
        if not x.strip():
            raise SchemaError(f"labels[{i}] is empty")
        labels.append(x if x.isascii() else unicodedata.normalize("NFC", x))
    if len(set(labels)) != len(labels):
        seen: set[str] = set()
        dup = next(x for x in labels if x in seen or seen.add(x))  # type: ignore[func-returns-value]
        raise SchemaError(f"label {dup!r} appears twice (perhaps in two Unicode spellings)")
    return tuple(labels)


def _fields(header: dict, source: str) -> tuple:
    try:
        dim = need_int(header, "embedding_dim", lo=1, hi=MAX_EMBEDDING_DIM)
        metric = Metric(need_str(header, "metric", choices=tuple(m.value for m in Metric)))
        fingerprint = need_str(header, "fingerprint", max_len=256)
        raw_labels = need_list(header, "labels", max_len=1 << 24)
        raw_counts = need_list(header, "counts", max_len=1 << 24)
        counts = tuple(as_int(c, f"counts[{i}]", lo=1, hi=MAX_COUNT) for i, c in enumerate(raw_counts))
        keep = need_bool(header, "keep_embeddings", default=False)
        labels = _labels(raw_labels, source)
        extra = set(header) - {
            "format",
            "version",
            "fingerprint",
            "embedding_dim",
            "metric",
            "labels",
            "counts",
            "keep_embeddings",
        }
        if extra:
            raise SchemaError(f"unknown field(s) {', '.join(sorted(extra))[:80]}")
        if len(labels) != len(counts):
            raise SchemaError(f"{len(labels)} labels but {len(counts)} counts")
    except SchemaError as e:
        raise StoreCorruptError(
            f"store {source} has a bad header ({e}); restore it from a backup or re-enrol"
        ) from None
    return fingerprint, dim, metric, labels, counts, keep


def _check_table(table: dict, expected: dict[str, tuple[str, list[int]]], source: str) -> None:
    """The tensor table declares exactly the tensors the header implies (so nothing is
    allocated for a shape the header did not promise)."""
    problems = []
    for name in sorted(set(table) | set(expected)):
        got, want = table.get(name), expected.get(name)
        if want is None:
            problems.append(f"an unexpected tensor {name[:40]!r}")
        elif type(got) is not dict or got.get("dtype") != want[0] or got.get("shape") != want[1]:
            problems.append(f"{name} tensor is not {want[0]} {want[1]}")
    if problems:
        raise StoreCorruptError(
            f"store {source} is inconsistent: {'; '.join(problems[:4])}; restore it from a backup or re-enrol"
        )


def parse(data: bytes, source: str = "store") -> StoreData:
    """Parse and verify store bytes (format, schema, sizes, checksum).

    Raises:
        StoreCorruptError: damaged, edited, not a store, or a newer format (one line).
    """
    from safetensors.numpy import load

    table, meta, n = read_metadata(data, source)
    if HEADER_KEY not in meta:
        raise StoreCorruptError(
            f"store {source} is not a readable edgemeta store: a safetensors file without an edgemeta store header; "
            "pass a store file"
        )
    text = meta[HEADER_KEY]
    header = _header(text, source)  # format and version first: a newer file may checksum differently
    fingerprint, dim, metric, labels, counts, keep = _fields(header, source)
    c, total = len(labels), sum(counts)
    expected = {"sums": ("F64", [c, dim]), "counts": ("I64", [c])}
    if keep:
        expected["embeddings"] = ("F32", [total, dim])
    _check_table(table, expected, source)
    size = 8 + n + 8 * c * dim + 8 * c + (4 * total * dim if keep else 0)
    if len(data) != size:
        raise _bad(source, f"{len(data):,} bytes where its header declares {size:,}: truncated or padded")
    try:
        tensors = load(bytes(data))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise _bad(source, f"damaged tensors: {' '.join(str(e).split())[:120]}") from None
    if meta.get(CHECKSUM_KEY) != checksum(text, tensors):
        raise StoreCorruptError(
            f"store {source} failed its checksum: the file was damaged or edited; restore it from a backup or re-enrol"
        )
    problems = []
    sums, cnt = tensors["sums"], tensors["counts"]
    if cnt.tolist() != list(counts):
        problems.append("counts tensor does not match the header")
    if not np.isfinite(sums).all():
        problems.append("sums tensor holds values that are not finite")
    emb = tensors.get("embeddings")
    if emb is not None and not np.isfinite(emb).all():
        problems.append("embeddings tensor holds values that are not finite")
    if problems:
        raise StoreCorruptError(
            f"store {source} is inconsistent: {'; '.join(problems)}; restore it from a backup or re-enrol"
        )
    for t in tensors.values():
        t.flags.writeable = False
    return StoreData(fingerprint, dim, metric, labels, counts, keep, sums, emb)


def is_store(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes, through the end of its safetensors header)
    opens an edgemeta store, judged by parsing the header (a damaged store still is one)."""
    try:
        _, meta, _ = read_metadata(head, "file")
    except StoreCorruptError:
        return False
    text = meta.get(HEADER_KEY)
    if text is None:
        return False
    try:
        doc = loads(text, max_depth=2, max_string=MAX_LABEL_LENGTH * 4)
    except SchemaError:
        return False
    return type(doc) is dict and doc.get("format") == FORMAT_NAME
