"""Recipe: meta-train Conv-4 on Omniglot (background split only), evaluate, write a report.

Usage:
    EDGEMETA_DATA_DIR=../shared/data python scripts/train_omniglot.py --out runs/omniglot

Trains Snell et al.'s setting (60-way 5-query episodes, rotations as classes, 28x28,
squared euclidean) with 1 and 5 shots cycled, a cosine learning rate and bfloat16
autocast, validates 20-way 1-shot on held-out background alphabets, then evaluates
the best checkpoint on the evaluation split (5/20-way, 1/5-shot, 1,000 episodes each)
and out of domain on scikit-learn's digits, and writes ``report.md`` / ``report.json``.
``--install`` copies the checkpoint into the package as the embedded default.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from edgemeta.checkpoint import load_checkpoint
from edgemeta.data import load_digits, load_omniglot
from edgemeta.evaluate import evaluate
from edgemeta.train import TrainConfig, train

PROTOCOLS = [(5, 1), (5, 5), (20, 1), (20, 5)]
PAPER = {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/omniglot")
    ap.add_argument("--episodes", type=int, default=13000)
    ap.add_argument("--shots", default="1,5", help="training shots, cycled episode by episode")
    ap.add_argument("--val-alphabets", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 (bf16 autocast is much faster with AMX)")
    ap.add_argument("--n-way", type=int, default=60)
    ap.add_argument("--schedule", choices=("step", "cosine"), default="cosine")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--step-every", type=int, default=2500, help="step schedule: halve the learning rate this often")
    ap.add_argument(
        "--val-way", type=int, default=20, help="validation episodes are N-way 1-shot (20: 5-way saturates near 99%%)"
    )
    ap.add_argument("--val-every", type=int, default=500)
    ap.add_argument("--max-minutes", type=float, default=57.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-episodes", type=int, default=1000)
    ap.add_argument("--install", action="store_true", help="copy the checkpoint to edgemeta/pretrained/")
    ap.add_argument("--skip-train", action="store_true", help="only evaluate an existing checkpoint in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "conv4_omniglot.safetensors"
    cfg = TrainConfig(
        out=str(ckpt),
        dataset="omniglot",
        backbone="conv4",
        n_way=args.n_way,
        k_shot=5,
        q_query=5,
        mixed_shots=tuple(int(k) for k in args.shots.split(",")),
        bf16=not args.no_bf16,
        val_alphabets=args.val_alphabets,
        episodes=args.episodes,
        lr=args.lr,
        schedule=args.schedule,
        step_every=args.step_every,
        gamma=0.5,
        val_every=args.val_every,
        val_episodes=300,
        val_n_way=args.val_way,
        val_k_shot=1,
        seed=0,
        threads=args.threads,
        max_minutes=args.max_minutes,
    )
    t0 = time.time()
    result = None
    if not args.skip_train:
        result = train(cfg, progress=True, force=True)  # a re-run of this script replaces its earlier run
    train_min = (time.time() - t0) / 60
    ck = load_checkpoint(ckpt)
    torch.set_num_threads(args.threads)
    ev = load_omniglot("evaluation")
    rows = []
    for n, k in PROTOCOLS:
        rep = evaluate(ck.model, ev, n, k, 15, args.eval_episodes, seed=0)
        rows.append({**rep.to_dict(), "paper": PAPER[(n, k)]})
        print(rep.line(), flush=True)
    digits = load_digits(ck.spec.preprocess)
    ood = []
    for k in (1, 5):
        rep = evaluate(ck.model, digits, 10, k, 15, args.eval_episodes, seed=0)
        ood.append(rep.to_dict())
        print("digits", rep.line(), flush=True)
    report = {
        "checkpoint": str(ckpt),
        "fingerprint": ck.fingerprint,
        "train_minutes": round(train_min, 1),
        "episodes_trained": ck.info.get("step"),
        "best_val_accuracy": ck.info.get("best_val_accuracy"),
        "episodes_per_second": result.episodes_per_second if result else None,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "omniglot_evaluation": rows,
        "digits_out_of_domain": ood,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Conv-4 on Omniglot (Snell et al. protocol)",
        "",
        f"Trained on the background split only ({ck.info.get('step')} episodes of {args.n_way}-way "
        f"{args.shots.replace(',', '/')}-shot 5-query "
        f"(shots cycled episode by episode{', bfloat16 autocast' if not args.no_bf16 else ''}), "
        f"{train_min:.1f} min on {report['machine']}); {args.schedule} learning-rate schedule; best validation "
        f"(held-out background alphabets, {args.val_way}-way 1-shot) "
        f"{100 * ck.info.get('best_val_accuracy', 0):.2f}%.",
        "",
        f"Evaluation split, 28x28, {args.eval_episodes} episodes each, 15 queries per class:",
        "",
        "| protocol | accuracy | 95% CI | macro F1 | Snell et al. 2017 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['n_way']}-way {r['k_shot']}-shot | {100 * r['accuracy']:.2f}% | ± {100 * r['ci95']:.2f} | "
        f"{100 * r['f1']:.2f} | {r['paper']}% |"
        for r in rows
    ]
    lines += [
        "",
        "Out of domain, scikit-learn digits (inverted to dark ink on white, resized to 28x28):",
        "",
        "| protocol | accuracy | 95% CI |",
        "|---|---|---|",
    ]
    lines += [f"| 10-way {r['k_shot']}-shot | {100 * r['accuracy']:.2f}% | ± {100 * r['ci95']:.2f} |" for r in ood]
    lines += ["", "![training curve](conv4_omniglot.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    if args.install:
        target = Path(__file__).resolve().parent.parent / "edgemeta" / "pretrained" / "conv4_omniglot.safetensors"
        shutil.copyfile(ckpt, target)
        print(f"installed {target}")


if __name__ == "__main__":
    main()
