"""FewShotClassifier: enrol, predict, open set, k-NN, persistence, threads."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from conftest import runtime_class_images

from edgemeta.runtime import (
    ClassifierOptions,
    FewShotClassifier,
    InputError,
    Mode,
    ModelMismatchError,
    Prediction,
    PrototypeStore,
    preprocess,
)


def _split(images: dict[str, list[np.ndarray]]) -> tuple[dict, list, list]:
    support = {label: imgs[:4] for label, imgs in images.items()}
    queries = [img for imgs in images.values() for img in imgs[4:]]
    truth = [label for label, imgs in images.items() for _ in imgs[4:]]
    return support, queries, truth


def _enrolled(model, images, **options) -> FewShotClassifier:
    clf = FewShotClassifier(model, "cpu", options=ClassifierOptions(**options))
    for label, imgs in _split(images)[0].items():
        clf.enroll(label, imgs)
    return clf


def _embed(clf: FewShotClassifier, imgs) -> np.ndarray:
    return clf.session.embed(preprocess(imgs, clf.session.preprocess)).astype(np.float64)


def test_enrol_and_predict(tiny_onnx_model, runtime_images):
    clf = _enrolled(tiny_onnx_model, runtime_images)
    _, queries, truth = _split(runtime_images)
    preds = clf.predict(queries, top_k=3)
    assert [p.label for p in preds] == truth
    assert clf.labels == ["class0", "class1", "class2", "class3"] and clf.counts == dict.fromkeys(clf.labels, 4)
    assert clf.providers == ["CPUExecutionProvider"]
    p = preds[0]
    assert isinstance(p, Prediction) and len(p.top_k) == 3 and p.top_k[0] == (p.label, p.probability, p.distance)
    assert [c.probability for c in p.top_k] == sorted((c.probability for c in p.top_k), reverse=True)
    # distance = squared euclidean to the class mean; probability = softmax over all classes
    emb = _embed(clf, queries[:1])[0]
    protos = np.stack([_embed(clf, runtime_images[lab][:4]).mean(0) for lab in clf.labels])
    d = ((emb - protos) ** 2).sum(1)
    soft = np.exp(-d - (-d).max()) / np.exp(-d - (-d).max()).sum()
    assert [c.label for c in p.top_k] == [clf.labels[i] for i in np.argsort(d)[:3]]
    np.testing.assert_allclose([c.distance for c in p.top_k], np.sort(d)[:3], atol=1e-5)
    np.testing.assert_allclose([c.probability for c in p.top_k], soft[np.argsort(d)[:3]], atol=1e-5)
    everything = clf.predict(queries[0], top_k=99)[0].top_k  # clamped to the classes there are
    assert len(everything) == 4 and sum(c.probability for c in everything) == pytest.approx(1.0)
    best = clf.predict(queries, top_k=1)  # the argmax path: the same first candidate, softmax over all classes
    assert [b.top_k for b in best] == [q.top_k[:1] for q in preds] and best[0].probability == pytest.approx(
        soft.max(), abs=1e-5
    )


@pytest.mark.parametrize("model", ["tiny_onnx_model", "tiny_cosine_model"])
def test_one_image_gets_the_verdict_it_gets_in_a_batch(model, runtime_images, request):
    """A single query takes a scalar path (the camera loop's): the same numbers, to the bit,
    as its row of a batch, the unknown verdict included."""
    clf = _enrolled(request.getfixturevalue(model), runtime_images)
    _, queries, _ = _split(runtime_images)
    batch = clf.predict(queries)
    distances = sorted(p.distance for p in batch)
    for threshold in (None, distances[len(distances) // 2]):
        clf.threshold = threshold
        batch = clf.predict(queries)
        alone = [clf.predict(q)[0] for q in queries]
        # the graph may sum a batch in another order than one image: compare against its own logits
        for q, b, a in zip(queries, batch, alone):
            logits = clf.session.run(preprocess([q], clf.session.preprocess), clf.store.prototypes())[1]
            again = clf._verdicts(np.concatenate([logits, logits]), tuple(clf.labels), 1, threshold)[0]
            assert a == again and a.label == b.label
        assert any(p.unknown for p in alone) == (threshold is not None)


def test_logits_come_from_the_graph(tiny_onnx_model, runtime_images, monkeypatch):
    clf = _enrolled(tiny_onnx_model, runtime_images)
    _, queries, truth = _split(runtime_images)
    seen = []
    real_run = clf.session.run

    def reversed_graph(images, prototypes):
        seen.append(prototypes)
        emb, logits = real_run(images, prototypes)
        return emb, -logits  # a graph scoring the other way round

    monkeypatch.setattr(clf.session, "run", reversed_graph)
    preds = clf.predict(queries[:1])
    assert seen[0] is clf.store.prototypes()  # the cached, read-only matrix is fed as is
    assert preds[0].label != truth[0] and preds[0].distance < 0  # verdict and distance follow the graph


def test_cosine_model(tiny_cosine_model, runtime_images):
    clf = _enrolled(tiny_cosine_model, runtime_images)
    _, queries, truth = _split(runtime_images)
    preds = clf.predict(queries)
    assert [p.label for p in preds] == truth
    emb, proto = _embed(clf, queries[:1])[0], _embed(clf, runtime_images[truth[0]][:4]).mean(0)
    cos = emb @ proto / np.linalg.norm(emb) / np.linalg.norm(proto)
    assert preds[0].distance == pytest.approx(1 - cos, abs=1e-5)
    assert clf.threshold == 0.5


def test_enrolment_embeds_only_the_new_images(tiny_onnx_model, runtime_images, monkeypatch):
    clf = _enrolled(tiny_onnx_model, runtime_images)
    embedded = []
    real = clf.session.embed
    monkeypatch.setattr(clf.session, "embed", lambda x: embedded.append(len(x)) or real(x))
    assert clf.enroll("class4", np.stack(runtime_class_images(5, 3, seed=9)["class4"])[..., None]) == 3  # NHWC
    assert clf.enroll("class0", runtime_images["class0"][4:]) == 6
    assert embedded == [3, 2]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, im: c.enroll("x", []), "no images given for label 'x'; pass at least one image"),
        (lambda c, im: c.enroll("", im), "label must be a non-empty string"),
        (lambda c, im: c.enroll(7, im), "label must be a string, got int 7"),
        (lambda c, im: c.predict(im), r"nothing is enrolled yet; call enroll\(label, images\)"),
    ],
)
def test_bad_enrolment_and_empty_predict(tiny_onnx_model, runtime_images, call, message):
    clf = FewShotClassifier(tiny_onnx_model, "cpu")
    with pytest.raises(InputError, match=message):
        call(clf, runtime_images["class0"])


def test_bad_image_leaves_the_store_unchanged(tiny_onnx_model, runtime_images, tmp_path):
    clf = _enrolled(tiny_onnx_model, runtime_images)
    before = clf.store.prototypes()
    with pytest.raises(InputError, match="image file not found"):
        clf.enroll("class0", [runtime_images["class0"][4], tmp_path / "gone.png"])
    assert clf.counts["class0"] == 4 and clf.store.prototypes() is before
    with pytest.raises(InputError, match="top_k must be an integer >= 1"):
        clf.predict(runtime_images["class0"][0], top_k=0)


def test_preprocessed_batch_enrols_like_images_and_bad_values_change_nothing(tiny_onnx_model, runtime_images):
    clf = _enrolled(tiny_onnx_model, runtime_images)
    batch = preprocess(runtime_images["class1"][4:], clf.session.preprocess)  # float32 [B, C, H, W]: checked once
    ref = _enrolled(tiny_onnx_model, runtime_images)
    assert clf.enroll("class1", batch) == ref.enroll("class1", runtime_images["class1"][4:]) == 6
    np.testing.assert_allclose(clf.store.prototypes(), ref.store.prototypes(), atol=1e-6)
    before = clf.store.prototypes()
    batch[1, 0, 3, 3] = np.nan
    with pytest.raises(InputError, match="image 1 of the batch contains NaN or infinite values"):
        clf.enroll("class1", batch)
    assert clf.counts["class1"] == 6 and clf.store.prototypes() is before


def test_a_bad_image_in_a_preprocessed_batch_is_named_by_its_place_in_the_whole_batch(tiny_onnx_model, runtime_images):
    clf = _enrolled(tiny_onnx_model, runtime_images, batch_size=2)  # smaller than the batch
    batch = preprocess(runtime_images["class1"][:5] + runtime_images["class2"][:2], clf.session.preprocess)
    before = clf.store.prototypes()
    batch[5, 0, 0, 0] = np.inf
    for call in (lambda: clf.enroll("class1", batch), lambda: clf.predict(batch), lambda: clf.embed(batch)):
        with pytest.raises(InputError, match="image 5 of the batch contains NaN or infinite values"):
            call()
    assert clf.store.prototypes() is before
    batch[5, 0, 0, 0] = 0.0
    done = []
    assert clf.embed(batch, on_progress=done.append).shape == (7, clf.session.embedding_dim) and done == [
        2,
        2,
        2,
        1,
    ]  # batch by batch
    calls = []
    real = clf.session.run
    clf.session.run = lambda x, p: calls.append(len(x)) or real(x, p)
    clf.predict(batch)
    assert calls == [2, 2, 2, 1]  # the classifier's batch size bounds each call, preprocessed or not
    assert [p.label for p in clf.predict(batch)] == [
        p.label for p in clf.predict(list(batch))
    ]  # one call or image by image


def test_open_set_threshold(tiny_onnx_model, make_onnx_model, runtime_images):
    clf = _enrolled(tiny_onnx_model, runtime_images)
    assert clf.threshold == 1.0 == clf.default_threshold()  # l2-normalized squared euclidean
    stranger = runtime_class_images(1, 1, seed=123)["class0"]
    clf.threshold = 1e-6
    p = clf.predict(stranger)[0]
    assert p.unknown and p.label in clf.labels and p.distance > 1e-6
    clf.threshold = None
    assert not clf.predict(stranger)[0].unknown
    with pytest.raises(InputError, match="threshold must be a finite distance >= 0"):
        clf.threshold = -1.0
    unnormalized = FewShotClassifier(make_onnx_model(normalization="none"), "cpu")
    assert unnormalized.threshold is None
    given = FewShotClassifier(make_onnx_model(extra={"open_set_threshold": 0.3}), "cpu")
    assert given.threshold == 0.3
    closed = FewShotClassifier(tiny_onnx_model, "cpu", options=ClassifierOptions(open_set=False, threshold=0.1))
    assert closed.threshold is None


def test_calibrated_threshold_is_the_leave_one_out_percentile(tiny_onnx_model, runtime_images):
    with pytest.raises(InputError, match="needs the enrolled embeddings; use ClassifierOptions.keep_embeddings=True."):
        _enrolled(tiny_onnx_model, runtime_images).calibrate_threshold()
    clf = _enrolled(tiny_onnx_model, runtime_images, keep_embeddings=True)
    dists = []
    for label in clf.labels:
        e = _embed(clf, runtime_images[label][:4])
        for i in range(4):
            loo = np.delete(e, i, axis=0).mean(0)
            dists.append(((e[i] - loo) ** 2).sum())
    value = clf.calibrate_threshold(percentile=90, margin=1.5)
    assert value == pytest.approx(np.percentile(dists, 90) * 1.5, rel=1e-4)
    assert clf.threshold == value
    _, queries, _ = _split(runtime_images)
    assert sum(p.unknown for p in clf.predict(queries)) <= 2  # genuine queries mostly known
    assert clf.predict(runtime_class_images(1, 1, seed=77)["class0"])[0].unknown  # a stranger is not
    single = FewShotClassifier(tiny_onnx_model, "cpu", options=ClassifierOptions(keep_embeddings=True))
    single.enroll("one", runtime_images["class0"][:1])
    with pytest.raises(InputError, match="at least one class with 2 or more enrolled examples"):
        single.calibrate_threshold()


@pytest.mark.parametrize("k", [1, 3])
def test_knn_mode(tiny_onnx_model, runtime_images, k):
    clf = _enrolled(tiny_onnx_model, runtime_images, mode=Mode.KNN, knn_k=k)
    assert clf.store.keep_embeddings  # implied by k-NN
    _, queries, truth = _split(runtime_images)
    preds = clf.predict(queries, top_k=4)
    assert [p.label for p in preds] == truth
    e = _embed(clf, queries[:1])[0]
    for cand in preds[0].top_k:
        ex = _embed(clf, runtime_images[cand.label][:4])
        d = np.sort(((ex - e) ** 2).sum(1))[:k].mean()
        assert cand.distance == pytest.approx(d, abs=1e-5)
    exact = clf.predict(runtime_images["class2"][0])[0]
    if k == 1:
        assert exact.label == "class2" and exact.distance == pytest.approx(0.0, abs=1e-5)
    assert clf.calibrate_threshold() > 0


def test_knn_needs_a_store_with_embeddings(tiny_onnx_model):
    lean = PrototypeStore(16, fingerprint="fp-tiny-0001")
    with pytest.raises(InputError, match="k-NN mode needs a store that keeps embeddings"):
        FewShotClassifier(tiny_onnx_model, "cpu", store=lean, options=ClassifierOptions(mode="knn"))


def test_forget_rename_and_persistence(tiny_onnx_model, tiny_cosine_model, runtime_images, tmp_path):
    clf = _enrolled(tiny_onnx_model, runtime_images)
    clf.forget("class3")
    clf.rename("class2", "two")
    assert clf.labels == ["class0", "class1", "two"]
    _, queries, _ = _split(runtime_images)
    before = clf.predict(queries, top_k=2)
    path = clf.save(tmp_path / "device.store")
    fresh = FewShotClassifier(tiny_onnx_model, "cpu").load(path)
    assert fresh.counts == clf.counts and fresh.predict(queries, top_k=2) == before
    with pytest.raises(
        ModelMismatchError,
        match="made with model fp-tiny-0001, this model is fp-tiny-cos; re-enrol or load the matching model",
    ):
        FewShotClassifier(tiny_cosine_model, "cpu").load(path)
    with pytest.raises(ModelMismatchError, match="made with model fp-tiny-0001, this model is fp-tiny-cos"):
        FewShotClassifier(tiny_cosine_model, "cpu", store=clf.store)


def test_a_store_made_by_hand_is_taken_as_this_models(tiny_onnx_model, tiny_cosine_model, runtime_images, tmp_path):
    hand = PrototypeStore(16)  # records no model: accepted, and from then on records this one
    clf = FewShotClassifier(tiny_onnx_model, "cpu", store=hand)
    assert hand.fingerprint == clf.fingerprint == "fp-tiny-0001"
    clf.enroll("class0", runtime_images["class0"])
    fresh = FewShotClassifier(tiny_onnx_model, "cpu").load(
        clf.save(tmp_path / "s.store")
    )  # it saves and loads like any other
    assert fresh.counts == {"class0": 6}
    PrototypeStore(16).save(tmp_path / "hand.store")  # a file without a fingerprint loads as the memory one does
    assert FewShotClassifier(tiny_onnx_model, "cpu").load(tmp_path / "hand.store").store.fingerprint == "fp-tiny-0001"
    with pytest.raises(
        ModelMismatchError, match="store holds 16-D sqeuclidean prototypes, this model gives 16-D cosine"
    ):
        FewShotClassifier(tiny_cosine_model, "cpu", store=PrototypeStore(16))  # the rest is still checked


def test_editing_adds_to_the_file(tiny_onnx_model, runtime_images, tmp_path):
    path = tmp_path / "s.store"
    with FewShotClassifier(tiny_onnx_model, "cpu").editing(path) as clf:
        clf.enroll("class0", runtime_images["class0"])
    with FewShotClassifier(tiny_onnx_model, "cpu").editing(path) as clf:
        clf.enroll("class1", runtime_images["class1"])
    assert PrototypeStore.load(path).counts == {"class0": 6, "class1": 6}


def test_enroll_folder(tiny_onnx_model, runtime_image_folder, tmp_path):
    clf = FewShotClassifier(tiny_onnx_model, "cpu")
    progress = []
    added = clf.enroll_folder(runtime_image_folder, on_progress=progress.append)
    assert added == {f"class{k}": 6 for k in range(4)} and sum(progress) == 24
    assert clf.predict(runtime_image_folder / "class3" / "5.png")[0].label == "class3"
    (runtime_image_folder / "empty").mkdir()
    with pytest.raises(InputError, match="class folder.s. without images in .*: empty"):
        clf.enroll_folder(runtime_image_folder)
    with pytest.raises(InputError, match="has no class subfolders"):
        clf.enroll_folder(tmp_path / "images" / "class0")
    assert clf.counts["class0"] == 6  # the failed calls changed nothing
    (runtime_image_folder / "empty").rmdir()
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    (runtime_image_folder / "class0").rename(runtime_image_folder / decomposed)  # as macOS writes folder names
    assert FewShotClassifier(tiny_onnx_model, "cpu").enroll_folder(runtime_image_folder)[composed] == 6
    (runtime_image_folder / "class1").rename(runtime_image_folder / composed)
    with pytest.raises(
        InputError,
        match=f"folders .* name the same class '{composed}' .one written decomposed.; merge the two folders into one",
    ):
        clf.enroll_folder(runtime_image_folder)
    assert clf.counts == {f"class{k}": 6 for k in range(4)}  # refused before anything was embedded


def test_predictions_never_see_a_half_updated_store(tiny_onnx_model):
    images = runtime_class_images(14, 2, seed=5)
    clf = FewShotClassifier(tiny_onnx_model, "cpu", options=ClassifierOptions(batch_size=4))
    query = images["class0"][0]
    e = _embed(clf, [query])[0]
    expected = {lab: float(((e - _embed(clf, imgs).mean(0)) ** 2).sum()) for lab, imgs in images.items()}
    expected.update({f"renamed{lab}": d for lab, d in expected.items()})
    clf.enroll("class0", images["class0"])
    done, problems, checked = threading.Event(), [], [0]

    def predictor() -> None:
        while not done.is_set():
            try:
                for cand in clf.predict([query, query], top_k=20)[0].top_k:
                    if abs(cand.distance - expected[cand.label]) > 1e-4:
                        problems.append((cand.label, cand.distance, expected[cand.label]))
            except Exception as e:  # noqa: BLE001 - a thread's exception must fail the test
                problems.append(repr(e))
            checked[0] += 1

    def enroller() -> None:
        try:
            for k in range(1, 14):
                clf.enroll(f"class{k}", images[f"class{k}"])
                if k % 3 == 0:
                    clf.forget(f"class{k - 2}")  # shifts the rows of every later class
                if k % 6 == 5:
                    clf.rename(f"class{k}", f"renamedclass{k}")
            passes = 0
            while passes < 3 or (checked[0] < 40 and passes < 50):  # until the predictors ran a while
                passes += 1
                for label in clf.labels:  # move every class to the end: rows shift, prototypes stay put
                    clf.forget(label)
                    clf.enroll(label, images[label.replace("renamed", "")])
        finally:
            done.set()

    threads = [
        threading.Thread(target=predictor),
        threading.Thread(target=predictor),
        threading.Thread(target=enroller),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert problems == [] and checked[0] > 0
    assert len(clf.labels) == 14 - 4 and "renamedclass11" in clf.labels


def test_editing_that_raises_keeps_neither_the_file_nor_the_memory_changed(
    tiny_onnx_model, runtime_images, tmp_path, monkeypatch
):
    path = tmp_path / "s.store"
    clf = FewShotClassifier(tiny_onnx_model, "cpu")
    clf.enroll("mine", runtime_images["class3"])
    with clf.editing(path):
        clf.enroll("class0", runtime_images["class0"])
    with pytest.raises(RuntimeError, match="stop"), clf.editing(path):
        clf.enroll("class1", runtime_images["class1"])
        raise RuntimeError("stop")
    assert PrototypeStore.load(path).labels == ["class0"]
    assert clf.labels == ["class0"]  # the store of before the failed block (the file's, after the first block)
    clf.save(path)
    assert PrototypeStore.load(path).labels == ["class0"]  # a later save writes no half-done edit
    # a block that succeeds but whose save fails (a full disk): the same
    from edgemeta.runtime import StoreWriteError

    def full(self, path):
        raise StoreWriteError("no space left on device")

    monkeypatch.setattr(PrototypeStore, "save", full)
    fresh = FewShotClassifier(tiny_onnx_model, "cpu")
    with pytest.raises(StoreWriteError, match="no space"), fresh.editing(tmp_path / "new.store"):
        fresh.enroll("class2", runtime_images["class2"])
    assert fresh.labels == [] and not (tmp_path / "new.store").exists()


def test_knn_logits_match_the_per_class_definition(tiny_onnx_model):
    """Vectorized k-NN: each class's logit is the mean of its k best examples' logits, for classes
    with fewer, as many and more examples than k."""
    from edgemeta.runtime.store import StoreSnapshot

    rng = np.random.default_rng(0)
    counts = (1, 3, 5, 2, 7, 1, 3)
    logits = rng.standard_normal((4, sum(counts)))
    logits[:, 5] = logits[:, 6]  # ties inside a class (the third, examples 4-8)
    logits[:, 19] = logits[:, 20] = logits[:, 21]  # a class of three equal examples
    snap = StoreSnapshot(tuple(f"c{i}" for i in range(len(counts))), counts, np.zeros((len(counts), 16), np.float32))
    for k in (1, 2, 3, 10):
        clf = FewShotClassifier(tiny_onnx_model, "cpu", options=ClassifierOptions(mode="knn", knn_k=k))
        want, start = np.empty((4, len(counts))), 0
        for c, n in enumerate(counts):
            want[:, c] = np.sort(logits[:, start : start + n], axis=1)[:, ::-1][:, :k].mean(axis=1)
            start += n
        assert np.allclose(clf._knn_logits(logits, snap), want, rtol=0, atol=1e-12), k


def test_top1_does_not_depend_on_top_k_when_classes_tie(tiny_onnx_model, runtime_images):
    clf = FewShotClassifier(tiny_onnx_model, "cpu")
    for label in ("first", "second", "third"):
        clf.enroll(label, runtime_images["class0"][:3])  # the same images: exactly equal logits
    clf.enroll("other", runtime_images["class1"][:3])
    q = runtime_images["class0"][4]
    assert {k: clf.predict(q, top_k=k)[0].label for k in (1, 2, 3, 4)} == {k: "first" for k in (1, 2, 3, 4)}
    assert [c.label for c in clf.predict(q, top_k=3)[0].top_k] == ["first", "second", "third"]
    # and on random rows with ties: the order of a stable sort of every class, cut at k
    from edgemeta.runtime.classifier import _top_k

    rng = np.random.default_rng(1)
    logits = rng.integers(0, 4, (50, 12)).astype(np.float32)
    for k in (2, 3, 5, 11):
        assert (_top_k(logits, k) == np.argsort(-logits, axis=1, kind="stable")[:, :k]).all(), k


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(mode="knn", knn_k=2.5), "knn_k must be an integer >= 1, got 2.5"),
        (dict(mode="knn", knn_k="3"), "knn_k must be an integer >= 1, got '3'"),
        (dict(knn_k=True), "knn_k must be an integer >= 1, got True"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(threshold="1"), "threshold must be a finite distance >= 0 or None, got '1'"),
        (dict(threshold=float("nan")), "threshold must be a finite distance >= 0 or None, got nan"),
    ],
)
def test_bad_options_are_refused_when_made(options, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClassifierOptions(**options)


def test_threshold_setter_refuses_what_is_not_a_distance(tiny_onnx_model):
    clf = FewShotClassifier(tiny_onnx_model, "cpu")
    with pytest.raises(InputError, match="threshold must be a finite distance >= 0 or None, got '1'"):
        clf.threshold = "1"
    clf.threshold = np.float32(2.5)
    assert clf.threshold == 2.5


def test_a_label_that_cannot_be_written_is_refused_before_embedding(
    tiny_onnx_model, runtime_images, tmp_path, monkeypatch
):
    clf = FewShotClassifier(tiny_onnx_model, "cpu")
    with pytest.raises(InputError, match=r"cannot be written as UTF-8 \(a lone surrogate"):
        clf.enroll("caf\udce9", runtime_images["class0"])
    from PIL import Image

    root = tmp_path / "folders"
    for name in (b"good", b"caf\xe9"):  # a folder name in Latin-1: Python reads it with a lone surrogate
        folder = os.path.join(os.fsencode(root), name)
        os.makedirs(folder)
        Image.fromarray(runtime_images["class0"][0]).save(os.path.join(os.fsdecode(folder), "0.png"))
    monkeypatch.setattr(clf, "embed", lambda *a, **k: pytest.fail("embedded before refusing the label"))
    with pytest.raises(InputError, match="cannot be written as UTF-8"):
        clf.enroll_folder(root)
    assert clf.labels == []
