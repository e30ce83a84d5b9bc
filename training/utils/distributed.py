"""torchrun / DDP set-up: gloo on CPU, NCCL on GPUs; a single process needs nothing.

    torchrun --nproc_per_node 2 -m diffprompt.training.pretrain_foundation ...   # one host
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m ...  # multi-node
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment, or run alone."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def all_reduce_sum(value: float, info: DistInfo) -> float:
    return all_reduce_mean(value, info) * info.world_size


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group. Drop every DistributedDataParallel wrapper first (`del ddp_module`).

    A DDP wrapper's C++ reducer holds the process group. If the group's last reference goes with the
    wrapper at interpreter exit, gloo's destructor joins its worker threads while holding the GIL, and a
    worker still releasing a finished collective's Python tensor waits for that GIL: both ranks hang
    forever (pytorch/pytorch#56297). With the wrappers gone, `destroy_process_group` drops the last
    reference, and that path releases the GIL.
    """
    if info.world_size > 1 and dist.is_initialized():
        gc.collect()  # DDP wrappers sit in reference cycles; free them (and their reducers) now
        dist.barrier()
        dist.destroy_process_group()
