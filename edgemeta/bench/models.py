"""The models a benchmark times: the files given, and the precision variants found beside them or made."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edgemeta.bench.flops import is_ort_format
from edgemeta.runtime.errors import CheckpointError, InputError, ModelMismatchError, ProviderError
from edgemeta.runtime.files import file_sha256
from edgemeta.runtime.ort import GPU_PROVIDERS, SessionOptions, display_name, resolve_providers
from edgemeta.runtime.session import Session
from edgemeta.runtime.spec import Precision

REMOTE_PROVIDERS = ("AzureExecutionProvider",)  # in ONNX Runtime's CPU builds; it calls a cloud endpoint


@dataclass(frozen=True)
class ModelVariant:
    """One exported model file of the benchmarked model, at one precision."""

    precision: Precision
    path: Path
    origin: str  # "given", "found next to the model", "made from ..." (with the exporters)
    fingerprint: str
    backbone: str
    input_shape: tuple[int, int, int]  # C, H, W
    embedding_dim: int
    size_bytes: int
    fixed_batch: int | None = None  # the graph's batch size when it is fixed (it runs no other)
    dataset: str = ""  # the data set the model records it was trained on ("" if none)
    int8_stem: str | None = None  # an int8 model: how it runs its stem (ModelMetadata.int8_stem)
    module: str = ""  # an `export --module` model: its factory (package.module:factory or file.py:factory)
    weights_sha256: str = ""  # ... and the SHA-256 of the weights it was exported with ("" if none)
    wrapped_from: str = ""  # an `edgemeta wrap` model: the ONNX file it was wrapped from (it has no torch source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision.value,
            "path": str(self.path),
            "origin": self.origin,
            "fingerprint": self.fingerprint,
            "backbone": self.backbone,
            "input_shape": list(self.input_shape),
            "embedding_dim": self.embedding_dim,
            "size_mb": round(self.size_bytes / 1e6, 3),  # MB, as `edgemeta export` reports it
            "fixed_batch": self.fixed_batch,
            "dataset": self.dataset,
            "int8_stem": self.int8_stem,
            "module": self.module,
        }


def open_variant(path: Path, origin: str, threads: int) -> ModelVariant:
    """Load ``path`` once on the CPU to check it is an edgemeta model and read its metadata."""
    sess = Session(path, "cpu", options=SessionOptions(intra_op_threads=threads))
    meta = sess.metadata
    pp = meta.preprocess
    dataset = meta.extra.get("dataset")
    module = meta.extra.get("module") if meta.extra.get("source") in ("module", "extractor") else None
    return ModelVariant(
        meta.precision,
        path,
        origin,
        meta.fingerprint,
        meta.backbone,
        (pp.channels, *pp.size),
        meta.embedding_dim,
        path.stat().st_size,
        sess.fixed_batch,
        dataset if isinstance(dataset, str) else "",
        meta.int8_stem,
        module if isinstance(module, str) else "",
        str(meta.extra.get("weights_sha256") or "") if module else "",
        str(meta.extra.get("source_file") or "?") if meta.extra.get("source") == "onnx" else "",
    )


def _check_batch_sizes(variants: Sequence[ModelVariant], batch_sizes: Sequence[int]) -> None:
    """A graph with a fixed batch size runs that batch only: other batch sizes are refused
    before any measuring (the runtime pads a smaller call; the benchmark times the graph)."""
    for v in variants:
        other = [b for b in batch_sizes if v.fixed_batch is not None and b != v.fixed_batch]
        if other:
            raise InputError(
                f"{v.path} takes a fixed batch of {v.fixed_batch}, so batch size "
                f"{', '.join(map(str, other))} cannot be timed: pass --batch-sizes "
                f"{v.fixed_batch}, or re-export it with a dynamic batch (`edgemeta export`)"
            )


def _base_stem(path: Path) -> str:
    """``model`` for ``model.onnx``, ``model.int8.onnx`` and ``model.fp32.onnx`` alike."""
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
    for p in Precision:
        if stem.endswith(f".{p.value}"):
            return stem[: -len(p.value) - 1]
    return stem


def _sibling(path: Path, precision: Precision) -> Path | None:
    """``model.int8.onnx`` next to ``model.onnx`` (and back); ``model.fp32.onnx`` counts as fp32."""
    stem = _base_stem(path)
    names = [f"{stem}.{precision.value}.onnx"] + ([f"{stem}.onnx"] if precision is Precision.FP32 else [])
    for name in names:
        cand = path.with_name(name)
        if cand.is_file() and cand.resolve() != path.resolve():
            return cand
    return None


def _make_variant(
    precision: Precision, fp32: ModelVariant | None, checkpoint: Path | None, workdir: Path, data_dir: str | None = None
) -> tuple[Path, str]:
    """Make a missing precision with the exporters: fp16 from the fp32 model; int8 calibrated on
    the checkpoint's training images; anything from the checkpoint. Not verified: only timed.
    Returns the file and what it was made from (for the notes)."""
    try:
        from edgemeta.exporters import ExportOptions, export_checkpoint, quantize_model, to_fp16
    except ImportError as e:
        raise InputError(f"making a {precision.value} model needs the exporters: {e}") from None
    out = workdir / f"{_base_stem(fp32.path if fp32 else checkpoint or Path('model'))}.{precision.value}.onnx"
    if fp32 is not None and precision is Precision.FP16:
        to_fp16(fp32.path, out)
        return out, f"{fp32.path.name} (fp16 conversion)"
    if fp32 is not None and checkpoint is not None and precision is Precision.INT8:
        quantize_model(fp32.path, checkpoint, out, ExportOptions(verify=None, data_dir=data_dir))
        return out, f"{fp32.path.name} and the checkpoint (int8 calibration)"
    if checkpoint is not None:
        export_checkpoint(checkpoint, out, ExportOptions(precision=precision, verify=None, data_dir=data_dir))
        return out, "the checkpoint"
    raise InputError(f"making a {precision.value} model needs --checkpoint (int8 is calibrated on its training images)")


def resolve_variants(
    models: Sequence[Path],
    precisions: Sequence[Precision],
    checkpoint: Path | None,
    workdir: Path,
    threads: int,
    batch_sizes: Sequence[int] = (),
    data_dir: str | None = None,
) -> list[ModelVariant]:
    """The models to benchmark: the given ones, or one per requested precision.

    A requested precision comes from a given model, else from a sibling file
    (``model.int8.onnx``), else it is made with the exporters (int8 calibrated on the
    training images, from ``data_dir``). ``batch_sizes``: those to be timed, which a
    fixed-batch model must take (checked before any variant is made).
    """
    given = [open_variant(Path(m), "given", threads) for m in models]
    _check_given(given, checkpoint)
    _check_batch_sizes(given, batch_sizes)
    if checkpoint is not None:
        _check_fingerprints(given, checkpoint)  # before any time is spent making variants
    if not precisions:
        return given
    by_precision = {v.precision: v for v in given}
    out = []
    for precision in precisions:
        if precision in by_precision:
            out.append(by_precision[precision])
            continue
        found = next((s for v in given if (s := _sibling(v.path, precision)) is not None), None)
        if found is not None:
            out.append(_open_sibling(found, precision, given[0], checkpoint, threads))
            continue
        fp32 = by_precision.get(Precision.FP32)
        if fp32 is None or is_ort_format(fp32.path):  # the exporters read ONNX, not the ORT format
            fp32 = next(
                (
                    _open_sibling(s, Precision.FP32, given[0], checkpoint, threads)
                    for v in given
                    if (s := _sibling(v.path, Precision.FP32))
                ),
                None,
            )
        if checkpoint is None and not given[0].module and (fp32 is None or precision is not Precision.FP16):
            raise InputError(
                f"no {precision.value} model: pass one, put {_base_stem(given[0].path)}.{precision.value}.onnx next to "
                f"{given[0].path.name}, or give --checkpoint to make it"
            )
        if given[0].module and (fp32 is None or precision is not Precision.FP16):
            # its int8 calibration images are the user's (it records no data set), which the benchmark does not take
            raise InputError(
                f"no {precision.value} model of {given[0].path.name} (exported from {given[0].module}): make it with "
                "`edgemeta quantize` (int8, --calibration-data) or `edgemeta export --module`, and pass it too"
            )
        made, source = _make_variant(precision, fp32, checkpoint, workdir, data_dir)
        out.append(open_variant(made, f"made from {source}", threads))
    if checkpoint is not None:
        _check_fingerprints(out, checkpoint)
    _check_batch_sizes(out, batch_sizes)
    return out


def variant_notes(given: Sequence[Path], variants: Sequence[ModelVariant], temporary: bool) -> list[str]:
    """Which files ran, where they did not all come from the command line: a given model that
    --precisions leaves out, and each precision found beside it or made."""
    timed = {v.path.resolve() for v in variants}
    notes = [
        f"{p.name} was given but not timed: --precisions "
        f"({', '.join(v.precision.value for v in variants)}) leaves its precision out"
        for p in dict.fromkeys(given)
        if p.resolve() not in timed
    ]
    for v in variants:
        if v.origin != "given":
            where = " in a temporary folder, removed after the run" if temporary and v.origin.startswith("made") else ""
            notes.append(f"{v.precision.value}: {v.path.name}, {v.origin}{where}")
    return notes


def _name_precision(path: Path) -> Precision | None:
    """The precision a file's name says (``model.int8.onnx``: int8), or None (``model.onnx``)."""
    return next((p for p in Precision if path.stem.endswith(f".{p.value}")), None)


