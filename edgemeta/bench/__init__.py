"""Latency users can trust: an exported model on ONNX Runtime against the alternatives, in one run.

:func:`run_benchmark` measures, for every execution provider and precision asked for:

* **embedding latency** at each batch size (mean, p50, p90, p99, max; images/s), in
  rounds that time every precision and the torch lines in turn (one session alive at a
  time), so the ratios between them hold even when the machine drifts; the p50s of the
  first and second half of the calls are compared, so the report can say whether the
  machine was quiet enough;
* the **torch eager baseline** from the checkpoint, in the same process, with the same
  thread count, in eval and inference mode; channels-last is timed too, and ratios are
  taken against the faster torch line, so the baseline is never the crippled one;
* **FLOPs** counted from the ONNX graph (needs the ``onnx`` package; not from an ``.ort`` file) and the achieved
  FLOP/s as a fraction of the machine's peak, measured in the same run by a large
  float32 MatMul on ONNX Runtime with the same threads; for CUDA and TensorRT rows, by a
  large MatMul on the CUDA provider with its inputs on the GPU;
* **adaptation**: enrolling one class from K shots with the runtime's
  :class:`~edgemeta.runtime.classifier.FewShotClassifier` vs embedding the K images alone;
* **predict on frames**: :meth:`FewShotClassifier.predict` on decoded uint8 frames (the
  model's ``pixels`` entry preprocesses them) vs the model call on the preprocessed tensor,
  at batch 1 and the largest batch (models with the entry; see :mod:`edgemeta.bench.frames`);
* **classification** latency at batch 1 with 1 ... 10,000 (or more) enrolled classes;
* **cold start** in a fresh process: interpreter, imports, session creation, first
  prediction, each apart, and that process's peak RSS.

:func:`backprop_baseline` is the skeptic's comparison: on the same seeded episodes of
novel classes (those of the data set the model records, when it is Omniglot or
Tiny-ImageNet; else Omniglot's for a grey model; or any data named, see
:func:`backprop_data`), a last linear layer trained by backprop vs prototype enrolment, on
the embeddings of each precision benchmarked.

Only numpy and onnxruntime are needed for the ONNX Runtime figures: torch is imported
for the torch and backprop baselines only, ``onnx`` for FLOP counting only, rich and
matplotlib only to render.

Example:
    >>> from edgemeta.bench import BenchConfig, run_benchmark         # doctest: +SKIP
    >>> cfg = BenchConfig(batch_sizes=(1, 32), threads=2)              # doctest: +SKIP
    >>> report = run_benchmark("conv4.onnx", cfg, checkpoint="conv4.safetensors")  # doctest: +SKIP
    >>> report.to_dict()["embedding"][0]["latency"]["p50_ms"]          # doctest: +SKIP
"""

from edgemeta.bench.backprop import BackpropResult, backprop_baseline, backprop_data
from edgemeta.bench.config import BENCH_SESSION_OPTIONS, BenchConfig
from edgemeta.bench.flops import (
    FlopCount,
    count_flops,
    is_ort_format,
    matmul_model_bytes,
    measure_gpu_peak_flops,
    measure_int8_peak,
    measure_peak_flops,
)
from edgemeta.bench.frames import FramesRow, measure_frames
from edgemeta.bench.machine import logical_cores, machine_info, physical_cores
from edgemeta.bench.measure import AdaptationRow, ClassesRow, ColdStartRow, EmbeddingRow
from edgemeta.bench.models import ModelVariant, checkpoint_fingerprint, resolve_variants
from edgemeta.bench.render import check_plot_path, plot_report, render_report
from edgemeta.bench.report import REPORT_FORMAT, BenchReport, run_benchmark
from edgemeta.bench.timing import LatencyStats, paired_ratio, time_fn, time_pair

__all__ = [
    "BENCH_SESSION_OPTIONS",
    "REPORT_FORMAT",
    "AdaptationRow",
    "BackpropResult",
    "BenchConfig",
    "BenchReport",
    "ClassesRow",
    "ColdStartRow",
    "EmbeddingRow",
    "FlopCount",
    "FramesRow",
    "LatencyStats",
    "ModelVariant",
    "backprop_baseline",
    "backprop_data",
    "check_plot_path",
    "checkpoint_fingerprint",
    "count_flops",
    "is_ort_format",
    "logical_cores",
    "machine_info",
    "matmul_model_bytes",
    "measure_gpu_peak_flops",
    "measure_int8_peak",
    "measure_frames",
    "measure_peak_flops",
    "paired_ratio",
    "physical_cores",
    "plot_report",
    "render_report",
    "resolve_variants",
    "run_benchmark",
    "time_fn",
    "time_pair",
]
