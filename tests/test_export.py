"""torch -> ONNX export, the exported contract, verification and inspection (issue: ONNX exporters)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgemeta.backbones import BACKBONES
from edgemeta.checkpoint import load_checkpoint, save_checkpoint
from edgemeta.data import omniglot_spec
from edgemeta.evaluate import to_tensor
from edgemeta.exporters import (
    ExportOptions,
    ExportSpec,
    VerifySpec,
    WrappedExtractor,
    convert,
    export,
    export_checkpoint,
    inspect,
    labelled_images,
    metadata_for_checkpoint,
    to_ort_format,
    verify,
)
from edgemeta.exporters.graph import save_model
from edgemeta.exporters.head import has_fed_norms
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.runtime.errors import ExportError, InputError, VerificationError
from edgemeta.runtime.spec import Metric, ModelMetadata, Normalization, Precision

# Every registered backbone at its smallest, with a metric/normalization each so all
# combinations are exported somewhere. A new backbone must be added here.
TINY = {
    "conv4": ({"channels": 8}, Metric.SQEUCLIDEAN, Normalization.NONE),
    "resnet12": ({"widths": (8, 16)}, Metric.COSINE, Normalization.L2),
    "edgenet": ({"widths": (8, 16, 16)}, Metric.SQEUCLIDEAN, Normalization.CENTERED_L2),
    # full size (3-5M weights): the variants differ in depth and width, not in a size argument
    "efficientnet_lite0": ({}, Metric.COSINE, Normalization.CENTERED_L2),
    "efficientnet_lite1": ({}, Metric.SQEUCLIDEAN, Normalization.L2),
    "efficientnet_lite2": ({}, Metric.COSINE, Normalization.NONE),
}
FAST = VerifySpec(batch_sizes=(1, 7, 32), prototype_counts=(0, 1, 12), episodes=10, q_query=5)


def tiny_model(
    name: str = "conv4",
    seed: int = 0,
    metric: Metric | None = None,
    norm: Normalization | None = None,
    calibration: np.ndarray | None = None,
) -> FewShotModel:
    """A tiny untrained model. With ``calibration`` images its batch-norm statistics and
    center are measured on them (random affine weights on top), so the embeddings differ
    from image to image as a trained model's do and folding BN into the convolutions matters."""
    kwargs, m, n = TINY[name]
    torch.manual_seed(seed)
    model = FewShotModel(ModelSpec(name, omniglot_spec(28), kwargs, metric or m, norm or n))
    if calibration is not None:
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.momentum = None  # running stats = the batch's
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.2, 0.2)
            x = to_tensor(calibration, (0.9211,), (0.2166,))
            model.train()
            model.center.copy_(torch.flatten(model.backbone(x), 1).mean(0))
    return model.eval()


