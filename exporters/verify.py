"""Does the ONNX model compute what the torch model computes?

Two kinds of evidence, on real images:

1. tensors: ``embeddings`` and ``logits`` of ONNX Runtime against torch, at several
   batch sizes and with 0, 1 and many prototypes (max absolute and relative error,
   relative meaning ``max |onnx - torch| / max |torch|``; for logits the denominator
   is at least the largest squared norm of an embedding or prototype, the size of the
   terms the metric adds up);
2. episodes: the same seeded N-way K-shot episodes classified by both, query by
   query (prediction agreement) and as accuracy. An image's embedding does not depend
   on the episode, so each image is embedded once by each side; the logits of every
   episode then come from the model's own metric (the ONNX graph's metric part, cut
   out with ``onnx.utils.Extractor``), so 1,000 episodes cost one pass over the images.

A model that takes the optional ``prototype_sqnorms`` input is checked both ways: the
tensor runs compare the logits with the norms fed (as the runtime feeds them) and
computed by the graph (as an app on plain ONNX Runtime gets them), and the episodes
are classified with the norms fed.

Every check runs, then one report; :func:`verify` raises :class:`VerificationError`
naming every failed check, by how much, and what to try.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from edgemeta.episodes import EpisodeSampler
from edgemeta.evaluate import episode_scores, summarize
from edgemeta.exporters.graph import load_model, model_bytes, read_metadata
from edgemeta.exporters.images import LabelledImages
from edgemeta.runtime.errors import ExportError, InputError, VerificationError
from edgemeta.runtime.ort import open_session as open_ort_session
from edgemeta.runtime.preprocess import pixel_groups
from edgemeta.runtime.session import feeds_prototype_norms, graph_batch, images_only_feeds, prototype_sqnorms
from edgemeta.runtime.spec import (
    INPUT_IMAGES,
    INPUT_PIXELS,
    INPUT_PROTOTYPES,
    INPUT_SQNORMS,
    OUTPUT_EMBEDDINGS,
    OUTPUT_LOGITS,
    ModelMetadata,
    Precision,
    PreprocessSpec,
)

__all__ = ["Tolerance", "VerifySpec", "Check", "VerificationReport", "verify", "metadata_with", "Progress"]

#: ``progress(task, done, total)``: called as long work advances.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Tolerance:
    """Limits of one precision. Errors are relative to the largest torch value; for fp16
    and int8 the real criterion is that predictions agree and accuracy holds."""

    embeddings_rel: float
    logits_rel: float
    min_agreement: float
    max_accuracy_drop: float

    @classmethod
    def for_precision(cls, precision: Precision) -> Tolerance:
        return {
            Precision.FP32: cls(embeddings_rel=1e-4, logits_rel=1e-4, min_agreement=0.999, max_accuracy_drop=0.002),
            Precision.FP16: cls(embeddings_rel=2e-2, logits_rel=2e-2, min_agreement=0.98, max_accuracy_drop=0.01),
            Precision.INT8: cls(embeddings_rel=0.25, logits_rel=0.25, min_agreement=0.90, max_accuracy_drop=0.03),
        }[Precision(precision)]


@dataclass(frozen=True)
class VerifySpec:
    """What :func:`verify` runs. ``tolerance=None`` picks the model's precision's defaults."""

    batch_sizes: tuple[int, ...] = (1, 7, 32, 64)
    prototype_counts: tuple[int, ...] = (0, 1, 20)
    episodes: int = 200
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    seed: int = 0
    tolerance: Tolerance | None = None
    batch_size: int = 256  # images per ONNX Runtime / torch call when embedding episode images

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InputError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if not self.prototype_counts or min(self.prototype_counts) < 0:
            raise InputError(f"prototype counts must be >= 0, got {self.prototype_counts}")
        if self.episodes < 0:
            raise InputError(f"episodes must be >= 0, got {self.episodes}")


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    passed: bool
    detail: str = ""
    hint: str = ""

    def line(self) -> str:
        return f"{self.name}: {self.detail}" + ("" if self.passed else f" — {self.hint}")


@dataclass
class VerificationReport:
    """Every figure of one verification; ``summary()`` is what goes into the model's metadata."""

    model: str
    precision: Precision
    tolerance: Tolerance
    checks: list[Check] = field(default_factory=list)
    tensors: list[dict[str, Any]] = field(default_factory=list)
    episodes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    pixels: dict[str, Any] = field(default_factory=dict)  # the episodes again, the ONNX side fed uint8 frames

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def _worst(self, key: str) -> float:
        vals = [t[key] for t in self.tensors if t.get(key) is not None]
        return float(max(vals)) if vals else 0.0

    def summary(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "passed": self.passed,
            "precision": self.precision.value,
            "embeddings_max_abs_error": self._worst("embeddings_abs"),
            "embeddings_max_rel_error": self._worst("embeddings_rel"),
            "logits_max_abs_error": self._worst("logits_abs"),
            "logits_max_rel_error": self._worst("logits_rel"),
            "batch_sizes": sorted({t["batch"] for t in self.tensors}),
            "prototype_counts": sorted({t["prototypes"] for t in self.tensors}),
            "episodes": self.episodes,
            **({"pixels_episodes": self.pixels} if self.pixels else {}),
            "tolerance": asdict(self.tolerance),
            "failed_checks": [c.name for c in self.failures],
            "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0]},
            "provider": "CPUExecutionProvider",
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self.summary(),
            "checks": [asdict(c) for c in self.checks],
            "tensors": self.tensors,
            "seconds": round(self.seconds, 2),
        }

    def error_message(self) -> str:
        fails = "; ".join(c.line() for c in self.failures)
        return (
            f"verification of {Path(self.model).name} ({self.precision.value}) failed {len(self.failures)} of "
            f"{len(self.checks)} checks: {fails}"
        )


