"""Backbones, checkpoints, meta-training, evaluation and their CLI (issue: meta-training pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgemeta.backbones import BACKBONES, build_backbone
from edgemeta.checkpoint import load_checkpoint, save_checkpoint
from edgemeta.cli import app
from edgemeta.data import load_omniglot
from edgemeta.evaluate import episode_scores, evaluate, evaluate_episodes_file, summarize
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.runtime.errors import CheckpointError, InputError
from edgemeta.runtime.spec import Metric, Normalization, PreprocessSpec
from edgemeta.train import TrainConfig, resume_path, train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "omniglot").is_dir(), reason="needs ../shared/data")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("EDGEMETA_DATA_DIR", str(SHARED))


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_every_backbone_embeds_flat(name, channels, size):
    net = build_backbone(name, channels).eval()
    with torch.no_grad():
        z = net(torch.randn(3, channels, size, size))
    assert z.ndim == 2 and z.shape[0] == 3 and torch.isfinite(z).all()


def test_unknown_backbone_names_the_choices():
    with pytest.raises(
        InputError,
        match=r"unknown backbone .vgg.; choose one of: conv4, edgenet, "
        r"efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet12",
    ):
        build_backbone("vgg", 1)


@pytest.mark.parametrize("metric", list(Metric))
@pytest.mark.parametrize("norm", list(Normalization))
def test_logits_match_the_definition(metric, norm):
    torch.manual_seed(0)
    model = FewShotModel(ModelSpec("conv4", PreprocessSpec.create(28, 1), metric=metric, normalization=norm)).eval()
    model.center.normal_()
    z, logits = model(torch.randn(4, 1, 28, 28), protos := torch.randn(6, 64))
    if norm is not Normalization.NONE:
        assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    if metric is Metric.SQEUCLIDEAN:
        expected = -(torch.cdist(z, protos) ** 2)
    else:
        expected = torch.exp(model.log_scale) * torch.nn.functional.cosine_similarity(z[:, None], protos[None], dim=2)
    assert torch.allclose(logits, expected, atol=1e-3)
    assert model(torch.randn(2, 1, 28, 28), torch.zeros(0, 64))[1].shape == (2, 0)


def test_checkpoint_round_trip_and_tampering(tmp_path):
    spec = ModelSpec(
        "conv4", PreprocessSpec.create(28, 1, 0.5, 0.25), metric=Metric.COSINE, normalization=Normalization.CENTERED_L2
    )
    model = FewShotModel(spec).eval()
    model.center.fill_(0.5)
    path = tmp_path / "m.safetensors"
    fp = save_checkpoint(path, model, {"note": "x"})
    ck = load_checkpoint(path)
    assert ck.fingerprint == fp and ck.spec == spec and ck.info["note"] == "x"
    assert torch.equal(ck.model.center, model.center)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(ck.model.embed(x), model.embed(x))
    # flip one byte of the weights: the fingerprint check catches it
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fingerprint .* differs"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_rewriting_a_checkpoint_keeps_its_mode(tmp_path):
    model = FewShotModel(ModelSpec("conv4", PreprocessSpec.create(28, 1, 0.5, 0.25))).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {})
    path.chmod(0o640)
    save_checkpoint(path, model, {"again": True})
    assert path.stat().st_mode & 0o777 == 0o640 and load_checkpoint(path).info["again"] is True
    link = tmp_path / "latest.safetensors"  # written through a symlink: the target is replaced, the link stays
    link.symlink_to(path)
    save_checkpoint(link, model, {"third": True})
    assert link.is_symlink() and load_checkpoint(path).info["third"] is True and path.stat().st_mode & 0o777 == 0o640
    # the checks before any work follow the link too: a target in a missing folder is refused up front
    from edgemeta.runtime.files import check_output

    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone" / "m.safetensors")
    with pytest.raises(InputError, match=f"-o: folder {tmp_path / 'gone'} does not exist"):
        check_output(tmp_path / "dangling.safetensors")
    assert check_output(link) == path  # files written beside it go beside the target


def test_foreign_files_are_not_checkpoints(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not an edgemeta checkpoint \\(no edgemeta header\\)"):
        load_checkpoint(tmp_path / "other.safetensors")
    (tmp_path / "model.pt").write_bytes(b"\x80\x04pickle data")
    with pytest.raises(CheckpointError, match="not an edgemeta checkpoint"):
        load_checkpoint(tmp_path / "model.pt")


def test_episode_scores_and_confidence_interval():
    acc, p, r, f1 = episode_scores(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert acc == 0.75
    assert p == pytest.approx((0.5 + 1 + 1) / 3) and r == pytest.approx((1 + 0.5 + 1) / 3)
    assert f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    rep = summarize([(1.0, 1, 1, 1), (0.5, 0.5, 0.5, 0.5)], dataset="d", n_way=3, k_shot=1, q_query=1)
    assert rep.accuracy == 0.75 and rep.ci95 == pytest.approx(1.96 * np.std([1, 0.5], ddof=1) / np.sqrt(2))


@needs_shared
@pytest.mark.slow
def test_short_training_beats_the_untrained_network(tmp_path):
    """A real (short) run on background classes must clearly beat random init on evaluation classes."""
    cfg = TrainConfig(
        out=str(tmp_path / "m.safetensors"),
        n_way=20,
        k_shot=5,
        q_query=5,
        episodes=80,
        val_every=40,
        val_episodes=50,
        threads=2,
        seed=0,
    )
    result = train(cfg, progress=False)
    ev = load_omniglot("evaluation")
    trained = evaluate(load_checkpoint(result.checkpoint).model, ev, 5, 1, 5, 200, seed=3)
    torch.manual_seed(0)
    untrained = evaluate(FewShotModel(load_checkpoint(result.checkpoint).spec).eval(), ev, 5, 1, 5, 200, seed=3)
    assert trained.accuracy > untrained.accuracy + 0.08, (trained.line(), untrained.line())
    assert trained.accuracy - trained.ci95 > untrained.accuracy + untrained.ci95
    # the log and the curve are written next to the checkpoint
    log = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "val_acc" in h] == [40, 80]
    assert (tmp_path / "m.png").stat().st_size > 1000
    ck = load_checkpoint(result.checkpoint)
    assert ck.info["train_data"]["classes"] == 4 * (964 - 95) and ck.info["config"]["n_way"] == 20


@needs_shared
@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    base = dict(n_way=5, k_shot=1, q_query=2, val_every=5, val_episodes=5, threads=1, seed=4, log_every=5)
    straight = train(TrainConfig(out=str(tmp_path / "a.safetensors"), episodes=10, **base), progress=False)
    train(TrainConfig(out=str(tmp_path / "b.safetensors"), episodes=5, **base), progress=False)
    assert resume_path(tmp_path / "b.safetensors").exists()
    resumed = train(
        TrainConfig(out=str(tmp_path / "b.safetensors"), episodes=10, **base),
        resume=tmp_path / "b.safetensors",
        progress=False,
    )
    a = load_checkpoint(resume_path(straight.checkpoint)).model.state_dict()
    b = load_checkpoint(resume_path(resumed.checkpoint)).model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@needs_shared
@pytest.mark.slow
def test_centered_l2_stores_the_base_mean(tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path / "c.safetensors"),
        normalization=Normalization.CENTERED_L2,
        metric=Metric.COSINE,
        n_way=5,
        k_shot=1,
        q_query=2,
        episodes=3,
        val_every=3,
        val_episodes=3,
        threads=1,
    )
    ck = load_checkpoint(train(cfg, progress=False).checkpoint)
    assert ck.model.center.abs().sum() > 0 and ck.spec.normalization is Normalization.CENTERED_L2
    # the default open-set threshold: a cosine distance, measured on held-out classes
    assert 0.0 < ck.info["open_set_threshold"] < 2.0


def test_episodes_file_evaluation_matches_direct_classification(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((28, 28)) * 60 + 60 * c).astype(np.uint8)).save(
                tmp_path / "imgs" / f"c{c}" / f"{i}.png"
            )
    r = runner.invoke(
        app,
        [
            "episodes",
            str(tmp_path / "imgs"),
            "-o",
            str(tmp_path / "e.json"),
            "--n-way",
            "4",
            "--k-shot",
            "2",
            "--queries",
            "2",
            "--episodes",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    torch.manual_seed(0)
    model = FewShotModel(ModelSpec("conv4", PreprocessSpec.create(28, 1))).eval()
    rep = evaluate_episodes_file(model, str(tmp_path / "e.json"))
    assert rep.episodes == 3 and rep.n_way == 4 and rep.k_shot == 2
    assert rep.accuracy > 0.9  # classes differ by brightness: trivially separable even untrained


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--backbone", "vgg", "--episodes", "1"], "unknown backbone 'vgg'"),
        (["train", "--out", "/nonexistent/dir/m.safetensors"], "-o: folder /nonexistent/dir does not exist"),
        pytest.param(
            ["train", "--n-way", "4000", "--episodes", "1"],
            "fewer than the 4000-way episodes",
            marks=[needs_shared, pytest.mark.slow],
        ),
        pytest.param(
            ["train", "--k-shot", "15", "--queries", "10", "--episodes", "1"],
            "only 0 classes have at least 25 images",
            marks=needs_shared,
        ),
        (["evaluate", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
        (["evaluate", "--dataset", "digits", "--n-way", "11"], "fewer than 11-way"),
        (["evaluate", "--dataset", "nosuchset"], "unknown data set 'nosuchset'"),
        (["evaluate", "--episodes-file", "nope.json"], "episodes file not found"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_foreign_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint at all, definitely not")
    r = runner.invoke(app, ["evaluate", str(tmp_path / "x.pt")])
    assert r.exit_code == 1 and "is not an edgemeta checkpoint" in r.output


def test_missing_omniglot_via_cli(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    r = runner.invoke(
        app, ["train", "--data-dir", str(tmp_path), "--episodes", "1", "--out", str(tmp_path / "m.safetensors")]
    )
    assert r.exit_code == 1 and "put images_background.zip and images_evaluation.zip in" in r.output


@needs_shared
@pytest.mark.slow
def test_mixed_shots_and_bf16_autocast(tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path / "b.safetensors"),
        n_way=5,
        mixed_shots=(1, 3),
        q_query=2,
        episodes=4,
        bf16=True,
        val_every=4,
        val_episodes=5,
        val_alphabets=1,
        threads=1,
        log_every=2,
    )
    result = train(cfg, progress=False)
    ck = load_checkpoint(result.checkpoint)
    assert ck.info["config"]["mixed_shots"] == [1, 3] and ck.info["config"]["bf16"] is True
    assert ck.info["train_data"]["classes"] == 4 * (964 - 55)  # one alphabet (Tifinagh, 55 characters) held out


# -- train: what -o may replace, bad values, interruption and resume ---------------------------

TINY = ["--n-way", "5", "--k-shot", "1", "--queries", "2", "--val-episodes", "3", "--threads", "1", "--json"]


def _old_run(folder: Path) -> dict[str, bytes]:
    """An earlier run's files at folder/m.safetensors (an untrained model; nothing trained)."""
    model = FewShotModel(ModelSpec("conv4", PreprocessSpec.create(28, 1)))
    save_checkpoint(folder / "m.safetensors", model, {"best_val_accuracy": 0.5})
    save_checkpoint(folder / "m.last.safetensors", model, {"best_val_accuracy": 0.5, "step": 3})
    (folder / "m.jsonl").write_text('{"old": true}\n')
    (folder / "m.png").write_bytes(b"old curve")
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}


