"""Hardening: the files layer (atomic writes, locks, temp files, special files) and the
findings of a hostile and a careless user, each as a regression test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edgemeta.runtime import (
    InputError,
    ModelMetadata,
    ModelMismatchError,
    PrototypeStore,
    StoreCorruptError,
    store_format,
)
from edgemeta.runtime.files import LockTimeout, atomic_write, clean_stale_temps, locked
from edgemeta.runtime.store import StoreConflictWarning

D = 4


def _store(n: int = 2, fingerprint: str = "fp-a") -> PrototypeStore:
    s = PrototypeStore(D, fingerprint=fingerprint)
    for i in range(n):
        s.add(f"c{i}", np.full((1, D), i, np.float32))
    return s


def _reseal(path: Path, edit) -> None:
    """Edit a store's header and recompute its (public) checksum, as anyone can."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["edgemeta.store"])
    tensors = dict(st_load(data))
    text = edit(header)
    text = text if isinstance(text, str) else json.dumps(header)
    path.write_bytes(
        st_save(tensors, metadata={"edgemeta.store": text, "sha256": store_format.checksum(text, tensors)})
    )


# ---- atomic writes -----------------------------------------------------------------------


def test_a_new_file_follows_the_umask_and_a_replaced_one_keeps_its_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "new.bin", b"one")
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    path.chmod(0o604)
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o604


def test_a_symlinked_target_is_written_through_and_a_loop_is_refused(tmp_path):
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    assert atomic_write(link, b"new") == target and link.is_symlink() and target.read_bytes() == b"new"
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(InputError, match="is a symlink loop"):
        atomic_write(tmp_path / "a", b"x")
    with pytest.raises(InputError, match="is a symlink loop"):
        _store().save(tmp_path / "a")
    with pytest.raises(InputError, match="is a symlink loop, not a store file"):
        PrototypeStore.load(tmp_path / "a")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_are_refused_without_hanging(tmp_path, kind):
    path = tmp_path / "pipe"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    with pytest.raises(InputError, match=r"is a (FIFO|character device).*not a store file"):
        PrototypeStore.load(path)
    with pytest.raises(InputError, match=r"is a (FIFO|character device)"):
        atomic_write(path, b"x")


def test_temp_files_of_dead_writers_are_cleaned_by_the_next_writer_and_live_ones_kept(tmp_path):
    path = _store().save(tmp_path / "s.store")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".s.store.{dead}.abcd1234.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".s.store.{os.getpid()}.live0000.tmp"  # this process's: alive
    live.write_bytes(b"y")
    other = tmp_path / f".other.store.{dead}.zzzz.tmp"  # another file's: not this writer's business
    other.write_bytes(b"z")
    legacy_old = tmp_path / ".s.store.k3j_x9a2.tmp"  # as earlier versions named them: no pid
    legacy_old.write_bytes(b"old")
    os.utime(legacy_old, (time.time() - 3600, time.time() - 3600))
    legacy_new = tmp_path / ".s.store.q8w7e6r5.tmp"  # a minute old: perhaps an earlier version still writing
    legacy_new.write_bytes(b"new")
    _store(3).save(path)
    assert not stale.exists() and live.exists() and other.exists()
    assert not legacy_old.exists() and legacy_new.exists()
    assert clean_stale_temps(tmp_path / "other.store") == [other]