@pytest.fixture(scope="module")
def calib(omniglot_novel) -> np.ndarray:
    """200 Omniglot images spread over the classes, for batch-norm statistics."""
    return omniglot_novel.images[:: len(omniglot_novel) // 200][:200]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".probe"))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, calib):
    """(path, torch model, checkpoint) of a tiny Conv-4 exported with a checkpoint's metadata."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("conv4", metric=Metric.COSINE, norm=Normalization.L2, calibration=calib)
    save_checkpoint(folder / "tiny.safetensors", model, info={"config": {"dataset": "omniglot"}})
    ck = load_checkpoint(folder / "tiny.safetensors")
    return export(ck.model, folder / "tiny.onnx", metadata_for_checkpoint(ck)).path, ck.model, ck


def test_every_registered_backbone_has_export_coverage():
    missing = sorted(set(BACKBONES) - set(TINY))
    assert not missing, f"backbone(s) {missing} have no export test: add them to TINY in tests/test_export.py"


@pytest.fixture(scope="module")
def model_size_folder(tmp_path_factory, omniglot_novel):
    """Omniglot novel classes as 28x28 PNG files (20 classes of 10), the size the tiny models take."""
    from PIL import Image

    root = tmp_path_factory.mktemp("omniglot28") / "omniglot28"
    for k in range(20):
        (root / f"c{k:02d}").mkdir(parents=True)
        for i, im in enumerate(omniglot_novel.images[omniglot_novel.labels == k][:10]):
            Image.fromarray(im[:, :, 0]).save(root / f"c{k:02d}" / f"{i}.png")
    return root


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.slow
def test_every_backbone_exports_and_verifies(name, tmp_path, calib, model_size_folder):
    model = tiny_model(name, calibration=calib)
    save_checkpoint(tmp_path / "m.safetensors", model, info={"config": {"dataset": "omniglot"}})
    # images already at the model's size, so the pixels check's resize is an identity: these
    # untrained networks flip a few decisions on the one-level rounding differences between the
    # graph's resize and Pillow's (the resize is measured in test_export_native_frames.py)
    options = ExportOptions(verify=FAST, data=str(model_size_folder))
    outcome = export_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.onnx", options)
    figures = outcome.verification.summary()
    assert figures["passed"] and figures["failed_checks"] == []
    assert figures["embeddings_max_rel_error"] < 1e-4 and figures["episodes"]["agreement"] == 1.0
    assert figures["episodes"]["dataset"] == "omniglot28"
    assert figures["pixels_episodes"]["frames"] == "native sizes 28x28"
    stored = ModelMetadata.from_json(
        ort.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map["edgemeta"]
    )
    assert stored.backbone == name and stored.fingerprint == load_checkpoint(tmp_path / "m.safetensors").fingerprint
    assert stored.verification["episodes"]["count"] == 10 and stored.verification["passed"] is True


@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("n_classes", [0, 1, 40])
def test_dynamic_batch_and_any_number_of_prototypes(tiny_onnx, batch, n_classes):
    path, model, _ = tiny_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(batch * 100 + n_classes)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    p = rng.standard_normal((n_classes, model.embedding_dim)).astype(np.float32)
    emb, logits = session.run(["embeddings", "logits"], {"images": x, "prototypes": p})
    with torch.no_grad():
        te, tl = model(torch.from_numpy(x), torch.from_numpy(p))
    assert emb.shape == (batch, model.embedding_dim) and logits.shape == (batch, n_classes)
    np.testing.assert_allclose(emb, te.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, tl.numpy(), rtol=1e-4, atol=1e-4)


def test_metadata_round_trip_through_onnxruntime(tiny_onnx):
    path, model, ck = tiny_onnx
    raw = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map["edgemeta"]
    meta = ModelMetadata.from_json(raw)
    assert meta == ModelMetadata.from_json(meta.to_json())
    assert (meta.fingerprint, meta.source_checkpoint_sha256) == (ck.fingerprint, ck.sha256)
    assert meta.preprocess == ck.spec.preprocess and meta.embedding_dim == model.embedding_dim
    assert (meta.metric, meta.normalization, meta.precision, meta.opset) == (
        Metric.COSINE,
        Normalization.L2,
        Precision.FP32,
        18,
    )
    assert meta.extra["exporter"] == "dynamo" and "fallback_reason" not in meta.extra


def test_graph_is_portable_to_older_onnxruntime(tiny_onnx):
    """Opset 18 at IR version 8 (ONNX Runtime 1.17 reads IR <= 9), no IR-10 node metadata, checker-clean."""
    model = onnx.load(str(tiny_onnx[0]))
    assert model.ir_version == 8 and [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert not any(n.metadata_props for n in model.graph.node) and not model.graph.metadata_props
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops  # folded into the convolutions


def test_normalization_epsilon_survives_graph_optimization(tmp_path):
    """An all-zero embedding stays finite: the 1e-12 that onnxscript's `x + 0` rule would delete is kept."""

    class Zero(nn.Module):
        def forward(self, x):
            return torch.flatten(x, 1)[:, :4] * 0.0

    net = WrappedExtractor(Zero(), Metric.COSINE, Normalization.L2)
    meta = ModelMetadata(omniglot_spec(28), 4, Metric.COSINE, Normalization.L2, "zero")
    path = export(net, tmp_path / "zero.onnx", meta).path
    emb, logits = ort.InferenceSession(str(path)).run(
        None, {"images": np.ones((2, 1, 28, 28), np.float32), "prototypes": np.ones((3, 4), np.float32)}
    )
    assert np.isfinite(emb).all() and np.isfinite(logits).all() and not emb.any()


def test_plain_feature_extractor_gets_metric_in_the_graph(tmp_path, omniglot_novel):
    extractor = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    with pytest.raises(
        ExportError, match="forward takes images only.*wrap a plain feature extractor in WrappedExtractor"
    ):
        export(
            extractor,
            tmp_path / "bare.onnx",
            ModelMetadata(omniglot_spec(28), 32, Metric.SQEUCLIDEAN, Normalization.NONE, "x"),
        )
    net = WrappedExtractor(extractor, Metric.SQEUCLIDEAN, Normalization.L2)
    path = export(
        net, tmp_path / "wrapped.onnx", ModelMetadata(omniglot_spec(28), 32, Metric.SQEUCLIDEAN, Normalization.L2, "x")
    ).path
    report = verify(path, net, labelled_images(omniglot_novel), FAST)
    assert report.passed and report.episodes["agreement"] == 1.0
    assert not (tmp_path / "bare.onnx").exists() and leftovers(tmp_path) == []
    # the optional norms input is verified both ways: fed (as the runtime feeds it) and computed
    runs = {(t["batch"], t["prototypes"], t["norms_fed"]) for t in report.tensors}
    assert {(b, n) for b, n, fed in runs if fed} == {(b, n) for b, n, fed in runs if n and not fed} != set()


def test_verification_feeds_the_norms_as_the_runtime_does(tmp_path, omniglot_novel, monkeypatch):
    """Episodes and tensor runs use the fed norms: wrong ones fail both checks, while the
    runs with the graph's own norms stay right."""
    import importlib

    vf = importlib.import_module("edgemeta.exporters.verify")  # the module (the package exports its function)
    extractor = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    net = WrappedExtractor(extractor, Metric.SQEUCLIDEAN, Normalization.L2)
    path = export(
        net, tmp_path / "wrapped.onnx", ModelMetadata(omniglot_spec(28), 32, Metric.SQEUCLIDEAN, Normalization.L2, "x")
    ).path

    def wrong(p):
        return (
            {"prototype_sqnorms": np.random.default_rng(0).uniform(0, 10, len(p)).astype(np.float32)} if len(p) else {}
        )

    monkeypatch.setattr(vf, "_norms", wrong)
    with pytest.raises(vf.VerificationError) as e:
        vf.verify(path, net, labelled_images(omniglot_novel), FAST)
    report = e.value.report
    assert {"logits error", "prediction agreement"} <= {c.name for c in report.failures}
    assert all(t["logits_rel"] < 1e-4 for t in report.tensors if t["prototypes"] and not t["norms_fed"])


def test_forward_may_name_its_arguments_freely(tmp_path):
    class Named(nn.Module):
        def forward(self, x, protos):
            z = torch.flatten(nn.functional.avg_pool2d(x, 7), 1)
            return z, z @ protos.t()

    result = export(
        Named(),
        tmp_path / "named.onnx",
        ModelMetadata(omniglot_spec(28), 16, Metric.SQEUCLIDEAN, Normalization.NONE, "n"),
    )
    assert result.exporter == "dynamo" and result.fallback_reason == ""
    assert [i["name"] for i in inspect(result.path)["inputs"]] == ["images", "prototypes"]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, images, prototypes):
        z = torch.flatten(self.conv(images), 1)[:, :8]
        if z.sum() > 0:  # the graph would depend on the data
            z = z * 2
        return z, z @ prototypes.t()


