"""The backprop baseline: a last linear layer trained by SGD against prototype enrolment, on the same episodes."""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgemeta.bench.config import BenchConfig, unknown_data
from edgemeta.bench.machine import physical_cores
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.ort import SessionOptions
from edgemeta.runtime.session import Session
from edgemeta.runtime.spec import PreprocessSpec

# torch threads of the backprop baseline's SGD steps. A 64 x 5 layer's tensors are far below
# torch's parallel grain, so more threads only add a team to wake: on 2 quiet cores one
# thread was about as fast (17.0 vs 17.7 ms per 100 steps in an isolated A/B, well inside
# the 16-45 ms the steps take from run to run), and far steadier under load: while another
# process held a core, a 2-thread team took 35 ms to 2.4 s (its barriers waiting on a
# preempted thread), one thread 22-50 ms.
SGD_THREADS = 1
BACKPROP_SHOTS, BACKPROP_WAYS, BACKPROP_QUERIES = (1, 5), 5, 15  # the protocol: 5-way 1- and 5-shot, 15 queries


@dataclass(frozen=True)
class BackpropResult:
    """Prototype enrolment vs a last linear layer trained by backprop, on the same episodes.

    Times are per new class set (one episode's N classes), in ms: the embedding of the
    support images (shared by both) and each method's own adaptation step.
    """

    n_way: int
    k_shot: int
    episodes: int
    steps: int
    lr: float
    embed_ms: float
    prototype_ms: float
    backprop_ms: float
    prototype_accuracy: float
    prototype_ci95: float
    backprop_accuracy: float
    backprop_ci95: float
    precision: str  # of the exported model that embeds the images for both methods
    dataset: str = "omniglot-evaluation"  # where the episodes' classes come from (never the model's training classes)
    sgd_threads: int = SGD_THREADS  # torch threads of the SGD steps (see SGD_THREADS)

    @property
    def speedup(self) -> float:
        """How many times faster a class set is learned by prototypes, end to end (the
        support embedding, which both need, included)."""
        return (self.embed_ms + self.backprop_ms) / (self.embed_ms + self.prototype_ms)

    @property
    def learning_speedup(self) -> float:
        """How many times faster the learning step alone is: class means against the SGD
        steps, both from the same support embeddings."""
        return self.backprop_ms / self.prototype_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup, "learning_speedup": self.learning_speedup}


