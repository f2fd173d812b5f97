"""Multi-process (``torchrun``) set-up of a training run: process group, DDP, rank-0-only handlers."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ldct_clip.errors import InputError

__all__ = ["cleanup_distributed", "init_distributed", "is_main_process", "main_process_only", "wrap_ddp"]


def is_main_process() -> bool:
    """True on rank 0 or without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_distributed(backend: str | None = None, required: bool = False) -> dict:
    """Starts the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else does nothing.

    Backend: NCCL when CUDA is available, else gloo. Each rank uses GPU ``LOCAL_RANK``. All ranks meet at a
    barrier before returning.

    Args:
        backend: force a backend ("gloo", "nccl").
        required: raise unless launched by torchrun with more than one process.

    Returns:
        ``{"rank", "world_size", "local_rank", "device"}``.

    Raises:
        InputError: ``required`` and not launched by torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if required and world_size < 2:
        raise InputError(
            "the multi-GPU config needs several processes: launch with "
            "torchrun --nproc_per_node=N -m ldct_clip train --config train.json --config multi_gpu_train.json"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    if dist.is_initialized():
        dist.barrier()
        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "local_rank": local_rank,
            "device": device,
        }
    return {"rank": 0, "world_size": 1, "local_rank": local_rank, "device": device}


def wrap_ddp(network: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """``DistributedDataParallel`` around ``network`` in a distributed run, else ``network`` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return network
    device = torch.device(device) if device is not None else torch.device("cpu")
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def cleanup_distributed() -> None:
    """Ends the process group if there is one (the bundle's ``finalize``)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main_process_only(handlers: Sequence) -> list:
    """``handlers`` on rank 0, an empty list elsewhere (for logging handlers in configs).

    Entries may be factories (config components with ``"_mode_": "callable"``): they are only called on
    rank 0, so other ranks never even create, e.g., a TensorBoard event file.
    """
    if not is_main_process():
        return []
    return [h() if isinstance(h, functools.partial) else h for h in handlers]
