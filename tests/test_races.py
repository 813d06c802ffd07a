"""Thread races: every public method that changes a store or a classifier, run in one thread
while another saves (and predicts), must leave every saved file whole and consistent.

A file is consistent when it loads (format, schema and checksum), its counts add up to its
kept embeddings, and each class's sum equals the sum of its kept embeddings (the invariant a
save that read the arrays mid-change would break). ``scripts/race_stress.py`` runs the
same races many more times for ``reports/hardening.md``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgemeta.runtime import ClassifierOptions, FewShotClassifier, Metric, PrototypeStore

D = 8
ROUNDS = 12
CHURN = 150


def check_consistent(path: Path) -> PrototypeStore:
    s = PrototypeStore.load(path)
    if s.keep_embeddings:
        ex = [s.examples(lab) for lab in s.labels]
        assert [len(e) for e in ex] == [s.counts[lab] for lab in s.labels]
        sums = s.sums()
        for i, e in enumerate(ex):
            np.testing.assert_allclose(sums[i], e.sum(0, dtype=np.float64), rtol=1e-9, atol=1e-9)
    return s


def _emb(i: int, n: int = 1) -> np.ndarray:
    return np.full((n, D), (i % 13) + 1, np.float32)


def _base(keep: bool = True) -> PrototypeStore:
    s = PrototypeStore(D, metric=Metric.SQEUCLIDEAN, fingerprint="fp", keep_embeddings=keep)
    for i in range(50):
        s.add(f"c{i}", _emb(i, 2))
    return s


def _race(mutate: Callable[[int], None], save: Callable[[], Path], rounds: int = ROUNDS) -> None:
    stop, errors = threading.Event(), []

    def churn():
        i = 0
        try:
            while not stop.is_set() and i < CHURN:  # bounded: kept embeddings grow with every add
                mutate(i)
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(rounds):
            check_consistent(save())
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors


STORE_METHODS: dict[str, Callable[[PrototypeStore, int], None]] = {
    "add-existing": lambda s, i: s.add("c0", _emb(i)),
    "add-new": lambda s, i: s.add(f"n{i}", _emb(i)),
    "forget": lambda s, i: (s.add(f"f{i}", _emb(i)), s.forget(f"f{i}")),
    "rename": lambda s, i: s.rename("c1" if i % 2 == 0 else "renamed", "renamed" if i % 2 == 0 else "c1"),
    "rename-merge": lambda s, i: (s.add(f"m{i}", _emb(i)), s.rename(f"m{i}", "c2", merge=True)),
    "merge": lambda s, i: s.merge(_small(i)),
    "recompute": lambda s, i: (s.add("c3", _emb(i)), s.recompute()),
    "claim": lambda s, i: s.claim("fp", D, Metric.SQEUCLIDEAN),
}


def _small(i: int) -> PrototypeStore:
    o = PrototypeStore(D, fingerprint="fp", keep_embeddings=True)
    o.add(f"o{i % 5}", _emb(i))
    return o


def test_every_mutating_store_method_is_raced():
    public = {n for n in vars(PrototypeStore) if not n.startswith("_") and callable(getattr(PrototypeStore, n))}
    readers = {
        "prototypes",
        "examples",
        "snapshot",
        "sums",
        "copy",
        "data",
        "to_bytes",
        "from_bytes",
        "load",
        "edit",
        "save",
    }
    raced = {k.split("-")[0] for k in STORE_METHODS}
    assert public - readers == raced, "a new mutating method needs a race test"


@pytest.mark.parametrize("method", sorted(STORE_METHODS))
def test_store_method_racing_with_save_writes_consistent_files(tmp_path, method):
    s = _base()
    _race(lambda i: STORE_METHODS[method](s, i), lambda: s.save(tmp_path / "s.store"))


@pytest.mark.parametrize("method", ["add-existing", "forget"])
def test_edit_racing_with_another_thread_editing_loses_nothing(tmp_path, method):
    path = _base().save(tmp_path / "s.store")
    n_threads, per = 3, 6

    def worker(t: int):
        for i in range(per):
            with PrototypeStore.edit(path) as s:
                s.add(f"t{t}-{i}", _emb(i))
                if method == "forget":
                    s.forget("c0") if "c0" in s else None

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    s = check_consistent(path)
    assert {f"t{t}-{i}" for t in range(n_threads) for i in range(per)} <= set(s.labels)


# ---- the classifier ------------------------------------------------------------------------


@pytest.fixture
def clf(tiny_onnx_model, runtime_images):
    c = FewShotClassifier(tiny_onnx_model, "cpu", options=ClassifierOptions(keep_embeddings=True))
    for label, imgs in runtime_images.items():
        c.enroll(label, imgs[:4])
    return c


def _clf_methods(runtime_images, tmp_path) -> dict[str, Callable]:
    imgs = runtime_images["class0"][:2]
    spare = tmp_path / "spare.store"
    return {
        "enroll": lambda c, i: c.enroll("class0", imgs),
        "enroll_folder": None,  # checked below with a folder
        "forget": lambda c, i: (c.enroll(f"x{i}", imgs[:1]), c.forget(f"x{i}")),
        "rename": lambda c, i: c.rename("class1" if i % 2 == 0 else "cats", "cats" if i % 2 == 0 else "class1"),
        "use_store": lambda c, i: c.use_store(c.store.copy()),
        "load": lambda c, i: c.load(spare),
        "calibrate_threshold": lambda c, i: c.calibrate_threshold(),
        "predict": lambda c, i: c.predict(runtime_images["class2"][4:]),
    }


@pytest.mark.parametrize(
    "method", ["enroll", "enroll_folder", "forget", "rename", "use_store", "load", "calibrate_threshold", "predict"]
)
def test_classifier_method_racing_with_save_writes_consistent_files(
    clf, runtime_images, runtime_image_folder, tmp_path, method
):
    clf.save(tmp_path / "spare.store")
    methods = _clf_methods(runtime_images, tmp_path)
    methods["enroll_folder"] = lambda c, i: c.enroll_folder(runtime_image_folder)
    _race(lambda i: methods[method](clf, i), lambda: clf.save(tmp_path / "s.store"), rounds=6)


def test_classifier_editing_from_threads_loses_nothing(tiny_onnx_model, runtime_images, tmp_path):
    path = tmp_path / "s.store"

    def worker(t: int):
        c = FewShotClassifier(tiny_onnx_model, "cpu", options=ClassifierOptions(keep_embeddings=True))
        for i in range(3):
            with c.editing(path):
                c.enroll(f"t{t}-{i}", runtime_images["class1"][:1])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(check_consistent(path).labels) == {f"t{t}-{i}" for t in range(3) for i in range(3)}
