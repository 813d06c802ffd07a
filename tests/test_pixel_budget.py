"""The pixels check holds full-size frames by a pixel budget, not by ``VerifySpec.batch_size``:
each ONNX Runtime call and the frames read at once stay under it (a larger frame goes alone),
and the embeddings come back in the order asked."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from edgemeta.data import omniglot_spec
from edgemeta.exporters import VerifySpec
from edgemeta.exporters.verify import PIXEL_BUDGET, _embed_all, _PixelSide


class _Session:
    """Embeds a frame as (its first pixel, its height); records every call's pixels."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def run(self, outputs, feeds):
        x = feeds["pixels"]
        self.calls.append(x.shape)
        e = np.stack([x[:, 0, 0, 0].astype(np.float32), np.full(len(x), x.shape[1], np.float32)], axis=1)
        return e, np.zeros((len(x), len(feeds["prototypes"])), np.float32)


def _frames(heights):
    return [np.full((h, 100, 1), i % 250, np.uint8) for i, h in enumerate(heights)]


def _side(budget, spec=None, batch_size=256):
    session = _Session()
    side = _PixelSide(SimpleNamespace(dim=2, session=session, head=None), spec or omniglot_spec(28), batch_size, budget)
    return side, session


def test_the_default_budget_bounds_a_batch_of_photos():
    assert 0 < PIXEL_BUDGET <= 64 * 1024 * 1024 < VerifySpec().batch_size * 12_000_000


def test_calls_and_frames_held_stay_within_the_budget_in_order():
    heights = [100] * 7 + [300] + [100] * 3 + [50] * 4  # 10k-pixel frames, one of 30k, four of 5k
    frames = _frames(heights)
    side, session = _side(25_000)
    held = []

    def frames_of(ix):
        held.append(len(ix))
        return [frames[i] for i in ix]

    idx = np.arange(len(frames))[::-1].copy()  # any order: the output follows idx
    z = _embed_all(side, frames_of, idx, VerifySpec(batch_size=256), "t", None)
    assert z[:, 0].tolist() == [float(i % 250) for i in idx] and z[:, 1].tolist() == [heights[i] for i in idx]
    assert set(held) == {1}  # read one at a time, never a batch_size of full frames
    pixels = [n * h * w for n, h, w, _ in session.calls]
    assert all(p <= 25_000 for p, (n, *_) in zip(pixels, session.calls) if n > 1)
    assert (1, 300, 100, 1) in session.calls  # over the budget alone: still embedded, by itself
    assert sum(n for n, *_ in session.calls) == len(frames) and side.sizes[(100, 100)] == 10


def test_one_call_of_many_same_size_frames_is_split():
    side, session = _side(25_000)
    frames = _frames([100] * 5)
    e, lg = side.run(frames, np.zeros((3, 2), np.float32))
    assert [c[0] for c in session.calls] == [2, 2, 1] and side.calls == [2, 2, 1]
    assert e[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and lg.shape == (5, 3)


def test_small_frames_count_as_the_model_input_they_are_enlarged_to():
    """The graph enlarges a small frame to the model's size before the backbone, so a budget
    of tiny frames must not become one call of thousands of model-size images (a 160x160
    photo model fed 5,000 64x64 frames at once needed over 20 GB)."""
    from edgemeta.runtime.spec import PreprocessSpec

    side, session = _side(10 * 160 * 160, spec=PreprocessSpec.create(160, 1))
    frames = [np.full((16, 16, 1), i, np.uint8) for i in range(25)]
    e, _ = side.run(frames, np.zeros((0, 2), np.float32))
    assert [c[0] for c in session.calls] == [10, 10, 5] and e[:, 0].tolist() == [float(i) for i in range(25)]


def test_no_call_takes_more_frames_than_the_batch_size():
    side, session = _side(PIXEL_BUDGET, batch_size=4)
    side.run(_frames([10] * 9), np.zeros((0, 2), np.float32))
    assert [c[0] for c in session.calls] == [4, 4, 1]