@pytest.mark.parametrize(
    "setup, out, message",
    [
        (
            lambda d: (d / "notes.txt").write_text("keep me"),
            "notes.txt",
            "-o {d}/notes.txt exists and is not a checkpoint",
        ),
        (
            lambda d: (d / "m.onnx").write_bytes(b"\x08\x07onnx model"),
            "m.onnx",
            "-o {d}/m.onnx exists and is not a checkpoint",
        ),
        (lambda d: (d / "sub").mkdir(), "sub", "-o {d}/sub is a folder"),
        (lambda d: None, "m.jsonl", "the run's log or curve would overwrite the checkpoint"),
        (lambda d: None, "m.last.safetensors", "is named like a run's resume file"),
        (
            _old_run,
            "m.safetensors",
            "a run is there already (m.safetensors, m.last.safetensors, m.jsonl, m.png); "
            "pass --resume {d}/m.safetensors to continue it or --force to replace it",
        ),
        (
            lambda d: (_old_run(d), (d / "m.safetensors").unlink()),
            "m.safetensors",
            "a run is there already (m.last.safetensors, m.jsonl, m.png)",
        ),
        (
            lambda d: (d / "m.jsonl").write_text("{}\n"),
            "m.safetensors",
            "a run is there already (m.jsonl); pass --force to replace it (it has nothing to resume)",
        ),
    ],
)
def test_train_refuses_an_output_that_would_lose_files(setup, out, message, tmp_path):
    setup(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    r = runner.invoke(app, ["train", "-o", str(tmp_path / out), "--episodes", "1", *TINY])
    assert r.exit_code == 1, r.output
    assert message.format(d=tmp_path) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert json.loads(r.stdout)["ok"] is False  # --json: the failure is a JSON document too
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == before


def test_resume_of_another_run_does_not_replace_a_run_at_out(tmp_path):
    (tmp_path / "a").mkdir()
    _old_run(tmp_path / "a")
    before = _old_run(tmp_path)
    r = runner.invoke(
        app, ["train", "-o", str(tmp_path / "m.safetensors"), "--resume", str(tmp_path / "a" / "m.safetensors"), *TINY]
    )
    assert r.exit_code == 1 and "--force to replace it" in r.output
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "3"], "--size 3 is too small for conv4: it takes 16 pixels or more"),
        (["--size", "8"], "--size 8 is too small for conv4: it takes 16 pixels or more"),
        (["--size", "12", "--backbone", "resnet12"], "--size 12 is too small for resnet12: it takes 16 pixels or more"),
        (["--size", "0"], "--size 0 (must be >= 1"),
        (["--step-every", "0"], "--step-every 0 (must be >= 1)"),
        (["--threads", "-3"], "--threads -3 (must be >= 1, or 0 for torch's choice)"),
        (["--gamma", "-1"], "--gamma -1.0 (the learning-rate factor per step must be in (0, 1])"),
        (["--gamma", "0"], "--gamma 0.0 (the learning-rate factor"),
        (["--gamma", "1.5"], "--gamma 1.5 (the learning-rate factor"),
        (["--max-minutes", "-1"], "--max-minutes -1.0 (must be > 0)"),
        (["--lr", "nan"], "--lr nan (must be a finite number > 0)"),
        (["--lr", "0"], "--lr 0.0 (must be a finite number > 0)"),
        (["--pretrain-lr", "inf"], "--pretrain-lr inf (must be a finite number > 0)"),
        (["--max-minutes", "0", "--step-every", "0"], "--step-every 0 (must be >= 1); --max-minutes 0.0 (must be > 0)"),
    ],
)
def test_train_refuses_bad_values_before_any_work(args, message, tmp_path, monkeypatch):
    import edgemeta.train as train_mod

    monkeypatch.setattr(train_mod, "load_training_data", lambda *a: pytest.fail("loaded data before refusing"))
    r = runner.invoke(app, ["train", "-o", str(tmp_path / "m.safetensors"), "--episodes", "1", *TINY[:-1], *args])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _val_accuracy(model: FewShotModel, cfg: TrainConfig) -> float:
    """What ``validate`` measures, on the checkpoint's own weights."""
    from edgemeta.data import omniglot_splits

    val = omniglot_splits(None, 28, cfg.val_alphabets)[1]
    q = max(1, min(15, int(np.bincount(val.labels).min()) - cfg.val_k_shot))
    return evaluate(model, val, cfg.val_n_way, cfg.val_k_shot, q, cfg.val_episodes, seed=cfg.seed + 1).accuracy


