"""PrototypeStore: running means, edits, the safetensors file, atomic and locked saves."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edgemeta.runtime import (
    InputError,
    Metric,
    ModelMismatchError,
    PrototypeStore,
    StoreCorruptError,
    StoreWriteError,
    store_format,
)
from edgemeta.runtime import files as files_mod

D = 4


def _emb(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _store(keep: bool = True, fingerprint: str = "fp-a") -> PrototypeStore:
    s = PrototypeStore(D, metric="cosine", fingerprint=fingerprint, keep_embeddings=keep)
    s.add("cat", _emb(3, 0))
    s.add("dog", _emb(2, 1))
    s.add("cat", _emb(1, 2))
    return s


def test_running_means_counts_and_order():
    s = _store()
    assert s.labels == ["cat", "dog"] and s.counts == {"cat": 4, "dog": 2} and len(s) == 2 and "cat" in s
    cat = np.concatenate([_emb(3, 0), _emb(1, 2)])
    protos = s.prototypes()
    assert protos.dtype == np.float32 and protos.shape == (2, D) and not protos.flags.writeable
    np.testing.assert_allclose(protos, [cat.mean(0), _emb(2, 1).mean(0)], rtol=1e-6)
    np.testing.assert_allclose(s.sums()[0], cat.astype(np.float64).sum(0), rtol=1e-12)
    assert s.prototypes() is protos  # cached
    s.add("dog", _emb(1, 3))
    assert s.prototypes() is not protos and s.counts["dog"] == 3  # invalidated on change
    np.testing.assert_allclose(protos[1], _emb(2, 1).mean(0), rtol=1e-6)  # the old snapshot did not move


def test_examples_and_snapshot_owners():
    s = _store()
    np.testing.assert_array_equal(s.examples("dog"), _emb(2, 1))
    snap = s.snapshot(examples=True)
    assert snap.labels == ("cat", "dog") and snap.counts == (4, 2)
    assert snap.examples.shape == (6, D) and snap.owners.tolist() == [0, 0, 0, 0, 1, 1]
    s.recompute()
    np.testing.assert_allclose(s.prototypes()[1], _emb(2, 1).mean(0), rtol=1e-6)
    lean = _store(keep=False)
    with pytest.raises(InputError, match="needs the individual embeddings; create the store with keep_embeddings=True"):
        lean.snapshot(examples=True)


def test_forget_rename_merge():
    s = _store()
    s.forget("cat")
    assert s.labels == ["dog"] and s.counts == {"dog": 2}
    np.testing.assert_allclose(s.prototypes()[0], _emb(2, 1).mean(0), rtol=1e-6)
    s.rename("dog", "hound")
    assert s.labels == ["hound"] and s.examples("hound").shape == (2, D)
    s.add("puppy", _emb(2, 9))
    with pytest.raises(InputError, match="label 'hound' already exists; pass merge=True"):
        s.rename("puppy", "hound")
    s.rename("puppy", "hound", merge=True)
    assert s.counts == {"hound": 4}
    np.testing.assert_allclose(s.prototypes()[0], np.concatenate([_emb(2, 1), _emb(2, 9)]).mean(0), rtol=1e-6)
    with pytest.raises(InputError, match=r"unknown label 'cat'; enrolled labels: 'hound'"):
        s.forget("cat")


def test_merge_stores():
    a, b = _store(), PrototypeStore(D, metric="cosine", fingerprint="fp-a", keep_embeddings=True)
    b.add("dog", _emb(2, 5))
    b.add("owl", _emb(1, 6))
    a.merge(b)
    assert a.counts == {"cat": 4, "dog": 4, "owl": 1} and a.examples().shape == (9, D)
    with pytest.raises(ModelMismatchError, match="made with model fp-b into one made with model fp-a"):
        a.merge(_store(fingerprint="fp-b"))
    with pytest.raises(ModelMismatchError, match="dim 3"):
        a.merge(PrototypeStore(3, metric="cosine"))


@pytest.mark.parametrize("label", ["", "   ", 3, None, b"cat", ("a",)])
def test_labels_must_be_non_empty_strings(label):
    s = PrototypeStore(D)
    with pytest.raises(InputError, match="label must be a (non-empty )?string"):
        s.add(label, _emb(1, 0))
    assert len(s) == 0


@pytest.mark.parametrize(
    "emb, message",
    [
        (np.zeros((2, 3)), r"embeddings of shape \(2, 3\) do not fit \[n, 4\]"),
        (np.zeros((0, D)), "no embeddings given"),
        (np.full((1, D), np.nan), "embeddings must be finite"),
    ],
)
def test_bad_embeddings(emb, message):
    with pytest.raises(InputError, match=message):
        PrototypeStore(D).add("x", emb)


def test_float64_embeddings_beyond_float32_are_refused_without_a_warning():
    s = PrototypeStore(D)
    with np.errstate(all="raise"):  # a numpy warning would raise here
        with pytest.raises(InputError, match="embeddings must be finite"):
            s.add("x", np.full((2, D), 1e300))
        with pytest.raises(InputError, match="embeddings must be finite"):
            s.add("x", np.full((2, D), 1e39))  # finite in float64, inf as the float32 a model gives
        s.add("x", np.array([[1.0, 2.0, 3.0, 4.0]]))  # in range: taken, as float32
        s.add("y", np.arange(D))  # integers too
    assert s.labels == ["x", "y"] and s.prototypes().dtype == np.float32
    np.testing.assert_array_equal(s.prototypes(), [[1, 2, 3, 4], [0, 1, 2, 3]])


def test_labels_are_plain_composed_strings():
    s = PrototypeStore(D, keep_embeddings=True)
    s.add(np.str_("cat"), _emb(1, 0))
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    s.add(decomposed, _emb(1, 1))  # as macOS writes folder names
    s.add(composed, _emb(1, 2))  # as typed: the same class
    assert s.labels == ["cat", composed] and all(type(x) is str for x in s.labels)
    assert s.counts == {"cat": 1, composed: 2}
    assert s.examples(decomposed).shape == (2, D)  # either form finds it
    s.rename(decomposed, np.str_("coffee"))
    assert s.labels == ["cat", "coffee"] and type(s.labels[1]) is str
    s.forget("coffee")
    assert s.labels == ["cat"]


def test_labels_from_an_older_file_are_read_in_composed_form(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    path = _store().save(tmp_path / "s.store")
    _resave(path, lambda h: h.update(labels=[decomposed, "dog"]))  # as a store saved before labels were composed
    back = PrototypeStore.load(path)
    assert back.labels == [composed, "dog"] and composed in back and decomposed in back
    back.add(decomposed, _emb(1, 5))  # the same class, whichever form is typed
    assert back.counts == {composed: 5, "dog": 2}
    _resave(
        path, lambda h: h.update(labels=[decomposed, composed], counts=[4, 2])
    )  # both forms: one label twice, refused
    with pytest.raises(StoreCorruptError, match="label 'caf\u00e9' appears twice .perhaps in two Unicode spellings."):
        PrototypeStore.load(path)


def test_claim_records_the_model_of_a_hand_made_store_once():
    hand = PrototypeStore(D, metric="cosine")
    with pytest.raises(ModelMismatchError, match="store holds 4-D cosine prototypes, this model gives 8-D cosine"):
        hand.claim("fp-a", 8, Metric.COSINE)
    assert hand.fingerprint == ""  # a refused claim records nothing
    hand.claim("fp-a", D, Metric.COSINE)
    hand.claim("fp-a", D, Metric.COSINE)  # the same model again: nothing to change
    assert hand.fingerprint == "fp-a"
    with pytest.raises(
        ModelMismatchError,
        match="store was made with model fp-a, this model is fp-b; re-enrol or load the matching model",
    ):
        hand.claim("fp-b", D, Metric.COSINE)


def test_a_store_without_a_fingerprint_loads_for_any_model(tmp_path):
    path = PrototypeStore(D).save(tmp_path / "hand.store")  # made by hand: it records no model
    assert PrototypeStore.load(path, fingerprint="fp-z").fingerprint == ""


@pytest.mark.parametrize("keep", [True, False])
def test_save_load_round_trip(tmp_path, keep):
    s = _store(keep=keep)
    path = s.save(tmp_path / "s.store")
    back = PrototypeStore.load(path, fingerprint="fp-a")
    assert (back.labels, back.counts, back.metric, back.keep_embeddings) == (s.labels, s.counts, Metric.COSINE, keep)
    np.testing.assert_array_equal(back.sums(), s.sums())
    if keep:
        np.testing.assert_array_equal(back.examples(), s.examples())
    back.add("cat", _emb(1, 7))  # a loaded store keeps growing
    assert back.counts["cat"] == 5


def test_file_is_safetensors_with_the_documented_header(tmp_path):
    path = _store().save(tmp_path / "s.store")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    header = json.loads(meta["edgemeta.store"])
    assert header == {
        "format": "edgemeta.prototype_store",
        "version": 1,
        "fingerprint": "fp-a",
        "embedding_dim": D,
        "metric": "cosine",
        "labels": ["cat", "dog"],
        "counts": [4, 2],
        "keep_embeddings": True,
    }
    assert len(meta["sha256"]) == 64
    assert sorted(st_load(data)) == ["counts", "embeddings", "sums"]


def test_empty_store_round_trips(tmp_path):
    back = PrototypeStore.load(PrototypeStore(D, fingerprint="x").save(tmp_path / "e.store"))
    assert back.labels == [] and back.prototypes().shape == (0, D)


def test_model_mismatch_names_both_fingerprints(tmp_path):
    path = _store().save(tmp_path / "s.store")
    with pytest.raises(
        ModelMismatchError, match=r"made with model fp-a, this model is fp-z; re-enrol or load the matching model"
    ):
        PrototypeStore.load(path, fingerprint="fp-z")


def _resave(path: Path, header_edit=None, tensors_edit=None, checksum: bool = True) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    header, tensors = json.loads(meta["edgemeta.store"]), dict(st_load(data))
    if header_edit:
        header_edit(header)
    if tensors_edit:
        tensors_edit(tensors)
    text = json.dumps(header, sort_keys=True)
    meta = {"edgemeta.store": text, "sha256": store_format.checksum(text, tensors) if checksum else meta["sha256"]}
    path.write_bytes(st_save(tensors, metadata=meta))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "not a readable edgemeta store"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), r"not a readable edgemeta store .header runs past the end"),
        (lambda p: p.write_bytes(b""), r"only 0 bytes"),
        (lambda p: p.write_bytes(os.urandom(300)), "not a readable edgemeta store"),
        (_flip_last_byte, "failed its checksum: the file was damaged or edited"),
        (lambda p: _resave(p, lambda h: h.update(labels=["dog", "cat"]), checksum=False), "failed its checksum"),
        (
            lambda p: _resave(p, tensors_edit=lambda t: t.update(sums=t["sums"] * 2), checksum=False),
            "failed its checksum",
        ),
        (
            lambda p: _resave(p, lambda h: h.update(version=2)),
            r"format version 2, newer than this edgemeta reads \(1\); upgrade edgemeta",
        ),
        (lambda p: _resave(p, lambda h: h.update(format="something.else")), "is not an edgemeta prototype store"),
        (lambda p: _resave(p, lambda h: h.update(counts=[4, 3])), "inconsistent: embeddings tensor is not F32 .7, 4."),
        (
            lambda p: _resave(p, tensors_edit=lambda t: t["sums"].__setitem__((1, 2), np.nan)),
            "inconsistent: sums tensor holds values that are not finite",
        ),
        (
            lambda p: p.write_bytes(st_save({"w": np.zeros(3, np.float32)})),
            "safetensors file without an edgemeta store header",
        ),
    ],
    ids=[
        "truncated-end",
        "truncated-header",
        "empty",
        "garbage",
        "bit-flip",
        "header-edit",
        "tensor-edit",
        "newer",
        "foreign-format",
        "inconsistent",
        "not-finite",
        "other-safetensors",
    ],
)
def test_damaged_files_are_refused(tmp_path, damage, message):
    path = _store().save(tmp_path / "s.store")
    damage(path)
    with pytest.raises(StoreCorruptError, match=message):
        PrototypeStore.load(path)


def test_missing_file_and_bad_destinations(tmp_path):
    with pytest.raises(InputError, match="store file not found: .*nope.store; enrol classes first"):
        PrototypeStore.load(tmp_path / "nope.store")
    with pytest.raises(InputError, match="is a folder; give a store file path"):
        _store().save(tmp_path)
    with pytest.raises(InputError, match="does not exist; create it first"):
        _store().save(tmp_path / "no" / "such" / "s.store")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_save_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch, failing):
    path = _store().save(tmp_path / "s.store")
    before = path.read_bytes()
    bigger = _store()
    bigger.add("owl", _emb(2, 8))

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod.os, failing, disk_full)
    with pytest.raises(StoreWriteError, match=r"No space left on device.*the previous file is unchanged") as err:
        bigger.save(path)
    assert isinstance(err.value, OSError)
    monkeypatch.undo()
    assert path.read_bytes() == before and PrototypeStore.load(path).labels == ["cat", "dog"]
    assert _leftovers(tmp_path) == []


def test_edit_saves_on_success_only(tmp_path):
    path = tmp_path / "s.store"
    with pytest.raises(InputError, match="store file not found"):
        with PrototypeStore.edit(path):
            pass
    with PrototypeStore.edit(path, default=PrototypeStore(D, fingerprint="fp-a")) as s:
        s.add("a", _emb(1, 0))
    with pytest.raises(RuntimeError):
        with PrototypeStore.edit(path, fingerprint="fp-a") as s:
            s.add("b", _emb(1, 1))
            raise RuntimeError("app crashed mid-edit")
    assert PrototypeStore.load(path).labels == ["a"]
    assert not (tmp_path / "s.store.lock").exists()  # removed as the last writer left


# ---- two processes, one file ----------------------------------------------------------


def _enrol_worker(path: str, tag: str, rounds: int) -> None:
    for i in range(rounds):
        with PrototypeStore.edit(path, default=PrototypeStore(D, fingerprint="fp-a")) as s:
            s.add(f"{tag}{i}", np.full((1, D), i, np.float32))


def _save_worker(path: str, n_classes: int, rounds: int) -> None:
    s = PrototypeStore(D, fingerprint=f"fp-{n_classes}", keep_embeddings=True)
    for c in range(n_classes):
        s.add(f"c{c}", np.full((50, D), c, np.float32))
    for _ in range(rounds):
        s.save(path)


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_all(procs) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def test_two_processes_enrolling_into_one_file_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.store")
    ctx = _context()
    _run_all([ctx.Process(target=_enrol_worker, args=(path, tag, 12)) for tag in ("p", "q")])
    s = PrototypeStore.load(path)
    assert sorted(s.labels) == sorted([f"p{i}" for i in range(12)] + [f"q{i}" for i in range(12)])
    assert _leftovers(tmp_path) == []


def test_concurrent_saves_leave_one_complete_store(tmp_path):
    path = str(tmp_path / "shared.store")
    ctx = _context()
    _run_all([ctx.Process(target=_save_worker, args=(path, n, 8)) for n in (3, 40)])
    s = PrototypeStore.load(path)  # checksum verified: never a mix of the two
    assert (s.fingerprint, len(s)) in {("fp-3", 3), ("fp-40", 40)}
    assert s.examples().shape == (50 * len(s), D)


def test_labels_with_control_characters_are_refused_when_enrolled_and_when_loaded(tmp_path):
    s = PrototypeStore(4)
    for bad in ("new\nline", "tab\there", "\x1b[31mred"):
        with pytest.raises(InputError, match="contains control characters"):
            s.add(bad, np.ones((1, 4), np.float32))
    assert len(s) == 0
    path = _store().save(tmp_path / "s.store")
    _resave(path, lambda h: h.update(labels=["\x1b[31mred", "dog"]))  # made by hand: the checksum is public
    with pytest.raises(StoreCorruptError, match=r"bad header \(labels\[0\] holds control characters"):
        PrototypeStore.load(path)


def test_save_never_replaces_a_file_that_is_not_a_store(tmp_path):
    """A store replaces an earlier store (even a damaged one) or an empty file, never a model
    or an image: saving over the session's own model was one keystroke away."""
    s = _store()
    s.add("a", _emb(2, 5))
    for name, content in (
        ("m.onnx", b"\x08\x07\x12\x0bonnx-model-bytes"),
        ("img.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
        ("t.txt", b"hi"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError, match=f"{name} exists and is not an edgemeta store"):
            s.save(path)
        assert path.read_bytes() == content
    for name, content in (("empty.store", b""), ("old.store", None), ("damaged.store", "truncate")):
        path = tmp_path / name
        if content is None or content == "truncate":
            _store().save(path)
            if content == "truncate":
                path.write_bytes(path.read_bytes()[:-10])
        else:
            path.write_bytes(content)
        s.save(path)
        assert PrototypeStore.load(path).counts == {"cat": 4, "dog": 2, "a": 2}


def test_labels_that_cannot_be_written_are_refused():
    with pytest.raises(InputError, match=r"label 'caf\\udce9' cannot be written as UTF-8"):
        _store().add("caf\udce9", _emb(1, 5))


def test_unknown_label_error_shortens_long_labels():
    s = _store()
    s.add("x" * 1000, _emb(1, 5))
    with pytest.raises(InputError) as err:
        s.forget("nope")
    assert len(str(err.value)) < 200 and "xxx..." in str(err.value)


def test_save_replaces_a_store_with_a_long_header_and_refuses_a_fifo(tmp_path):
    s = PrototypeStore(D, fingerprint="fp-a")
    for i in range(3000):  # a header of about 150 KB: the store key is read from its first bytes
        s.add(f"class-{i:05d}-" + "x" * 30, _emb(1, i))
    path = tmp_path / "big.store"
    s.save(path)
    assert len(s.to_bytes()) > 100_000
    s.save(path)
    assert PrototypeStore.load(path).counts == s.counts
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"pipe is a FIFO \(named pipe\), not a store file; pass a regular file"):
        s.save(fifo)


def test_a_store_reached_through_a_symlink_is_written_through_it(tmp_path):
    s = _store()
    target = tmp_path / "real" / "s.store"
    target.parent.mkdir()
    _store(keep=False).save(target)
    link = tmp_path / "link.store"
    link.symlink_to(target)
    s.save(link)
    assert link.is_symlink() and PrototypeStore.load(target).keep_embeddings  # the target holds the new store
    with PrototypeStore.edit(link) as edited:
        edited.add("bird", _emb(1, 9))
    assert link.is_symlink() and "bird" in PrototypeStore.load(target).labels
