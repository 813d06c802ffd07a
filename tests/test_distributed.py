"""Meta-training under torchrun / DistributedDataParallel (issue 23): gloo on 2 local processes.

Every multi-process test launches ``python -m torch.distributed.run`` (torchrun) with a
bounded timeout, on ports chosen free (``--standalone``, or a port the OS just handed out),
and kills the whole process group when it runs over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgemeta import distributed
from edgemeta.checkpoint import load_checkpoint, read_header
from edgemeta.distributed import Device, DistEnv
from edgemeta.model import ModelSpec
from edgemeta.runtime.errors import CheckpointError, InputError
from edgemeta.train import (
    EpisodeLogits,
    TrainConfig,
    Trainer,
    _lr,
    check_world_size,
    default_spec,
    folder_split,
    load_training_data,
    resume_path,
    train,
)

# a tiny run: 14 classes of 16x16 grey images, Conv-4, 4-way 2-shot 2-query episodes
TINY = "--size 16 --n-way 4 --k-shot 2 --queries 2 --val-episodes 5 --threads 1 --seed 3 --device cpu"


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), dataset=str(data), size=16, n_way=4, k_shot=2, q_query=2, val_episodes=5, threads=1)
    return TrainConfig(**{**base, "seed": 3, "device": Device.CPU, **kw})


def train_args(images: Path, options: str) -> list[str]:
    """``edgemeta train`` arguments: the tiny run on ``images`` with ``options`` (space-separated)."""
    return ["--dataset", str(images), *options.split(), *TINY.split()]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun would set for ``rank`` (all ranks on this machine)."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "MASTER_PORT": port}
    return {**{k: str(v) for k, v in env.items()}, "MASTER_ADDR": "127.0.0.1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """14 classes x 6 images (4-way training, 5 validation and 5 novel classes held out): a blocky
    4x4 pattern per class, with noise per image."""
    root = tmp_path_factory.mktemp("ddp") / "images"
    rng = np.random.default_rng(0)
    for c in range(14):
        base = rng.integers(0, 256, (4, 4))
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(6):
            img = np.kron(base, np.ones((4, 4))) + rng.normal(0, 30, (16, 16))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(root / f"class{c:02d}" / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEMETA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ddp-cache"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on a timeout, kill the group (torchrun's workers too)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        args, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args[:6])}... ran over {timeout} s; stderr tail: {err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``edgemeta train args`` on ``nproc`` local processes (a free port of torchrun's choice)."""
    launch = f"-m torch.distributed.run --standalone --nnodes 1 --nproc-per-node {nproc} -m edgemeta train".split()
    return run([sys.executable, *launch, *args], cwd, timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# -- one process: detection, sharding, checks ---------------------------------


def test_a_plain_process_is_rank_0_of_1_on_the_cpu():
    env = distributed.detect(Device.CPU)
    assert (env.rank, env.world_size, env.is_main, env.distributed, env.backend) == (0, 1, True, False, "gloo")


def test_torchrun_variables_are_read(monkeypatch):
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    env = distributed.detect(Device.CPU)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.is_main) == (3, 4, 1, 2, False)


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"RANK": "two", "WORLD_SIZE": "4"}, "RANK='two' is not an integer"),
        ({"RANK": "4", "WORLD_SIZE": "4"}, "do not fit together"),
    ],
)
def test_inconsistent_variables_are_refused(variables, message, monkeypatch):
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InputError, match=message):
        distributed.detect(Device.CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(InputError, match="--device cuda, but this torch .* sees no GPU; use --device cpu"):
        distributed.detect(Device.CUDA)
    assert distributed.detect(Device.AUTO).device.type == "cpu"


def test_pretraining_shards_split_the_images_between_ranks():
    shards = [
        distributed.shard(DistEnv(rank=r, world_size=2, local_world_size=2), 11, epoch=0, seed=5) for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 6  # 11 images: one repeated so that both ranks take 6
    assert set(shards[0]) | set(shards[1]) == set(range(11))
    again = distributed.shard(DistEnv(rank=0, world_size=2, local_world_size=2), 11, epoch=1, seed=5)
    assert not np.array_equal(again, shards[0])  # reshuffled each epoch


def test_one_process_re_raises_its_own_error():
    with pytest.raises(InputError, match="boom"):
        with distributed.all_or_none(DistEnv()):
            raise InputError("boom")


@pytest.mark.parametrize(
    "episodes, step, world, message",
    [
        (5, 0, 2, r"--episodes 5 does not split over 2 processes: .* use --episodes 6 or 4"),
        (
            12,
            6,
            4,
            r"--episodes 12 does not split over 4 processes \(resuming at episode 6, 6 left\): "
            r".* use --episodes 14 or 10",
        ),
        (7, 6, 2, r"use --episodes 8, or a number of processes that divides 1"),
    ],
)
def test_a_world_size_that_does_not_divide_the_episodes_is_refused(episodes, step, world, message):
    with pytest.raises(InputError, match=message):
        check_world_size(TrainConfig(episodes=episodes), step, world)
    check_world_size(TrainConfig(episodes=episodes), step, 1)  # one process takes any number


def test_resume_with_another_config_is_refused_and_writes_nothing(images, tmp_path):
    out = tmp_path / "m.safetensors"
    train(tiny_config(images, out, episodes=2, val_every=2), progress=False)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(
        CheckpointError,
        match=r"trained with --lr 0.001 \(now 0.01\), --seed 3 \(now 4\); resume with the run's own settings",
    ):
        train(tiny_config(images, out, episodes=4, val_every=2, lr=0.01, seed=4), resume=out, progress=False)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    # what may change: the length of the run, threads, the device (and the number of processes)
    result = train(tiny_config(images, out, episodes=4, val_every=2, threads=2), resume=out, progress=False)
    assert read_header(result.checkpoint)["info"]["step"] == 4


# -- several processes ----------------------------------------------------------


def test_two_gloo_processes_take_the_same_step_as_one_process_averaging_two_episodes(images, tmp_path):
    """DDP averages the gradients of rank 0's episode 0 and rank 1's episode 1: one Adam step on
    their mean gradient, which one process computes here from the same two episodes."""
    res = torchrun(2, train_args(images, "-o ddp.safetensors --episodes 2 --val-every 2"), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = load_checkpoint(resume_path(tmp_path / "ddp.safetensors")).model
    assert load_checkpoint(tmp_path / "ddp.safetensors").info["episodes_per_step"] == 2

    cfg = tiny_config(images, tmp_path / "ref.safetensors", episodes=2, val_every=2)
    pp = default_spec(cfg)
    spec = ModelSpec(cfg.backbone, pp, {}, cfg.metric, cfg.normalization)

    def one_step(episodes: list[int]) -> dict[str, torch.Tensor]:
        trainer = Trainer(cfg, *load_training_data(cfg, pp, folder_split(cfg)), spec, None)
        net, samplers = EpisodeLogits(trainer.model), trainer.samplers()
        opt = torch.optim.Adam(trainer.model.parameters(), lr=_lr(cfg, 0))
        loss = sum(trainer.episode_loss(net, samplers, i)[0] for i in episodes) / len(episodes)
        loss.backward()
        opt.step()
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        averaged, first_only = one_step([0, 1]), one_step([0])
    finally:
        torch.set_num_threads(threads)
    got = dict(ddp.named_parameters())
    worst = max((got[k] - averaged[k]).abs().max().item() for k in averaged)
    apart = max((first_only[k] - averaged[k]).abs().max().item() for k in averaged)
    assert worst < 1e-5, worst
    assert apart > 100 * max(worst, 1e-7), (apart, worst)  # the comparison tells the two steps apart


def test_every_rank_refuses_episodes_the_world_size_does_not_divide(images, tmp_path):
    res = torchrun(2, train_args(images, "-o m.safetensors --episodes 3"), tmp_path)
    assert res.returncode != 0
    lines = error_lines(res.stderr)
    assert len(lines) == 2, res.stderr[-3000:]
    assert all("--episodes 3 does not split over 2 processes" in line for line in lines), lines
    assert not list(tmp_path.glob("m.*"))


def test_a_rank_that_cannot_reach_the_rendezvous_stops_with_an_error(images, tmp_path):
    port = free_port()  # nobody listens there: rank 0 never comes
    args = [
        sys.executable,
        "-m",
        "edgemeta",
        "train",
        *train_args(images, "-o m.safetensors --episodes 4 --dist-timeout 2"),
    ]
    res = run(args, tmp_path, timeout=60, env=rank_env(1, 2, port))
    assert res.returncode == 1
    assert error_lines(res.stderr) == [error_lines(res.stderr)[-1]]
    assert f"rank 1 of 2 could not reach the rendezvous at 127.0.0.1:{port} within 2 s" in res.stderr
    assert not list(tmp_path.glob("m.*"))


AGREE = """
from edgemeta import distributed
from edgemeta.runtime.errors import EdgemetaError, InputError
env = distributed.detect("cpu")
with distributed.session(env, timeout_s=30):
    try:
        with distributed.all_or_none(env):
            if env.rank == 1:
                raise InputError("no images in class17 on this machine")
        print("went on")
    except EdgemetaError as e:
        print(type(e).__name__ + ": " + str(e))
"""


def test_one_rank_failing_stops_every_rank_with_its_error(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AGREE],
            cwd=tmp_path,
            env={**os.environ, **rank_env(r, 2, port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert outs == [
        "DistributedError: rank 1 failed: no images in class17 on this machine",
        "InputError: no images in class17 on this machine",
    ]


@pytest.mark.slow
def test_torchrun_trains_end_to_end_then_resumes_on_one_process_and_evaluates(images, tmp_path):
    # pre-training (DistributedSampler), then episodes; bf16 autocast and channels-last (the default) under DDP
    args = train_args(images, "-o m.safetensors --val-every 4 --pretrain-epochs 1 --batch-size 8 --bf16 --json")
    res = torchrun(2, [*args, "--episodes", "4"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # rank 0 alone reports
    assert summary["world_size"] == 2 and summary["checkpoint"] == "m.safetensors"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.jsonl", "m.last.safetensors", "m.png", "m.safetensors"]
    info = read_header(tmp_path / "m.last.safetensors")["info"]
    assert (info["step"], info["world_size"], info["episodes_per_step"]) == (4, 2, 2)
    log = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in log if "val_acc" in h] == ["pretrain", "episodic"]

    # resumed on one process, to 8 episodes
    res = run(
        [sys.executable, "-m", "edgemeta", "train", *args, "--episodes", "8", "--resume", "m.safetensors"], tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = read_header(tmp_path / "m.last.safetensors")["info"]
    assert (info["step"], info["world_size"], info["episodes_per_step"]) == (8, 1, 1)
    log = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if h.get("stage") == "episodic" and "val_acc" in h] == [4, 8]

    evaluate = f"evaluate m.safetensors --dataset {images} --n-way 3 --k-shot 1 --queries 3 --episodes 20 --json"
    res = run([sys.executable, "-m", "edgemeta", *evaluate.split()], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)["results"][0]
    # 3-way on classes as distinct as these: far above chance (1/3) once trained
    assert result["n_way"] == 3 and result["episodes"] == 20 and result["accuracy"] > 0.6, result


@pytest.mark.slow
def test_a_one_process_run_resumes_on_two_processes(images, tmp_path):
    train(tiny_config(images, tmp_path / "m.safetensors", episodes=3, val_every=2), progress=False)
    # 3 done, 6 asked: the 3 left do not split over 2 processes
    res = torchrun(
        2, train_args(images, "-o m.safetensors --val-every 2 --episodes 6 --resume m.safetensors"), tmp_path
    )
    assert len(error_lines(res.stderr)) == 2 and "resuming at episode 3, 3 left" in res.stderr, res.stderr[-3000:]
    assert read_header(tmp_path / "m.last.safetensors")["info"]["step"] == 3
    res = torchrun(
        2, train_args(images, "-o m.safetensors --val-every 2 --episodes 7 --resume m.safetensors"), tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = read_header(tmp_path / "m.last.safetensors")["info"]
    assert (info["step"], info["world_size"]) == (7, 2)


@pytest.mark.slow
def test_two_nodes_meet_through_a_c10d_rendezvous_on_localhost(images, tmp_path):
    """Two torchrun invocations, one process each, as two machines would run them."""
    launcher = f"--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{free_port()} "
    launcher += "--rdzv-id two-nodes --rdzv-conf join_timeout=60"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher.split(),
        "-m",
        "edgemeta",
        "train",
        *train_args(images, "-o m.safetensors --episodes 4 --val-every 4 --json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        results = [(*p.communicate(timeout=120), p.returncode) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [rc for _, _, rc in results] == [0, 0], [err[-2000:] for _, err, _ in results]
    reports = [json.loads(out) for out, _, _ in results if out.strip()]
    assert len(reports) == 1 and reports[0]["world_size"] == 2  # rank 0 reports, on whichever node it ran
    assert read_header(tmp_path / "m.last.safetensors")["info"]["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_training_on_the_gpu(images, tmp_path):
    args = train_args(images, "-o m.safetensors --episodes 2 --val-every 2")
    args[args.index("--device") + 1] = "cuda"
    res = torchrun(1, args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_header(tmp_path / "m.safetensors")["info"]["config"]["device"] == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs (NCCL takes one GPU per process)")
def test_two_nccl_processes_train_on_two_gpus(images, tmp_path):
    args = train_args(images, "-o m.safetensors --episodes 4 --val-every 4")
    args[args.index("--device") + 1] = "cuda"
    res = torchrun(2, args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_header(tmp_path / "m.last.safetensors")["info"]["world_size"] == 2
