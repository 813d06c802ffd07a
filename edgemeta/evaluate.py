"""Few-shot evaluation: accuracy with a 95% confidence interval, macro precision/recall/F1.

In evaluation mode an image's embedding does not depend on the episode, so every
image of the split is embedded once and episodes are then index operations: 1,000
episodes cost one pass over the data set, and the numbers are exactly those of
embedding each episode separately.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgemeta.data import ClassSplit, ImageSet
from edgemeta.episodes import Episode, EpisodeSampler
from edgemeta.model import FewShotModel
from edgemeta.runtime.spec import PreprocessSpec

__all__ = [
    "EvalReport",
    "embed_images",
    "episode_scores",
    "evaluate",
    "evaluate_embeddings",
    "open_set_threshold_of",
    "pixel_mismatch",
    "report_doc",
    "summarize",
    "to_tensor",
]


@dataclass
class EvalReport:
    """Summary over episodes; ``accuracy`` and ``ci95`` are fractions (0.985 = 98.5%)."""

    dataset: str
    n_way: int
    k_shot: int
    q_query: int
    episodes: int
    accuracy: float
    ci95: float
    precision: float
    recall: float
    f1: float
    seed: int = 0
    per_episode: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, per_episode: bool = False) -> dict:
        d = asdict(self)
        if not per_episode:
            d.pop("per_episode")
        return d

    def line(self) -> str:
        return (
            f"{self.n_way}-way {self.k_shot}-shot: {100 * self.accuracy:.2f}% "
            f"± {100 * self.ci95:.2f} (F1 {100 * self.f1:.2f})"
        )


def to_tensor(images_u8: np.ndarray, mean: Iterable[float], std: Iterable[float]) -> torch.Tensor:
    """uint8 [B, H, W, C] -> normalized float32 [B, C, H, W]; the runtime's ``normalize`` in torch."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


@torch.inference_mode()
def embed_images(
    model: FewShotModel, images_u8: np.ndarray, batch_size: int = 512, progress: Callable[[int], None] | None = None
) -> torch.Tensor:
    """Embeddings of every image (model in eval mode), in batches."""
    model.eval()
    pp = model.spec.preprocess
    out = []
    for i in range(0, len(images_u8), batch_size):
        out.append(model.embed(to_tensor(images_u8[i : i + batch_size], pp.mean, pp.std)))
        if progress:
            progress(min(batch_size, len(images_u8) - i))
    return torch.cat(out) if out else torch.zeros(0, model.embedding_dim)


def episode_scores(pred: np.ndarray, truth: np.ndarray, n_way: int) -> tuple[float, float, float, float]:
    """Accuracy and macro precision, recall, F1 of one episode."""
    acc = float((pred == truth).mean())
    ps, rs, fs = [], [], []
    for c in range(n_way):
        tp = float(((pred == c) & (truth == c)).sum())
        p_den, r_den = float((pred == c).sum()), float((truth == c).sum())
        p = tp / p_den if p_den else 0.0
        r = tp / r_den if r_den else 0.0
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if p + r else 0.0)
    return acc, float(np.mean(ps)), float(np.mean(rs)), float(np.mean(fs))


