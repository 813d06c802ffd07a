"""Shared pytest fixtures."""

# ---------------------------------------------------------------------------
# Device runtime fixtures (tests/test_runtime_*.py): tiny edgemeta-contract ONNX
# models built with onnx.helper, and small synthetic image sets.
# ---------------------------------------------------------------------------

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _no_progress_lines(monkeypatch):
    """No plain progress lines (stderr is no terminal under CliRunner): tests assert whole outputs;
    the tests of those lines turn them back on."""
    monkeypatch.setenv("EDGEMETA_PROGRESS", "off")


RUNTIME_SIZE = 16  # test models take 1x16x16 (grey) or 3x16x16 (RGB) images
RUNTIME_DIM = 16


def build_runtime_model(
    path: Path,
    *,
    metric: str = "sqeuclidean",
    normalization: str = "l2",
    channels: int = 1,
    dim: int = RUNTIME_DIM,
    scale: float = 10.0,
    metadata: bool = True,
    fingerprint: str = "fp-tiny-0001",
    drop: tuple[str, ...] = (),
    seed: int = 0,
    extra: dict | None = None,
) -> Path:
    """Write an ONNX model that follows the edgemeta contract (a 2-layer MLP extractor).

    ``drop`` removes named inputs/outputs from the graph, to build broken models.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgemeta.runtime.spec import Metric, ModelMetadata, Normalization, PreprocessSpec

    rng = np.random.default_rng(seed)
    flat = channels * RUNTIME_SIZE * RUNTIME_SIZE
    inits = [
        numpy_helper.from_array((rng.standard_normal((flat, 64)) * (2.0 / np.sqrt(flat))).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(64) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((64, dim)) / 8.0).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(scale, np.float32), "scale"),
    ]
    n = helper.make_node
    nodes = [
        n("Flatten", ["images"], ["flat"], axis=1),
        n("MatMul", ["flat", "w1"], ["h0"]),
        n("Add", ["h0", "b1"], ["h1"]),
        n("Tanh", ["h1"], ["h2"]),
        n("MatMul", ["h2", "w2"], ["raw"]),
    ]
    if normalization == "none":
        nodes.append(n("Identity", ["raw"], ["embeddings"]))
    else:
        nodes += [
            n("ReduceSumSquare", ["raw"], ["rss"], axes=[1], keepdims=1),
            n("Add", ["rss", "eps"], ["rss_e"]),
            n("Sqrt", ["rss_e"], ["rnorm"]),
            n("Div", ["raw", "rnorm"], ["embeddings"]),
        ]
    embed_nodes, nodes = nodes, []
    if metric == "sqeuclidean":
        nodes += [
            n("ReduceSumSquare", ["embeddings"], ["ee"], axes=[1], keepdims=1),
            n("ReduceSumSquare", ["prototypes"], ["pp"], axes=[1], keepdims=0),
            n("Transpose", ["prototypes"], ["pt"], perm=[1, 0]),
            n("MatMul", ["embeddings", "pt"], ["ep"]),
            n("Mul", ["ep", "two"], ["ep2"]),
            n("Sub", ["ep2", "ee"], ["l0"]),
            n("Sub", ["l0", "pp"], ["logits"]),
        ]
    else:
        nodes += [
            n("ReduceSumSquare", ["embeddings"], ["ess"], axes=[1], keepdims=1),
            n("Add", ["ess", "eps"], ["ess_e"]),
            n("Sqrt", ["ess_e"], ["enorm"]),
            n("Div", ["embeddings", "enorm"], ["en"]),
            n("ReduceSumSquare", ["prototypes"], ["pss"], axes=[1], keepdims=1),
            n("Add", ["pss", "eps"], ["pss_e"]),
            n("Sqrt", ["pss_e"], ["pnorm"]),
            n("Div", ["prototypes", "pnorm"], ["pn"]),
            n("Transpose", ["pn"], ["pt"], perm=[1, 0]),
            n("MatMul", ["en", "pt"], ["cos"]),
            n("Mul", ["cos", "scale"], ["logits"]),
        ]
    inputs = [
        helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", channels, RUNTIME_SIZE, RUNTIME_SIZE]),
        helper.make_tensor_value_info("prototypes", TensorProto.FLOAT, ["n_classes", dim]),
    ]
    outputs = [
        helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "n_classes"]),
    ]
    if "prototypes" in drop:  # a plain feature extractor: no prototypes, so no logits either
        nodes, drop = [], (*drop, "logits")
    nodes = embed_nodes + nodes
    inputs = [i for i in inputs if i.name not in drop]
    outputs = [o for o in outputs if o.name not in drop]
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(nodes, "tiny_edgemeta", inputs, outputs, [i for i in inits if i.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgemeta-tests")
    model.ir_version = 8
    if metadata:
        spec = PreprocessSpec.create(RUNTIME_SIZE, channels, mean=0.5, std=0.25)
        meta = ModelMetadata(
            preprocess=spec,
            embedding_dim=dim,
            metric=Metric(metric),
            normalization=Normalization(normalization),
            fingerprint=fingerprint,
            backbone="tiny-mlp",
            opset=17,
            extra=dict(extra or {}),
        )
        entry = model.metadata_props.add()
        entry.key, entry.value = "edgemeta", meta.to_json()
    onnx.checker.check_model(model)
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


def fixed_batch_copy(src: Path, dst: Path, batch: int) -> Path:
    """A copy of an edgemeta model whose graph takes a fixed batch of ``batch`` images."""
    import onnx

    m = onnx.load(str(src))
    for v in m.graph.input:
        if v.name == "images":
            v.type.tensor_type.shape.dim[0].dim_value = batch
    for v in m.graph.output:  # embeddings, logits
        v.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(m, str(dst))
    return dst


_CUDA_RUNS: bool | None = None


def cuda_runs() -> bool:
    """Whether ONNX Runtime really runs on CUDA here: a GPU build lists the CUDA provider
    also on a machine without a GPU or CUDA libraries, where it cannot load. Asked of the
    runtime's own :class:`Session`, which raises when a provider named explicitly does not run."""
    global _CUDA_RUNS
    if _CUDA_RUNS is None:
        import tempfile

        import onnxruntime as ort

        from edgemeta.runtime import ProviderError, Session

        _CUDA_RUNS = False
        if "CUDAExecutionProvider" in ort.get_available_providers():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    _CUDA_RUNS = Session(build_runtime_model(Path(tmp) / "probe.onnx"), "cuda").on_gpu
                except ProviderError:
                    pass
    return _CUDA_RUNS


