"""Process-group set-up for `torchrun` (DDP), and the few collective helpers the commands need.

    torchrun --standalone --nproc-per-node 2 -m kd_fracture.cv --folds 5 ...     # CPU: gloo, GPU: nccl

torchrun starts N copies of the command with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set;
`init_from_env` joins them into one process group. A plain `python -m ...` (no WORLD_SIZE, or WORLD_SIZE=1) stays a
single process and every helper here is a no-op. Conventions (docs/design.md §9): every rank trains on its shard of each
training batch (`data.dataset.ShardedRandomSampler`), every rank evaluates the whole (small) inner-validation split
so all ranks take the same early-stopping decision, and only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", timeout_min: float = 60.0) -> bool:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); returns whether one is active.

    `device` is the command's `--device` (auto | cpu | cuda | cuda:N): it picks the backend, so `--device cpu` on a GPU
    machine still uses gloo. On CUDA each process is pinned to GPU LOCAL_RANK. `timeout_min` bounds how long a rank
    waits at a collective (e.g. while rank 0 generates the phantom or scores a fold).
    """
    if not launched_by_torchrun() or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    return True


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes files."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """`cuda` without an index → this process's GPU (`cuda:LOCAL_RANK`) under torchrun; anything else unchanged."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may write: phantom, folds file, repairs), the other ranks after it, so they
    only read what rank 0 left. If rank 0 fails inside, the others wait until torchrun stops them."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank.

    DDP keeps parameters identical, but each rank's BatchNorm updates its running statistics from its own shard
    after DDP's per-forward broadcast; evaluating with rank 0's everywhere gives every rank the same inner-val score,
    hence the same early-stopping and checkpoint decisions (and the ranks never disagree on how many epochs to run).
    """
    if world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf.data, src)
