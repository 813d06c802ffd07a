"""The metric head whose prototype norms can be fed (issue: `edgemeta benchmark`, 10,000 classes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgemeta.data import omniglot_spec
from edgemeta.exporters import ExportSpec, export
from edgemeta.exporters.head import has_fed_norms
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.ort import SessionOptions
from edgemeta.runtime.session import Session
from edgemeta.runtime.spec import INPUT_SQNORMS, Metric, ModelMetadata, Normalization


def quiet_session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(
    scope="module",
    params=[(Metric.SQEUCLIDEAN, Normalization.NONE), (Metric.COSINE, Normalization.L2)],
    ids=["sqeuclidean", "cosine"],
)
def exported(request, tmp_path_factory):
    """(torch model, graph with the head, graph as torch exported it)."""
    metric, norm = request.param
    torch.manual_seed(0)
    model = FewShotModel(ModelSpec("conv4", omniglot_spec(28), {"channels": 8}, metric, norm)).eval()
    with torch.no_grad():
        if hasattr(model, "log_scale"):
            model.log_scale.fill_(np.log(7.0))  # not the default, so a wrong scale shows
    folder = tmp_path_factory.mktemp("head")
    meta = ModelMetadata(omniglot_spec(28), model.embedding_dim, metric, norm, "head-test")
    fast = export(model, folder / "fast.onnx", meta).path
    plain = export(model, folder / "plain.onnx", meta, ExportSpec(fed_norms=False)).path
    return model, fast, plain


def inputs(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four images and ``n`` prototypes."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((4, 1, 28, 28)).astype(np.float32), rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("n", [0, 1, 9])
def test_head_gives_torchs_logits_with_and_without_norms(exported, n):
    model, fast, plain = exported
    x, p = inputs(n, model.embedding_dim)
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(p))[1].numpy()
    feeds = {"images": x, "prototypes": p}
    got_plain = quiet_session(plain).run(["logits"], feeds)[0]
    got_computed = quiet_session(fast).run(["logits"], feeds)[0]
    got_fed = quiet_session(fast).run(["logits"], {**feeds, INPUT_SQNORMS: np.square(p).sum(axis=1)})[0]
    tol = 1e-4 * max(1.0, float(np.abs(want).max(initial=0)))
    for got in (got_plain, got_computed, got_fed):
        assert got.shape == (4, n)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)


def test_fed_norms_are_used_and_a_wrong_length_is_ignored(exported):
    model, fast, _ = exported
    sess = quiet_session(fast)
    x, p = inputs(5, model.embedding_dim, seed=2)
    norms = np.square(p).sum(axis=1)
    right = sess.run(["logits"], {"images": x, "prototypes": p, INPUT_SQNORMS: norms})[0]
    wrong = sess.run(["logits"], {"images": x, "prototypes": p, INPUT_SQNORMS: norms * 4.0})[0]
    assert not np.allclose(wrong, right, rtol=1e-3)  # the graph reads the fed norms
    other_length = sess.run(["logits"], {"images": x, "prototypes": p, INPUT_SQNORMS: np.ones(6, np.float32)})[0]
    np.testing.assert_allclose(other_length, right, rtol=1e-5, atol=1e-4)  # not n_classes long: computed


@pytest.mark.parametrize("io_binding", [False, True])
def test_non_finite_prototypes_are_refused_with_the_norms_the_runtime_feeds(exported, io_binding):
    model, fast, _ = exported
    s = Session(fast, "cpu", options=SessionOptions(io_binding=io_binding))
    assert s.feeds_norms
    x, p = inputs(1, model.embedding_dim)
    for value in (np.nan, np.inf, -np.inf):
        bad = p.copy()
        bad[0, 3] = value
        bad.flags.writeable = False  # as a store keeps them: checked once, with the norms fed
        with pytest.raises(
            InputError, match=r"prototype 0 contains NaN or infinite values \(or values beyond float32's range\)"
        ):
            s.run(x, bad)
    assert s.prototype_uploads == 0  # refused before anything went to the device
    big = np.full((1, model.embedding_dim), 1e39)  # finite in float64, infinite as the float32 the graph takes
    big.flags.writeable = False
    with pytest.raises(InputError, match="prototype 0 contains NaN or infinite values"):
        s.run(x, big)
    p.flags.writeable = False
    assert np.isfinite(s.run(x, p)[1]).all()


def test_contract_inputs_stay_images_and_prototypes(exported):
    _, fast, plain = exported
    sess = quiet_session(fast)
    assert [i.name for i in sess.get_inputs()] == ["images", "prototypes"]
    assert [i.name for i in sess.get_overridable_initializers()] == [INPUT_SQNORMS]
    assert has_fed_norms(onnx.load(str(fast))) and not has_fed_norms(onnx.load(str(plain)))
    assert Session(fast, "cpu").metadata.extra["fed_norms"] is True
    assert Session(plain, "cpu").metadata.extra["fed_norms"] is False


def test_module_with_its_own_logits_keeps_the_exported_graph(tmp_path):
    class DotProduct(nn.Module):
        def forward(self, images, prototypes):
            z = torch.flatten(nn.functional.avg_pool2d(images, 7), 1)
            return z, z @ prototypes.t()

    path = export(
        DotProduct(),
        tmp_path / "dot.onnx",
        ModelMetadata(omniglot_spec(28), 16, Metric.SQEUCLIDEAN, Normalization.NONE, "d"),
    ).path
    assert not has_fed_norms(onnx.load(str(path)))
    extra = Session(path, "cpu").metadata.extra
    assert extra["fed_norms"] is False and "not edgemeta's sqeuclidean metric" in extra["fed_norms_reason"]


class Recorder:
    """Wraps an InferenceSession and keeps the names of every feed."""

    def __init__(self, sess) -> None:
        self.sess, self.feeds = sess, []

    def run(self, names, feed):
        self.feeds.append(sorted(feed))
        return self.sess.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.sess, name)


def test_runtime_feeds_norms_of_read_only_prototypes_once(exported, monkeypatch):
    model, fast, plain = exported
    s = Session(fast, "cpu", options=SessionOptions(io_binding=False))
    ref = Session(plain, "cpu", options=SessionOptions(io_binding=False))
    assert s.feeds_norms and not ref.feeds_norms
    rec = s._sess = Recorder(s._sess)
    x, p = inputs(6, model.embedding_dim, seed=3)
    writable = p.copy()
    p.flags.writeable = False
    calls = []
    real = np.einsum
    monkeypatch.setattr(np, "einsum", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    first, second, mutable = s.run(x, p)[1], s.run(x, p)[1], s.run(x, writable)[1]
    assert len(calls) == 1  # once per read-only array
    assert rec.feeds == [["images", INPUT_SQNORMS, "prototypes"]] * 2 + [["images", "prototypes"]]
    want = ref.run(x, p)[1]
    for got in (first, second, mutable):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    s.embed(x)
    assert rec.feeds[-1] == ["images", "prototypes"]  # embedding only: nothing to norm


def test_io_binding_binds_the_norms_once_per_prototypes(exported):
    """The GPU path (IO binding), run on the CPU: norms bound with the prototypes, uploaded once."""
    model, fast, plain = exported
    s = Session(fast, "cpu", options=SessionOptions(io_binding=True))
    ref = Session(plain, "cpu", options=SessionOptions(io_binding=False))
    x, p = inputs(7, model.embedding_dim, seed=4)
    p.flags.writeable = False
    first = s.run(x, p)[1]
    value = s._norms_cache[2]
    second = s.run(x, p)[1]
    assert value is not None and s._norms_cache[2] is value and s.prototype_uploads == 1
    want = ref.run(x, p)[1]
    for got in (first, second):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_read_only_view_of_writable_memory_is_not_cached(exported):
    """A read-only view can still change through its base: its norms are never reused."""
    from edgemeta.runtime.store import PrototypeStore

    model, fast, plain = exported
    s, ref = Session(fast, "cpu"), Session(plain, "cpu")
    x, base = inputs(5, model.embedding_dim, seed=5)
    view = base[:]
    view.flags.writeable = False
    s.run(x, view)
    base *= 3.0
    got, want = s.run(x, view)[1], ref.run(x, base)[1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    store = PrototypeStore(model.embedding_dim, metric=model.spec.metric, keep_embeddings=True)
    store.add("a", base[:2])
    store.add("b", base[2:])
    snap = store.snapshot(examples=True)
    assert (
        s._norms(snap.prototypes) is not None and s._norms(snap.examples) is not None
    )  # the store's arrays are frozen


def test_bound_norms_are_the_ones_the_graph_reads(exported):
    model, fast, _ = exported
    s = Session(fast, "cpu", options=SessionOptions(io_binding=True))
    x, p = inputs(6, model.embedding_dim, seed=6)
    p.flags.writeable = False
    right = s.run(x, p)[1]
    protos, norms, _ = s._norms_cache
    s._norms_cache = (protos, norms, ort.OrtValue.ortvalue_from_numpy(norms * 4.0))  # what IO binding will bind
    assert not np.allclose(s.run(x, p)[1], right, rtol=1e-3)


def test_a_graph_the_head_cannot_take_keeps_the_traced_one(tmp_path):
    class Float64(nn.Module):
        def forward(self, images, prototypes):
            z = torch.flatten(nn.functional.avg_pool2d(images, 7), 1).double()
            d = (z * z).sum(1, keepdim=True) - 2 * z @ prototypes.double().t() + (prototypes.double() ** 2).sum(1)
            return z, -d.clamp_min(0)

    path = export(
        Float64(),
        tmp_path / "f64.onnx",
        ModelMetadata(omniglot_spec(28), 16, Metric.SQEUCLIDEAN, Normalization.NONE, "f"),
    ).path
    extra = Session(path, "cpu").metadata.extra
    assert not has_fed_norms(onnx.load(str(path))) and extra["fed_norms"] is False
    assert "does not run on this graph" in extra["fed_norms_reason"]


def test_backbone_with_a_subgraph_keeps_what_the_subgraph_reads():
    """An If in the backbone reads a tensor and a weight from the outer scope: both stay."""
    from onnx import TensorProto, helper, numpy_helper

    from edgemeta.exporters.head import with_fed_norms

    w = numpy_helper.from_array(np.full((4, 3), 0.5, np.float32), "W")
    flag = numpy_helper.from_array(np.array(True), "flag")
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("MatMul", ["flat", "W"], [f"{name}_out"])],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"]),
        helper.make_node("If", ["flag"], ["embeddings"], then_branch=branch("a"), else_branch=branch("b")),
        helper.make_node("MatMul", ["embeddings", "Pt"], ["logits"]),
        helper.make_node("Transpose", ["prototypes"], ["Pt"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 1, 2, 2]),
            helper.make_tensor_value_info("prototypes", TensorProto.FLOAT, ["n", 3]),
        ],
        [
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["b", 3]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "n"]),
        ],
        [w, flag],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    new = with_fed_norms(model, "sqeuclidean")
    onnx.checker.check_model(new, full_check=True)
    sess = quiet_session_bytes(new.SerializeToString())
    x, p = np.ones((2, 1, 2, 2), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    emb, logits = sess.run(None, {"images": x, "prototypes": p})
    np.testing.assert_allclose(logits, -np.square(emb[:, None] - p[None]).sum(-1), rtol=1e-5)


def quiet_session_bytes(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
