"""Training speed: episodes per second for 20-way 5-shot 5-query Conv-4 at 28x28.

Usage:
    EDGEMETA_DATA_DIR=../shared/data python scripts/train_speed.py [--episodes 30] [--json]

Measured in one run, same episodes, same seed, each variant after a warm-up:
- plain eager loop: each episode's PNGs decoded from the archive with PIL and
  normalized per image (what a torchvision-style Dataset does), NCHW, torch's
  default thread count;
- + data decoded once into memory (edgemeta's cache);
- + channels_last memory format;
- + bfloat16 autocast (AMX / AVX-512 BF16 CPUs), what the Omniglot recipe uses;
- + torch.compile (if it compiles here).
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from edgemeta.data import data_dir, load_omniglot, omniglot_spec
from edgemeta.episodes import EpisodeSampler
from edgemeta.evaluate import to_tensor
from edgemeta.model import FewShotModel, ModelSpec
from edgemeta.runtime.preprocess import decode, preprocess


def step(model, opt, x, n, k, q):
    z = model.embed(x)
    protos = z[: n * k].view(n, k, -1).mean(1)
    loss = F.cross_entropy(model.logits(z[n * k :], protos).float(), torch.arange(n).repeat_interleave(q))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run(variant: str, ds, sampler, episodes: int, warmup: int, archive) -> float:
    torch.manual_seed(0)
    spec = ModelSpec("conv4", omniglot_spec(28))
    model = FewShotModel(spec)
    cl = variant in ("channels_last", "bf16", "compile")
    if cl:
        model = model.to(memory_format=torch.channels_last)
    fwd_model = torch.compile(model) if variant == "compile" else model
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    n, k, q = sampler.n_way, sampler.k_shot, sampler.q_query
    t0 = None
    for i in range(warmup + episodes):
        if i == warmup:
            t0 = time.perf_counter()
        ep = sampler.episode(i)
        idx = np.concatenate([ep.support, ep.query])
        if variant == "plain":
            imgs = [decode(io.BytesIO(archive.read(ds.paths[j]))) for j in idx]
            x = torch.from_numpy(preprocess(imgs, spec.preprocess))
        else:
            x = to_tensor(ds.images[idx], spec.preprocess.mean, spec.preprocess.std)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            step(fwd_model if variant == "compile" else model, opt, x, n, k, q)
    return episodes / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads for the tuned variants (default: all cores)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ds = load_omniglot("background")
    sampler = EpisodeSampler(ds.labels, 20, 5, 5, seed=0)
    archive = zipfile.ZipFile(data_dir() / "omniglot" / "images_background.zip")
    default_threads = torch.get_num_threads()
    results = {}
    variants = ["plain", "in_memory", "channels_last", "bf16"] + ([] if args.no_compile else ["compile"])
    for v in variants:
        torch.set_num_threads(default_threads if v == "plain" or not args.threads else args.threads)
        try:
            results[v] = run(v, ds, sampler, args.episodes, args.warmup, archive)
        except Exception as e:  # torch.compile needs a C++ toolchain; report, don't fail
            results[v] = None
            print(f"{v}: failed ({type(e).__name__}: {str(e)[:100]})")
    base = results["plain"]
    rows = {v: {"episodes_per_second": r, "speedup": (r / base if r else None)} for v, r in results.items()}
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": rows}, indent=2))
        return
    print(f"20-way 5-shot 5-query Conv-4 28x28, {args.episodes} episodes each, {torch.get_num_threads()} threads")
    for v, r in rows.items():
        eps = f"{r['episodes_per_second']:.2f}" if r["episodes_per_second"] else "n/a"
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
        print(f"  {v:14s} {eps:>8s} episodes/s  {sp:>7s}")


if __name__ == "__main__":
    main()
