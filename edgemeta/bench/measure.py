"""The measurements: timed sessions, classification, enrolment, cold start in a child process, torch eager."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from edgemeta.bench.config import BenchConfig, timed_options
from edgemeta.bench.models import ModelVariant, bind_device
from edgemeta.bench.timing import LatencyStats, paired_ratio, time_fn, time_pair
from edgemeta.runtime.errors import EdgemetaError, InputError, ProviderError
from edgemeta.runtime.ort import GPU_PROVIDERS, Provider, SessionOptions, display_name, open_session
from edgemeta.runtime.session import feeds_prototype_norms, images_only_feeds, prototype_sqnorms, run_bound
from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES, INPUT_SQNORMS, OUTPUT_EMBEDDINGS, OUTPUT_LOGITS


@dataclass(frozen=True)
class EmbeddingRow:
    """Embedding latency of one engine at one batch size."""

    provider: str
    precision: str
    engine: str  # "onnxruntime", "torch eager", "torch eager channels_last"
    batch: int
    latency: LatencyStats
    throughput_ips: float
    flops: int | None = None
    achieved_gflops: float | None = None
    peak_fraction: float | None = None
    speedup_vs_torch: float | None = None  # torch p50 (the faster torch line) / this p50
    speedup_vs_fp32: float | None = None  # ORT fp32 p50 / this p50
    repeat_p50_ms: float | None = None  # p50 of the second half of the calls (in the order they ran)
    repeatable: bool | None = (
        None  # the two halves' p50s agree within REPEAT_TOLERANCE (None: under MIN_REPEAT_CALLS calls)
    )
    first_half_p50_ms: float | None = None  # p50 of the first half of the calls

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = self.latency.to_dict(samples)
        return d


@dataclass(frozen=True)
class ClassesRow:
    """Classification latency at batch 1 with ``n_classes`` prototypes in the graph."""

    provider: str
    precision: str
    n_classes: int
    latency: LatencyStats
    vs_fewest: float  # p50 / p50 with the fewest classes measured
    predict: LatencyStats | None = None  # FewShotClassifier.predict: graph + softmax, top-1, verdict

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = self.latency.to_dict(samples)
        d["predict"] = self.predict.to_dict(samples) if self.predict else None
        return d


@dataclass(frozen=True)
class AdaptationRow:
    """Enrolling one class from K shots vs embedding the K images alone (same session)."""

    provider: str
    precision: str
    shots: int
    enroll: LatencyStats
    embed: LatencyStats
    ratio: float  # median over the timed pairs of enroll / the embed timed beside it
    method: str

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["enroll"], d["embed"] = self.enroll.to_dict(samples), self.embed.to_dict(samples)
        return d


@dataclass(frozen=True)
class ColdStartRow:
    """A fresh process: start -> imports -> session -> first prediction, in ms; its peak RSS."""

    provider: str
    precision: str
    interpreter_ms: float
    import_ms: float
    session_ms: float
    first_prediction_ms: float
    total_ms: float
    peak_rss_mb: float | None
    peak_rss_batch_mb: float | None  # after one more call at the largest batch size
    largest_batch: int

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        return asdict(self)


def input_dtype(sess: ort.InferenceSession, name: str) -> type:
    # with the pixels entry, `images` is an overridable initializer, not among get_inputs()
    t = next(i.type for i in (*sess.get_inputs(), *sess.get_overridable_initializers()) if i.name == name)
    return np.float16 if t == "tensor(float16)" else np.float32


def timed_session(
    variant: ModelVariant, provider: str, config: BenchConfig, model: bytes | None = None
) -> ort.InferenceSession:
    """The timed session: the benchmark's tuning, opened as the runtime opens its sessions
    (CUDA libraries preloaded, ONNX Runtime's fallback notices off stdout); the provider is
    checked to really run. ``model``: a serialized graph to open instead of the variant's file."""
    so = timed_options(config.ort, config.resolved_threads)
    chain = [provider] if provider == Provider.CPU.value else [provider, Provider.CPU.value]
    try:
        sess, said = open_session(variant.path if model is None else model, so, chain)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own pybind types
        raise ProviderError(
            f"{display_name(provider)} cannot run {variant.path.name}: {' '.join(str(e).split())[:300]}"
        ) from None
    if sess.get_providers()[0] != provider:
        said = f"; ONNX Runtime said: {said}" if said else ""
        raise ProviderError(
            f"{display_name(provider)} did not load for {variant.path.name} "
            f"(the session runs {sess.get_providers()}){said}"
        )
    return sess


def random_images(variant: ModelVariant, batch: int, dtype: type, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, batch]).standard_normal((batch, *variant.input_shape)).astype(dtype)