def test_untraceable_model_is_one_clear_error_and_no_file(tmp_path):
    meta = ModelMetadata(omniglot_spec(28), 8, Metric.SQEUCLIDEAN, Normalization.NONE, "dd")
    with pytest.raises(
        ExportError,
        match=r"does not trace: data-dependent control flow at test_export.py:\d+ \(`if z.sum\(\) > 0:.*`\)",
    ):
        export(DataDependent(), tmp_path / "dd.onnx", meta)
    assert list(tmp_path.iterdir()) == []


def test_torchscript_fallback_is_reported(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX function for aten::frobnicate")

    monkeypatch.setattr(convert, "_export_dynamo", broken)
    model = tiny_model("conv4")
    result = export(
        model,
        tmp_path / "ts.onnx",
        ModelMetadata(omniglot_spec(28), model.embedding_dim, Metric.SQEUCLIDEAN, Normalization.NONE, "ts"),
    )
    assert result.exporter == "torchscript" and "aten::frobnicate" in result.fallback_reason
    assert result.metadata.extra["fallback_reason"] == result.fallback_reason
    emb, logits = ort.InferenceSession(str(result.path)).run(
        None,
        {"images": np.zeros((3, 1, 28, 28), np.float32), "prototypes": np.zeros((0, model.embedding_dim), np.float32)},
    )
    assert emb.shape == (3, model.embedding_dim) and logits.shape == (3, 0)


@pytest.mark.slow
def test_offline_optimization_keeps_the_contract(tmp_path, omniglot_novel, calib):
    model = tiny_model("edgenet", calibration=calib)
    meta = ModelMetadata(omniglot_spec(28), model.embedding_dim, Metric.SQEUCLIDEAN, Normalization.CENTERED_L2, "opt")
    result = export(model, tmp_path / "opt.onnx", meta, ExportSpec(optimize=True))
    proto = onnx.load(str(result.path))
    assert result.metadata.extra["optimized"] is True and proto.ir_version <= 9
    assert {o.domain for o in proto.opset_import} == {""}  # basic level: standard operators only
    assert has_fed_norms(proto) and result.metadata.extra["fed_norms"] is True
    assert verify(result.path, model, labelled_images(omniglot_novel), FAST).passed


@pytest.mark.parametrize("make_bad", ["missing folder", "parent is a file", "output is a folder"])
def test_unwritable_output_is_an_export_error_before_any_work(tmp_path, make_bad):
    (tmp_path / "file.txt").write_text("x")
    target = {
        "missing folder": tmp_path / "nope" / "m.onnx",
        "parent is a file": tmp_path / "file.txt" / "m.onnx",
        "output is a folder": tmp_path,
    }[make_bad]
    message = {
        "missing folder": "does not exist",
        "parent is a file": "file.txt is a file, not a folder",
        "output is a folder": "is a folder",
    }[make_bad]
    model = tiny_model("conv4")
    with pytest.raises(ExportError, match=message):
        export(
            model,
            target,
            ModelMetadata(omniglot_spec(28), model.embedding_dim, Metric.SQEUCLIDEAN, Normalization.NONE, "w"),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_failed_verification_names_every_failed_check(tiny_onnx, omniglot_novel, calib):
    path, _, _ = tiny_onnx
    other = tiny_model("conv4", seed=7, metric=Metric.COSINE, norm=Normalization.L2, calibration=calib)
    with pytest.raises(VerificationError) as info:
        verify(path, other, labelled_images(omniglot_novel), FAST)
    message = str(info.value)
    assert message.startswith("verification of tiny.onnx (fp32) failed")
    for check in ("embeddings error", "logits error", "prediction agreement"):
        assert check in message
    assert "limit 1e-04" in message and "make sure the model is in eval mode" in message
    failed = {c.name for c in info.value.report.failures}
    assert {"embeddings error", "logits error"} <= failed and "output shapes" not in failed


def test_inspect_with_and_without_the_onnx_package(tiny_onnx, monkeypatch):
    path = tiny_onnx[0]
    full = inspect(path)
    assert full["precision"] == "fp32" and full["opset"] == {"ai.onnx": 18} and full["ir_version"] == 8
    assert full["operators"]["Conv"] == 4 and full["parameters"] > 1000 and full["notes"] == []
    assert [i["shape"] for i in full["inputs"]] == [
        ["batch", 1, 28, 28],
        ["n_classes", full["metadata"]["embedding_dim"]],
    ]
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a device: import onnx fails
    lite = inspect(path)
    assert lite["operators"] is None and lite["parameters"] is None and "pip install onnx" in lite["notes"][0]
    assert lite["inputs"] == full["inputs"] and lite["metadata"] == full["metadata"] and lite["precision"] == "fp32"
    assert (
        lite["optional_inputs"]
        == full["optional_inputs"]
        == [{"name": "prototype_sqnorms", "type": "float32", "shape": ["n_norms"]}]
    )


def test_ort_format_loads_and_keeps_metadata(tiny_onnx, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(Path(tiny_onnx[0]).read_bytes())
    dst = to_ort_format(src)
    assert dst == tmp_path / "m.ort" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ort"]
    info = inspect(dst)
    assert info["format"] == "ort" and info["metadata"]["fingerprint"] == tiny_onnx[2].fingerprint
    assert [i["name"] for i in info["optional_inputs"]] == ["prototype_sqnorms"]  # the ORT format keeps it


def test_an_ort_copy_that_cannot_be_written_is_an_export_error(tiny_onnx, tmp_path, monkeypatch):
    from edgemeta.exporters import optimize

    def full_disk(path, write, suffix=".tmp"):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(optimize, "atomic_write", full_disk)
    with pytest.raises(
        ExportError, match=r"cannot write .*m\.ort \(No space left on device\); choose a writable output folder"
    ):
        to_ort_format(tiny_onnx[0], tmp_path / "m.ort")
    with pytest.raises(ExportError, match="No space left on device"):  # through export --ort: nothing written
        export_checkpoint(Path(tiny_onnx[2].path), tmp_path / "m.onnx", ExportOptions(verify=None, ort_format=True))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o444, 0o600, 0o664])
def test_replacing_a_model_keeps_its_mode(tiny_onnx, tmp_path, mode):
    src = tmp_path / "m.onnx"
    src.write_bytes(Path(tiny_onnx[0]).read_bytes())
    to_ort_format(src)
    for path in (src, tmp_path / "m.ort"):
        os.chmod(path, mode)
    save_model(onnx.load(str(src)), src)
    to_ort_format(src)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (src, tmp_path / "m.ort")] == [mode, mode]
    assert (
        inspect(tmp_path / "m.ort")["metadata"]["fingerprint"] == tiny_onnx[2].fingerprint and leftovers(tmp_path) == []
    )


