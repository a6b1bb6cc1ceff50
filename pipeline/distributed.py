"""The only module that knows about ranks: process group set-up under torchrun, device choice, threads.

Under `torchrun --nnodes=N --nproc-per-node=P` (stages/launch.sh) the env vars RANK/WORLD_SIZE (global, over
all N x P processes) and LOCAL_RANK/LOCAL_WORLD_SIZE (this node's) are set; gloo on CPU, NCCL on CUDA. Without
them everything runs as rank 0 of 1 and no process group is created.

One rule keeps a run on many nodes the same as on one: only what belongs to the machine uses the local values
(the GPU: ``cuda:LOCAL_RANK``; the cores: shared by LOCAL_WORLD_SIZE ranks); everything else uses the global
rank and world size: the work split (stage one's units, stage two's shards), RNG streams, the global batch, and
``Context.is_main`` (global rank 0 alone takes the cache store's writer lease and writes metrics, checkpoints
and summaries). No file is written per node, so every node must see the same paths: a shared filesystem
(docs/operations.md, "From one box to many").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", num_threads: int = 0, num_workers: int = 0) -> Context:
    """Initialise the process group (if launched by torchrun), pick the device, size the thread pool."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but this node sees {torch.cuda.device_count()} GPU(s): start at "
                              f"most one process per GPU on each node (NPROC / --nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    set_threads(num_threads, num_workers, procs_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    return Context(rank, world, local, dev)


def set_threads(num_threads: int, num_workers: int, procs_per_node: int = 1) -> int:
    """Intra-op threads = the cores left free by DataLoader workers and sibling ranks (spinning OpenMP
    threads on oversubscribed cores made fwd+bwd ~30x slower here)."""
    if num_threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_threads = max(1, cores // max(1, procs_per_node) - num_workers)
    torch.set_num_threads(num_threads)
    return num_threads


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (metrics)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