def _measure(fn: Callable[[], Any], config: BenchConfig) -> LatencyStats:
    return time_fn(fn, config.warmup, config.runs, config.duration)


def embedding_call(
    sess: ort.InferenceSession, variant: ModelVariant, batch: int, config: BenchConfig
) -> Callable[[], Any]:
    """One call of ``embeddings`` at ``batch`` (no prototypes fed)."""
    feeds = {
        INPUT_IMAGES: random_images(variant, batch, input_dtype(sess, INPUT_IMAGES), config.seed),
        INPUT_PROTOTYPES: np.zeros((0, variant.embedding_dim), input_dtype(sess, INPUT_PROTOTYPES)),
        **images_only_feeds(sess),
    }
    return lambda: sess.run([OUTPUT_EMBEDDINGS], feeds)


def time_classes(
    sess: ort.InferenceSession, variant: ModelVariant, n_classes: int, config: BenchConfig
) -> LatencyStats:
    """The graph at batch 1 with ``n_classes`` prototypes, fed as the runtime feeds them: with
    their squared norms (kept with the store) when the model takes them, except on TensorRT;
    on CUDA and TensorRT bound once on the device (:func:`bound_call`, :func:`bind_device`)."""
    rng = np.random.default_rng([config.seed, n_classes])
    protos = rng.standard_normal((n_classes, variant.embedding_dim)).astype(input_dtype(sess, INPUT_PROTOTYPES))
    batch = variant.fixed_batch or 1  # a fixed-batch graph: the call the runtime makes for one image, padded
    feeds = {
        INPUT_IMAGES: random_images(variant, batch, input_dtype(sess, INPUT_IMAGES), config.seed),
        INPUT_PROTOTYPES: protos,
    }
    feeds.update(images_only_feeds(sess))
    if feeds_prototype_norms(sess) and n_classes:
        feeds[INPUT_SQNORMS] = prototype_sqnorms(protos)
    return _measure(graph_call(sess, feeds), config)


def graph_call(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], Any]:
    """One call of ``embeddings`` and ``logits`` as the runtime makes it: with numpy feeds on
    the CPU, through :func:`bound_call` on CUDA and TensorRT."""
    device = bind_device(sess.get_providers()[0])
    if device is None:
        return lambda: sess.run([OUTPUT_EMBEDDINGS, OUTPUT_LOGITS], feeds)
    return bound_call(sess, feeds, device)


def bound_call(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], device: tuple[str, int]
) -> Callable[[], list[np.ndarray]]:
    """A graph call with IO binding, as the runtime makes it on a GPU: every input but the
    images is copied to ``device`` once (the store's prototypes stay there between calls);
    each call copies the images in and the outputs out. Without this, a 10,000-class row
    on a GPU would time the upload of the prototypes, which the runtime does not repeat."""
    fixed = {
        name: ort.OrtValue.ortvalue_from_numpy(value, *device) for name, value in feeds.items() if name != INPUT_IMAGES
    }
    images = feeds[INPUT_IMAGES]
    return lambda: run_bound(sess, images, fixed, [OUTPUT_EMBEDDINGS, OUTPUT_LOGITS], device)


def runtime_options(config: BenchConfig, batch: int = 64) -> SessionOptions:
    """The benchmark's ONNX Runtime settings for the runtime's own sessions, with its threads and ``batch``."""
    return replace(config.ort, intra_op_threads=config.resolved_threads, batch_size=batch)