@pytest.mark.slow
def test_an_ort_copy_is_written_with_its_onnx_or_not_at_all(tiny_onnx, tmp_path, monkeypatch):
    from edgemeta.exporters import pipeline

    checkpoint = Path(tiny_onnx[2].path)
    out, ort_copy = tmp_path / "m.onnx", tmp_path / "m.ort"
    export_checkpoint(checkpoint, out, ExportOptions(verify=None, ort_format=True))
    os.chmod(ort_copy, 0o444)
    before = out.read_bytes(), ort_copy.read_bytes()

    def full_disk(*_):
        raise ExportError("cannot write m.onnx (No space left on device); choose a writable output folder")

    def interrupted(*_):
        raise KeyboardInterrupt

    for failure, raised in ((full_disk, ExportError), (interrupted, KeyboardInterrupt)):
        monkeypatch.setattr(pipeline, "save_model", failure)
        with pytest.raises(raised):
            export_checkpoint(checkpoint, out, ExportOptions(verify=None, ort_format=True))
        assert (out.read_bytes(), ort_copy.read_bytes()) == before and leftovers(tmp_path) == []  # the pair as it was
        with pytest.raises(raised):
            export_checkpoint(checkpoint, tmp_path / "new.onnx", ExportOptions(verify=None, ort_format=True))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ort"]  # no .ort without its .onnx
    monkeypatch.undo()

    os.remove(out)
    export_checkpoint(checkpoint, out, ExportOptions(verify=None, ort_format=True))  # replaces the read-only copy
    assert stat.S_IMODE(ort_copy.stat().st_mode) == 0o444 and leftovers(tmp_path) == []
    assert inspect(ort_copy)["metadata"]["fingerprint"] == tiny_onnx[2].fingerprint
    real = tmp_path / "kept" / "m.ort"
    real.parent.mkdir()
    os.replace(ort_copy, real)
    ort_copy.symlink_to(real)
    inode = real.stat().st_ino
    export_checkpoint(checkpoint, out, ExportOptions(verify=None, ort_format=True))
    assert ort_copy.is_symlink() and real.stat().st_ino != inode  # the link kept, its target replaced
    assert inspect(real)["format"] == "ort" and leftovers(tmp_path) == leftovers(real.parent) == []


