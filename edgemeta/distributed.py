"""Meta-training on several processes, the PyTorch way: ``torchrun`` + ``DistributedDataParallel``.

``edgemeta train`` runs unchanged under ``torchrun --nproc-per-node N`` (and ``--nnodes M``
with a c10d rendezvous). This module owns everything that is about the processes rather
than the model:

- :func:`detect` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``...)
  and picks the device: NCCL on one GPU per process, gloo on CPUs;
- :func:`session` sets up and tears down the process group, with a bounded timeout, so a
  rank that cannot reach the rendezvous stops with an error instead of waiting forever;
- :func:`all_or_none` and :func:`agree` make the ranks agree on success: a rank's error
  (bad input, a missing file) stops every rank with that rank's message;
- :func:`local_first` runs a loader on each machine's local rank 0 first, so the decoded
  data cache is written once per machine and read by the other ranks;
- :func:`wrap` puts a module under ``DistributedDataParallel``, and :func:`shard` gives each
  rank its part of the pre-training images (``DistributedSampler``).

Writes (checkpoints, logs, curves) happen on rank 0 only; the trainer asks ``env.is_main``.
torch is imported inside the functions: the CLI imports :class:`Device` for its options, and
must start without torch (the device-side install).
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from edgemeta.runtime.errors import DistributedError, InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Device", "DistEnv", "detect", "session", "agree", "all_or_none", "local_first", "any_rank", "wrap", "shard"]

T = TypeVar("T")
_MESSAGE_BYTES = 1024  # one rank's error, as exchanged between ranks (longer messages are cut)


class Device(str, Enum):
    """Where training runs: ``auto`` takes one GPU per process when there are enough, else the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run. A plain ``edgemeta train`` is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: _torch().device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that validates, logs and writes files."""
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def _torch():
    import torch

    return torch


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(
            f"environment variable {name}={text!r} is not an integer; launch with torchrun, which sets it"
        ) from None


def detect(device: Device | str = Device.AUTO) -> DistEnv:
    """This process's rank and device, from the variables torchrun sets (none: one process).

    Raises:
        InputError: the variables are inconsistent, or ``cuda`` is asked for without a GPU
            for every process on this machine (NCCL takes one GPU per process).
    """
    import torch

    device = Device(device)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1 if world == 1 else world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise InputError(
            f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world} do not fit together; "
            "launch with torchrun, which sets them"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is Device.CUDA and gpus == 0:
        raise InputError(
            f"--device cuda, but this torch ({torch.__version__}) sees no GPU; "
            "use --device cpu, or install a CUDA build of torch"
        )
    if device is Device.CUDA and local_world > gpus:
        raise InputError(
            f"--device cuda with {local_world} processes on this machine and {gpus} GPU(s): "
            f"NCCL takes one GPU per process; use --nproc-per-node {gpus}, or --device cpu"
        )
    if device is Device.AUTO:
        if 0 < gpus < local_world:
            warnings.warn(
                f"{local_world} processes on this machine and {gpus} GPU(s): training on the CPU (gloo); "
                f"use --nproc-per-node {gpus} to train on the GPUs",
                stacklevel=2,
            )
        device = Device.CUDA if 0 < local_world <= gpus else Device.CPU
    dev = torch.device("cuda", local_rank) if device is Device.CUDA else torch.device("cpu")
    return DistEnv(rank, world, local_rank, local_world, dev)


_control: Any = None  # a gloo group for the ranks' agreement (CPU tensors, on NCCL runs too)


@contextmanager
def session(env: DistEnv, timeout_s: float = 1800.0) -> Iterator[DistEnv]:
    """The process group of a distributed run, set up on entry and torn down on exit.

    ``timeout_s`` bounds the rendezvous and every collective: a rank that cannot reach the
    others, or whose peers stopped, fails after it rather than waiting forever.

    Raises:
        DistributedError: the rendezvous was not reached within ``timeout_s``.
    """
    import torch
    import torch.distributed as dist

    global _control
    if not env.distributed or dist.is_initialized():
        yield env
        return
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(
            env.backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s)
        )
        _control = dist.new_group(backend="gloo") if env.backend != "gloo" else None
    except (RuntimeError, ValueError) as e:  # torch raises DistStoreError / DistNetworkError, both RuntimeErrors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {env.rank} of {env.world_size} could not reach the rendezvous at {where} within {timeout_s:g} s "
            f"({first}); check that every node runs the same torchrun command and that the address and port are "
            "reachable from this machine"
        ) from None
    try:
        yield env
    finally:
        _control = None
        # DDP's reducer and gloo's pending work hold references into the group: free them while
        # the interpreter is whole, not at its exit, where a gloo thread can abort the process
        # (pytorch/pytorch#179291)
        gc.collect()
        dist.destroy_process_group()


def agree(env: DistEnv, error: BaseException | None) -> None:
    """Every rank says whether it failed; if one did, every rank raises.

    A rank that failed re-raises its own error; the others raise :class:`DistributedError`
    with the first failed rank's message, so each rank's log says why the run stopped.
    One process: ``error`` is raised as it is.
    """
    import torch
    import torch.distributed as dist

    if not env.distributed or not dist.is_initialized():
        if error is not None:
            raise error
        return
    mine = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        text = (" ".join(str(error).split()) or type(error).__name__).encode()[: _MESSAGE_BYTES - 3]
        mine[0] = 1
        mine[1], mine[2] = len(text) // 256, len(text) % 256
        mine[3 : 3 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    every = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(every, mine, group=_control)
    if error is not None:
        raise error
    for rank, msg in enumerate(every):
        if msg[0]:
            n = int(msg[1]) * 256 + int(msg[2])
            text = bytes(msg[3 : 3 + n].tolist()).decode(errors="replace")
            raise DistributedError(f"rank {rank} failed: {text}")


@contextmanager
def all_or_none(env: DistEnv) -> Iterator[None]:
    """A block that succeeds on every rank or fails on every rank (see :func:`agree`)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every rank must hear of any failure, then it is re-raised
        agree(env, e)
    else:
        agree(env, None)


def local_first(env: DistEnv, load: Callable[[], T]) -> T:
    """``load()`` on each machine's local rank 0 first, then on its other ranks.

    The data loaders cache what they decode; run this way the cache is written once per
    machine (by local rank 0) and the other ranks read it, instead of N processes decoding
    the same images at once. A failure on any rank stops every rank.
    """
    result = None
    with all_or_none(env):
        if env.local_rank == 0:
            result = load()
    with all_or_none(env):
        if env.local_rank != 0:
            result = load()
    return result  # type: ignore[return-value]


def any_rank(env: DistEnv, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (e.g. a time limit reached), so all ranks stop together."""
    if not env.distributed:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def wrap(env: DistEnv, module: nn.Module) -> nn.Module:
    """``module`` under ``DistributedDataParallel`` (gradients averaged over the ranks in the
    backward pass; rank 0's weights and buffers broadcast), or ``module`` itself for one process."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def shard(env: DistEnv, n: int, epoch: int, seed: int) -> np.ndarray:
    """This rank's image indices for pre-training epoch ``epoch``: a ``DistributedSampler``
    over ``n`` images (every rank gets as many, the last ones padded by repetition).
    One process keeps its own seeded permutation, so single-process runs are unchanged."""
    if not env.distributed:
        return np.random.default_rng([seed, 1_000_003, epoch]).permutation(n)
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64)
