"""Property-based fuzzing (Hypothesis) of the parsers of files that may come from strangers:
the store format, the model metadata and the episodes file.

Each parser must round-trip what edgemeta writes, and turn any other input (arbitrary bytes,
damaged files, hand-made documents with a recomputed checksum) into its own one-line error,
never another exception. CI runs a short profile; set ``EDGEMETA_FUZZ_EXAMPLES`` (examples
per test) for a long run, as ``reports/hardening.md`` records.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgemeta.runtime import (  # noqa: E402
    Metric,
    ModelMetadata,
    ModelMismatchError,
    StoreCorruptError,
    store_format,  # noqa: E402
)
from edgemeta.runtime.errors import EdgemetaError, InputError  # noqa: E402
from edgemeta.runtime.store_format import StoreData, parse, serialize  # noqa: E402

settings.register_profile(
    "edgemeta",
    max_examples=int(os.environ.get("EDGEMETA_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not os.environ.get("EDGEMETA_FUZZ_EXAMPLES"),  # CI: the same inputs every run
)
settings.load_profile("edgemeta")

# ---- strategies ---------------------------------------------------------------------------

labels = (
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)
    .filter(lambda s: s.strip() != "")
    .map(lambda s: __import__("unicodedata").normalize("NFC", s))
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def stores(draw) -> StoreData:
    dim = draw(st.integers(1, 6))
    labs = draw(st.lists(labels, max_size=6, unique=True))
    counts = tuple(draw(st.integers(1, 4)) for _ in labs)
    keep = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    emb = rng.standard_normal((sum(counts), dim)).astype(np.float32)
    offsets = np.cumsum([0, *counts])
    sums = np.array([emb[offsets[i] : offsets[i + 1]].sum(0, dtype=np.float64) for i in range(len(labs))]).reshape(
        len(labs), dim
    )
    fp = draw(st.text("0123456789abcdef", max_size=16))
    return StoreData(
        fp, dim, draw(st.sampled_from(list(Metric))), tuple(labs), counts, keep, sums, emb if keep else None
    )


def _resealed(data: bytes, edit) -> bytes:
    """``data`` with its store header edited and the (public) checksum recomputed."""
    from safetensors.numpy import load, save

    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][store_format.HEADER_KEY])
    tensors = dict(load(data))
    edit(header)
    text = json.dumps(header)
    return save(
        tensors,
        metadata={store_format.HEADER_KEY: text, store_format.CHECKSUM_KEY: store_format.checksum(text, tensors)},
    )


# ---- the store format ---------------------------------------------------------------------


@given(stores())
def test_store_format_round_trips(data):
    back = parse(serialize(data))
    assert (back.fingerprint, back.embedding_dim, back.metric, back.labels, back.counts, back.keep_embeddings) == (
        data.fingerprint,
        data.embedding_dim,
        data.metric,
        data.labels,
        data.counts,
        data.keep_embeddings,
    )
    assert np.array_equal(back.sums, data.sums)
    assert (back.embeddings is None) == (data.embeddings is None)
    if data.embeddings is not None:
        assert np.array_equal(back.embeddings, data.embeddings)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_only_ever_a_store_corrupt_error(blob):
    with pytest.raises(StoreCorruptError):
        parse(blob)


@given(stores(), st.data())
def test_damaged_stores_load_whole_or_not_at_all(data, draw):
    blob = bytearray(serialize(data))
    for _ in range(draw.draw(st.integers(1, 4))):
        kind = draw.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw.draw(st.integers(0, max(0, len(blob) - 1)))
        if kind == "flip" and blob:
            blob[at] ^= 1 << draw.draw(st.integers(0, 7))
        elif kind == "cut":
            del blob[at : at + draw.draw(st.integers(1, 16))]
        else:
            blob[at:at] = draw.draw(st.binary(min_size=1, max_size=8))
    try:
        back = parse(bytes(blob))
    except StoreCorruptError:
        return
    assert (
        back.labels == data.labels and back.counts == data.counts
    )  # only a change the format ignores (header padding)


@given(
    stores(),
    st.sampled_from(
        ["format", "version", "fingerprint", "embedding_dim", "metric", "labels", "counts", "keep_embeddings", "extra"]
    ),
    json_values,
)
def test_hand_made_headers_with_a_valid_checksum_are_refused_or_exact(data, field, value):
    blob = _resealed(serialize(data), lambda h: h.__setitem__(field, value))
    try:
        back = parse(blob)
    except StoreCorruptError:
        return
    assert back.labels == data.labels and back.counts == data.counts and back.embedding_dim == data.embedding_dim


# ---- the model metadata ------------------------------------------------------------------


def _metadata(draw) -> ModelMetadata:
    from edgemeta.runtime import Normalization, Precision, PreprocessSpec

    channels = draw(st.sampled_from([1, 3]))
    floats = st.floats(-10, 10, allow_nan=False)
    spec = PreprocessSpec(
        (draw(st.integers(1, 512)), draw(st.integers(1, 512))),
        channels,
        tuple(draw(floats) for _ in range(channels)),
        tuple(draw(st.floats(0.01, 10)) for _ in range(channels)),
        draw(st.sampled_from(["nearest", "bilinear", "bicubic"])),
        "L" if channels == 1 else "RGB",
    )
    return ModelMetadata(
        spec,
        draw(st.integers(1, 4096)),
        draw(st.sampled_from(list(Metric))),
        draw(st.sampled_from(list(Normalization))),
        draw(st.text("0123456789abcdef", max_size=16)),
        draw(labels),
        draw(st.sampled_from(list(Precision))),
        draw(st.integers(0, 30)),
    )


@given(st.data())
def test_model_metadata_round_trips(draw):
    meta = _metadata(draw.draw)
    assert ModelMetadata.from_json(meta.to_json()) == meta


@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_arbitrary_metadata_text_is_only_ever_a_model_mismatch(text):
    with pytest.raises(ModelMismatchError):
        ModelMetadata.from_json(text)


@given(
    st.data(),
    st.sampled_from(
        [
            "format",
            "version",
            "preprocess",
            "embedding_dim",
            "metric",
            "normalization",
            "fingerprint",
            "precision",
            "opset",
            "verification",
            "extra",
            "producer",
        ]
    ),
    json_values,
)
def test_metadata_with_a_field_replaced_is_refused_or_valid(draw, field, value):
    doc = json.loads(_metadata(draw.draw).to_json())
    doc[field] = value
    try:
        meta = ModelMetadata.from_json(json.dumps(doc))
    except ModelMismatchError:
        return
    assert meta.embedding_dim >= 1 and all(s >= 1 for s in meta.preprocess.size)


@given(st.data(), st.sampled_from(["size", "channels", "mean", "std", "interpolation", "color"]), json_values)
def test_metadata_with_a_preprocess_field_replaced_is_refused_or_valid(draw, field, value):
    doc = json.loads(_metadata(draw.draw).to_json())
    doc["preprocess"][field] = value
    try:
        meta = ModelMetadata.from_json(json.dumps(doc))
    except ModelMismatchError:
        return
    h, w = meta.preprocess.size
    assert type(h) is int and type(w) is int and h * w <= 1 << 24


# ---- the episodes file ------------------------------------------------------------------


@pytest.fixture(scope="module")
def episode_folder():
    with tempfile.TemporaryDirectory() as d:
        for c in range(3):
            for i in range(4):
                Path(d, f"c{c}_{i}.png").write_bytes(b"x")
        yield Path(d)


@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_episodes_file_round_trips(episode_folder, n_way, k_shot, q_query, count):
    from edgemeta.episodes import EPISODES_FORMAT, EPISODES_VERSION, read_episodes_file

    eps = []
    for _ in range(count):
        support = [[f"c{c}_{i}.png", f"class {c}"] for c in range(n_way) for i in range(k_shot)]
        query = [[f"c{c}_{k_shot + i}.png", f"class {c}"] for c in range(n_way) for i in range(q_query)]
        eps.append({"support": support, "query": query})
    doc = {
        "format": EPISODES_FORMAT,
        "version": EPISODES_VERSION,
        "n_way": n_way,
        "k_shot": k_shot,
        "q_query": q_query,
        "episodes": eps,
    }
    path = episode_folder / "e.json"
    path.write_text(json.dumps(doc))
    back = read_episodes_file(path)
    assert (back.n_way, back.k_shot, back.q_query) == (n_way, k_shot, q_query) and back.episodes == eps


@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_episodes_files_are_only_ever_an_input_error(episode_folder, blob):
    from edgemeta.episodes import read_episodes_file

    path = episode_folder / "bad.json"
    path.write_bytes(blob)
    with pytest.raises(InputError):
        read_episodes_file(path)


@given(st.sampled_from(["episodes", "n_way", "k_shot", "version", "format"]), json_values)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_episodes_with_a_field_replaced_are_refused_or_valid(episode_folder, field, value):
    from edgemeta.episodes import EPISODES_FORMAT, EPISODES_VERSION, read_episodes_file

    doc = {
        "format": EPISODES_FORMAT,
        "version": EPISODES_VERSION,
        "n_way": 1,
        "k_shot": 1,
        "q_query": 1,
        "episodes": [{"support": [["c0_0.png", "a"]], "query": [["c0_1.png", "a"]]}],
    }
    doc[field] = value
    path = episode_folder / "edit.json"
    path.write_text(json.dumps(doc))
    try:
        back = read_episodes_file(path)
    except EdgemetaError:
        return
    assert back.episodes and all(isinstance(ep, dict) for ep in back.episodes)
