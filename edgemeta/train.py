"""Meta-training: optional cross-entropy pre-training, then prototypical episodes.

Two recipes share one loop:
- pure episodic training (Snell et al. 2017): ``pretrain_epochs=0``;
- Meta-Baseline / RFS (Chen et al. 2021, Tian et al. 2020): pre-train a classifier
  over all base classes, then fine-tune episodically (``pretrain_epochs>0``).

Validation runs on held-out classes every ``val_every`` episodes (and after each
pre-training epoch); the best model is what the checkpoint holds, and it is written
whenever validation improves, so a run that is stopped keeps it. Everything is
seeded, and ``resume`` continues on exactly the episodes the run would have seen.

Under ``torchrun`` the same loop runs on every process (see :mod:`edgemeta.distributed`):
one optimizer step takes one episode per process with the gradients averaged, and rank 0
alone validates and writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgemeta import distributed
from edgemeta.backbones import build_backbone
from edgemeta.checkpoint import load_checkpoint, read_header, save_checkpoint
from edgemeta.data import (
    ClassSplit,
    ImageSet,
    folder_classes,
    load_dataset,
    omniglot_spec,
    omniglot_splits,
    recorded_split,
    split_classes,
)
from edgemeta.distributed import Device, DistEnv
from edgemeta.episodes import EpisodeSampler
from edgemeta.evaluate import evaluate, open_set_threshold, to_tensor
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.runs import (  # noqa: F401  (resume_path, run_files and plot_curve: the run's files, public here too)
    RESUME_MAY_CHANGE,
    check_out,
    check_resume,
    check_same_config,
    check_world_size,
    continues_run,
    is_checkpoint,
    option_name,
    plot_curve,
    resume_files,
    resume_path,
    run_files,
)
from edgemeta.runtime.errors import CheckpointError, DataError, InputError
from edgemeta.runtime.files import atomic_write, same_file
from edgemeta.runtime.spec import Metric, Normalization, PreprocessSpec

__all__ = ["TrainConfig", "TrainResult", "train", "default_spec", "resume_path", "run_files"]


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Defaults are the Omniglot Conv-4 recipe."""

    out: str = "model.safetensors"
    dataset: str = "omniglot"
    data_dir: str | None = None
    backbone: str = "conv4"
    size: int | None = None  # default: 28 for Omniglot, 64 for Tiny-ImageNet
    val_alphabets: int = 3  # Omniglot: background alphabets held out for validation
    metric: Metric = Metric.SQEUCLIDEAN
    normalization: Normalization = Normalization.NONE
    # episodic stage
    n_way: int = 60
    k_shot: int = 5
    q_query: int = 5
    # cycle through these shot counts episode by episode (e.g. (1, 5)); empty: always k_shot
    mixed_shots: tuple[int, ...] = ()
    episodes: int = 5000
    lr: float = 1e-3
    schedule: str = "step"  # step | cosine
    step_every: int = 2000
    gamma: float = 0.5
    # pre-training stage (cross-entropy over all base classes)
    pretrain_epochs: int = 0
    pretrain_lr: float = 0.05
    batch_size: int = 128
    augment: bool = False
    # validation
    val_every: int = 500
    val_episodes: int = 300
    val_n_way: int = 5
    val_k_shot: int = 1
    # execution
    seed: int = 0
    threads: int | None = None  # None or 0: torch's choice
    channels_last: bool = True
    # bfloat16 autocast for the forward pass (weights stay float32): much faster on CPUs
    # with AMX or AVX-512 BF16 and on recent GPUs; evaluation always runs in float32
    bf16: bool = False
    max_minutes: float | None = None
    log_every: int = 25
    # distributed runs (torchrun): the device, and how long a rank waits for the others
    device: Device = Device.AUTO
    dist_timeout: float = 1800.0  # seconds; bounds the rendezvous and every collective
    # pretrained start (P>M>F, see edgemeta.finetune): "imagenet" loads the backbone's ImageNet
    # weights; the stem and the blocks before freeze_until stay frozen (None: the backbone's default)
    init: str | None = None
    freeze_until: int | None = None
    warmup: int = 0  # episodes of linear learning-rate warm-up

    def check(self) -> None:
        """Every problem of the config at once, as options: ``bad training config: --gamma -1.0 (...)``."""
        problems = []
        if self.schedule not in ("step", "cosine"):
            problems.append(f"schedule {self.schedule!r} (use step or cosine)")
        for name in (
            "n_way",
            "k_shot",
            "q_query",
            "val_n_way",
            "val_k_shot",
            "batch_size",
            "val_every",
            "val_episodes",
            "log_every",
            "step_every",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{option_name(name)} {getattr(self, name)} (must be >= 1)")
        if self.size is not None and self.size < 1:
            problems.append(f"--size {self.size} (must be >= 1, or left out for the data set's default)")
        if not 0 < self.gamma <= 1:
            problems.append(f"--gamma {self.gamma} (the learning-rate factor per step must be in (0, 1])")
        if self.threads is not None and self.threads < 0:
            problems.append(f"--threads {self.threads} (must be >= 1, or 0 for torch's choice)")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            problems.append(f"--dist-timeout {self.dist_timeout} (must be a finite number of seconds > 0)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            problems.append(f"--max-minutes {self.max_minutes} (must be > 0)")
        if self.n_way < 2 or self.val_n_way < 2:
            problems.append("n-way must be >= 2")
        if any(k < 1 for k in self.mixed_shots):
            problems.append(f"mixed shots must be >= 1, got {self.mixed_shots}")
        if self.episodes < 0 or self.pretrain_epochs < 0:
            problems.append("episodes and pretrain epochs must be >= 0")
        if self.init not in (None, "imagenet"):
            problems.append(f"--init {self.init} (use imagenet, or leave it out to start from random weights)")
        if self.init and self.pretrain_epochs:
            problems.append("--init imagenet meta-trains episodically: drop --pretrain-epochs")
        if (self.freeze_until is not None or self.warmup) and self.init != "imagenet":
            problems.append("--freeze-until and --warmup go with --init imagenet")
        if self.warmup < 0 or (self.freeze_until is not None and self.freeze_until < 0):
            problems.append("--warmup and --freeze-until must be >= 0")
        if self.episodes == 0 and self.pretrain_epochs == 0:
            problems.append("nothing to train: set --episodes or --pretrain-epochs")
        for name in ("lr", "pretrain_lr"):  # NaN and infinity too: one update makes every weight NaN
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                problems.append(f"{option_name(name)} {getattr(self, name)} (must be a finite number > 0)")
        if problems:
            raise InputError("bad training config: " + "; ".join(problems))


@dataclass
class TrainResult:
    checkpoint: Path
    fingerprint: str
    best_val_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    episodes_per_second: float = 0.0  # of the whole run: every rank's episodes
    world_size: int = 1
    is_main: bool = True  # rank 0, which wrote the files (the other ranks write nothing)


def default_spec(cfg: TrainConfig) -> PreprocessSpec:
    if cfg.dataset == "omniglot":
        return omniglot_spec(cfg.size or 28)
    if cfg.dataset == "tiny-imagenet":
        return PreprocessSpec.create(cfg.size or 64, 3, mean=(0.480, 0.448, 0.398), std=(0.277, 0.269, 0.282))
    return PreprocessSpec.create(cfg.size or 84, 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def check_size(spec: ModelSpec) -> None:
    """Refuse an input size the backbone cannot take, naming the smallest it can."""
    try:
        FewShotModel(spec)  # one dry forward pass; also fails early on an unknown backbone
    except RuntimeError:
        c, size = spec.preprocess.channels, spec.preprocess.size[0]
        backbone = build_backbone(spec.backbone, c, **spec.backbone_kwargs).eval()

        def runs(side: int) -> bool:
            try:
                with torch.no_grad():
                    backbone(torch.zeros(1, c, side, side))
                return True
            except RuntimeError:
                return False

        # larger inputs always run, so a doubling search and a bisection find the smallest
        # size in a few dry passes; none up to 1024 means the error was not about the size
        bad, good = size, size + 1
        while not runs(good):
            if good >= 1024:
                raise
            bad, good = good, min(2 * good, 1024)
        while good - bad > 1:
            mid = (bad + good) // 2
            bad, good = (bad, mid) if runs(mid) else (mid, good)
        raise InputError(f"--size {size} is too small for {spec.backbone}: it takes {good} pixels or more") from None


def _lr(cfg: TrainConfig, step: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(step, cfg.episodes) / max(cfg.episodes, 1)))
    return cfg.lr * cfg.gamma ** (step // cfg.step_every)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random crop from 1/8 reflection padding (natural images)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    pad = max(h // 8, 1)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[:, :, dy : dy + h, dx : dx + w]


class EpisodeLogits(nn.Module):
    """The episodic forward pass (embed, prototypes, query logits) as one module call:
    DistributedDataParallel averages gradients only for what runs through its forward."""

    def __init__(self, model: FewShotModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, n_way: int, k_shot: int) -> torch.Tensor:
        z = self.model.embed(x)
        nk = n_way * k_shot
        protos = z[:nk].view(n_way, k_shot, -1).mean(1)
        return self.model.logits(z[nk:], protos)


def _crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (before, after]: a step of N episodes (N
    processes) passes log and validation points it may not land on."""
    return after // every > before // every


class Trainer:
    """Holds the state of one run; ``train()`` is the public entry point."""

    def __init__(
        self,
        cfg: TrainConfig,
        train_set: ImageSet,
        val_set: ImageSet,
        spec: ModelSpec,
        on_event: Callable[[dict], None] | None,
        env: DistEnv | None = None,
    ):
        self.cfg, self.train_set, self.val_set, self.on_event = cfg, train_set, val_set, on_event
        self.env = env or DistEnv()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = FewShotModel(spec)
        self.out = Path(cfg.out)
        self.log_path = self.out.with_suffix(".jsonl")
        self.history: list[dict[str, Any]] = []
        self.best_acc, self.best_state, self.best_threshold = -1.0, None, None
        self.step, self.epoch = 0, 0
        self.start_time = time.perf_counter()
        self.train_seconds = 0.0  # of the sessions before this one (--resume)
        # an earlier run's files that --force replaces, removed at this session's first write
        self.replaces: list[Path] = []
        self.claimed = False
        self.class_split: ClassSplit | None = None
        self.episode_seconds, self.episodes_done = 0.0, 0
        mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.memory_format = mf
        self.device = self.env.device
        self.device_type = self.device.type
        self.model.to(self.device, memory_format=mf)

    # -- logging and files ---------------------------------------------
    def elapsed(self) -> float:
        """Training seconds of the whole run, earlier sessions included."""
        return self.train_seconds + time.perf_counter() - self.start_time

    def claim(self) -> None:
        """Before this session's first write: remove the files of the run that ``--force``
        replaces (only now, so that a run stopped before it writes anything leaves the old
        one whole rather than half replaced) and start the log with the history so far (a
        resumed run's, up to where it continues)."""
        if self.claimed or not self.env.is_main:
            return
        for f in self.replaces:
            f.unlink(missing_ok=True)
        text = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write(self.log_path, lambda tmp: Path(tmp).write_text(text))
        self.claimed = True

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(self.elapsed(), 2), **record}
        self.history.append(record)
        if not self.env.is_main:
            return
        if self.claimed:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self.claim()
        if self.on_event:
            self.on_event(record)

    def out_of_time(self) -> bool:
        if self.cfg.max_minutes is None:
            return False
        # every rank must stop at the same step, or the others would wait for it in the next one
        return distributed.any_rank(self.env, time.perf_counter() - self.start_time > 60 * self.cfg.max_minutes)

    def batch(self, idx: np.ndarray, gen: torch.Generator | None = None) -> torch.Tensor:
        pp = self.model.spec.preprocess
        x = to_tensor(self.train_set.images[idx], pp.mean, pp.std)
        if gen is not None:
            x = _augment(x, gen)
        return x.to(self.device).contiguous(memory_format=self.memory_format)

    # -- center for centered-L2 -----------------------------------------
    @torch.no_grad()
    def update_center(self) -> None:
        if self.model.spec.normalization is not Normalization.CENTERED_L2:
            return
        rng = np.random.default_rng([self.cfg.seed, 7])
        idx = rng.choice(len(self.train_set), size=min(len(self.train_set), 5000), replace=False)
        self.model.eval()
        pp = self.model.spec.preprocess
        feats = [
            self.model.backbone(to_tensor(self.train_set.images[ix], pp.mean, pp.std).to(self.device))
            for ix in (np.sort(idx[i : i + 512]) for i in range(0, len(idx), 512))
        ]
        self.model.center.copy_(torch.cat(feats).mean(0))

    # -- validation ----------------------------------------------------
    def validate(self, stage: str) -> float:
        """On rank 0 only (the others go on to the next step and wait for it there)."""
        if not self.env.is_main:
            return self.best_acc
        self.update_center()
        cfg = self.cfg
        q = max(1, min(15, int(np.bincount(self.val_set.labels).min()) - cfg.val_k_shot))
        # evaluation runs on the CPU, in float32, as the checkpoint will
        model = self.model if self.device.type == "cpu" else copy.deepcopy(self.model).cpu()
        rep = evaluate(model, self.val_set, cfg.val_n_way, cfg.val_k_shot, q, cfg.val_episodes, seed=cfg.seed + 1)
        self.record_validation(stage, rep)
        self.model.train()
        return rep.accuracy

    def record_validation(self, stage: str, rep) -> None:
        """Log a validation's result and keep (and save) the weights when it is the best so far."""
        improved = rep.accuracy > self.best_acc
        if improved:
            self.best_acc, self.best_threshold = rep.accuracy, None
            self.best_state = copy.deepcopy(self.model.state_dict())
        self.log(
            {
                "stage": stage,
                "step": self.step,
                "epoch": self.epoch,
                "val_acc": rep.accuracy,
                "val_ci95": rep.ci95,
                "best": improved,
            }
        )
        if improved:
            self.save_best()  # now, not at the end: a run that is stopped keeps its best model

    def info(self) -> dict[str, Any]:
        return {
            "config": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(self.cfg).items()},
            "train_data": {
                "name": self.train_set.name,
                "classes": self.train_set.num_classes,
                "images": len(self.train_set),
                "fingerprint": self.train_set.fingerprint(),
            },
            "val_data": {"name": self.val_set.name, "classes": self.val_set.num_classes},
            **({"class_split": self.class_split.to_dict()} if self.class_split else {}),
            "step": self.step,
            "epoch": self.epoch,
            # the episodes of one optimizer step: one per process, gradients averaged
            "world_size": self.env.world_size,
            "episodes_per_step": self.env.world_size,
            "best_val_accuracy": self.best_acc,
            "train_seconds": round(self.elapsed(), 1),
        }

    def save_last(self, optimizer: torch.optim.Optimizer, stage: str) -> None:
        if not self.env.is_main:
            return
        self.claim()
        save_checkpoint(resume_path(self.out), self.model, {**self.info(), "stage": stage}, optimizer.state_dict())

    def save_best(self, final_write: bool = False) -> str:
        """Write the best weights so far to ``out``; ``best_val_accuracy`` is theirs. The
        open-set threshold (one more pass over the validation images) is measured for the
        final write only: a checkpoint written during training carries none until then."""
        self.claim()
        final = copy.deepcopy(self.model).cpu()
        if self.best_state is not None:
            final.load_state_dict(self.best_state)
        final.eval()
        if self.best_threshold is None and final_write:
            # the runtime's default "unknown" threshold, from held-out classes
            self.best_threshold = open_set_threshold(
                final, self.val_set, k_shot=min(5, int(np.bincount(self.val_set.labels).min()) - 1)
            )
        info = {**self.info(), "open_set_threshold": self.best_threshold}
        return save_checkpoint(self.out, final.to(memory_format=torch.contiguous_format), info)

    # -- stages --------------------------------------------------------
    def pretrain(self, progress) -> None:
        cfg, ds = self.cfg, self.train_set
        env = self.env
        head = nn.Linear(self.model.embedding_dim, ds.num_classes).to(self.device)
        net = distributed.wrap(env, nn.Sequential(self.model.backbone, head))
        opt = torch.optim.SGD(net.parameters(), lr=cfg.pretrain_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        # each rank takes --batch-size images of its own shard: a step sees world_size batches
        steps_per_epoch = math.ceil(math.ceil(len(ds) / env.world_size) / cfg.batch_size)
        total = cfg.pretrain_epochs * steps_per_epoch
        task = (
            progress.add_task("pre-train", total=total, completed=self.epoch * steps_per_epoch, info="")
            if progress
            else None
        )
        self.model.train()
        while self.epoch < cfg.pretrain_epochs and not self.out_of_time():
            order = distributed.shard(env, len(ds), self.epoch, cfg.seed)
            gen = None
            if cfg.augment:
                gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.epoch + 1_000_033 * env.rank)
            losses, accs = [], []
            for b in range(steps_per_epoch):
                it = self.epoch * steps_per_epoch + b
                for g in opt.param_groups:
                    g["lr"] = 0.5 * cfg.pretrain_lr * (1 + math.cos(math.pi * it / total))
                idx = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
                y = torch.from_numpy(ds.labels[idx]).to(self.device)
                with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits = net(self.batch(idx, gen)).float()
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                accs.append((logits.argmax(1) == y).float().mean().item())
                if progress:
                    progress.update(
                        task,
                        advance=1,
                        info=f"epoch {self.epoch + 1} loss {np.mean(losses[-50:]):.3f} acc "
                        f"{100 * np.mean(accs[-50:]):.1f}%",
                    )
                if self.out_of_time():
                    break
            self.epoch += 1
            self.log(
                {
                    "stage": "pretrain",
                    "epoch": self.epoch,
                    "loss": float(np.mean(losses)),
                    "acc": float(np.mean(accs)),
                    "lr": opt.param_groups[0]["lr"],
                }
            )
            self.validate("pretrain")
        if progress:
            progress.remove_task(task)

    def episodic(self, progress, optimizer_state: dict | None) -> None:
        cfg = self.cfg
        samplers = self.samplers()
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        if optimizer_state is not None:
            opt.load_state_dict(optimizer_state)
        task = progress.add_task("episodes", total=cfg.episodes, completed=self.step, info="") if progress else None
        net = distributed.wrap(self.env, EpisodeLogits(self.model))
        losses, accs, validated = [], [], -1
        self.model.train()
        while self.step < cfg.episodes and not self.out_of_time():
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, self.step)
            # one optimizer step = one episode per rank: rank r takes episode step + r, so the
            # run sees the same episodes on any number of processes, and resumes on any number
            loss, logits, q_labels = self.episode_loss(net, samplers, self.step + self.env.rank)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # under DDP: gradients averaged over the ranks here
            opt.step()
            self.episode_seconds += time.perf_counter() - t0
            self.episodes_done += self.env.world_size
            losses.append(loss.item())
            accs.append((logits.argmax(1) == q_labels).float().mean().item())
            before, self.step = self.step, self.step + self.env.world_size
            if progress:
                info = f"loss {np.mean(losses[-50:]):.3f} acc {100 * np.mean(accs[-50:]):.1f}%"
                info += f" best val {100 * max(self.best_acc, 0):.2f}%"
                progress.update(task, advance=self.env.world_size, info=info)
            if _crossed(before, self.step, cfg.log_every):  # rank 0's episodes
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
            if _crossed(before, self.step, cfg.val_every) or self.step == cfg.episodes:
                self.validate("episodic")
                self.save_last(opt, "episodic")
                validated = self.step
        if self.step % cfg.val_every and validated != self.step and self.step != cfg.episodes:
            self.validate("episodic")  # stopped by the time limit: validate what was reached
        if progress:
            progress.remove_task(task)

    def episode_loss(
        self, net: nn.Module, samplers: list[EpisodeSampler], i: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, logits and query labels of training episode ``i`` through ``net`` (an
        :class:`EpisodeLogits`, or DDP around one)."""
        cfg = self.cfg
        sampler = samplers[i % len(samplers)]
        ep = sampler.episode(i)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + 104729 + i) if cfg.augment else None
        q_labels = torch.from_numpy(np.repeat(np.arange(cfg.n_way), cfg.q_query)).to(self.device)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = net(self.batch(np.concatenate([ep.support, ep.query]), gen), cfg.n_way, sampler.k_shot)
        return F.cross_entropy(logits.float(), q_labels), logits, q_labels

    def samplers(self) -> list[EpisodeSampler]:
        """The episode samplers of the run: one per shot count of --mixed-shots, used in turn."""
        cfg, ds = self.cfg, self.train_set
        shots = cfg.mixed_shots or (cfg.k_shot,)
        return [
            EpisodeSampler(ds.labels, cfg.n_way, k, cfg.q_query, cfg.seed + 7 * j, ds.name) for j, k in enumerate(shots)
        ]


def progress_bar(enabled: bool):
    """Rich progress bars on a terminal; elsewhere (a log, a pipe) plain lines per stage and a heartbeat."""
    if not enabled:
        return None
    from edgemeta.progress import StageLog, plain_progress_wanted

    if plain_progress_wanted():
        return StageLog()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    )


def _stage(bar, name: str) -> None:
    """A stage line for the plain progress log (a progress bar shows its tasks instead)."""
    if bar is not None and hasattr(bar, "stage"):
        bar.stage(name)


def folder_split(cfg: TrainConfig) -> ClassSplit | None:
    """The class split of a user's image folder, decided from its class names before any image
    is decoded (so too few classes is said at once); None for the named data sets."""
    if cfg.dataset in ("omniglot", "tiny-imagenet"):
        return None
    if cfg.dataset == "digits":
        classes = [str(i) for i in range(10)]
    elif Path(cfg.dataset).exists():
        classes = folder_classes(cfg.dataset)
    else:
        return None  # load_dataset names the unknown data set
    n_way = cfg.n_way if cfg.episodes else 2  # pre-training alone draws no training episodes
    return split_classes(classes, n_way, cfg.val_n_way, cfg.seed, name=cfg.dataset)


def load_training_data(
    cfg: TrainConfig, spec: PreprocessSpec, split: ClassSplit | None = None
) -> tuple[ImageSet, ImageSet]:
    if cfg.dataset == "omniglot":
        return omniglot_splits(cfg.data_dir, spec.size[0], cfg.val_alphabets)
    if cfg.dataset == "tiny-imagenet" or split is None:
        return load_dataset(cfg.dataset, "train", cfg.data_dir, spec), load_dataset(
            cfg.dataset, "val", cfg.data_dir, spec
        )
    # a user's image folder: base classes train, validation classes choose the best weights,
    # and the novel classes stay unseen for verification and evaluation
    full = load_dataset(cfg.dataset, "all", cfg.data_dir, spec)
    index = {c: i for i, c in enumerate(full.classes)}
    missing = sorted(set(split.base + split.val) - set(index))
    if missing:
        raise DataError(
            f"{full.name} no longer holds {len(missing)} class(es) the run was split with ({', '.join(missing[:3])}); "
            "put them back, or start a new run"
        )
    return (
        full.select_classes([index[c] for c in split.base], full.name + "-train"),
        full.select_classes([index[c] for c in split.val], full.name + "-val"),
    )


def train(
    cfg: TrainConfig,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    on_event: Callable[[dict], None] | None = None,
    force: bool = False,
) -> TrainResult:
    """Meta-train a model and write its checkpoint, JSONL log and training curve next to ``cfg.out``.

    ``cfg.out`` must not hold an earlier run (see :func:`run_files`) unless ``resume`` continues
    it or ``force`` replaces it; a replaced run's files are removed when the new run first
    writes (its first log record), not before.

    Example:
        >>> result = train(TrainConfig(out="conv4.safetensors", episodes=2000))
        >>> print(result.best_val_accuracy)
    """
    if cfg.init:  # a pretrained backbone is fine-tuned by its own loop (one process)
        from edgemeta.finetune import train_pretrained

        cfg.check()
        if distributed.detect(cfg.device).world_size > 1:
            raise InputError("--init imagenet trains in one process; run it without torchrun")
        return train_pretrained(cfg, resume, progress, on_event, force)
    env = distributed.detect(cfg.device)
    with distributed.session(env, cfg.dist_timeout):
        # every check before any work, on every rank: a bad input stops all of them, each with the
        # message, and nothing is written
        with distributed.all_or_none(env):
            out, spec, files = _check_run(cfg, resume, force, env)
            # a resumed run keeps the split it recorded (class folders added since, or another
            # --episodes, must not move classes between base, validation and novel)
            recorded = recorded_split(read_header(files[0]).get("info", {})) if files else None
            split = recorded or folder_split(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        bar = progress_bar(progress and env.is_main)
        plain = bar is not None and hasattr(bar, "stage")
        if plain:  # a progress bar starts after loading: the data loader draws its own on a terminal
            bar.start()
        try:
            _stage(bar, f"loading {cfg.dataset}")
            train_set, val_set = distributed.local_first(env, lambda: _load_checked_data(cfg, spec.preprocess, split))
            with distributed.all_or_none(env):
                trainer = Trainer(cfg, train_set, val_set, spec, on_event, env)
                trainer.class_split = split
                optimizer_state = restore_run(trainer, *files) if files else None
            if not continues_run(resume, out):
                trainer.replaces = [f for f in run_files(out) if f.exists()]
            return _run(trainer, out, optimizer_state, bar, plain)
        finally:
            if bar is not None:
                bar.stop()


def _check_run(
    cfg: TrainConfig, resume: str | os.PathLike | None, force: bool, env: DistEnv
) -> tuple[Path, ModelSpec, tuple[Path, Path] | None]:
    """The output, the model spec and the files to resume from (if any), once every check passed."""
    cfg.check()
    resume = Path(resume) if resume is not None else None
    out = check_out(cfg, resume, force)
    pp = default_spec(cfg)
    spec = ModelSpec(cfg.backbone, pp, {}, cfg.metric, cfg.normalization)
    check_size(spec)
    step, files = 0, None
    if resume is not None:
        last, _ = files = check_resume(resume, spec, cfg)
        step = int(read_header(last).get("info", {}).get("step", 0))
    check_world_size(cfg, step, env.world_size)
    return out, spec, files


def _load_checked_data(cfg: TrainConfig, pp: PreprocessSpec, split: ClassSplit | None) -> tuple[ImageSet, ImageSet]:
    train_set, val_set = load_training_data(cfg, pp, split)
    if cfg.episodes:
        train_set.check_episode_size(cfg.n_way, cfg.k_shot + cfg.q_query)
    val_set.check_episode_size(cfg.val_n_way, cfg.val_k_shot + 1)
    return train_set, val_set


def _run(trainer: Trainer, out: Path, optimizer_state: dict | None, bar, plain: bool) -> TrainResult:
    """Train, then (rank 0) write the final checkpoint and curve; ``bar``: a progress display
    (``plain``: lines in a log, already started) or None."""
    cfg, env = trainer.cfg, trainer.env
    if bar is not None and not plain:
        bar.start()
    try:
        if trainer.epoch < cfg.pretrain_epochs and trainer.step == 0:
            trainer.pretrain(bar)
        if cfg.episodes:
            trainer.episodic(bar, optimizer_state)
    finally:
        if bar is not None and not plain:
            bar.stop()
    fingerprint = ""
    with distributed.all_or_none(env):  # a failed final write fails every rank, not only rank 0
        if env.is_main:
            if trainer.best_state is None:
                _stage(bar, "validating")
                trainer.validate("final")
            _stage(bar, "writing the checkpoint (open-set threshold from the validation classes)")
            fingerprint = trainer.save_best(final_write=True)
            plot_curve(trainer.history, out.with_suffix(".png"))
    eps = trainer.episodes_done / trainer.episode_seconds if trainer.episode_seconds else 0.0
    return TrainResult(
        out, fingerprint, trainer.best_acc, trainer.history, trainer.elapsed(), eps, env.world_size, env.is_main
    )


def restore_run(trainer: Trainer, last: Path, best: Path) -> dict | None:
    """Load the last state from ``last`` (a ``.last`` file or a checkpoint), the best weights
    so far from the run's checkpoint ``best``, and the run's log up to the last state."""
    ck = load_checkpoint(last, with_optimizer=True)
    trainer.model.load_state_dict(ck.model.state_dict())
    trainer.model.to(trainer.device, memory_format=trainer.memory_format)
    trainer.step = int(ck.info.get("step", 0))
    trainer.epoch = int(ck.info.get("epoch", 0))
    trainer.train_seconds = float(ck.info.get("train_seconds", 0.0))
    recorded = float(ck.info.get("best_val_accuracy", -1.0))
    # the run writes its checkpoint whenever validation improves, before its .last file, so
    # the checkpoint's accuracy is at least the one .last recorded; a lower one (or none)
    # means the best weights are lost, and the best is chosen anew, so the final checkpoint's
    # accuracy is always that of the weights it holds
    try:
        ck_best = ck if same_file(best, last) else load_checkpoint(best)
        best_acc = float(ck_best.info.get("best_val_accuracy", -1.0))
    except CheckpointError:
        ck_best, best_acc = None, -1.0
    if ck_best is not None and ck_best.spec == ck.spec and best_acc >= recorded:
        trainer.best_state = copy.deepcopy(ck_best.model.state_dict())
        trainer.best_acc, trainer.best_threshold = best_acc, ck_best.info.get("open_set_threshold")
    elif recorded >= 0:
        warnings.warn(
            f"{best} does not hold the best weights ({100 * recorded:.2f}%) of the run resumed from {last}; "
            "the best model is chosen anew from the validations of this session",
            stacklevel=2,
        )
    log = best.with_suffix(".jsonl")
    if log.is_file():
        history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        # records past the last state are made again by this session
        trainer.history = [
            h for h in history if h.get("step", 0) <= trainer.step and h.get("epoch", 0) <= trainer.epoch
        ]
    return ck.optimizer_state if ck.info.get("stage") == "episodic" else None