def _interrupt_after_last(monkeypatch, step: int) -> None:
    """Ctrl-C right after the resume file of ``step`` is written."""
    import edgemeta.train as train_mod

    save_last = train_mod.Trainer.save_last

    def stop(self, *a):
        save_last(self, *a)
        if self.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Trainer, "save_last", stop)


@needs_shared
@pytest.mark.slow
def test_interrupted_run_keeps_its_best_model_and_resume_labels_it(tmp_path, monkeypatch):
    cfg = TrainConfig(
        out=str(tmp_path / "m.safetensors"),
        n_way=5,
        k_shot=1,
        q_query=2,
        episodes=10,
        val_every=2,
        val_episodes=20,
        threads=1,
        seed=1,
        log_every=1,
    )
    with monkeypatch.context() as m:
        _interrupt_after_last(m, 6)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    best = max(h["val_acc"] for h in log if "val_acc" in h)
    ck = load_checkpoint(tmp_path / "m.safetensors")  # the best model survives the interruption
    assert ck.info["best_val_accuracy"] == best == pytest.approx(_val_accuracy(ck.model, cfg))
    assert ck.info["open_set_threshold"] is None  # measured for the final write only
    result = train(cfg, resume=tmp_path / "m.safetensors", progress=False)
    ck = load_checkpoint(result.checkpoint)
    assert ck.info["open_set_threshold"] > 0
    assert (
        result.best_val_accuracy
        == ck.info["best_val_accuracy"]
        == max(h["val_acc"] for h in result.history if "val_acc" in h)
    )
    assert ck.info["best_val_accuracy"] == pytest.approx(_val_accuracy(ck.model, cfg))
    # one record per step, and the time goes on from the interrupted session
    log = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in log if h["stage"] == "episodic" and "loss" in h]
    assert steps == list(range(1, 11))
    assert [h["time"] for h in log] == sorted(h["time"] for h in log) and result.seconds >= log[-1]["time"]


