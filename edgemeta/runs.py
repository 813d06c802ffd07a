"""A training run's files: where it writes (checkpoint, resume file, log, curve), what an output
path may replace, what a resume may change, and the training curve."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemeta.checkpoint import read_header
from edgemeta.model import ModelSpec
from edgemeta.runtime.errors import CheckpointError, InputError
from edgemeta.runtime.files import check_output, same_file

if TYPE_CHECKING:
    from edgemeta.train import TrainConfig


def option_name(name: str) -> str:
    """The command-line spelling of a config field."""
    return "--queries" if name == "q_query" else "--" + name.replace("_", "-")


def resume_path(out: str | os.PathLike) -> Path:
    """Where the last (not best) state is kept for ``--resume``."""
    out = Path(out)
    return out.with_name(out.name.replace(".safetensors", "") + ".last.safetensors")


def run_files(out: str | os.PathLike) -> list[Path]:
    """The files of a run at ``out``: its checkpoint, resume file, JSONL log and PNG curve."""
    out = Path(out)
    return [out, resume_path(out), out.with_suffix(".jsonl"), out.with_suffix(".png")]


def is_checkpoint(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except CheckpointError:
        return False


def resume_files(path: Path) -> tuple[Path, Path]:
    """The resume file of the run at ``path`` (its ``.last`` file, or a checkpoint) and the
    run's checkpoint, which holds its best weights so far."""
    if path.name.endswith(".last.safetensors"):
        # the checkpoint beside it, as the run wrote them (a moved or renamed run keeps the pair);
        # the name recorded inside only when that one is missing
        beside = path.with_name(path.name[: -len(".last.safetensors")] + ".safetensors")
        if beside.exists():
            return path, beside
        out = read_header(path).get("info", {}).get("config", {}).get("out") or beside.name
        return path, path.parent / Path(out).name
    last = resume_path(path)
    return (last if last.exists() else path), path


def check_out(cfg: TrainConfig, resume: Path | None, force: bool) -> Path:
    """Refuse, before any work, an ``-o`` that would lose something: a folder, a file that is
    not a checkpoint, or an earlier run that is neither continued (``resume``) nor replaced."""
    out = check_output(cfg.out, option="-o", what="checkpoint", is_own=is_checkpoint)
    files = run_files(out)
    if out.name.endswith(".last.safetensors"):
        raise InputError(f"-o {out} is named like a run's resume file; name the checkpoint like model.safetensors")
    if len({f.resolve() for f in files}) < len(files):
        raise InputError(
            f"-o {out}: the run's log or curve would overwrite the checkpoint; name it like model.safetensors"
        )
    existing = [f for f in files if f.exists()]
    if existing and not (continues_run(resume, out) or force):
        resumable = any(f.exists() for f in files[:2])  # a log or curve alone: stopped before anything to resume
        raise InputError(
            f"-o {out}: a run is there already ({', '.join(f.name for f in existing)}); "
            + (
                f"pass --resume {out} to continue it or --force to replace it"
                if resumable
                else "pass --force to replace it (it has nothing to resume)"
            )
            + ", or choose another -o"
        )
    return out


def continues_run(resume: Path | None, out: Path) -> bool:
    """Whether ``resume`` is the run at ``out`` (its checkpoint or its ``.last`` file)."""
    return resume is not None and any(same_file(resume, f) for f in run_files(out)[:2])


# what a resumed run may change: where it writes and reads, how long it runs and on what;
# everything else decides which episodes it sees and what it learns from them
RESUME_MAY_CHANGE = frozenset(
    {"out", "data_dir", "episodes", "threads", "max_minutes", "log_every", "device", "dist_timeout"}
)


def check_same_config(last: Path, was: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse a resume whose config differs from the run's in anything but where and how long
    it runs (the number of processes may change); every difference named at once."""
    now = json.loads(json.dumps({k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()}))
    changed = [k for k, v in now.items() if k in was and k not in RESUME_MAY_CHANGE and was[k] != v]
    if changed:
        diffs = ", ".join(f"{option_name(k)} {was[k]!r} (now {now[k]!r})" for k in changed)
        raise CheckpointError(
            f"{last} was trained with {diffs}; resume with the run's own settings, or start a new run with another -o"
        )


def check_world_size(cfg: TrainConfig, step: int, world_size: int) -> None:
    """One optimizer step takes one episode per process: the episodes left must split evenly."""
    left = cfg.episodes - step
    if left > 0 and left % world_size:
        lower, upper = step + left // world_size * world_size, step + -(-left // world_size) * world_size
        at = f" (resuming at episode {step}, {left} left)" if step else ""
        raise InputError(
            f"--episodes {cfg.episodes} does not split over {world_size} processes{at}: "
            "each step takes one episode per process; "
            f"use --episodes {upper}"
            + (f" or {lower}" if lower > step else "")
            + f", or a number of processes that divides {left}"
        )


def check_resume(resume: Path, spec: ModelSpec, cfg: TrainConfig) -> tuple[Path, Path]:
    """The resume and best files of the run ``resume``, refused when it was trained with another
    spec or another config (:func:`check_same_config`)."""
    last, best = resume_files(resume)
    header = read_header(last)
    was = ModelSpec.from_dict(header["spec"])
    if was != spec:
        raise CheckpointError(
            f"{last} was trained with {was.backbone} at size {was.preprocess.size[0]}, "
            f"{was.metric.value}, {was.normalization.value}, not this config; resume "
            "with the same --backbone, --size, --metric and --normalization"
        )
    check_same_config(last, header.get("info", {}).get("config", {}), cfg)
    return last, best


def plot_curve(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss/accuracy and validation accuracy against episodes (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [h for h in history if h.get("stage") == "episodic" and "loss" in h]
    val = [h for h in history if "val_acc" in h]
    pre = [h for h in history if h.get("stage") == "pretrain" and "loss" in h]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if ep:
        axes[0].plot([h["step"] for h in ep], [h["loss"] for h in ep], label="episodic loss")
        axes[1].plot([h["step"] for h in ep], [100 * h["acc"] for h in ep], label="train episode acc", alpha=0.6)
    if pre:
        axes[0].plot([h["epoch"] for h in pre], [h["loss"] for h in pre], label="pre-train loss (x: epoch)")
    if val:
        xs = [h["step"] if h.get("stage") != "pretrain" else h["epoch"] for h in val]
        axes[1].plot(xs, [100 * h["val_acc"] for h in val], "o-", label="validation acc (held-out classes)")
    axes[0].set_xlabel("episode")
    axes[0].set_ylabel("loss")
    axes[1].set_xlabel("episode")
    axes[1].set_ylabel("accuracy %")
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
