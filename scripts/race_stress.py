"""Concurrent save / enrol / forget races on one store, counted for reports/hardening.md.

Each race runs one thread that enrols into an existing class, enrols and forgets new
classes, while the main thread saves the store; every saved file is then loaded (format,
schema, checksum) and checked: counts add up to the kept embeddings and each class's sum
equals the sum of its embeddings.

    python scripts/race_stress.py --races 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgemeta.runtime import EdgemetaError, PrototypeStore

D = 32


def consistent(path: Path) -> bool:
    try:
        s = PrototypeStore.load(path)
    except EdgemetaError:
        return False
    sums = s.sums()
    for i, lab in enumerate(s.labels):
        e = s.examples(lab)
        if len(e) != s.counts[lab] or not np.allclose(sums[i], e.sum(0, dtype=np.float64), rtol=1e-9, atol=1e-9):
            return False
    return True


def run(races: int, classes: int = 200) -> dict:
    corrupt = 0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.store"
        for r in range(races):
            s = PrototypeStore(D, fingerprint="fp", keep_embeddings=True)
            for c in range(classes):
                s.add(f"c{c}", np.full((1, D), c, np.float32))
            go = threading.Event()

            def churn(k: int = r, s: PrototypeStore = s, go: threading.Event = go) -> None:
                go.wait()
                for i in range(30):
                    s.add("c0", np.full((1, D), i + k, np.float32))
                    s.add(f"n{i}", np.ones((2, D), np.float32))
                    s.forget(f"n{i}")

            t = threading.Thread(target=churn)
            t.start()
            go.set()
            s.save(path)  # races with the churn
            t.join()
            corrupt += not consistent(path)
            if (r + 1) % 250 == 0:
                print(f"{r + 1}/{races} races, {corrupt} corrupt stores", flush=True)
    return {"races": races, "corrupt": corrupt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--races", type=int, default=1000)
    args = ap.parse_args()
    result = run(args.races)
    print(f"{result['races']} save/enrol/forget races: {result['corrupt']} corrupt stores")
    return 1 if result["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