@pytest.mark.parametrize(
    "make_bad, error",
    [
        ("folder", "is a folder; move it or choose another -o"),
        ("link to the model", "links to the model .* itself, which --ort would write over"),
        (
            "link into a missing folder",
            r"a link to .*nope.m\.ort in a folder that does not exist; remove the link or create the folder",
        ),
        ("-o links to an .ort file", r"links to .*t\.ort, an \.ort file; --ort writes the \.ort copy itself"),
        ("-o in capitals", "-o names the .onnx model; --ort writes m.ORT beside it: use -o"),
    ],
)
def test_an_ort_copy_that_cannot_be_written_is_refused_before_any_work(tiny_onnx, tmp_path, make_bad, error):
    checkpoint, out, ort_copy = Path(tiny_onnx[2].path), tmp_path / "m.onnx", tmp_path / "m.ort"
    if make_bad == "folder":
        ort_copy.mkdir()
    elif make_bad == "link to the model":
        out.write_bytes(Path(tiny_onnx[0]).read_bytes())
        ort_copy.symlink_to(out)
    elif make_bad == "link into a missing folder":
        ort_copy.symlink_to(tmp_path / "nope" / "m.ort")
    elif make_bad == "-o links to an .ort file":
        (tmp_path / "t.ort").write_bytes(b"kept")
        out.symlink_to(tmp_path / "t.ort")
    else:
        out = tmp_path / "m.ORT"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises((ExportError, InputError), match=error):
        export_checkpoint(checkpoint, out, ExportOptions(verify=None, ort_format=True))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before and leftovers(tmp_path) == []