def _ci95(values: Sequence[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    return 1.96 * float(a.std(ddof=1)) / math.sqrt(len(a)) if len(a) > 1 else float("nan")


def _train_linear(torch: Any, support: Any, labels: Any, n_way: int, steps: int, lr: float) -> Any:
    """Coral-style on-device training of the last layer: full-batch SGD on frozen embeddings.

    Embeddings are scaled to unit mean norm first, so one learning rate suits any backbone.
    """
    scale = support.norm(dim=1).mean().clamp_min(1e-12)
    x = support / scale
    layer = torch.nn.Linear(x.shape[1], n_way)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(layer(x), labels).backward()
        opt.step()
    return lambda q: layer(q / scale)


def backprop_data(given: str | None, recorded: object, channels: int) -> str:
    """Which images the backprop baseline's episodes come from: ``given``
    (``--backprop-data``: the user vouches that the model never saw its classes), else the
    novel classes of the data set the model records, when it is one whose novel split
    edgemeta's training never touches (Omniglot's evaluation alphabets, Tiny-ImageNet's test
    classes), else Omniglot's evaluation classes for a grey model. A folder or the digits
    the model records are not followed: training used most of their classes. A colour model
    without such a record must be told."""
    from edgemeta.data import NOVEL_SPLITS, is_data_name

    if given is not None:
        if not is_data_name(given):
            raise InputError(unknown_data(given))
        return given
    if recorded in NOVEL_SPLITS:
        return str(recorded)
    if channels == 1:
        return "omniglot"
    raise InputError(
        "the backprop baseline needs images of classes the model was not trained on, and "
        f"this {channels}-channel model records no data set with such a split; pass "
        "--backprop-data tiny-imagenet or a folder (or zip) of classes it never saw"
    )


def _backprop_episodes(
    spec: PreprocessSpec,
    data: str | None,
    recorded: object,
    data_dir: str | os.PathLike | None,
    shots: Sequence[int],
    n_way: int,
    queries: int,
    seed: int,
) -> tuple[Any, list[Any]]:
    """The images and one episode sampler per shot count; every problem with the data (a
    missing set, images the model cannot take, too few images for the largest shot count)
    is raised here, before any episode runs."""
    from edgemeta.data import novel_images
    from edgemeta.episodes import EpisodeSampler

    images = novel_images(backprop_data(data, recorded, spec.channels), spec, data_dir, option="--backprop-data")
    remedy = "pass --backprop-data with more classes or more images per class"
    return images, [EpisodeSampler(images.labels, n_way, k, queries, seed, images.name, remedy=remedy) for k in shots]


def check_backprop(config: BenchConfig, model: Path) -> None:
    """What the backprop baseline needs, checked before the minutes of measuring (and of
    making variants): torch, and episodes of the data for every shot count (the data is
    decoded now, and cached for the baseline)."""
    if importlib.util.find_spec("torch") is None:
        raise InputError(
            "--backprop-baseline trains the last layer in torch, which is not installed: pip install 'edgemeta[train]'"
        )
    sess = Session(model, "cpu", options=SessionOptions(intra_op_threads=1))
    recorded = sess.metadata.extra.get("dataset")
    _backprop_episodes(
        sess.preprocess,
        config.backprop_data,
        recorded,
        config.data_dir,
        BACKPROP_SHOTS,
        BACKPROP_WAYS,
        BACKPROP_QUERIES,
        config.seed,
    )


def backprop_baseline(
    model: str | os.PathLike,
    *,
    data: str | None = None,
    shots: Sequence[int] = BACKPROP_SHOTS,
    n_way: int = BACKPROP_WAYS,
    queries: int = BACKPROP_QUERIES,
    episodes: int = 100,
    steps: int = 100,
    lr: float = 0.5,
    threads: int = 0,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    options: SessionOptions | None = None,
) -> list[BackpropResult]:
    """The skeptic's comparison on seeded episodes of novel classes (needs torch and the data).

    ``data`` names the images (see :func:`backprop_data`): by default the novel classes of the
    data set the model records (Omniglot, Tiny-ImageNet), else Omniglot's for a grey model.

    For each episode the support images are embedded by the exported model on ONNX
    Runtime; then (a) prototypes are the class means and queries are classified by the
    graph's logits, and (b) a linear layer is trained by ``steps`` SGD steps in torch
    (zero-initialised, momentum 0.9; on :data:`SGD_THREADS` thread) and queries
    are classified by it. ``threads``: ONNX Runtime's intra-op threads. With an int8
    model both methods learn from int8 embeddings, as on an int8 accelerator with
    on-device last-layer training (Coral's Edge TPU).

    Example:
        >>> [r.to_dict() for r in backprop_baseline("conv4.onnx", episodes=100)]   # doctest: +SKIP
    """
    try:
        import torch
    except ImportError:
        raise InputError("the backprop baseline needs torch: pip install 'edgemeta[train]'") from None
    from edgemeta.runtime.preprocess import normalize

    threads = threads or physical_cores()
    sess = Session(model, "cpu", options=options or SessionOptions(intra_op_threads=threads))
    images, samplers = _backprop_episodes(
        sess.preprocess, data, sess.metadata.extra.get("dataset"), data_dir, shots, n_way, queries, seed
    )
    saved = torch.get_num_threads()
    torch.set_num_threads(SGD_THREADS)
    try:
        return [_backprop_shots(torch, sess, images, normalize, sampler, episodes, steps, lr) for sampler in samplers]
    finally:
        torch.set_num_threads(saved)


def _backprop_shots(
    torch: Any, sess: Session, data: Any, normalize: Callable, sampler: Any, episodes: int, steps: int, lr: float
) -> BackpropResult:
    """Two phases over the same episodes: ONNX Runtime only, then torch only.

    Interleaving them would time each engine while the other's idle threads still spin
    (ONNX Runtime's intra-op pool, torch's OpenMP team): on 2 cores that slowed the SGD
    steps 2.5-4x and the support embedding 3x, and flattered neither side honestly.
    """
    n, k = sampler.n_way, sampler.k_shot
    eps = list(sampler(episodes))
    t_embed, t_proto, t_bp, acc_proto, acc_bp, embedded = [], [], [], [], [], []
    for ep in eps:
        support_x = normalize(data.images[ep.support], sess.preprocess)
        query_x = normalize(data.images[ep.query], sess.preprocess)
        t0 = time.perf_counter()
        support = sess.embed(support_x)
        t1 = time.perf_counter()
        protos = support.reshape(n, k, -1).mean(axis=1)
        t2 = time.perf_counter()
        query, logits = sess.run(query_x, protos)
        acc_proto.append(float((logits.argmax(axis=1) == ep.query_labels).mean()))
        t_embed.append(t1 - t0)
        t_proto.append(t2 - t1)
        embedded.append((support, query))
    for ep, (support, query) in zip(eps, embedded):
        t3 = time.perf_counter()
        classify = _train_linear(torch, torch.from_numpy(support), torch.from_numpy(ep.support_labels), n, steps, lr)
        t4 = time.perf_counter()
        with torch.inference_mode():
            pred = classify(torch.from_numpy(query)).argmax(dim=1).numpy()
        acc_bp.append(float((pred == ep.query_labels).mean()))
        t_bp.append(t4 - t3)
    ms = lambda v: 1e3 * float(np.median(v))  # noqa: E731
    return BackpropResult(
        n,
        k,
        episodes,
        steps,
        lr,
        ms(t_embed),
        ms(t_proto),
        ms(t_bp),
        float(np.mean(acc_proto)),
        _ci95(acc_proto),
        float(np.mean(acc_bp)),
        _ci95(acc_bp),
        sess.metadata.precision.value,
        str(getattr(data, "name", "")),
    )
