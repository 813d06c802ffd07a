"""Few-shot accuracy through the device runtime vs ``edgemeta evaluate`` on the torch model.

Usage:
    EDGEMETA_DATA_DIR=../shared/data python scripts/runtime_accuracy.py model.onnx [model.int8.onnx ...]

For each model and protocol, the same seeded episodes as ``edgemeta evaluate`` (Omniglot
evaluation classes): every episode enrols its N classes from K images through
``FewShotClassifier.enroll`` and classifies the queries with ``predict`` (logits from the
model's graph), starting from an empty store. The torch figure comes from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgemeta.checkpoint import default_checkpoint, load_checkpoint
from edgemeta.data import load_omniglot
from edgemeta.episodes import EpisodeSampler
from edgemeta.evaluate import episode_scores, evaluate, summarize
from edgemeta.runtime import FewShotClassifier, PrototypeStore


def runtime_report(model: str, data, n: int, k: int, q: int, episodes: int, seed: int):
    clf = FewShotClassifier(model, providers="cpu")
    sampler = EpisodeSampler(data.labels, n, k, q, seed, data.name)
    scores = []
    for ep in sampler(episodes):
        clf.use_store(
            PrototypeStore(clf.store.embedding_dim, metric=clf.store.metric, fingerprint=clf.store.fingerprint)
        )
        for j in range(n):
            clf.enroll(str(j), list(data.images[ep.support[ep.support_labels == j]]))
        pred = np.array([int(p.label) for p in clf.predict(list(data.images[ep.query]))])
        scores.append(episode_scores(pred, ep.query_labels, n))
    return summarize(scores, dataset=data.name, n_way=n, k_shot=k, q_query=q, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--checkpoint", default=None, help="default: the embedded model")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--protocols", default="5x1,20x5")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = load_omniglot("evaluation")
    ck = load_checkpoint(args.checkpoint or default_checkpoint())
    rows = []
    for proto in args.protocols.split(","):
        n, k = (int(v) for v in proto.split("x"))
        torch_rep = evaluate(ck.model, data, n, k, 15, args.episodes, seed=0)
        rows.append({"engine": "torch (edgemeta evaluate)", **torch_rep.to_dict()})
        for m in args.models:
            t0 = time.perf_counter()
            rep = runtime_report(m, data, n, k, 15, args.episodes, seed=0)
            within = abs(rep.accuracy - torch_rep.accuracy) <= max(rep.ci95, torch_rep.ci95)
            rows.append(
                {
                    "engine": f"runtime {m}",
                    **rep.to_dict(),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "within_ci": within,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| engine | protocol | accuracy | 95% CI | within CI of torch |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['n_way']}-way {r['k_shot']}-shot | {100 * r['accuracy']:.2f}% | ± "
            f"{100 * r['ci95']:.2f} | {r.get('within_ci', '—')} |"
        )


if __name__ == "__main__":
    main()
