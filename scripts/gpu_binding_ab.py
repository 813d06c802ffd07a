#!/usr/bin/env python3
"""How to feed a classification call on a GPU: IO-binding variants side by side.

    python scripts/gpu_binding_ab.py model.fp32.onnx --provider CUDAExecutionProvider

With 1 and 10,000 prototypes: ``run()`` with numpy feeds (the prototypes uploaded on every
call), the runtime's binding (prototypes and their norms on the device, the image bound as
a device OrtValue, the outputs bound on the device: ``edgemeta.bench.measure.bound_call``),
variants of it (the image bound from host memory, outputs to the host, norms not fed, one
binding reused across calls), and the runtime's own ``Session.run``. Each variant is
checked to give the same logits, then timed in three rounds (best p50 kept).
``--provider CPUExecutionProvider`` runs it as a dry run on the CPU.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--provider", default="CUDAExecutionProvider")
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()

    import onnxruntime as ort

    from edgemeta.bench import time_fn
    from edgemeta.bench.measure import bound_call
    from edgemeta.runtime.ort import open_session
    from edgemeta.runtime.session import Session, feeds_prototype_norms, prototype_sqnorms
    from edgemeta.runtime.spec import INPUT_IMAGES, INPUT_PROTOTYPES, INPUT_SQNORMS, OUTPUT_EMBEDDINGS, OUTPUT_LOGITS

    on_cpu = args.provider == "CPUExecutionProvider"
    device = ("cpu", 0) if on_cpu else ("cuda", 0)
    sess, _ = open_session(
        args.model, ort.SessionOptions(), list(dict.fromkeys([args.provider, "CPUExecutionProvider"]))
    )
    runtime = Session(args.model, "cpu" if on_cpu else "cuda")
    takes_norms = feeds_prototype_norms(sess)
    print(f"{args.model}: {sess.get_providers()[0]}, onnxruntime {ort.__version__}, norms input: {takes_norms}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, runtime.preprocess.channels, *runtime.preprocess.size)).astype(np.float32)
    outs = [OUTPUT_EMBEDDINGS, OUTPUT_LOGITS]

    def bound(fixed: dict, image_on_device: bool, outputs_on_device: bool, binding=None):
        """A graph call with ``fixed`` inputs bound once; a new binding per call unless one is given."""
        values = {k: ort.OrtValue.ortvalue_from_numpy(v, *device) for k, v in fixed.items()}
        if binding is not None:
            for k, v in values.items():
                binding.bind_ortvalue_input(k, v)
            for o in outs:
                binding.bind_output(o)

        def call():
            b = binding or sess.io_binding()
            if image_on_device:
                b.bind_ortvalue_input(INPUT_IMAGES, ort.OrtValue.ortvalue_from_numpy(x, *device))
            else:
                b.bind_cpu_input(INPUT_IMAGES, x)
            if binding is None:
                for k, v in values.items():
                    b.bind_ortvalue_input(k, v)
                for o in outs:
                    if outputs_on_device:
                        b.bind_output(o, *device)
                    else:
                        b.bind_output(o)
            sess.run_with_iobinding(b)
            return b.copy_outputs_to_cpu() if outputs_on_device else [v.numpy() for v in b.get_outputs()]

        return call

    for n in (1, 10000):
        protos = rng.standard_normal((n, runtime.embedding_dim)).astype(np.float32)
        fed = {INPUT_PROTOTYPES: protos} | ({INPUT_SQNORMS: prototype_sqnorms(protos)} if takes_norms else {})
        frozen = protos.copy()
        frozen.flags.writeable = False  # as the store keeps them: the runtime binds them once
        variants = {
            "plain run (numpy feeds)": lambda fed=fed: sess.run(outs, {INPUT_IMAGES: x, **fed}),
            "runtime binding: all on device": bound_call(sess, {INPUT_IMAGES: x, **fed}, device),
            "runtime binding, no norms": bound_call(sess, {INPUT_IMAGES: x, INPUT_PROTOTYPES: protos}, device),
            "bind_cpu_input, outputs on device": bound(fed, False, True),
            "bind_cpu_input, outputs to CPU": bound(fed, False, False),
            "host in/out, no norms": bound({INPUT_PROTOTYPES: protos}, False, False),
            "one binding reused": bound(fed, False, False, sess.io_binding()),
            "runtime Session.run": lambda frozen=frozen: runtime.run(x, frozen),
        }
        want = sess.run(outs, {INPUT_IMAGES: x, INPUT_PROTOTYPES: protos})[1]
        for name, fn in variants.items():
            got = fn()[1]
            if not np.allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max()):
                print(f"{name}: logits differ from the plain run", file=sys.stderr)
                return 1
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(3):
            for name, fn in variants.items():
                best[name] = min(best[name], time_fn(fn, 20, args.runs).p50_ms)
        print(f"{n} classes, p50 ms (best of 3 rounds of {args.runs}):")
        for name, v in best.items():
            print(f"  {name:38s} {v:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