def bench_classifier(variant: ModelVariant, provider: str, config: BenchConfig, images: int = 0) -> Any:
    """The runtime's classifier with the benchmark's settings, taking ``images`` (or K shots) in one call."""
    from edgemeta.runtime.classifier import ClassifierOptions, FewShotClassifier

    batch = max(64, config.shots, images)  # K shots in one call: the session chunks at its own batch size too
    opts = ClassifierOptions(batch_size=batch, session=runtime_options(config, batch))
    return FewShotClassifier(variant.path, providers=[provider], options=opts)


def predict_latencies(variant: ModelVariant, provider: str, config: BenchConfig) -> dict[int, LatencyStats]:
    """``FewShotClassifier.predict`` on one image with 1 ... N enrolled classes (random prototypes)."""
    clf = bench_classifier(variant, provider, config)
    x = random_images(variant, 1, np.float32, config.seed)
    rng = np.random.default_rng(config.seed)
    out = {}
    for n in sorted(config.class_counts):
        for i in range(len(clf.labels), n):
            clf.store.add(f"class{i}", rng.standard_normal((1, variant.embedding_dim)).astype(np.float32))
        out[n] = _measure(lambda: clf.predict(x), config)
    return out


def measure_adaptation(variant: ModelVariant, provider: str, config: BenchConfig) -> AdaptationRow:
    """Enrol K preprocessed images as a new class vs embed them, on the classifier's own session.

    Both start from the same preprocessed float tensors, so the ratio is the cost of
    enrolment itself (input checks, store update) over the embedding it needs. The two
    are timed alternately and the ratio is the median of each pair's: a change in the
    machine's speed hits both calls of a pair alike, where a ratio of the two p50s
    compares calls from different moments (on a shared 2-core machine the embedding's
    p50 alone moved by 20-40% between runs). Each enrolment adds a new class to a store
    of one class, and is forgotten (untimed) after its pair: the store does not grow
    with the number of calls.
    """
    clf = bench_classifier(variant, provider, config)
    clf.enroll("enrolled", x := random_images(variant, config.shots, np.float32, config.seed))
    enroll, embed = time_pair(
        lambda: clf.enroll("new class", x),
        lambda: clf.session.embed(x),
        config.warmup,
        config.runs,
        config.duration,
        after=lambda: clf.forget("new class"),
    )
    return AdaptationRow(
        display_name(provider),
        variant.precision.value,
        config.shots,
        enroll,
        embed,
        paired_ratio(enroll, embed),
        "FewShotClassifier.enroll vs Session.embed",
    )


_COLD_START = r"""
import sys, time
t0 = time.monotonic()
import json
import numpy as np
import onnxruntime
from edgemeta.runtime.ort import SessionOptions
from edgemeta.runtime.session import Session
t1 = time.monotonic()
path, provider, threads, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = Session(path, [provider], options=SessionOptions(intra_op_threads=threads, batch_size=max(big, 1)))
t2 = time.monotonic()
pp = s.preprocess
x = np.zeros((1, pp.channels, *pp.size), np.float32)
s.run(x, np.zeros((1, s.embedding_dim), np.float32))
t3 = time.monotonic()
def rss():
    # VmHWM: the peak RSS of this process image. getrusage's ru_maxrss would not do: Linux
    # carries it over from the spawning parent across exec.
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        try:
            import psutil
            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss) / 2**20
        except ImportError:
            return None
first = rss()
s.run(np.zeros((big, pp.channels, *pp.size), np.float32), np.zeros((1, s.embedding_dim), np.float32))
print(json.dumps({"t0": t0, "t1": t1, "t2": t2, "t3": t3, "rss": first, "rss_batch": rss()}))
"""


def measure_cold_start(variant: ModelVariant, provider: str, config: BenchConfig) -> ColdStartRow:
    """Start a fresh interpreter that imports the runtime, opens the model and predicts once.

    ``time.monotonic`` reads the same system-wide clock in both processes, so the
    child's timestamps are measured from the parent's moment of spawning it.
    """
    big = max(config.batch_sizes)
    args = [sys.executable, "-c", _COLD_START, str(variant.path), provider, str(config.resolved_threads), str(big)]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-300:]
        raise EdgemetaError(
            f"the cold-start process failed for {variant.path.name} on {display_name(provider)}: {tail}"
        )
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    ms = lambda a, b: (b - a) * 1e3  # noqa: E731
    return ColdStartRow(
        display_name(provider),
        variant.precision.value,
        ms(start, t["t0"]),
        ms(t["t0"], t["t1"]),
        ms(t["t1"], t["t2"]),
        ms(t["t2"], t["t3"]),
        ms(start, t["t3"]),
        t["rss"],
        t["rss_batch"],
        big,
    )