def _remake(path: Path, precision: Precision, first: ModelVariant, checkpoint: Path | None) -> str:
    """How to replace a model file that is not what it should be."""
    ckpt = str(checkpoint) if checkpoint is not None else "CHECKPOINT"
    # an .ort file comes from export --ort, which writes it beside the .onnx that -o names
    how = f"`edgemeta export {ckpt} --precision {precision.value} " + (
        f"--ort -o {path.with_suffix('.onnx')}`" if path.suffix == ".ort" else f"-o {path}`"
    )
    if precision is Precision.INT8 and not is_ort_format(first.path) and first.precision is Precision.FP32:
        how += f" or `edgemeta quantize {first.path} -c {ckpt} -o {path}`"
    return f"remake it from the checkpoint {first.path.name} was exported from ({how}), or delete it"


def _kind(v: ModelVariant) -> str:
    """What a model is, in words: its backbone and input (``conv4 1x28x28``)."""
    return _describe(v.backbone, v.input_shape)


def _describe(backbone: str, input_shape: Sequence[int]) -> str:
    return f"{backbone} {'x'.join(map(str, input_shape))}"


def _check_given(given: Sequence[ModelVariant], checkpoint: Path | None) -> None:
    """Several models are precision variants of one model: the first one's fingerprint, one file
    per precision, each of the precision its name says. Raises once with every problem found."""
    first, problems, seen = given[0], [], {}
    for v in given:
        if _kind(v) != _kind(first):  # plainly another model: nothing about it is worth remaking
            problems.append(
                f"{v.path} is a {_kind(v)} model and {first.path.name} a "
                f"{_kind(first)} model: benchmark different models one at a time"
            )
            continue
        if v.fingerprint != first.fingerprint:
            problems.append(
                f"{v.path} is model {v.fingerprint}, but {first.path.name} is model {first.fingerprint} (several "
                "models are precision variants of one model): benchmark different models one at a time; if it should "
                f"be {first.path.name}'s {v.precision.value} variant, {_remake(v.path, v.precision, first, checkpoint)}"
            )
        named = _name_precision(v.path)
        if named is not None and named is not v.precision:
            problems.append(
                f"{v.path} is an {v.precision.value} model though its name says {named.value}: "
                f"{_remake(v.path, named, first, checkpoint)}"
            )
        if v.precision in seen and os.path.samefile(seen[v.precision].path, v.path):
            problems.append(f"{v.path} is given twice; pass each model once")
        elif v.precision in seen:
            ort = (
                " (benchmark an .ort file on its own)"
                if is_ort_format(v.path) != is_ort_format(seen[v.precision].path)
                else ""
            )
            problems.append(
                f"{seen[v.precision].path} and {v.path} are both "
                f"{v.precision.value} models; pass one model per precision{ort}"
            )
        seen.setdefault(v.precision, v)
    if problems:
        raise ModelMismatchError("; ".join(problems))