@needs_shared
@pytest.mark.slow
def test_resume_without_the_best_weights_chooses_the_best_anew(tmp_path, monkeypatch):
    """A resume file whose checkpoint is gone (as runs before this fix left them): the final
    checkpoint's accuracy is that of the weights it holds, not the lost best's."""
    cfg = TrainConfig(
        out=str(tmp_path / "m.safetensors"),
        n_way=5,
        k_shot=1,
        q_query=2,
        episodes=6,
        val_every=2,
        val_episodes=20,
        threads=1,
        seed=1,
    )
    with monkeypatch.context() as m:
        _interrupt_after_last(m, 4)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    (tmp_path / "m.safetensors").unlink(missing_ok=True)
    # the lost best was better than anything the resumed session reaches
    last = load_checkpoint(resume_path(tmp_path / "m.safetensors"), with_optimizer=True)
    save_checkpoint(last.path, last.model, {**last.info, "best_val_accuracy": 0.99}, last.optimizer_state)
    with pytest.warns(UserWarning, match="does not hold the best weights .* chosen anew"):
        result = train(cfg, resume=tmp_path / "m.safetensors", progress=False)
    ck = load_checkpoint(result.checkpoint)
    assert ck.info["best_val_accuracy"] == result.best_val_accuracy == pytest.approx(_val_accuracy(ck.model, cfg))
    assert result.best_val_accuracy < 0.99


