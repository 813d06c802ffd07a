"""Crash consistency: kill -9 writer processes at random points and check what they leave.

Each run starts a writer process that saves, over and over, two versions of a prototype
store (``PrototypeStore.save``) and two versions of a plain file (``atomic_write``, the
route of checkpoints, models, reports and episode files), and kills it with SIGKILL after
a random delay. Then every file must be exactly the old or the new version (never a mix,
never missing), and once the next writer has saved, no temporary file may remain.

    python scripts/crash_consistency.py --runs 200            # the figures in reports/hardening.md
    python scripts/crash_consistency.py --runs 5 --json       # what the test suite runs

Exit status 1 when any run found a damaged file or a leftover temporary file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRITER = r"""
import sys
import warnings
import numpy as np
from edgemeta.runtime import PrototypeStore
from edgemeta.runtime.files import atomic_write
from edgemeta.runtime.store import StoreConflictWarning

warnings.simplefilter("ignore", StoreConflictWarning)  # two versions, one path: replacing is the point

folder = sys.argv[1]
versions = []
for v in range(2):
    s = PrototypeStore(64, fingerprint=f"v{v}", keep_embeddings=True)
    for c in range(300 + 200 * v):
        s.add(f"class-{c}", np.full((8, 64), c + v, np.float32))
    versions.append(s)
blobs = [bytes([65 + v]) * (3_000_000 + v) for v in range(2)]
print("ready", flush=True)
i = 0
while True:
    versions[i % 2].save(folder + "/s.store")
    atomic_write(folder + "/plain.bin", blobs[i % 2])
    i += 1
"""


def _versions(folder: Path) -> tuple[set[str], set[bytes]]:
    """The fingerprints of the two store versions and the two plain-file contents the writer writes."""
    return {"v0", "v1"}, {bytes([65]) * 3_000_000, bytes([66]) * 3_000_001}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def _check(folder: Path, stores: set[str], plains: set[bytes]) -> list[str]:
    from edgemeta.runtime import EdgemetaError, PrototypeStore

    problems = []
    try:
        s = PrototypeStore.load(folder / "s.store")
        expected = 300 + 200 * int(s.fingerprint[1:]) if s.fingerprint in stores else -1
        if len(s) != expected:
            problems.append(f"store holds {len(s)} classes for version {s.fingerprint}")
    except EdgemetaError as e:
        problems.append(f"store: {e}")
    data = (folder / "plain.bin").read_bytes() if (folder / "plain.bin").exists() else b""
    if data not in plains:
        problems.append(f"plain file is neither version ({len(data)} bytes)")
    return problems


def run(runs: int, seed: int = 0, max_delay: float = 1.5, log=print) -> dict:
    """Kill ``runs`` writers at random points; returns the counts the report records."""
    import numpy as np

    from edgemeta.runtime import PrototypeStore
    from edgemeta.runtime.files import atomic_write

    rng = random.Random(seed)
    result = {"runs": runs, "damaged": 0, "temps_left_by_kill": 0, "temps_after_next_write": 0, "problems": []}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        stores, plains = _versions(folder)
        # the "old" files before the first writer: a store and a plain file of version 0
        seed_store = PrototypeStore(64, fingerprint="v0", keep_embeddings=True)
        for c in range(300):
            seed_store.add(f"class-{c}", np.full((8, 64), c, np.float32))
        seed_store.save(folder / "s.store")
        atomic_write(folder / "plain.bin", bytes([65]) * 3_000_000)
        for k in range(runs):
            p = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, max_delay))
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            problems = _check(folder, stores, plains)
            left = _temps(folder)
            result["temps_left_by_kill"] += bool(left)
            # the next writer: saves the version the folder holds now, cleaning what the killed one left
            PrototypeStore.load(folder / "s.store").save(folder / "s.store")
            atomic_write(folder / "plain.bin", (folder / "plain.bin").read_bytes())
            after = _temps(folder)
            if after:
                result["temps_after_next_write"] += 1
                problems.append(f"temporary files remain after the next write: {after}")
            if problems:
                result["damaged"] += 1
                result["problems"].append(f"run {k}: {'; '.join(problems)}")
            if log and (k + 1) % 25 == 0:
                log(f"{k + 1}/{runs} runs, {result['damaged']} with problems")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200, help="writer processes to kill (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=1.5, help="longest wait before the kill, seconds")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    result = run(args.runs, args.seed, args.max_delay, log=None if args.json else print)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['runs']} kill -9 runs: {result['damaged']} with a damaged file or leftover temp file; "
            f"{result['temps_left_by_kill']} kills left a temp file, "
            f"{result['temps_after_next_write']} remained after the next write"
        )
        for line in result["problems"][:20]:
            print("  " + line)
    return 1 if result["damaged"] else 0


if __name__ == "__main__":
    sys.exit(main())
