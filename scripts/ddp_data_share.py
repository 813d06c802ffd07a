"""How much of a training step is data preparation: should training use DataLoader workers?

Times, on one process and one thread, the batch preparation of an episode (gathering its
decoded uint8 images, normalizing, channels-last) against the whole training step
(preparation, forward, backward, Adam). Workers could only hide the preparation share, and
only on cores that the training processes leave free.

    python scripts/ddp_data_share.py                 # Omniglot, Conv-4 20-way 5-shot 5-query
    python scripts/ddp_data_share.py --episodes 50 --n-way 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--n-way", type=int, default=20)
    p.add_argument("--k-shot", type=int, default=5)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--backbone", default="conv4")
    args = p.parse_args()
    torch.set_num_threads(1)

    from edgemeta.distributed import Device
    from edgemeta.model import ModelSpec
    from edgemeta.train import EpisodeLogits, TrainConfig, Trainer, default_spec, folder_split, load_training_data

    cfg = TrainConfig(
        backbone=args.backbone, n_way=args.n_way, k_shot=args.k_shot, q_query=args.queries, threads=1, device=Device.CPU
    )
    pp = default_spec(cfg)
    trainer = Trainer(
        cfg,
        *load_training_data(cfg, pp, folder_split(cfg)),
        ModelSpec(cfg.backbone, pp, {}, cfg.metric, cfg.normalization),
        None,
    )
    net, samplers = EpisodeLogits(trainer.model), trainer.samplers()
    opt = torch.optim.Adam(trainer.model.parameters(), lr=cfg.lr)
    # CPU time of this thread as well as wall time: on a shared machine the wall time of a step
    # mostly measures the other processes, its CPU time does not
    times: dict[str, list[float]] = {"prep_wall": [], "step_wall": [], "prep_cpu": [], "step_cpu": []}
    for i in range(args.episodes + 3):  # the first 3 warm up
        ep = samplers[0].episode(i)
        w0, c0 = time.perf_counter(), time.thread_time()
        trainer.batch(np.concatenate([ep.support, ep.query]))
        w1, c1 = time.perf_counter(), time.thread_time()
        loss = trainer.episode_loss(net, samplers, i)[0]  # the step prepares its own batch again
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        w2, c2 = time.perf_counter(), time.thread_time()
        if i >= 3:
            for key, value in (
                ("prep_wall", w1 - w0),
                ("step_wall", w2 - w1),
                ("prep_cpu", c1 - c0),
                ("step_cpu", c2 - c1),
            ):
                times[key].append(value)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.backbone} {args.n_way}-way {args.k_shot}-shot {args.queries}-query, 1 thread, "
        f"{args.episodes} episodes (medians): "
        f"batch preparation {1000 * med['prep_cpu']:.2f} ms CPU ({1000 * med['prep_wall']:.2f} ms wall), "
        f"whole step {1000 * med['step_cpu']:.1f} ms CPU ({1000 * med['step_wall']:.1f} ms wall): "
        f"preparation is {100 * med['prep_cpu'] / med['step_cpu']:.2f}% of a step's CPU time"
    )


if __name__ == "__main__":
    main()