def test_a_new_model_is_an_ordinary_file(tiny_onnx, tmp_path):
    umask = os.umask(0o022)
    try:
        save_model(onnx.load(str(tiny_onnx[0])), tmp_path / "m.onnx")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644


def test_the_library_refuses_to_write_over_its_input(tiny_onnx, tmp_path):
    _, _, ck = tiny_onnx
    checkpoint = tmp_path / "tiny.safetensors"
    checkpoint.write_bytes(Path(ck.path).read_bytes())
    before = checkpoint.read_bytes()
    with pytest.raises(InputError, match="is the input .*tiny.safetensors and would overwrite it; choose another -o"):
        export_checkpoint(checkpoint, tmp_path / "." / "tiny.safetensors", ExportOptions(verify=None))
    with pytest.raises(InputError, match="--ort writes tiny.ort beside it: use -o .*tiny.onnx"):
        export_checkpoint(checkpoint, tmp_path / "tiny.ort", ExportOptions(verify=None, ort_format=True))
    onnx_model = tmp_path / "m.onnx"
    onnx_model.write_bytes(Path(tiny_onnx[0]).read_bytes())
    with pytest.raises(InputError, match="and its ORT-format copy .* are one file"):
        to_ort_format(onnx_model, onnx_model)
    assert checkpoint.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.onnx",
        "tiny.safetensors",
    ]


@pytest.mark.skipif(
    not os.environ.get("EDGEMETA_LITE_PYTHON"), reason="set EDGEMETA_LITE_PYTHON to a runtime-only venv"
)
def test_inspect_in_a_runtime_only_environment(tiny_onnx):
    script = textwrap.dedent(
        """
        import json, sys
        from edgemeta.exporters.inspection import inspect
        info = inspect(sys.argv[1])
        assert "torch" not in sys.modules and "onnx" not in sys.modules
        print(json.dumps(info))
        """
    )
    r = subprocess.run(
        [os.environ["EDGEMETA_LITE_PYTHON"], "-c", script, str(tiny_onnx[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["metadata"]["fingerprint"] == tiny_onnx[2].fingerprint and "pip install onnx" in info["notes"][0]


def test_an_efficientnet_lite_takes_its_int8_defaults_where_the_user_chose_none(tmp_path, calib):
    from edgemeta.exporters.quantize import BACKBONE_INT8, QuantizeSpec, int8_model

    model = tiny_model("efficientnet_lite0", calibration=calib)
    save_checkpoint(tmp_path / "m.safetensors", model, info={"config": {"dataset": "omniglot"}})
    fp32 = export_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.onnx", ExportOptions(verify=None)).path
    x = to_tensor(calib[:16], (0.9211,), (0.2166,)).numpy()
    q = int8_model(onnx.load(str(fp32)), [x], QuantizeSpec(calibration_images=16))
    calib_meta = ModelMetadata.from_json({p.key: p.value for p in q.metadata_props}["edgemeta"]).extra["calibration"]
    wanted = BACKBONE_INT8["efficientnet_lite0"]
    assert calib_meta["defaults_of"] == {"backbone": "efficientnet_lite0", **wanted}
    # float_first is recorded where it is not 0
    assert calib_meta["activations"] == wanted["activations"]
    assert calib_meta.get("float_first", 0) == wanted["float_first"] and calib_meta["float_stem"] is True
    producers = {o: n for n in q.graph.node for o in n.output}
    weights_int8 = [
        n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"
        for n in q.graph.node
        if n.op_type == "Conv"
    ]
    n = max(wanted["float_first"], 1)  # the stem is float either way: space-to-depth does not fit its stride 2
    assert not any(weights_int8[:n]) and all(weights_int8[n:])
    assert calib_meta["bias_correction"] is True and calib_meta["bias_corrected_convolutions"] == sum(weights_int8)
