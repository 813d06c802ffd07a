#!/usr/bin/env python3
"""How to feed a classification call on a GPU: IO-binding variants side by side.

    python scripts/gpu_binding_ab.py model.fp32.onnx CUDAExecutionProvider

With 1 and 10,000 prototypes: ``run()`` with numpy feeds (the prototypes uploaded on every
call), the runtime's binding (prototypes and their norms on the device, the image bound as
a device OrtValue, the outputs bound on the device), variants of it (the image bound from
host memory, outputs to the host, norms not fed, one binding reused across calls), and the
runtime's own ``Session.run``. Each variant is checked to give the same logits, then timed
in three rounds (best p50 kept). ``CPUExecutionProvider`` runs it as a dry run.
"""
import sys
import numpy as np
import onnxruntime as ort
from edgemeta.benchmark import time_fn
from edgemeta.runtime.session import Session, open_ort_session

M, EP = sys.argv[1], sys.argv[2]
DEV = ("cuda", 0) if EP != "CPUExecutionProvider" else ("cpu", 0)
sess, _ = open_ort_session(M, ort.SessionOptions(), [EP, "CPUExecutionProvider"])
print(sess.get_providers()[0])
rng = np.random.default_rng(0)
x = rng.standard_normal((1, *sess.get_inputs()[0].shape[1:])).astype(np.float32)
DIM = sess.get_inputs()[1].shape[1]
OUTS = ["embeddings", "logits"]
for n in (1, 10000):
    protos = rng.standard_normal((n, DIM)).astype(np.float32)
    norms = np.einsum("nd,nd->n", protos, protos)
    P, N = (ort.OrtValue.ortvalue_from_numpy(a, *DEV) for a in (protos, norms))
    reused = sess.io_binding()
    reused.bind_ortvalue_input("prototypes", P)
    reused.bind_ortvalue_input("prototype_sqnorms", N)
    for o in OUTS:
        reused.bind_output(o)

    def plain():
        return sess.run(OUTS, {"images": x, "prototypes": protos, "prototype_sqnorms": norms})

    def dev_in_dev_out(norms_bound=True):
        b = sess.io_binding()
        b.bind_ortvalue_input("images", ort.OrtValue.ortvalue_from_numpy(x, *DEV))
        b.bind_ortvalue_input("prototypes", P)
        if norms_bound:
            b.bind_ortvalue_input("prototype_sqnorms", N)
        for o in OUTS:
            b.bind_output(o, *DEV)
        sess.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()

    def cpu_in_dev_out():
        b = sess.io_binding()
        b.bind_cpu_input("images", x)
        b.bind_ortvalue_input("prototypes", P)
        b.bind_ortvalue_input("prototype_sqnorms", N)
        for o in OUTS:
            b.bind_output(o, *DEV)
        sess.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()

    def cpu_in_cpu_out(norms_bound=True):
        b = sess.io_binding()
        b.bind_cpu_input("images", x)
        b.bind_ortvalue_input("prototypes", P)
        if norms_bound:
            b.bind_ortvalue_input("prototype_sqnorms", N)
        for o in OUTS:
            b.bind_output(o)
        sess.run_with_iobinding(b)
        return [v.numpy() for v in b.get_outputs()]

    def reuse_binding():
        reused.bind_cpu_input("images", x)
        sess.run_with_iobinding(reused)
        return [v.numpy() for v in reused.get_outputs()]

    frozen = protos.copy()
    frozen.flags.writeable = False
    s = Session(M, "cuda" if EP != "CPUExecutionProvider" else "cpu")
    variants = {"plain run (numpy feeds)": plain, "runtime binding: all on device": dev_in_dev_out,
                "runtime binding, no norms": lambda: dev_in_dev_out(False), "bind_cpu_input, outputs on device": cpu_in_dev_out,
                "bind_cpu_input, outputs to CPU": cpu_in_cpu_out, "host in/out, no norms": lambda: cpu_in_cpu_out(False),
                "one binding reused": reuse_binding, "runtime Session.run": lambda: s.run(x, frozen)}
    ref = plain()[1]
    for name, fn in variants.items():
        out = fn()
        got = out[1] if isinstance(out, list) else out[1]
        assert np.allclose(got, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max()), name
    best = {k: float("inf") for k in variants}
    for _ in range(3):
        for k, fn in variants.items():
            best[k] = min(best[k], time_fn(fn, 20, 300).p50_ms)
    print(f"{n} classes, p50 ms (best of 3 rounds of 300):")
    for k, v in best.items():
        print(f"  {k:38s} {v:7.3f}")