def test_no_lock_file_stays_beside_a_store(tmp_path):
    path = _store().save(tmp_path / "s.store")
    with PrototypeStore.edit(path) as s:
        s.add("x", np.ones((1, D), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.store"]


def test_a_lock_wait_is_said_and_honours_the_timeout(tmp_path):
    path = _store().save(tmp_path / "s.store")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from edgemeta.runtime.files import locked\n"
            "with locked(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        said = []
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=rf"s.store is locked by process {holder.pid}"):
            _store(5).save(path, timeout=0.3, on_wait=said.append)
        assert 0.25 < time.monotonic() - t0 < 5
        assert said == [f"waiting for the lock on {path} held by process {holder.pid} ..."]
        assert PrototypeStore.load(path).labels == ["c0", "c1"]
    finally:
        holder.kill()
        holder.wait()
    _store(5).save(path, timeout=5)  # the dead holder's lock is free again
    assert len(PrototypeStore.load(path)) == 5


def test_locks_are_exclusive_between_threads_and_reentrant_within_one(tmp_path):
    inside, order = threading.Event(), []

    def other():
        inside.wait()
        with locked(tmp_path / "f"):
            order.append("other")

    t = threading.Thread(target=other)
    t.start()
    with locked(tmp_path / "f"):
        with locked(tmp_path / "f"):
            inside.set()
            time.sleep(0.2)
            order.append("main")
    t.join(10)
    assert order == ["main", "other"]


# ---- finding 1: save racing with enrolment ------------------------------------------------


@pytest.mark.parametrize("mutate", ["add", "forget"])
def test_a_save_racing_with_enrolment_always_writes_a_consistent_store(tmp_path, mutate):
    """Class ``c<k>``'s embeddings are all ``k``: a save that took the labels before another
    thread's change and the arrays after it fails its checksum or shows the wrong prototype."""
    s = PrototypeStore(64, fingerprint="fp")
    for k in range(2000 if mutate == "add" else 300):  # forget rebuilds the label index: O(classes) each
        s.add(f"c{k}", np.full((1, 64), k, np.float32))
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            k = i % 50
            if mutate == "add":
                s.add(f"c{k}", np.full((1, 64), k, np.float32))
            else:  # forget an early class (every later row moves up), then enrol it again at the end
                s.forget(f"c{k}")
                s.add(f"c{k}", np.full((1, 64), k, np.float32))
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(15):
            back = PrototypeStore.load(s.save(tmp_path / "s.store"))  # checksum verified each time
            protos = back.prototypes()[:, 0]
            assert np.array_equal(protos, [float(lab[1:]) for lab in back.labels])
    finally:
        stop.set()
        t.join()


# ---- findings 3 and 4: parsers that trusted -------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: "[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),
        (lambda h: h.update(embedding_dim=10**11), r"embedding_dim must be in \[1, 65536\]"),
        (lambda h: h.update(labels="ab", counts=[1, 1]), "labels must be a list"),
        (lambda h: h.update(embedding_dim=4.9), "embedding_dim must be an integer, got 4.9"),
        (lambda h: h.update(version=True), "invalid format version True"),
        (lambda h: h.update(counts=[True, 1]), r"counts\[0\] must be an integer, got true"),
        (lambda h: h.update(counts=[1.5, 1]), r"counts\[0\] must be an integer"),
        (lambda h: h.update(labels=["caf\u00e9", "cafe\u0301"]), "appears twice"),
        (lambda h: h.update(labels=["a\nb", "c1"]), "holds control characters"),
        (lambda h: h.update(labels=["\x1b[2J", "c1"]), "holds control characters"),
        (lambda h: h.update(keep_embeddings=1), "keep_embeddings must be true or false"),
        (lambda h: json.dumps(h).replace('"c0"', '"\\ud800"'), "lone surrogate"),
    ],
    ids=[
        "deep",
        "huge-dim",
        "labels-string",
        "float-dim",
        "bool-version",
        "bool-count",
        "float-count",
        "nfc-nfd",
        "newline",
        "escape",
        "int-keep",
        "surrogate",
    ],
)
def test_hand_made_store_headers_are_refused_with_one_line(tmp_path, edit, message):
    path = _store().save(tmp_path / "s.store")
    _reseal(path, edit)
    with pytest.raises(StoreCorruptError, match=message) as err:
        PrototypeStore.load(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize("metadata", ['"a string"', '["a", "list"]', "[" * 100_000, '{"edgemeta.store": 5}'])
def test_a_safetensors_metadata_of_the_wrong_shape_is_a_store_error(tmp_path, metadata):
    data = _store().to_bytes()
    n = int.from_bytes(data[:8], "little")
    outer = json.loads(data[8 : 8 + n])
    text = (
        json.dumps(outer).replace(json.dumps(outer["__metadata__"]), metadata)
        if not metadata.startswith("[[")
        else metadata
    )
    raw = text.encode()
    (tmp_path / "s.store").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(StoreCorruptError):
        PrototypeStore.load(tmp_path / "s.store")


def test_deeply_nested_model_metadata_is_a_model_mismatch():
    with pytest.raises(ModelMismatchError, match="nested 100000 levels deep"):
        ModelMetadata.from_json("[" * 100_000)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["preprocess"].update(size=[100000, 100000]), r"must be in \[1, 8192\]"),
        (lambda d: d["preprocess"].update(size=[8000, 8000]), "over the 16,777,216-pixel limit"),
        (lambda d: d.update(embedding_dim=True), "embedding_dim must be an integer, got true"),
        (lambda d: d.update(version=True), "invalid version True"),
        (lambda d: d.update(verification="fast"), "verification must be an object"),
        (lambda d: d.update(verification={"passed": "yes"}), "passed must be true or false"),
        (lambda d: d.update(verification={"logits_max_rel_error": "x"}), "logits_max_rel_error must be a finite"),
        (lambda d: d.update(verification={"episodes": {"count": 5}}), r"episodes: verification.episodes.n_way must"),
        (lambda d: d.update(verification={"episodes": [1]}), "episodes must be an object"),
        (lambda d: d["preprocess"].update(mean=["0"]), "preprocess.mean must be a finite number"),
    ],
    ids=[
        "huge-size",
        "pixels",
        "bool-dim",
        "bool-version",
        "verification-string",
        "passed-string",
        "error-string",
        "episodes-partial",
        "episodes-list",
        "string-mean",
    ],
)
def test_model_metadata_is_checked_before_use(change, message):
    from edgemeta.runtime import Metric, Normalization, PreprocessSpec

    doc = json.loads(
        ModelMetadata(PreprocessSpec.create(28, 1), 8, Metric.SQEUCLIDEAN, Normalization.L2, "fp").to_json()
    )
    change(doc)
    with pytest.raises(ModelMismatchError, match=message):
        ModelMetadata.from_json(json.dumps(doc))