@pytest.fixture(scope="session")
def make_onnx_model(tmp_path_factory):
    """Factory: ``make_onnx_model(**kwargs)`` -> path of a cached tiny edgemeta model."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("runtime_models")

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            cache[key] = build_runtime_model(root / f"model{len(cache)}.onnx", **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_onnx_model(make_onnx_model) -> Path:
    """Grey 16x16 input, 16-D L2-normalized embeddings, squared-euclidean logits."""
    return make_onnx_model()


@pytest.fixture(scope="session")
def tiny_cosine_model(make_onnx_model) -> Path:
    """Like tiny_onnx_model but cosine logits with scale 10 (and another fingerprint)."""
    return make_onnx_model(metric="cosine", fingerprint="fp-tiny-cos", seed=1)


def runtime_class_images(
    n_classes: int, per_class: int, *, seed: int = 0, noise: float = 6.0
) -> dict[str, list[np.ndarray]]:
    """Grey uint8 16x16 images: one random base pattern per class, plus small noise."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for k in range(n_classes):
        base = rng.integers(0, 256, (RUNTIME_SIZE, RUNTIME_SIZE)).astype(np.float64)
        out[f"class{k}"] = [
            np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8) for _ in range(per_class)
        ]
    return out


@pytest.fixture
def runtime_images() -> dict[str, list[np.ndarray]]:
    """4 classes x 6 grey 16x16 uint8 images (first 4 to enrol, last 2 as queries)."""
    return runtime_class_images(4, 6)


@pytest.fixture
def runtime_image_folder(tmp_path, runtime_images) -> Path:
    """The runtime_images written as PNG files in class subfolders: <tmp>/images/<class>/<i>.png."""
    from PIL import Image

    root = tmp_path / "images"
    for label, imgs in runtime_images.items():
        (root / label).mkdir(parents=True)
        for i, arr in enumerate(imgs):
            Image.fromarray(arr).save(root / label / f"{i}.png")
    return root


# ---------------------------------------------------------------------------
# Export fixtures (tests/test_export*.py): the shared Omniglot data and a tiny
# trained Conv-4 checkpoint with its fp32 ONNX export, made once per session.
# ---------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def export_env(tmp_path_factory):
    """EDGEMETA_DATA_DIR -> ../shared/data and a per-session decode cache; skips without the data."""
    if not (SHARED_DATA / "omniglot").is_dir():
        pytest.skip("needs ../shared/data (Omniglot)")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEMETA_DATA_DIR", str(SHARED_DATA))
    mp.setenv("EDGEMETA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    yield SHARED_DATA
    mp.undo()


@pytest.fixture(scope="session")
def omniglot_novel(export_env):
    """Omniglot evaluation (novel classes), 28x28 grey uint8."""
    from edgemeta.data import load_omniglot

    return load_omniglot("evaluation", download=False)


# Fixtures that train a model first; a test that uses one counts as slow (see pytest_collection_modifyitems).
SLOW_FIXTURES = {"trained_conv4"}


def pytest_collection_modifyitems(items):
    """Mark `slow` every test that needs a training run first, so `-m "not slow"` skips the training."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained_conv4(export_env, tmp_path_factory) -> Path:
    """A Conv-4 trained for 30 Omniglot episodes (about 10 s): good enough to be discriminative."""
    from edgemeta.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "conv4.safetensors"
    train(TrainConfig(out=str(out), episodes=30, n_way=10, val_every=30, val_episodes=20, threads=2), progress=False)
    return out


@pytest.fixture(scope="session")
def trained_conv4_onnx(trained_conv4, tmp_path_factory) -> Path:
    """The fp32 ONNX export of ``trained_conv4`` (not yet verified)."""
    from edgemeta.checkpoint import load_checkpoint
    from edgemeta.exporters import export, metadata_for_checkpoint

    ck = load_checkpoint(trained_conv4)
    return export(ck.model, tmp_path_factory.mktemp("onnx") / "conv4.onnx", metadata_for_checkpoint(ck)).path