def summarize(scores: list[tuple[float, float, float, float]], **fields) -> EvalReport:
    arr = np.asarray(scores, dtype=np.float64)
    n = len(arr)
    ci = 1.96 * float(arr[:, 0].std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return EvalReport(
        episodes=n,
        accuracy=float(arr[:, 0].mean()),
        ci95=ci,
        precision=float(arr[:, 1].mean()),
        recall=float(arr[:, 2].mean()),
        f1=float(arr[:, 3].mean()),
        per_episode=arr[:, 0].tolist(),
        **fields,
    )


@torch.inference_mode()
def classify_episode(model: FewShotModel, emb: torch.Tensor, ep: Episode, n_way: int) -> np.ndarray:
    """Predicted class (0..N-1) for each query of ``ep`` from precomputed embeddings."""
    s = emb[torch.from_numpy(ep.support)]
    protos = s.view(n_way, -1, s.shape[1]).mean(dim=1)
    logits = model.logits(emb[torch.from_numpy(ep.query)], protos)
    return logits.argmax(dim=1).numpy()


def evaluate(
    model: FewShotModel,
    data: ImageSet,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Mean accuracy over seeded episodes of ``data``'s classes (which must be novel to the model).

    Example:
        >>> report = evaluate(ckpt.model, load_omniglot("evaluation"), n_way=5, k_shot=1)
        >>> print(report.line())
    """
    emb = embed_images(model, data.images, progress=progress)
    return evaluate_embeddings(emb, data.labels, model.logits, n_way, k_shot, q_query, episodes, seed, data.name)


@torch.inference_mode()
def evaluate_embeddings(
    emb: torch.Tensor,
    labels: np.ndarray,
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    name: str = "",
) -> EvalReport:
    """:func:`evaluate` on embeddings computed elsewhere (an ONNX Runtime session, a cache):
    the same seeded episodes, prototypes as class means, ``logits(queries, prototypes)``.

    Example:
        >>> rep = evaluate_embeddings(torch.from_numpy(emb), data.labels, model.logits, k_shot=5, name=data.name)
    """
    sampler = EpisodeSampler(labels, n_way, k_shot, q_query, seed, name)
    scores = []
    for ep in sampler(episodes):
        s = emb[torch.from_numpy(ep.support)]
        protos = s.view(n_way, -1, s.shape[1]).mean(dim=1)
        pred = logits(emb[torch.from_numpy(ep.query)], protos).argmax(dim=1).numpy()
        scores.append(episode_scores(pred, ep.query_labels, n_way))
    return summarize(scores, dataset=name, n_way=n_way, k_shot=k_shot, q_query=q_query, seed=seed)


def evaluate_episodes_file(model: FewShotModel, path: str, progress: Callable[[int], None] | None = None) -> EvalReport:
    """Evaluate the fixed episodes of an episodes file (see :mod:`edgemeta.episodes`).

    Each distinct image is decoded with the model's preprocessing and embedded once.
    """
    from edgemeta.episodes import read_episodes_file
    from edgemeta.runtime.preprocess import to_uint8

    ef = read_episodes_file(path)
    files = sorted({str(x[0]) for ep in ef.episodes for part in ("support", "query") for x in ep[part]})
    index = {f: i for i, f in enumerate(files)}
    spec = model.spec.preprocess
    images = np.stack([to_uint8(str(ef.base / f), spec) for f in files])
    emb = embed_images(model, images, progress=progress)
    scores, ways, shots, queries = [], set(), set(), set()
    for ep in ef.episodes:
        classes = sorted({str(x[1]) for x in ep["support"]})
        cid = {c: i for i, c in enumerate(classes)}
        s_idx = torch.tensor([index[str(x[0])] for x in ep["support"]])
        s_lab = torch.tensor([cid[str(x[1])] for x in ep["support"]])
        q_idx = torch.tensor([index[str(x[0])] for x in ep["query"]])
        q_lab = np.array([cid[str(x[1])] for x in ep["query"]])
        n = len(classes)
        protos = torch.zeros(n, emb.shape[1]).index_add_(0, s_lab, emb[s_idx]) / torch.bincount(
            s_lab, minlength=n
        ).unsqueeze(1)
        pred = model.logits(emb[q_idx], protos).argmax(1).numpy()
        scores.append(episode_scores(pred, q_lab, n))
        ways.add(n)
        shots.add(len(ep["support"]) // n)
        queries.add(len(ep["query"]) // n)
    one = lambda s: s.pop() if len(s) == 1 else 0  # noqa: E731
    return summarize(scores, dataset=str(path), n_way=one(ways), k_shot=one(shots), q_query=one(queries), seed=-1)


# Channels of the named data sets, known before decoding them (digits and folders take the model's).
_DATASET_CHANNELS = {"omniglot": 1, "tiny-imagenet": 3}


def pixel_mismatch(data: PreprocessSpec, model: PreprocessSpec) -> list[str]:
    """How images decoded with ``data`` differ from what ``model`` takes: channels, size,
    interpolation. Mean and std do not count: evaluation normalizes with the model's own."""
    found = []
    if data.channels != model.channels:
        found.append(f"{data.channels} channel(s), the model takes {model.channels}")
    if data.size != model.size:
        found.append(f"size {data.size[0]}x{data.size[1]}, the model takes {model.size[0]}x{model.size[1]}")
    if data.interpolation != model.interpolation:
        found.append(f"{data.interpolation} resizing, the model was trained with {model.interpolation}")
    return found


def _recorded_data(info: dict) -> str:
    """The data set a checkpoint was trained on when it can be loaded here (its novel classes are
    the default evaluation), else Omniglot."""
    from edgemeta.data import is_data_name

    recorded = str((info.get("config") or {}).get("dataset") or "")
    return recorded if is_data_name(recorded) else "omniglot"


FOLDER_SPLITS = ("test", "val", "train", "all")


def _recorded_split(dataset: str, data: ImageSet, split: ClassSplit | None, which: str) -> ImageSet:
    """The classes of an image folder (or digits) that ``which`` names under the checkpoint's class split:
    ``test`` the classes training never saw (base and validation classes are left out by name,
    whatever folder they are in), ``val`` and ``train`` the recorded ones, ``all`` every class."""
    from edgemeta.data import NOVEL_SPLITS, novel_classes
    from edgemeta.runtime.errors import InputError

    # omniglot and tiny-imagenet name their own splits (--split background, train...); a folder and
    # digits, which have none, follow the one training recorded
    if split is None or dataset in NOVEL_SPLITS:
        return data
    if which not in FOLDER_SPLITS:
        raise InputError(
            f"--split {which!r}: {dataset} has no splits of its own, so the class split the checkpoint records "
            f"applies; use one of {', '.join(FOLDER_SPLITS)}"
        )
    if which == "test":
        return novel_classes(data, split, "evaluate on classes the model never saw")
    if which == "all":
        return data
    names = set(split.val if which == "val" else split.base)
    picked = data.select_classes([i for i, c in enumerate(data.classes) if c in names], f"{data.name}-{which}")
    if picked.num_classes == 0:
        raise InputError(
            f"{data.name} holds none of the checkpoint's {which} classes; pass the folder it was trained on"
        )
    return picked


def report_doc(checkpoint: str | os.PathLike | None, reports: list[EvalReport]) -> dict:
    """The JSON report of ``edgemeta evaluate``."""
    return {"checkpoint": str(checkpoint or "embedded"), "results": [r.to_dict() for r in reports]}


def run_evaluation(
    checkpoint: str | os.PathLike | None,
    dataset: str | None = None,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    n_ways: list[int] | None = None,
    k_shots: list[int] | None = None,
    q_query: int | None = None,
    episodes: int | None = None,
    seed: int | None = None,
    episodes_file: str | os.PathLike | None = None,
    threads: int | None = None,
    report: str | os.PathLike | None = None,
) -> list[EvalReport]:
    """What ``edgemeta evaluate`` does: load the checkpoint (default: embedded) and the data, run each
    protocol, and write the JSON ``report`` when given (checked before any work; it may replace an
    earlier report, never an input or another kind of file).

    ``None`` takes the default: omniglot, its novel classes (split ``test``, which is Omniglot's
    evaluation split and Tiny-ImageNet's test classes), 5-way, 1-shot, 15 queries, 1000 episodes,
    seed 0. With ``episodes_file`` the file fixes all of these, and passing any is an error.
    """
    from edgemeta.checkpoint import default_checkpoint, load_checkpoint
    from edgemeta.data import load_dataset
    from edgemeta.runtime.errors import InputError
    from edgemeta.runtime.files import atomic_write, check_output, json_document

    ckpt_path = Path(checkpoint) if checkpoint else default_checkpoint()
    if report is not None:
        inputs = [ckpt_path, episodes_file, dataset]  # a data set that is not a path is no file, so not an input
        is_report = lambda p: isinstance(doc := json_document(p), dict) and {"checkpoint", "results"} <= doc.keys()  # noqa: E731
        check_output(report, option="--report", what="report of edgemeta evaluate", inputs=inputs, is_own=is_report)
    sampling = {
        "--dataset": dataset,
        "--split": split,
        "--data-dir": data_dir,
        "--n-way": n_ways,
        "--k-shot": k_shots,
        "--queries": q_query,
        "--episodes": episodes,
        "--seed": seed,
    }
    given = [flag for flag, v in sampling.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)]
    if episodes_file and given:
        raise InputError(
            f"the episodes file fixes the data and N-way/K-shot/queries of every episode; drop {', '.join(given)}"
        )
    split = split or "test"
    episodes = 1000 if episodes is None else episodes
    if episodes < 1:
        raise InputError(f"episodes must be >= 1, got {episodes}")
    if threads:
        torch.set_num_threads(threads)
    ck = load_checkpoint(ckpt_path)
    dataset = dataset or _recorded_data(ck.info)
    if episodes_file:
        reports = [evaluate_episodes_file(ck.model, str(episodes_file))]
    else:
        pp = ck.spec.preprocess
        channels = _DATASET_CHANNELS.get(dataset, pp.channels)
        if channels != pp.channels:  # before decoding the whole set
            raise InputError(
                f"{dataset} images have {channels} channel(s), the model takes {pp.channels}-channel "
                f"{pp.size[0]}x{pp.size[1]} images; "
                "evaluate it on a data set of its kind, or on an image folder (decoded to the model's input)"
            )
        data = _recorded_split(
            dataset, load_dataset(dataset, split, data_dir, pp), ClassSplit.from_dict(ck.info.get("class_split")), split
        )
        found = pixel_mismatch(data.spec, pp)
        if found:
            raise InputError(f"{data.name} was loaded with {'; '.join(found)}; evaluate it on a data set of its kind")
        sweep = [(n, k) for n in n_ways or [5] for k in k_shots or [1]]
        q = 15 if q_query is None else q_query
        reports = [evaluate(ck.model, data, n, k, q, episodes, 0 if seed is None else seed) for n, k in sweep]
    if report is not None:
        text = json.dumps(report_doc(checkpoint, reports), indent=2)
        atomic_write(report, lambda tmp: Path(tmp).write_text(text))
    return reports


@torch.inference_mode()
def open_set_threshold(
    model: FewShotModel, data: ImageSet, k_shot: int = 5, episodes: int = 200, percentile: float = 95.0, seed: int = 0
) -> float:
    """A default open-set distance threshold, from held-out (never test) classes.

    In ``episodes`` 5-way ``k_shot``-shot episodes, each query's distance to its own
    class prototype is measured; the threshold is the ``percentile``-th of those, so
    about ``100 - percentile`` % of genuine queries of unseen classes would be called
    unknown. The distance is ``-logit`` for squared euclidean and ``1 - cos`` for cosine,
    as the runtime reads it.
    """
    emb = embed_images(model, data.images)
    return open_set_threshold_of(model, emb, data.labels, k_shot, episodes, percentile, seed, data.name)


@torch.inference_mode()
def open_set_threshold_of(
    model: FewShotModel,
    emb: torch.Tensor,
    labels: np.ndarray,
    k_shot: int = 5,
    episodes: int = 200,
    percentile: float = 95.0,
    seed: int = 0,
    name: str = "",
) -> float:
    """:func:`open_set_threshold` from the embeddings ``emb`` of images with ``labels``."""
    q = max(1, min(5, int(np.bincount(labels).min()) - k_shot))
    sampler = EpisodeSampler(labels, min(5, int(labels.max()) + 1), k_shot, q, seed, name)
    dists = []
    for ep in sampler(episodes):
        s = emb[torch.from_numpy(ep.support)]
        protos = s.view(sampler.n_way, k_shot, -1).mean(1)
        logits = model.logits(emb[torch.from_numpy(ep.query)], protos)
        own = logits[torch.arange(len(ep.query)), torch.from_numpy(ep.query_labels)]
        if model.spec.metric.value == "cosine":
            own = own / torch.exp(model.log_scale)
            dists.append((1.0 - own).numpy())
        else:
            dists.append((-own).numpy())
    return float(np.percentile(np.concatenate(dists), percentile))
