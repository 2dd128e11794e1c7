"""The process group of one training run, with or without Ray.

Under Ray Train the gloo/nccl group already exists and RANK/LOCAL_RANK/WORLD_SIZE are set by Ray;
under ``torchrun``/``deepspeed`` the same variables come from the launcher; alone, the run is a
world of one. DeepSpeed's ``init_distributed`` reuses an existing group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(use_gpu: bool, timeout_s: int = 1800, device: torch.device | None = None) -> DistInfo:
    """Join (or create) the process group and pick this rank's device.

    ``device`` is the one Ray assigned (``ray.train.torch.get_device()``); without Ray it is
    ``cuda:LOCAL_RANK`` on GPU and ``cpu`` otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    if not use_gpu:
        _skip_shm_comm_build()
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if use_gpu else "gloo"
    if not torch_dist.is_initialized() and world == 1:
        # Alone: a group of one on a free loopback port, as DeepSpeed's engine needs a group. The
        # port goes in init_method, not MASTER_PORT, so child processes do not inherit it.
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                      rank=0, world_size=1, timeout=timeout)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # reuses an existing group
    return DistInfo(rank, world, local_rank, node_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_build() -> None:
    """Use plain gloo on CPU instead of JIT-compiling DeepSpeed's shared-memory comm op.

    The op takes 40-60 s to compile on every fresh machine and only speeds up CPU all-reduce,
    which the student's few million parameters do not need.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def comm_device() -> torch.device:
    """Where this process group's collectives run: the current CUDA device under NCCL (which
    accepts only CUDA tensors), the CPU under gloo or without a group."""
    if (torch_dist.is_available() and torch_dist.is_initialized()
            and torch_dist.get_backend() == "nccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks, returned on ``t``'s device (reduced on :func:`comm_device`)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return t
    x = t.to(comm_device())
    torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
    return x.to(t.device)


def gather_ints(value: int, world_size: int) -> list[int]:
    """Every rank's ``value`` in rank order (e.g. which node each rank runs on)."""
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    out = torch.zeros(world_size, dtype=torch.int64)
    out[rank] = value
    return all_reduce_sum(out).tolist()