@needs_shared
@pytest.mark.slow
def test_force_replaces_a_run_only_when_the_new_one_writes(tmp_path, monkeypatch):
    import edgemeta.train as train_mod

    before = _old_run(tmp_path)
    cfg = TrainConfig(
        out=str(tmp_path / "m.safetensors"),
        n_way=5,
        k_shot=1,
        q_query=2,
        episodes=2,
        val_every=2,
        val_episodes=3,
        threads=1,
    )
    with monkeypatch.context() as m:
        m.setattr(train_mod.Trainer, "episodic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False, force=True)
    assert {
        f.name: f.read_bytes() for f in tmp_path.iterdir()
    } == before  # stopped before writing: the old run is whole
    result = train(cfg, progress=False, force=True)
    assert load_checkpoint(result.checkpoint).info["config"]["episodes"] == 2
    assert load_checkpoint(resume_path(result.checkpoint)).info["step"] == 2
    assert '"old"' not in (tmp_path / "m.jsonl").read_text() and (tmp_path / "m.png").read_bytes() != b"old curve"


@pytest.mark.slow
def test_a_moved_run_resumed_through_its_last_file_keeps_its_best_model(tmp_path):
    import warnings

    base = dict(n_way=5, k_shot=1, q_query=2, val_every=5, val_episodes=5, threads=1, seed=4, log_every=5)
    first = train(TrainConfig(out=str(tmp_path / "m.safetensors"), episodes=10, **base), progress=False)
    for f in tmp_path.iterdir():  # the run moves: m.* -> run1.*
        f.rename(tmp_path / f.name.replace("m.", "run1.", 1))
    records = len((tmp_path / "run1.jsonl").read_text().splitlines())
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # no "best weights chosen anew": the checkpoint beside the .last file is the run's
        resumed = train(
            TrainConfig(out=str(tmp_path / "run1.safetensors"), episodes=15, **base),
            resume=tmp_path / "run1.last.safetensors",
            progress=False,
        )
    assert resumed.best_val_accuracy >= first.best_val_accuracy
    assert len((tmp_path / "run1.jsonl").read_text().splitlines()) > records  # the earlier records kept
