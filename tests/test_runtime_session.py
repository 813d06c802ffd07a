"""Session: providers, metadata, the I/O contract, IO binding, chunking."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import cuda_runs, fixed_batch_copy

from edgemeta.runtime import (
    InputError,
    Metric,
    ModelMismatchError,
    Normalization,
    PreprocessSpec,
    ProviderError,
    ProviderFallbackWarning,
    Session,
    SessionOptions,
)
from edgemeta.runtime.ort import resolve_providers

CPU = "CPUExecutionProvider"
GPU_BUILD = bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))
SPEC = PreprocessSpec.create(16, 1, mean=0.5, std=0.25)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 16, 16)).astype(np.float32)


def test_reads_metadata_and_runs_the_contract(tiny_onnx_model):
    s = Session(tiny_onnx_model, "cpu")
    assert s.providers == [CPU] and s.fallbacks == []
    assert (s.embedding_dim, s.metric, s.fingerprint) == (16, Metric.SQEUCLIDEAN, "fp-tiny-0001")
    assert s.preprocess == SPEC
    x = _batch(3)
    emb = s.embed(x)
    assert emb.shape == (3, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    protos = emb[:2] * 0.5
    emb2, logits = s.run(x, protos)
    np.testing.assert_allclose(emb2, emb, atol=1e-6)
    expected = -((emb[:, None, :] - protos[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_allclose(s.distances(logits), -expected, atol=1e-5)


def test_zero_prototypes_give_empty_logits(tiny_onnx_model):
    _, logits = Session(tiny_onnx_model).run(_batch(2), np.zeros((0, 16), np.float32))
    assert logits.shape == (2, 0)


def test_cosine_scale_is_measured_or_read(make_onnx_model, tiny_cosine_model):
    s = Session(tiny_cosine_model, "cpu")
    assert s.metric is Metric.COSINE and s.logit_scale == pytest.approx(10.0, rel=1e-4)
    x = _batch(2)
    emb, logits = s.run(x, np.ascontiguousarray(emb0 := s.embed(x)))
    np.testing.assert_allclose(np.diag(s.distances(logits)), 0.0, atol=1e-5)
    cos = (emb0 @ emb0.T) / np.outer(np.linalg.norm(emb0, axis=1), np.linalg.norm(emb0, axis=1))
    np.testing.assert_allclose(s.distances(logits), 1 - cos, atol=1e-5)
    declared = make_onnx_model(metric="cosine", extra={"logit_scale": 5.0})
    assert Session(declared).logit_scale == 5.0  # metadata wins over the probe


@pytest.mark.parametrize("metric, scale", [("sqeuclidean", 1.0), ("cosine", 7.0)])
def test_model_without_metadata_needs_a_spec_and_infers_the_rest(make_onnx_model, metric, scale):
    path = make_onnx_model(metric=metric, scale=scale, metadata=False)
    with pytest.raises(
        InputError,
        match=r"carries no edgemeta metadata, so its preprocessing is unknown; re-export the model with "
        r"`edgemeta export` \(from Python: pass preprocess=PreprocessSpec\(\.\.\.\)\)",
    ):
        Session(path)
    s = Session(path, preprocess=SPEC)
    assert s.metric is Metric(metric) and s.embedding_dim == 16
    assert s.metadata.normalization is Normalization.L2
    assert s.fingerprint.startswith("sha256:") and len(s.fingerprint) == 7 + 16
    assert s.logit_scale == pytest.approx(scale, rel=1e-4)


@pytest.mark.parametrize(
    "drop, missing",
    [
        (("prototypes",), "missing input 'prototypes', output 'logits'"),
        (("embeddings",), "missing output 'embeddings'"),
        (("logits",), "missing output 'logits'"),
    ],
)
def test_broken_contract_names_what_is_missing(make_onnx_model, drop, missing):
    with pytest.raises(InputError, match="is not an edgemeta model") as err:
        Session(make_onnx_model(drop=drop))
    assert missing in str(err.value) and "edgemeta export" in str(err.value)


def test_preprocess_that_does_not_fit_the_model_is_refused(tiny_onnx_model):
    with pytest.raises(
        InputError, match=r"model input is \['batch', 1, 16, 16\] but the preprocessing gives \[batch, 3, 32, 32\]"
    ):
        Session(tiny_onnx_model, preprocess=PreprocessSpec.create(32, 3))


def test_bad_model_files(tmp_path):
    with pytest.raises(InputError, match="model file not found"):
        Session(tmp_path / "none.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(InputError, match=r"dir.onnx is a folder, not a model file; pass the .onnx \(or .ort\) file"):
        Session(tmp_path / "dir.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(InputError, match="not an ONNX model ONNX Runtime can load"):
        Session(junk, "auto")


def test_bad_metadata_is_a_model_mismatch(tmp_path, tiny_onnx_model):
    import onnx

    m = onnx.load(str(tiny_onnx_model))
    m.metadata_props[0].value = m.metadata_props[0].value.replace('"version": 1', '"version": 99')
    path = tmp_path / "new.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ModelMismatchError, match=r"new.onnx: .*version 99 is newer"):  # the message names the file
        Session(path)
    m.metadata_props[0].value = "{not json"
    onnx.save(m, str(path))
    with pytest.raises(ModelMismatchError, match=r"new.onnx: model metadata is not valid JSON"):
        Session(path)


@pytest.mark.parametrize(
    "arg, names",
    [
        ("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]),
        ("cpu", [CPU]),
        ("CUDA", ["CUDAExecutionProvider"]),
        ("trt,cpu", ["TensorrtExecutionProvider", CPU]),
        (["tensorrt", "cuda", "cpu", "cpu"], ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]),
        ("OpenVINOExecutionProvider", ["OpenVINOExecutionProvider"]),
    ],
)
def test_provider_names(arg, names):
    assert resolve_providers(arg)[0] == names


@pytest.mark.parametrize(
    "bad, msg", [("gpu0", "unknown provider 'gpu0'"), ([], "empty provider list"), ([3], "is not a provider name")]
)
def test_bad_provider_names(bad, msg):
    with pytest.raises(InputError, match=msg):
        resolve_providers(bad)


@pytest.mark.skipif(GPU_BUILD, reason="this onnxruntime is a GPU build")
def test_auto_on_a_cpu_build_runs_cpu_without_warning(tiny_onnx_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)
        s = Session(tiny_onnx_model, "auto")
    assert s.providers == [CPU] and s.fallbacks == [] and not s.on_gpu and not s.io_binding


@pytest.mark.skipif(GPU_BUILD, reason="this onnxruntime is a GPU build")
def test_explicit_provider_that_is_missing_raises_unless_fallback_allowed(tiny_onnx_model):
    with pytest.raises(
        ProviderError, match=r"CUDAExecutionProvider asked for but not in this onnxruntime build.*allow_fallback=True"
    ):
        Session(tiny_onnx_model, "cuda")
    with pytest.warns(ProviderFallbackWarning, match="CUDAExecutionProvider not used"):
        s = Session(tiny_onnx_model, "cuda", allow_fallback=True)
    assert s.providers == [CPU]
    assert len(s.fallbacks) == 1 and s.fallbacks[0].startswith("CUDAExecutionProvider: not in this onnxruntime build")


@pytest.mark.skipif(GPU_BUILD, reason="this onnxruntime is a GPU build")
def test_provider_listed_but_not_loading_is_detected(tiny_onnx_model, monkeypatch):
    # A CPU build told that CUDA exists: ONNX Runtime drops it when creating the session,
    # which is what a GPU build does when the CUDA libraries are missing.
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    warnings.simplefilter("ignore", UserWarning)  # ONNX Runtime's own notice
    with pytest.raises(ProviderError, match=r"could not load it \(the session runs CPUExecutionProvider\)"):
        Session(tiny_onnx_model, "cuda")
    with pytest.warns(ProviderFallbackWarning):
        s = Session(tiny_onnx_model, "auto")
    assert s.providers == [CPU] and "CUDAExecutionProvider: ONNX Runtime could not load it" in s.fallbacks[0]


def test_session_creation_failure_on_a_provider_falls_back_when_allowed(tiny_onnx_model, monkeypatch):
    real_open = Session._open

    def flaky(self, providers):
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("CUDA driver version is insufficient")
        return real_open(self, providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    monkeypatch.setattr(Session, "_open", flaky)
    with pytest.raises(ProviderError, match="session creation failed .CUDA driver version is insufficient"):
        Session(tiny_onnx_model, "cuda")
    with pytest.warns(ProviderFallbackWarning, match="CUDA driver version"):
        s = Session(tiny_onnx_model, ["cuda", "cpu"], allow_fallback=True)
    assert s.providers == [CPU] and s.fallbacks[0].startswith("CUDAExecutionProvider: session creation failed")


def test_options_reach_onnxruntime(tiny_onnx_model):
    s = Session(tiny_onnx_model, options=SessionOptions(intra_op_threads=1, graph_optimization="basic"))
    so = s._sess.get_session_options()
    assert so.intra_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set: ONNX Runtime's default kept
        so.get_session_config_entry("session.intra_op.allow_spinning")


@pytest.mark.parametrize("spin, entry", [(False, "0"), (True, "1")])
def test_spinning_reaches_onnxruntime(tiny_onnx_model, spin, entry):
    s = Session(tiny_onnx_model, options=SessionOptions(intra_op_threads=2, allow_spinning=spin))
    assert s._sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == entry
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(s.embed(x), Session(tiny_onnx_model).embed(x), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"intra_op_threads": -1}, "thread counts must be >= 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        (
            {"graph_optimization": "max"},
            "unknown graph_optimization 'max'; choose one of: disable, basic, extended, all",
        ),
        ({"allow_spinning": "no"}, "allow_spinning must be True, False or None"),
        ({"execution_mode": "fast"}, "unknown execution_mode 'fast'; choose one of: sequential, parallel"),
    ],
)
def test_bad_session_options(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        SessionOptions(**kwargs)


def test_the_benchmark_settings_reach_the_runtime_sessions(tiny_onnx_model):
    options = SessionOptions(intra_op_threads=2, execution_mode="parallel", memory_arena=False, pin_threads=True)
    so = Session(tiny_onnx_model, options=options)._sess.get_session_options()
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL and not so.enable_cpu_mem_arena
    assert len(so.get_session_config_entry("session.intra_op_thread_affinities").split(";")) == 1  # the second thread
    default = SessionOptions().to_ort()
    assert default.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL and default.enable_cpu_mem_arena
    assert default.intra_op_num_threads == 0 and default.inter_op_num_threads == 0


@pytest.mark.parametrize(
    "name, full", [("cpu", CPU), ("TRT", "TensorrtExecutionProvider"), ("MyExecutionProvider", "MyExecutionProvider")]
)
def test_provider_name_and_display_name(name, full):
    from edgemeta.runtime.ort import display_name, provider_name

    assert provider_name(name) == full
    assert display_name(full) == {"cpu": "CPU", "TRT": "TensorRT"}.get(name, full)


def test_io_binding_keeps_readonly_prototypes_on_the_device(tiny_onnx_model):
    plain = Session(tiny_onnx_model, "cpu")
    bound = Session(tiny_onnx_model, "cpu", options=SessionOptions(io_binding=True))
    assert bound.io_binding and not plain.io_binding
    x = _batch(3)
    protos = plain.embed(_batch(4, seed=1))
    protos.flags.writeable = False
    for _ in range(3):
        e, lg = bound.run(x, protos)
        bound.embed(x)  # embedding alone neither uploads nor evicts the cached prototypes
    assert bound.prototype_uploads == 1
    e0, lg0 = plain.run(x, protos)
    np.testing.assert_allclose(lg, lg0, atol=1e-6)
    np.testing.assert_allclose(e, e0, atol=1e-6)
    writable = protos.copy()  # may change between calls: uploaded every time
    bound.run(x, writable)
    bound.run(x, writable)
    assert bound.prototype_uploads == 3
    assert bound.embed(x).shape == (3, 16)


class _CountingSession:
    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def run(self, names, feeds):
        self.batches.append(len(feeds["images"]))
        return self.inner.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_large_batches_are_chunked(tiny_onnx_model):
    s = Session(tiny_onnx_model, "cpu", options=SessionOptions(batch_size=2))
    x = _batch(5)
    ref_emb, ref_logits = Session(tiny_onnx_model, "cpu").run(x, np.eye(16, dtype=np.float32)[:3])
    s._sess = _CountingSession(s._sess)
    emb, logits = s.run(x, np.eye(16, dtype=np.float32)[:3])
    assert s._sess.batches == [2, 2, 1]
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6)


@pytest.mark.parametrize(
    "images, protos, msg",
    [
        (
            np.zeros((2, 3, 16, 16), np.float32),
            None,
            r"images of shape \(2, 3, 16, 16\) do not fit the model input \[batch>=1, 1, 16, 16\]",
        ),
        (np.zeros((0, 1, 16, 16), np.float32), None, "do not fit the model input"),
        (np.zeros((1, 1, 16, 16), np.uint8), None, "images must be a float array"),
        (np.full((1, 1, 16, 16), np.nan, np.float32), None, "image 0 of the batch contains NaN or infinite"),
        (
            np.stack([np.zeros((1, 16, 16), np.float32)] * 2 + [np.full((1, 16, 16), np.inf, np.float32)]),
            None,
            "image 2 of the batch",
        ),
        (
            np.zeros((1, 1, 16, 16), np.float32),
            np.zeros((2, 8), np.float32),
            r"prototypes of shape \(2, 8\) do not fit \[n_classes, 16\]",
        ),
    ],
)
def test_bad_run_inputs(tiny_onnx_model, images, protos, msg):
    s = Session(tiny_onnx_model)
    with pytest.raises(InputError, match=msg):
        s.run(images, np.zeros((1, 16), np.float32) if protos is None else protos)


@pytest.mark.gpu
def test_cuda_session_with_io_binding(tiny_onnx_model):
    if not cuda_runs():
        pytest.skip("needs onnxruntime-gpu, CUDA libraries and an NVIDIA GPU")
    s = Session(tiny_onnx_model, "cuda")
    assert s.providers[0] == "CUDAExecutionProvider" and s.io_binding
    x = _batch(4)
    protos = s.embed(x)
    protos.flags.writeable = False
    _, lg = s.run(x, protos)
    s.embed(x)  # embedding alone keeps the prototypes on the device
    s.run(x, protos)
    assert s.prototype_uploads == 1
    np.testing.assert_allclose(np.diag(lg), 0.0, atol=1e-3)  # GPU convolutions may differ in the last bits
    _, lg_cpu = Session(tiny_onnx_model, "cpu").run(x, protos)
    np.testing.assert_allclose(lg, lg_cpu, atol=1e-2)


@pytest.mark.skipif(GPU_BUILD, reason="simulates a GPU build on a CPU build")
def test_gpu_provider_failing_to_load_keeps_stdout_clean(tiny_onnx_model, monkeypatch, capsys):
    # onnxruntime-gpu without TensorRT/CUDA libraries prints "EP Error ..." on stdout while it
    # falls back; stdout is where `--json` goes, so the session must swallow it and report it.
    real_session, real_available = ort.InferenceSession, ort.get_available_providers

    def noisy_session(path, sess_options=None, providers=None, **kwargs):
        if any(p != CPU for p in providers or []):
            print("*************** EP Error ***************")
            print("EP Error libnvinfer.so.10: cannot open shared object file when using ['TensorrtExecutionProvider']")
            print("Falling back to ['CPUExecutionProvider'] and retrying.")
        return real_session(path, sess_options=sess_options, providers=[CPU], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", noisy_session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", *real_available()])
    with pytest.warns(ProviderFallbackWarning, match="TensorrtExecutionProvider not used"):
        s = Session(tiny_onnx_model, "auto")
    assert capsys.readouterr().out == ""
    assert s.providers == [CPU] and "ONNX Runtime said: EP Error libnvinfer.so.10" in s.fallbacks[0]
    with pytest.raises(ProviderError, match="TensorrtExecutionProvider asked for but ONNX Runtime could not load it"):
        Session(tiny_onnx_model, "tensorrt")
    assert capsys.readouterr().out == ""


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_model_asking_for_the_nhwc_stem_hand_over_is_opened_without_the_transpose_optimizer(
    make_onnx_model, monkeypatch
):
    """An int8 model exported with stem_layout="nhwc" says so in its metadata; on the CPU provider
    of an x86-64 machine the session is opened again with ONNX Runtime's transpose optimizer off
    (what the NHWC round trip needs), on other machines once, as every other model."""
    from edgemeta.runtime import ort as session_module

    hinted = make_onnx_model(extra={"calibration": {"stem_layout": "nhwc"}})
    plain = make_onnx_model(extra={"calibration": {"stem_layout": "nchw"}})
    opened = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        opened.append(tuple(kwargs.get("disabled_optimizers", ())))
        return real(*args, **kwargs)

    monkeypatch.setattr(session_module.ort, "InferenceSession", counting)
    for machine in ("x86_64", "aarch64"):
        monkeypatch.setattr(session_module.platform, "machine", lambda m=machine: m)
        for model, wanted in ((hinted, machine == "x86_64"), (plain, False)):
            opened.clear()
            s = Session(model, "cpu")
            base = session_module.DISABLED_OPTIMIZERS
            assert opened == ([base, (*base, *session_module.NHWC_STEM_DISABLED_OPTIMIZERS)] if wanted else [base])
            assert s.embed(np.ones((2, 1, 16, 16), np.float32)).shape == (2, 16)
    # x86-64 again: sessions where the hand-over would not pay, or would be written into a file, open once
    monkeypatch.setattr(session_module.platform, "machine", lambda: "x86_64")
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    writing = ort.SessionOptions()
    writing.optimized_model_filepath = str(hinted.with_suffix(".written.onnx"))
    profiling = ort.SessionOptions()
    profiling.enable_profiling = True
    profiling.profile_file_prefix = str(hinted.with_suffix(".profile"))
    cases = [
        (basic, ["CPUExecutionProvider"]),
        (writing, ["CPUExecutionProvider"]),
        (profiling, ["CPUExecutionProvider"]),
        (ort.SessionOptions(), ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ]  # a GPU that fails would be tried twice
    for options, providers in cases:
        opened.clear()
        session_module.open_session(hinted, options, providers)
        assert opened == [session_module.DISABLED_OPTIMIZERS]
    opened.clear()
    session_module.open_session(hinted, ort.SessionOptions(), ["CPUExecutionProvider"])
    assert len(opened) == 2


def test_nhwc_stem_request_is_read_safely_from_metadata(make_onnx_model, monkeypatch):
    from edgemeta.runtime import ort as session_module

    monkeypatch.setattr(session_module.platform, "machine", lambda: "x86_64")

    class Stub:
        def __init__(self, custom):
            self.custom = custom

        def get_providers(self):
            return ["CPUExecutionProvider"]

        def get_modelmeta(self):
            return type("Meta", (), {"custom_metadata_map": self.custom})()

    assert session_module.wants_nhwc_stem(
        ort.InferenceSession(str(make_onnx_model(extra={"calibration": {"stem_layout": "nhwc"}})))
    )
    for custom in ({}, {"edgemeta": "{not json"}, {"edgemeta": '{"precision": "int8"}'}):
        assert not session_module.wants_nhwc_stem(Stub(custom))
    assert not session_module.wants_nhwc_stem(ort.InferenceSession(str(make_onnx_model(extra={"calibration": "nhwc"}))))
    assert not session_module.wants_nhwc_stem(ort.InferenceSession(str(make_onnx_model(metadata=False))))


def _edited(src: Path, dst: Path, edit) -> Path:
    import onnx

    m = onnx.load(str(src))
    edit(m)
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize("batch, io_binding", [(1, False), (4, False), (4, True)])
def test_a_model_with_a_fixed_batch_runs_any_number_of_images(
    tmp_path, tiny_onnx_model, monkeypatch, batch, io_binding
):
    import edgemeta.runtime.session as session_module

    options = SessionOptions(batch_size=3, io_binding=io_binding)
    fixed = Session(fixed_batch_copy(tiny_onnx_model, tmp_path / "fixed.onnx", batch), "cpu", options=options)
    free = Session(tiny_onnx_model, "cpu")
    assert fixed.fixed_batch == batch and free.fixed_batch is None
    x, protos = _batch(6), np.eye(16, dtype=np.float32)[:3]
    fixed._sess = _CountingSession(fixed._sess)
    bound = session_module.run_bound
    monkeypatch.setattr(
        session_module,
        "run_bound",
        lambda sess, images, *a: fixed._sess.batches.append(len(images)) or bound(sess.inner, images, *a),
    )
    emb, logits = fixed.run(x, protos)
    ref_emb, ref_logits = free.run(x, protos)
    assert fixed._sess.batches == [batch] * -(-6 // batch)  # every call exactly the graph's batch, the last one padded
    assert emb.shape == (6, 16) and logits.shape == (6, 3)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
    np.testing.assert_allclose(fixed.embed(x[:1]), ref_emb[:1], atol=1e-6)


@pytest.mark.gpu
def test_a_model_with_a_fixed_batch_runs_on_cuda_with_io_binding(tmp_path, tiny_onnx_model):
    if not cuda_runs():
        pytest.skip("needs onnxruntime-gpu, CUDA libraries and an NVIDIA GPU")
    fixed = Session(
        fixed_batch_copy(tiny_onnx_model, tmp_path / "fixed.onnx", 4), "cuda", options=SessionOptions(batch_size=3)
    )
    assert fixed.providers[0] == "CUDAExecutionProvider" and fixed.io_binding and fixed.fixed_batch == 4
    x = _batch(6)
    protos = np.eye(16, dtype=np.float32)[:3].copy()  # its own data: a view of a writeable array could change
    protos.flags.writeable = False  # as the store keeps them: bound on the GPU once
    emb, logits = fixed.run(x, protos)  # two calls of 4 images, the last one padded
    fixed.run(x[:1], protos)
    assert emb.shape == (6, 16) and logits.shape == (6, 3) and fixed.prototype_uploads == 1
    ref_emb, ref_logits = Session(tiny_onnx_model, "cpu").run(x, protos)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-3)  # GPU convolutions may differ in the last bits
    np.testing.assert_allclose(logits, ref_logits, atol=1e-2)
    np.testing.assert_allclose(fixed.embed(x[5:]), ref_emb[5:], atol=1e-3)


def test_metadata_that_disagrees_with_the_graph_is_refused(tmp_path, tiny_onnx_model):
    def wrong_dim(m):
        m.metadata_props[0].value = m.metadata_props[0].value.replace('"embedding_dim": 16', '"embedding_dim": 128')

    path = _edited(tiny_onnx_model, tmp_path / "dim.onnx", wrong_dim)
    assert '"embedding_dim": 128' in path.read_bytes().decode("latin-1")  # the edit took
    with pytest.raises(InputError, match="metadata says 128-d embeddings but the graph's are 16-d; re-export"):
        Session(path, "cpu")


def test_an_input_that_is_not_float_is_refused(tmp_path, tiny_onnx_model):
    from onnx import TensorProto, helper

    def int_images(m):
        m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
        for node in m.graph.node:
            node.input[:] = ["images_f" if i == "images" else i for i in node.input]
        m.graph.node.insert(0, helper.make_node("Cast", ["images"], ["images_f"], to=TensorProto.FLOAT))

    with pytest.raises(InputError, match=r"input 'images' is tensor\(int64\), expected float or float16; re-export"):
        Session(_edited(tiny_onnx_model, tmp_path / "int.onnx", int_images), "cpu")


@pytest.mark.parametrize("frozen", [False, True])
def test_prototypes_with_nan_or_infinity_are_named(tiny_onnx_model, frozen):
    s = Session(tiny_onnx_model, "cpu")
    x = _batch(3)
    protos = s.embed(x)
    for value in (np.nan, np.inf):
        bad = protos.copy()
        bad[2, 5] = value
        bad.flags.writeable = not frozen  # (this model takes no norms: both are checked as given)
        with pytest.raises(
            InputError,
            match=r"prototype 2 contains NaN or infinite values \(or values beyond float32's range\); "
            "build prototypes from finite embeddings",
        ):
            s.run(x, bad)
    many = np.tile(protos, (100, 1))  # past the values checked before the run: found through the logits
    many[250, 1] = np.nan
    many.flags.writeable = not frozen
    with pytest.raises(InputError, match="prototype 250 contains NaN"):
        s.run(x, many)
    with pytest.raises(InputError, match="prototype 0 contains NaN or infinite values"):
        s.run(x, np.full((1, 16), 1e39))  # finite in float64, infinite as the float32 the graph takes
    assert np.isfinite(s.run(x, protos)[1]).all()
    assert s.run(x, protos.astype(np.int64))[1].shape == (3, 3)  # integer prototypes are finite by type


def test_a_fixed_number_of_prototypes_is_refused(tmp_path, tiny_onnx_model):
    def fixed_classes(m):
        m.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 5

    with pytest.raises(InputError, match=r"takes a fixed number of prototypes \(5\), so classes cannot be enrolled"):
        Session(_edited(tiny_onnx_model, tmp_path / "five.onnx", fixed_classes), "cpu")


def test_an_output_that_is_not_a_float_type_is_refused(tmp_path, tiny_onnx_model):
    from onnx import TensorProto, helper

    def int_embeddings(m):
        for node in m.graph.node:
            node.output[:] = ["emb_f" if o == "embeddings" else o for o in node.output]
            node.input[:] = ["emb_f" if i == "embeddings" else i for i in node.input]
        m.graph.node.append(helper.make_node("Cast", ["emb_f"], ["embeddings"], to=TensorProto.INT32))
        m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT32

    with pytest.raises(
        InputError, match=r"output 'embeddings' is tensor\(int32\), expected float, float16 or double; re-export"
    ):
        Session(_edited(tiny_onnx_model, tmp_path / "int_out.onnx", int_embeddings), "cpu")


def test_float64_outputs_are_read_as_float32(tmp_path, tiny_onnx_model):
    from onnx import TensorProto, helper

    def double_outputs(m):
        for name in ("embeddings", "logits"):
            for node in m.graph.node:
                node.output[:] = [f"{name}_f" if o == name else o for o in node.output]
                node.input[:] = [f"{name}_f" if i == name else i for i in node.input]
            m.graph.node.append(helper.make_node("Cast", [f"{name}_f"], [name], to=TensorProto.DOUBLE))
        for out in m.graph.output:
            out.type.tensor_type.elem_type = TensorProto.DOUBLE

    s = Session(_edited(tiny_onnx_model, tmp_path / "f64.onnx", double_outputs), "cpu")
    emb, logits = s.run(_batch(3), np.eye(16, dtype=np.float32)[:2])
    ref_emb, ref_logits = Session(tiny_onnx_model, "cpu").run(_batch(3), np.eye(16, dtype=np.float32)[:2])
    assert emb.dtype == logits.dtype == np.float32
    np.testing.assert_allclose(emb, ref_emb, atol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)


def test_raw_pixels_passed_as_preprocessed_are_refused(tiny_onnx_model, make_onnx_model):
    """0-255 floats in the model's input shape look preprocessed and used to classify at chance, silently."""
    s = Session(tiny_onnx_model)
    raw = np.random.default_rng(0).integers(0, 256, (2, 1, 16, 16)).astype(np.float32)
    with pytest.raises(
        InputError,
        match=r"images average 1\d\d\.\d, far above what this model's preprocessing gives \(-2 to 2\): "
        r"0-255 pixels are not preprocessed",
    ):
        s.embed(raw)
    with pytest.raises(InputError, match="far above"):
        s.embed(raw.astype(np.float16))
    s.embed(raw / 255.0)  # unnormalized 0-1 values: taken as they are
    s.embed(raw.astype(np.float16) / 255)
    bad = raw / 255.0
    bad[1, 0, 3, 3] = np.nan
    with pytest.raises(InputError, match="image 1 of the batch contains NaN"):
        s.embed(bad)
    # a model normalized with mean 0, std 1 (preprocessing gives 0..1): standard-normal noise,
    # whose extremes pass 5 in a large batch, is still taken
    plain = Session(make_onnx_model(channels=3, fingerprint="fp-plain"), preprocess=PreprocessSpec.create(16, 3))
    noise = np.random.default_rng(1).standard_normal((256, 3, 16, 16)).astype(np.float32)
    assert noise.min() < -4 and noise.max() > 4
    plain.embed(noise)
    with pytest.raises(InputError, match=r"far above what this model's preprocessing gives \(0 to 1\)"):
        plain.embed(noise + 30)