def _open_sibling(
    path: Path, precision: Precision, first: ModelVariant, checkpoint: Path | None, threads: int
) -> ModelVariant:
    """A model file found next to ``first`` for ``precision``: it must be ``first``'s model at that
    precision. One left over from another model (or a copy of another precision) would be compared
    with ``first`` as if it were its variant; the error names the file and how to replace it."""
    v = open_variant(path, "found next to the model", threads)
    problems = []
    if v.fingerprint != first.fingerprint:
        problems.append(f"is model {v.fingerprint}, but {first.path.name} is model {first.fingerprint}")
    if v.precision is not precision:
        problems.append(f"is an {v.precision.value} model")
    if problems:
        raise ModelMismatchError(
            f"{path}, found next to {first.path.name} as its {precision.value} model, {' and '.join(problems)}: "
            f"{_remake(path, precision, first, checkpoint)}"
        )
    return v


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """The model fingerprint recorded in a checkpoint's header, read without torch (the
    safetensors metadata, through safetensors' numpy side, holds edgemeta's JSON document)."""
    return _checkpoint_header(path)[0]


def _checkpoint_header(path: str | os.PathLike) -> tuple[str, str]:
    """``(fingerprint, what the model is in words)`` from a checkpoint's header, without torch."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .safetensors file `edgemeta train` wrote")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    try:
        with safe_open(str(path), framework="numpy") as f:
            doc = json.loads((f.metadata() or {})["edgemeta"])
        fingerprint = str(doc["fingerprint"])
    except Exception:  # noqa: BLE001 - safetensors raises its own types for files that are not safetensors
        raise CheckpointError(
            f"{path} is not an edgemeta checkpoint (no readable edgemeta header); pass one written by `edgemeta train`"
        ) from None
    try:  # the words are a courtesy: a header without them still names the model by its fingerprint
        spec = doc["spec"]
        pp = spec["preprocess"]
        size = pp["size"] if isinstance(pp["size"], list) else [pp["size"], pp["size"]]
        kind = f" ({_describe(spec['backbone'], [pp['channels'], *size])})"
    except (KeyError, TypeError):
        kind = ""
    return fingerprint, kind


def _check_weights(variants: Sequence[ModelVariant], weights: Path) -> None:
    """``--checkpoint`` of an `export --module` model: the weights file it was exported with."""
    first = variants[0]
    if not first.weights_sha256:
        raise InputError(
            f"{first.path.name} was exported from {first.module} without weights, so it has no --checkpoint: leave it "
            "out (add --rebuild-module to rebuild the torch baseline from the model's metadata)"
        )
    if weights.is_dir() or not weights.is_file():
        raise CheckpointError(f"--checkpoint {weights} is not a file; pass the weights {first.path.name} was made with")
    got = file_sha256(weights)
    bad = [v for v in variants if v.weights_sha256 != got]
    if bad:
        raise ModelMismatchError(
            f"{weights.name} is not the weights {', '.join(v.path.name for v in bad)} "
            f"{'was' if len(bad) == 1 else 'were'} exported with ({bad[0].weights_sha256[:12]}...); "
            f"pass the --weights file given to `edgemeta export --module {first.module}`"
        )


def _check_fingerprints(variants: Sequence[ModelVariant], checkpoint: Path) -> None:
    if variants[0].wrapped_from:
        raise InputError(
            f"{variants[0].path.name} was wrapped from the ONNX file {variants[0].wrapped_from}, not made from a torch "
            "module: it has no torch baseline and no --checkpoint; leave it out"
        )
    if variants[0].module:
        _check_weights(variants, checkpoint)
        return
    want, kind = _checkpoint_header(checkpoint)
    bad = [v for v in variants if v.fingerprint != want]
    if bad:
        raise ModelMismatchError(
            f"checkpoint {checkpoint.name} is model {want}{kind}, but "
            + ", ".join(f"{v.path.name} is model {v.fingerprint} ({_kind(v)})" for v in bad)
            + "; pass the checkpoint the model was exported from"
        )


def providers_to_run(requested: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """ONNX Runtime provider names to benchmark, and the unavailable ones with the reason.

    ``auto`` keeps what this build has and reports the rest; a provider named
    explicitly that this build lacks is an error (the benchmark never runs elsewhere).
    """
    available = ort.get_available_providers()
    auto = any(p.strip().lower() == "auto" for p in requested)
    names, _ = resolve_providers("auto" if auto else list(requested))
    remote = [p for p in names if p in REMOTE_PROVIDERS]
    if remote:  # its sessions run every node on the CPU provider: rows under its name would be the CPU's
        raise ProviderError(
            f"{', '.join(remote)} sends requests to a remote endpoint and "
            "runs nothing on this machine; benchmark cpu (or cuda, tensorrt)"
        )
    missing = [p for p in names if p not in available]
    if missing and not auto:
        raise ProviderError(
            f"provider(s) {', '.join(missing)} not available in this onnxruntime "
            f"build (it has {', '.join(available)}); install onnxruntime-gpu for "
            "CUDA/TensorRT, or use --providers auto to report them as unavailable"
        )
    unavailable = {p: f"{display_name(p)} unavailable (not in this onnxruntime build)" for p in missing}
    return [p for p in names if p in available], unavailable


def bind_device(provider: str) -> tuple[str, int] | None:
    """Where a provider's inputs are bound for the timed calls: the CUDA device for CUDA and
    TensorRT, None (plain ``run`` with numpy arrays) for the CPU and any other provider, which
    this onnxruntime may not be able to allocate device memory for (AzureExecutionProvider)."""
    return ("cuda", 0) if provider in GPU_PROVIDERS else None