# ---------------------------------------------------------------- the two sides


class _TorchSide:
    def __init__(self, model: nn.Module, dim: int) -> None:
        self.model, self.dim = model.eval(), dim
        self.fast = callable(getattr(model, "embed", None)) and callable(getattr(model, "logits", None))

    @torch.inference_mode()
    def run(self, x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e, lg = self.model(torch.from_numpy(x), torch.from_numpy(p))
        return e.float().numpy(), lg.float().numpy()

    @torch.inference_mode()
    def embed(self, x: np.ndarray) -> np.ndarray:
        if self.fast:
            return self.model.embed(torch.from_numpy(x)).float().numpy()
        return self.run(x, np.zeros((0, self.dim), np.float32))[0]

    @torch.inference_mode()
    def logits(self, z: np.ndarray, p: np.ndarray, x: Callable[[], np.ndarray]) -> np.ndarray:
        if self.fast:
            return self.model.logits(torch.from_numpy(z), torch.from_numpy(p)).float().numpy()
        return self.run(x(), p)[1]  # a module without .logits: run the whole graph on the queries


class _OnnxSide:
    def __init__(self, path: Path, model: onnx.ModelProto, dim: int) -> None:
        try:
            self.session = _cpu_session(model_bytes(model))  # as the runtime opens it
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        refuse_fixed_batch(path, "verification", self.session)
        self.dim = dim
        self.fed = feeds_prototype_norms(self.session)
        self.fixed = images_only_feeds(self.session)
        self.head = self._metric_part(model)
        self.head_fed = self.head is not None and feeds_prototype_norms(self.head)

    @staticmethod
    def _metric_part(model: onnx.ModelProto):
        """A session of the graph's own metric: (embeddings, prototypes) -> logits."""
        from onnx.utils import Extractor

        try:
            head = Extractor(model).extract_model([OUTPUT_EMBEDDINGS, INPUT_PROTOTYPES], [OUTPUT_LOGITS])
            if {i.name for i in head.graph.input} != {OUTPUT_EMBEDDINGS, INPUT_PROTOTYPES}:
                return None
            if any(t.name == INPUT_SQNORMS for t in head.graph.initializer):  # keep the optional input overridable
                head.graph.input.append(
                    onnx.helper.make_tensor_value_info(INPUT_SQNORMS, onnx.TensorProto.FLOAT, ["n_norms"])
                )
            return _cpu_session(head.SerializeToString())
        except Exception:  # an unusual graph: fall back to running the whole model per episode
            return None

    def run(self, x: np.ndarray, p: np.ndarray, fed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``fed``: feed the prototypes' squared norms, as the runtime does (models that take them)."""
        feeds = {INPUT_IMAGES: x, INPUT_PROTOTYPES: p} | self.fixed | (_norms(p) if fed and self.fed else {})
        e, lg = self.session.run([OUTPUT_EMBEDDINGS, OUTPUT_LOGITS], feeds)
        return e, lg

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self.run(x, np.zeros((0, self.dim), np.float32))[0]

    def logits(self, z: np.ndarray, p: np.ndarray, x: Callable[[], np.ndarray]) -> np.ndarray:
        """The episode logits as the runtime gets them: norms fed where the model takes them."""
        if self.head is not None:
            feeds = {OUTPUT_EMBEDDINGS: z, INPUT_PROTOTYPES: p} | (_norms(p) if self.head_fed else {})
            return self.head.run([OUTPUT_LOGITS], feeds)[0]
        return self.run(x(), p, fed=True)[1]


# Pixels per ONNX Runtime call on the pixels side (and frames held at once): episode images now
# come at their own sizes, and a batch of full-size photos would need gigabytes (256 12-MP RGB
# frames are 9 GB before the graph's own copies); a frame larger than this still goes alone.
# A frame counts as the larger of its own size and the model's input, since the graph enlarges
# small frames before the backbone: 5,000 64x64 photos are one budget, but at 160x160 their
# activations took over 20 GB.
PIXEL_BUDGET = 64 * 1024 * 1024


class _PixelSide:
    """The ONNX side fed decoded uint8 frames through ``pixels`` (the graph preprocesses them).

    Frames of several sizes (a folder's images as its files have them) go in one call per
    shape, as the runtime's ``predict()`` feeds them (never padded or resized here, which
    would change their pixels); the outputs come back in the order given. ``sizes`` counts
    the frames embedded per height x width."""

    def __init__(
        self, side: _OnnxSide, spec: PreprocessSpec, batch_size: int, pixel_budget: int = PIXEL_BUDGET
    ) -> None:
        self.side, self.dim, self.spec = side, side.dim, spec
        self.batch_size, self.pixel_budget = batch_size, pixel_budget
        self.sizes: Counter[tuple[int, int]] = Counter()
        self.calls: list[int] = []  # frames per ONNX Runtime call, in order

    def run(self, frames: Sequence[np.ndarray], p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        groups, _, _ = pixel_groups(frames, self.spec)
        e = np.empty((len(frames), self.dim), np.float32)
        lg = np.empty((len(frames), len(p)), np.float32)
        for at, batch in groups:
            # full-size photos: a call's input and the graph's intermediates grow with its pixels;
            # small ones: at most batch_size frames a call, as on the images side
            step = max(1, min(self.batch_size, self.pixel_budget // self._cost(batch.shape[1:3])))
            for j in range(0, len(at), step):
                feeds = {INPUT_PIXELS: np.ascontiguousarray(batch[j : j + step]), INPUT_PROTOTYPES: p}
                e[at[j : j + step]], lg[at[j : j + step]] = self.side.session.run(
                    [OUTPUT_EMBEDDINGS, OUTPUT_LOGITS], feeds
                )
                self.calls.append(len(at[j : j + step]))
        return e, lg

    def embed_all(self, frames_of: Callable[[np.ndarray], Sequence[np.ndarray]], idx: np.ndarray, tick) -> np.ndarray:
        """The embeddings of frames ``idx``, read one at a time and embedded whenever the next
        would pass the pixel budget, so no more than about a budget's frames are held at once."""
        out, pending, held = [], [], 0
        for n in range(len(idx)):
            (frame,) = frames_of(idx[n : n + 1])
            size = self._cost(frame.shape[:2])
            if pending and held + size > self.pixel_budget:
                out.append(self.embed(pending))
                pending, held = [], 0
                tick(n)
            pending.append(frame)
            held += size
        if pending:
            out.append(self.embed(pending))
        tick(len(idx))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _cost(self, hw: Sequence[int]) -> int:
        """A frame's share of the budget: its pixels, or the model input's where that is larger."""
        return max(hw[0] * hw[1], self.spec.size[0] * self.spec.size[1])

    def embed(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        self.sizes.update(tuple(f.shape[:2]) for f in frames)
        return self.run(frames, np.zeros((0, self.dim), np.float32))[0]

    def logits(self, z: np.ndarray, p: np.ndarray, frames: Callable[[], Sequence[np.ndarray]]) -> np.ndarray:
        if self.side.head is not None:
            return self.side.logits(z, p, frames)
        return self.run(frames(), p)[1]

    def described(self, native: bool, cap: int = 8) -> dict[str, Any]:
        """What the frames were, for the report: native sizes or the model-size arrays, and the
        sizes seen (the ``cap`` most frequent, with how many frames had each)."""
        common = [(f"{h}x{w}", n) for (h, w), n in self.sizes.most_common(cap)]
        more = len(self.sizes) - len(common)
        shown = ", ".join(s for s, _ in common) + (f" and {more} more" if more else "")
        return {
            "frames": f"native sizes {shown}" if native else f"model-size arrays {shown}",
            "frame_sizes": dict(common),
            "distinct_frame_sizes": len(self.sizes),
        }


def refuse_fixed_batch(path: Path, action: str, session=None, model: onnx.ModelProto | None = None) -> None:
    """Refuse a graph with a fixed batch size, in one line: ``action`` (verification,
    calibration) runs batches of every size through it. ``session``: one already open on it;
    ``model``: the model at ``path``, already in memory."""
    batch = graph_batch(session or _cpu_session(path if model is None else model_bytes(model)))
    if batch is not None:
        raise InputError(
            f"{path} takes a fixed batch of {batch}; {action} runs batches of other sizes through the graph and "
            "needs a dynamic batch: use the model it was made from (`edgemeta export` writes a dynamic batch)"
        )


def _cpu_session(model: Path | bytes):
    import onnxruntime as ort

    return open_ort_session(model, ort.SessionOptions(), ["CPUExecutionProvider"])[0]


def _norms(p: np.ndarray) -> dict[str, np.ndarray]:
    return {INPUT_SQNORMS: prototype_sqnorms(p)} if len(p) else {}


# ---------------------------------------------------------------- checks


def _errors(a: np.ndarray, b: np.ndarray, scale: float = 0.0) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(max |b|, scale)) of ONNX output ``a`` against torch output ``b``."""
    if a.size == 0:
        return 0.0, 0.0
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return diff, diff / max(float(np.max(np.abs(b))), scale, 1e-12)


def _operand_scale(z: np.ndarray, p: np.ndarray) -> float:
    """The size of the terms the metric combines: squared euclidean logits are
    ``-(|z|^2 - 2 z.p + |p|^2)``, so near-equal vectors give logits near 0 from terms
    near ``|z|^2``; their rounding error is relative to that, not to the logit."""
    norms = [float(np.max(np.sum(v.astype(np.float64) ** 2, axis=1))) for v in (z, p) if v.size]
    return max(norms, default=0.0)


def _tensor_runs(onnx_side: _OnnxSide, torch_side: _TorchSide, x: np.ndarray, spec: VerifySpec) -> list[dict[str, Any]]:
    bmax = max(spec.batch_sizes)
    protos = torch_side.embed(x[bmax:]) if len(x) > bmax else torch_side.embed(x)
    rows = []
    for b in spec.batch_sizes:
        for n in spec.prototype_counts:
            p = (
                np.ascontiguousarray(protos[np.arange(n) % len(protos)])
                if n
                else np.zeros((0, onnx_side.dim), np.float32)
            )
            xb = x[np.arange(b) % len(x)]
            te, tl = torch_side.run(xb, p)
            # the graph's own norms, and (models that take them) the fed ones: a row per way
            for fed in (False, True) if onnx_side.fed and n else (False,):
                oe, ol = onnx_side.run(xb, p, fed=fed)
                row: dict[str, Any] = {"batch": b, "prototypes": n, "norms_fed": fed}
                row["shapes_ok"] = oe.shape == te.shape == (b, onnx_side.dim) and ol.shape == tl.shape == (b, n)
                row["finite"] = bool(np.isfinite(oe).all() and np.isfinite(ol).all())
                if row["shapes_ok"]:
                    row["embeddings_abs"], row["embeddings_rel"] = _errors(oe, te)
                    row["logits_abs"], row["logits_rel"] = _errors(ol, tl, _operand_scale(te, p)) if n else (None, None)
                rows.append(row)
    return rows


def _embed_all(
    side,
    x_of: Callable[[np.ndarray], np.ndarray],
    idx: np.ndarray,
    spec: VerifySpec,
    task: str,
    progress: Progress | None,
) -> np.ndarray:
    if isinstance(side, _PixelSide):  # frames at full size: held by pixels, not by count
        return side.embed_all(x_of, idx, lambda n: progress(task, n, len(idx)) if progress else None)
    out = []
    for i in range(0, len(idx), spec.batch_size):
        out.append(side.embed(x_of(idx[i : i + spec.batch_size])))
        if progress:
            progress(task, min(i + spec.batch_size, len(idx)), len(idx))
    return np.concatenate(out) if out else np.zeros((0, side.dim), np.float32)


def verification_sampler(data: LabelledImages, spec: VerifySpec) -> EpisodeSampler:
    """The episodes' sampler, made before any work: data that cannot fill them is refused with
    what it needs (export, verify and quantize have no --n-way or --k-shot to lower)."""
    need = spec.k_shot + spec.q_query
    remedy = (
        f"verification draws {spec.n_way}-way {spec.k_shot}-shot episodes with {spec.q_query} queries: pass "
        f"--data with at least {spec.n_way} classes of {need} images"
    )
    return EpisodeSampler(data.labels, spec.n_way, spec.k_shot, spec.q_query, spec.seed, data.name, remedy=remedy)


def near_ties(logits: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, tol: float) -> int:
    """How many of the queries where ``pred_a`` and ``pred_b`` differ are near-ties: both classes'
    ``logits`` (one side's) within ``tol`` of each other, so rounding alone can pick either."""
    rows = np.flatnonzero(pred_a != pred_b)
    gap = np.abs(logits[rows, pred_a[rows]] - logits[rows, pred_b[rows]])
    return int((gap <= tol).sum())


def _episodes(
    onnx_side: _OnnxSide,
    torch_side: _TorchSide,
    data: LabelledImages,
    x_of,
    spec: VerifySpec,
    sampler: EpisodeSampler,
    progress: Progress | None,
    tie_rel: float = 0.0,
    onnx_x_of=None,
) -> dict[str, Any]:
    """``onnx_x_of``: what the ONNX side is fed, when not ``x_of``'s images (the uint8 frames of ``pixels``)."""
    onnx_x_of = onnx_x_of or x_of
    eps = list(sampler(spec.episodes))
    used = np.unique(np.concatenate([np.concatenate([e.support, e.query]) for e in eps]))
    where = np.full(len(data), -1, dtype=np.int64)
    where[used] = np.arange(len(used))
    z_onnx = _embed_all(onnx_side, onnx_x_of, used, spec, "embedding images (ONNX Runtime)", progress)
    z_torch = _embed_all(torch_side, x_of, used, spec, "embedding images (torch)", progress)
    agree, total, ties, scores_t, scores_o = 0, 0, 0, [], []
    for k, ep in enumerate(eps):
        s, q = where[ep.support], where[ep.query]
        images = partial(x_of, ep.query)  # only for models without a separable metric
        onnx_images = partial(onnx_x_of, ep.query)
        p_o = z_onnx[s].reshape(spec.n_way, spec.k_shot, -1).mean(axis=1)
        p_t = z_torch[s].reshape(spec.n_way, spec.k_shot, -1).mean(axis=1)
        pred_o = onnx_side.logits(np.ascontiguousarray(z_onnx[q]), p_o.astype(np.float32), onnx_images).argmax(axis=1)
        logits_t = torch_side.logits(np.ascontiguousarray(z_torch[q]), p_t.astype(np.float32), images)
        pred_t = logits_t.argmax(axis=1)
        agree += int((pred_o == pred_t).sum())
        # a flip is a near-tie when the logits error the tolerance accepts could alone have made it
        ties += near_ties(logits_t, pred_o, pred_t, tie_rel * _operand_scale(z_torch[q], p_t))
        total += len(q)
        scores_o.append(episode_scores(pred_o, ep.query_labels, spec.n_way))
        scores_t.append(episode_scores(pred_t, ep.query_labels, spec.n_way))
        if progress and ((k + 1) % 50 == 0 or k + 1 == len(eps)):
            progress("episodes", k + 1, len(eps))
    fields = dict(dataset=data.name, n_way=spec.n_way, k_shot=spec.k_shot, q_query=spec.q_query, seed=spec.seed)
    rep_t, rep_o = summarize(scores_t, **fields), summarize(scores_o, **fields)
    return {
        **fields,
        "count": len(eps),
        "queries": total,
        "agreement": agree / total,
        "disagreements_on_ties": ties,
        "torch_accuracy": rep_t.accuracy,
        "onnx_accuracy": rep_o.accuracy,
        "accuracy_difference": rep_o.accuracy - rep_t.accuracy,
        "torch_ci95": rep_t.ci95,
        "onnx_ci95": rep_o.ci95,
        "novel_classes": int(len(np.unique(data.labels))),
    }


_HINTS = {
    Precision.FP32: "the graph computes something else than torch: make sure the model "
    "is in eval mode, export without --optimize, or try --opset 17",
    Precision.FP16: "the backbone loses too much in fp16 (overflow or rounding); "
    "use --precision fp32, or int8 calibrated on base classes",
    Precision.INT8: "calibrate on more base-class images (--calibration-images), or use --precision fp16",
}


_TIES_HINT = (
    "the embeddings agree within tolerance, but decisions flip on near-ties ({ties} of {flips} "
    "disagreements have both classes' torch logits closer than the logits tolerance): the "
    "model gives near-identical embeddings to different images, so the export is faithful and "
    "the model separates the classes poorly (train it further, or check its normalization)"
)


def _episode_hint(episodes: dict[str, Any], tensors_ok: bool, hint: str) -> str:
    """The ties diagnosis when every flipped decision is a near-tie and the tensors matched,
    else the precision's hint."""
    flips = round(episodes["queries"] * (1 - episodes["agreement"]))
    ties = episodes.get("disagreements_on_ties", 0)
    if tensors_ok and flips and ties >= flips:
        return _TIES_HINT.format(ties=ties, flips=flips) + ("" if hint is _HINTS[Precision.FP32] else f"; else {hint}")
    return hint


def _checks(rows: list[dict[str, Any]], episodes: dict[str, Any], tol: Tolerance, precision: Precision) -> list[Check]:
    hint = _HINTS[precision]
    bad_shape = [r for r in rows if not r["shapes_ok"]]
    bad_finite = [r for r in rows if not r["finite"]]

    def where(r: dict[str, Any]) -> str:
        return f"batch {r['batch']}, {r['prototypes']} prototypes" + (", norms fed" if r.get("norms_fed") else "")

    checks = [
        Check(
            "output shapes",
            len(bad_shape),
            0,
            not bad_shape,
            f"{len(rows) - len(bad_shape)}/{len(rows)} runs have the expected shapes"
            + (f" (first wrong: {where(bad_shape[0])})" if bad_shape else ""),
            "the graph does not keep the batch and prototype axes dynamic; re-export it with edgemeta",
        ),
        Check(
            "finite outputs",
            len(bad_finite),
            0,
            not bad_finite,
            f"{len(rows) - len(bad_finite)}/{len(rows)} runs are free of NaN/inf"
            + (f" (first bad: {where(bad_finite[0])})" if bad_finite else ""),
            "the graph produces NaN or inf; check the normalization epsilon and the input scaling",
        ),
    ]
    for out, limit in (("embeddings", tol.embeddings_rel), ("logits", tol.logits_rel)):
        vals = [(r[f"{out}_rel"], r) for r in rows if r.get(f"{out}_rel") is not None]
        worst, row = max(vals, key=lambda v: v[0]) if vals else (0.0, None)
        detail = f"max relative error {worst:.2e} (limit {limit:.0e})" + (
            f" at {where(row)}, max abs {row[f'{out}_abs']:.2e}" if row else ""
        )
        checks.append(Check(f"{out} error", worst, limit, worst <= limit, detail, hint))
    if episodes:
        hint = _episode_hint(episodes, all(c.passed for c in checks), hint)
        a, drop = episodes["agreement"], episodes["torch_accuracy"] - episodes["onnx_accuracy"]
        what = f"{episodes['count']} episodes {episodes['n_way']}-way {episodes['k_shot']}-shot"
        checks.append(
            Check(
                "prediction agreement",
                a,
                tol.min_agreement,
                a >= tol.min_agreement,
                f"{100 * a:.2f}% of {episodes['queries']} queries (limit {100 * tol.min_agreement:.1f}%, {what})",
                hint,
            )
        )
        checks.append(
            Check(
                "accuracy drop",
                drop,
                tol.max_accuracy_drop,
                drop <= tol.max_accuracy_drop,
                f"torch {100 * episodes['torch_accuracy']:.2f}% vs ONNX {100 * episodes['onnx_accuracy']:.2f}% "
                f"(drop {100 * drop:.2f} points, limit {100 * tol.max_accuracy_drop:.1f})",
                hint,
            )
        )
    return checks


def verify(
    model: str | os.PathLike | onnx.ModelProto,
    torch_model: nn.Module,
    data: LabelledImages,
    spec: VerifySpec = VerifySpec(),
    progress: Progress | None = None,
    name: str | None = None,
) -> VerificationReport:
    """Compare the ONNX ``model`` (a file, or a model in memory) with ``torch_model`` on ``data``
    (real images of novel classes, preprocessed for the model); raise if any check fails.
    ``name``: how the report and messages name the model (default: its path).

    Raises:
        VerificationError: naming every failed check; the full report is ``error.report``.

    Example:
        >>> report = verify("conv4.onnx", ckpt.model, labelled_images(load_omniglot("evaluation")))
        >>> report.summary()["episodes"]["agreement"]
        1.0
    """
    t0 = time.perf_counter()
    if isinstance(model, onnx.ModelProto):
        proto, path = model, Path(name or "model.onnx")
    else:
        path = Path(model)
        proto = load_model(path)
        path = Path(name) if name else path
    meta = read_metadata(proto)
    if meta is None:
        raise ExportError(f"{path} has no edgemeta metadata; export it with `edgemeta export`")
    pp = meta.preprocess
    sampler = verification_sampler(data, spec) if spec.episodes else None
    tol = spec.tolerance or Tolerance.for_precision(meta.precision)

    def x_of(idx: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data.batch(np.asarray(idx)), dtype=np.float32)

    need = max(spec.batch_sizes) + max(spec.prototype_counts)
    pool = np.random.default_rng([spec.seed, 1]).choice(len(data), size=min(need, len(data)), replace=False)
    x = x_of(np.sort(pool))
    if x.shape[1:] != (pp.channels, *pp.size):
        raise InputError(
            f"{data.name} images are {x.shape[1:]}, the model takes "
            f"{(pp.channels, *pp.size)} (CHW); load them at the model's size"
        )
    onnx_side, torch_side = _OnnxSide(path, proto, meta.embedding_dim), _TorchSide(torch_model, meta.embedding_dim)
    rows = _tensor_runs(onnx_side, torch_side, x, spec)
    if progress:
        progress("tensor checks", 1, 1)
    episodes = (
        _episodes(onnx_side, torch_side, data, x_of, spec, sampler, progress, tol.logits_rel)
        if sampler is not None
        else {}
    )
    checks = _checks(rows, episodes, tol, meta.precision)
    pixels = {}
    frames = getattr(data, "frames", None)
    if sampler is not None and frames is not None and any(i.name == INPUT_PIXELS for i in proto.graph.input):
        # the same episodes with the ONNX side fed the decoded uint8 images: the graph's colour,
        # resize and normalization against the preprocessing torch was given
        # (at their native sizes where the data can read its files again, so the graph's resize
        # is measured; the model-size arrays, for which it is an identity, otherwise)
        pixel_side = _PixelSide(onnx_side, pp, spec.batch_size)
        reading = getattr(data, "reading", None)  # keeps the data's files open for the whole check
        with reading() if reading is not None else contextlib.nullcontext():
            pixels = _episodes(pixel_side, torch_side, data, x_of, spec, sampler, progress, tol.logits_rel, frames)
        pixels |= pixel_side.described(bool(getattr(data, "native_frames", False)))
        a = pixels["agreement"]
        limit = f"limit {100 * tol.min_agreement:.1f}%"
        detail = f"{100 * a:.2f}% of {pixels['queries']} queries fed as uint8 pixels, {pixels['frames']} ({limit})"
        hint = "the graph's preprocessing differs from the one torch was given; export with --no-pixels and report it"
        if getattr(data, "native_frames", False) and episodes and episodes["agreement"] >= tol.min_agreement:
            # the images path agrees, so the backbone is faithful: what differs is the resize
            hint = (
                "the graph's resize from the images' native sizes rounds some pixels a level off the Pillow "
                "resize torch's arrays were made with, and this model's decisions flip on that; export with "
                "--no-pixels (the model then takes preprocessed images only) and report it"
            )
        checks.append(Check("pixels agreement", a, tol.min_agreement, a >= tol.min_agreement, detail, hint))
    report = VerificationReport(str(path), meta.precision, tol, checks, rows, episodes, pixels=pixels)
    report.seconds = time.perf_counter() - t0
    if not report.passed:
        error = VerificationError(report.error_message())
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


def metadata_with(meta: ModelMetadata, report: VerificationReport) -> ModelMetadata:
    """``meta`` carrying ``report``'s figures."""
    return meta.with_(verification=report.summary())
