"""The "predict on frames" row: ``FewShotClassifier.predict`` fed decoded uint8 frames (they go
to the model's ``pixels`` entry, which converts colour, resizes and normalizes in the graph)
against the model call on the tensor those frames preprocess to. What it costs an app to hand
over raw camera frames instead of preprocessing them itself.

The baseline is the same model with the entry taken out (what ``--no-pixels`` exports), opened
with the same settings and fed the preprocessed tensor. Not the same session fed ``images``
beside an empty ``pixels``: the entry's nodes still run on the empty tensor there (a colour
branch, two resize passes, a Concat), a fixed cost per call that is a sizeable part of a small
model's batch-1 call; it would make the baseline slower and the ratio look better than what an
app that preprocesses for itself gets from a model without the entry. Taking the entry out needs
the ``onnx`` package; without it (or for an ``.ort`` file) the row is skipped and says why.

The two are timed in rounds of blocks, one session alive at a time, as the embedding rows are:
two sessions kept open side by side slow each other while their idle threads spin, which
:func:`~edgemeta.bench.timing.time_pair` on two sessions would charge to both calls unevenly
(predict's Python work does not wait on the other session's threads). Each round's ratio
compares its two blocks, run back to back in alternating order, so a machine that drifts
between rounds hits both sides of a ratio alike; the row gives the median of the rounds'
ratios and their spread.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgemeta.bench.config import BenchConfig
from edgemeta.bench.measure import (
    bench_classifier,
    graph_call,
    input_dtype,
    random_images,
    timed_session,
)
from edgemeta.bench.models import ModelVariant
from edgemeta.bench.timing import LatencyStats, time_fn
from edgemeta.runtime.errors import InputError
from edgemeta.runtime.ort import display_name
from edgemeta.runtime.session import feeds_prototype_norms, prototype_sqnorms
from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES, INPUT_SQNORMS

#: The name of the row, in the report's ``skipped`` entries.
FRAMES_ROW = "predict on frames"
#: Classes enrolled while predict() is timed: as many as the JavaScript benchmark and
#: scripts/pixels_predict_speed.py enrol, so their figures compare.
FRAME_CLASSES = 5
SETTLE_S = 0.02  # pause before each block: the previous session's idle threads stop spinning

BASELINE = "the model without the pixels entry (as --no-pixels exports it), fed the preprocessed tensor"


@dataclass(frozen=True)
class FramesRow:
    """predict() on ``batch`` decoded frames vs the model call on the preprocessed tensor."""

    provider: str
    precision: str
    batch: int
    frame: str  # WIDTHxHEIGHTxCHANNELS of each decoded uint8 frame
    classes: int  # enrolled while predict() is timed; as many prototypes in the model call
    predict: LatencyStats  # FewShotClassifier.predict(frames)
    model: LatencyStats  # the bare model call (embeddings and logits) on the preprocessed tensor
    ratio: float  # median over the rounds of predict p50 / model p50 of the same round
    ratio_min: float  # the spread of the rounds' ratios
    ratio_max: float
    round_ratios: tuple[float, ...]
    baseline: str = BASELINE
    # why this row's batch is smaller than the largest batch measured (the frames' memory cap), else None
    capped: str | None = None

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["predict"], d["model"] = self.predict.to_dict(samples), self.model.to_dict(samples)
        d["round_ratios"] = list(self.round_ratios)
        return d


def frames_skip_reason(variant: ModelVariant, takes_pixels: bool) -> str | None:
    """Why the row cannot be measured for ``variant``, or None."""
    if not takes_pixels:
        return (
            f"{variant.path.name} has no pixels entry (exported with --no-pixels or before the entry existed); "
            "export it again with `edgemeta export` to measure predict() on decoded frames"
        )
    if variant.path.suffix.lower() == ".ort":
        return (
            f"{variant.path.name} is an .ort file, which cannot be edited into the baseline without the pixels "
            "entry; benchmark the .onnx model for this row"
        )
    try:
        import onnx  # noqa: F401 - only to know whether the baseline can be made
    except ImportError:
        return "the baseline (the model without its pixels entry) takes the onnx package to make: pip install onnx"
    return None


def _without_entry(variant: ModelVariant) -> bytes:
    import onnx

    from edgemeta.exporters.pixels import without_pixels

    return without_pixels(onnx.load(str(variant.path))).SerializeToString()


def _frames(config: BenchConfig, batch: int, seed: int) -> Any:
    """``batch`` decoded frames as an app holds them: one HWC array for one frame, else a list."""
    w, h = config.frame_size
    rng = np.random.default_rng([seed, batch])
    frames = [rng.integers(0, 256, (h, w, config.frame_channels), dtype=np.uint8) for _ in range(batch)]
    return frames[0] if batch == 1 else frames


def _rounds(config: BenchConfig) -> tuple[list[int], float | None]:
    """The calls of each round's blocks (``runs`` in all, spread over the rounds) and each block's duration."""
    rounds = config.rounds if config.duration is not None else min(config.rounds, config.runs)
    runs = [config.runs // rounds + int(r < config.runs % rounds) for r in range(rounds)]
    return runs, None if config.duration is None else config.duration / rounds


def measure_frames(variant: ModelVariant, provider: str, config: BenchConfig) -> list[FramesRow]:
    """The row at each of ``config.frame_batches`` (see the module doc); the largest is capped at
    ``config.frame_batch_cap`` frames, and its row says so.

    Raises:
        InputError: the model has no ``pixels`` entry (call :func:`frames_skip_reason` first).
    """
    plain = _without_entry(variant)
    rng = np.random.default_rng(config.seed)
    protos = rng.standard_normal((FRAME_CLASSES, variant.embedding_dim)).astype(np.float32)
    runs, duration = _rounds(config)
    w, h = config.frame_size
    rows = []
    for batch in config.frame_batches:
        frames = _frames(config, batch, config.seed)
        blocks: dict[str, list[LatencyStats]] = {"predict": [], "model": []}
        for r, calls in enumerate(runs):
            for side in ("predict", "model") if r % 2 == 0 else ("model", "predict"):
                time.sleep(SETTLE_S)
                blocks[side].append(
                    _predict_block(variant, provider, config, protos, frames, batch, calls, duration)
                    if side == "predict"
                    else _model_block(variant, provider, config, plain, protos, batch, calls, duration)
                )
        ratios = tuple(p.p50_ms / m.p50_ms for p, m in zip(blocks["predict"], blocks["model"]))
        merged = {k: LatencyStats.from_samples([t for b in v for t in b.samples_ms]) for k, v in blocks.items()}
        rows.append(
            FramesRow(
                display_name(provider),
                variant.precision.value,
                batch,
                f"{w}x{h}x{config.frame_channels}",
                FRAME_CLASSES,
                merged["predict"],
                merged["model"],
                float(np.median(ratios)),
                min(ratios),
                max(ratios),
                ratios,
                capped=config.frame_cap_note if batch == config.frame_batch_cap else None,
            )
        )
    return rows


def _predict_block(
    variant: ModelVariant,
    provider: str,
    config: BenchConfig,
    protos: np.ndarray,
    frames: Any,
    batch: int,
    calls: int,
    duration: float | None,
) -> LatencyStats:
    clf = bench_classifier(variant, provider, config, images=batch)
    if not clf.session.takes_pixels:
        raise InputError(f"{variant.path.name} has no pixels entry; {FRAMES_ROW} needs it")
    for i, p in enumerate(protos):
        clf.store.add(f"class{i}", p[None])
    return time_fn(lambda: clf.predict(frames), config.warmup, calls, duration)  # the session closes on return


def _model_block(
    variant: ModelVariant,
    provider: str,
    config: BenchConfig,
    plain: bytes,
    protos: np.ndarray,
    batch: int,
    calls: int,
    duration: float | None,
) -> LatencyStats:
    sess = timed_session(variant, provider, config, model=plain)
    feeds = {
        INPUT_IMAGES: random_images(variant, batch, input_dtype(sess, INPUT_IMAGES), config.seed),
        INPUT_PROTOTYPES: protos.astype(input_dtype(sess, INPUT_PROTOTYPES)),
    }
    if feeds_prototype_norms(sess):  # as the runtime feeds them (kept with its store)
        feeds[INPUT_SQNORMS] = prototype_sqnorms(feeds[INPUT_PROTOTYPES])
    return time_fn(graph_call(sess, feeds), config.warmup, calls, duration)  # the session closes on return