class TorchBaseline:
    """torch eager from the checkpoint: eval mode, inference mode, the benchmark's thread count.
    For an `export --module` model, the module is rebuilt from the model's metadata and
    ``checkpoint`` is its weights file (None when it was exported without weights), only with
    ``rebuild_module`` (the user's consent to run the code the metadata names, weights given or
    not), as ``edgemeta verify`` rebuilds it.

    On CUDA its input and output stay on the GPU, while each ONNX Runtime call copies the
    images in and the embeddings out: the ratio to torch on a GPU favours torch."""

    def __init__(
        self, checkpoint: Path | None, threads: int, variant: ModelVariant | None = None, rebuild_module: bool = False
    ) -> None:
        try:
            import torch
        except ImportError:
            raise InputError(
                "the torch baseline needs torch (pip install 'edgemeta[train]'); or leave out --checkpoint"
            ) from None
        self.torch = torch
        self.saved_threads = torch.get_num_threads()
        if variant is not None and variant.module:
            try:
                from edgemeta.exporters import source_model
            except ImportError as e:
                raise InputError(f"the torch baseline of {variant.module} needs the exporters: {e}") from None
            model = source_model(variant.path, checkpoint, rebuild_module)
        else:
            if checkpoint is None:
                raise InputError("the torch baseline needs --checkpoint (the checkpoint the model was exported from)")
            from edgemeta.checkpoint import load_checkpoint

            model = load_checkpoint(checkpoint).model
        torch.set_num_threads(threads)  # after the loading: a refusal above leaves torch's setting as it was
        self.model = model.eval()
        self.dim = variant.embedding_dim if variant is not None else 0
        self.models: dict[tuple[str, bool], Any] = {}

    def embed_fn(
        self, batch: int, channels_last: bool, device: str, config: BenchConfig, shape: tuple[int, ...]
    ) -> Callable[[], Any]:
        """One call of the embedding at ``batch`` (run it inside :meth:`timing`)."""
        torch = self.torch
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        key = (device, channels_last)
        if key not in self.models:  # one copy per device and memory format, made once
            self.models[key] = copy.deepcopy(self.model).to(device=device, memory_format=memory_format)
        model = self.models[key]
        g = torch.Generator().manual_seed(config.seed)
        x = torch.randn((batch, *shape), generator=g).to(device=device, memory_format=memory_format)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        if hasattr(model, "embed"):
            embed = model.embed
        else:  # a module whose own forward(images, prototypes) is the graph: its embeddings, with no classes
            none = torch.zeros((0, self.dim), device=device)
            embed = lambda images: model(images, none)[0]  # noqa: E731

        def fn() -> None:
            embed(x)
            sync()

        return fn

    def timing(self) -> Any:
        """The context torch's calls are timed in: ``torch.inference_mode()``."""
        return self.torch.inference_mode()

    def device_for(self, provider: str) -> str | None:
        """torch's device for ``provider``'s rows: the CPU's, CUDA for CUDA and TensorRT; None
        where torch has no such device (no CUDA in this build) or no match (any other provider)."""
        if provider == Provider.CPU.value:
            return "cpu"
        return "cuda" if provider in GPU_PROVIDERS and self.torch.cuda.is_available() else None

    def close(self) -> None:
        self.torch.set_num_threads(self.saved_threads)


def row_name(r: EmbeddingRow) -> str:
    engine = (
        "ORT " + r.precision
        if r.engine == "onnxruntime"
        else r.engine.replace("torch eager", "torch").replace("channels_last", "CL")
    )
    return engine if r.provider == "CPU" else f"{r.provider} {engine}"