def test_a_model_fixing_a_huge_batch_is_refused_before_allocating():
    from edgemeta.runtime.session import _check_fixed_batch

    with pytest.raises(
        ModelMismatchError, match="fixes a batch of 1,099,511,627,776 images .* re-export it with a dynamic batch"
    ):
        _check_fixed_batch(2**40, [2**40, 1, 28, 28], "m.onnx")
    _check_fixed_batch(8, [8, 1, 28, 28], "m.onnx")  # an ordinary fixed batch passes


# ---- finding 8: images ---------------------------------------------------------------------


def test_a_float_tiff_of_values_0_to_1_is_not_black(tmp_path):
    from PIL import Image

    from edgemeta.runtime import PreprocessSpec
    from edgemeta.runtime.preprocess import to_uint8

    path = tmp_path / "f.tiff"
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(path)
    arr = to_uint8(str(path), PreprocessSpec.create(8, 1))
    assert arr.shape == (8, 8, 1) and int(arr.mean()) in (127, 128)


def test_an_extreme_aspect_ratio_is_refused_before_decoding(tmp_path):
    from PIL import Image

    from edgemeta.runtime.preprocess import decode

    path = tmp_path / "strip.png"
    Image.new("L", (1, 100_000)).save(path)
    with pytest.raises(InputError, match="more than 200 times longer than it is wide; crop the image"):
        decode(path)


# ---- finding 9: direct load/save from several processes ----------------------------------------


def test_a_save_over_a_store_changed_by_another_writer_warns(tmp_path):
    path = _store().save(tmp_path / "s.store")
    mine = PrototypeStore.load(path)
    theirs = PrototypeStore.load(path)
    theirs.add("theirs", np.ones((1, D), np.float32))
    theirs.save(path)
    mine.add("mine", np.ones((1, D), np.float32))
    with pytest.warns(
        StoreConflictWarning, match="was changed by another writer since this store read it.*PrototypeStore.edit"
    ):
        mine.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine.save(path)  # its own earlier save: no warning


# ---- finding 7: Ctrl-C during the CLI's imports --------------------------------------------------


def test_ctrl_c_while_the_cli_starts_never_prints_a_traceback():
    """SIGINT at several points after the console script's first import (before it, an
    interrupt is Python's own start-up's to report): during the CLI's imports, then in the command."""
    # as the console script starts: it imports edgemeta._console (two tiny modules), then calls main
    code = "import sys; from edgemeta._console import main; sys.stderr.write('ready\\n'); sys.stderr.flush(); main()"
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.4):
        p = subprocess.Popen(
            [sys.executable, "-c", code, "store", "list", "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stderr.readline() == "ready\n"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        # -SIGINT: the signal came as Python was shutting down, after the command had finished
        assert p.returncode in (0, 130, -signal.SIGINT), (p.returncode, err)
        if p.returncode == 130:
            assert err == "error: interrupted\n"


def test_the_console_entry_catches_an_interrupt_raised_during_import(monkeypatch, capsys):
    import builtins

    from edgemeta import _console

    real_import = builtins.__import__

    def interrupted(name, *a, **k):
        if name == "edgemeta.cli":
            raise KeyboardInterrupt
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    monkeypatch.setattr(_console, "_armed", False)  # main arms it; pytest's process goes back to holding nothing
    with pytest.raises(SystemExit) as ex:
        _console.main()
    assert ex.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"
