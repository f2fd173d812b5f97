"""How many slices fit in one forward pass: the batch size bounded by a memory budget.

The working set of the network grows with the batch: activations of every slice of the batch are alive
at once. It was measured with ``benchmarks/memory.py`` (peak RSS of one forward, float32, NHWC, 2-core CPU):
about :data:`BYTES_PER_PIXEL` per input pixel plus :data:`FIXED_BYTES`. A batch that would not fit the
budget is reduced to what fits, and the caller says so.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["BYTES_PER_PIXEL", "CPU_WORKING_BUDGET", "FIXED_BYTES", "bounded_batch_size", "working_set_bytes"]

logger = logging.getLogger(__name__)

#: Peak working memory of one forward per input pixel of one slice (float32; 512x512 slices: ~250 MB each).
BYTES_PER_PIXEL = 1000
#: Working memory of a forward that does not grow with the batch (weights' prepacked copies, buffers).
FIXED_BYTES = 64 << 20
#: Working memory allowed on a CPU on top of the volume (the project's target: volume + 1.5 GB).
CPU_WORKING_BUDGET = 1536 << 20
#: Part of a GPU's free memory a batch may use (the rest: allocator slack, cuDNN workspaces).
GPU_FREE_FRACTION = 0.8


def working_set_bytes(batch: int, height: int, width: int) -> int:
    """Estimated peak working memory of one forward of ``batch`` slices of ``height`` x ``width``."""
    padded = (-(-height // 32) * 32) * (-(-width // 32) * 32)  # slices are padded to a multiple of 32
    return FIXED_BYTES + batch * padded * BYTES_PER_PIXEL


def _budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_FRACTION)
    return CPU_WORKING_BUDGET


def bounded_batch_size(requested: int, height: int, width: int, device: torch.device | str) -> int:
    """``requested``, or the largest batch whose working set fits the device's memory budget (at least 1).

    Args:
        requested: the batch size asked for (``--batch`` or the bundle's ``batch_size``).
        height: slice height in pixels.
        width: slice width in pixels.
        device: the compute device (CPU: :data:`CPU_WORKING_BUDGET`; GPU: a share of its free memory).
    """
    device = torch.device(device)
    budget = _budget(device)
    per_slice = working_set_bytes(1, height, width) - FIXED_BYTES
    fits = max(1, int((budget - FIXED_BYTES) // max(per_slice, 1)))
    if requested <= fits:
        return int(requested)
    logger.warning(
        "batch of %d slices reduced to %d: %d slices of %dx%d need about %.1f GB of working memory, the "
        "budget on %s is %.1f GB",
        requested,
        fits,
        requested,
        height,
        width,
        working_set_bytes(requested, height, width) / 2**30,
        device.type,
        budget / 2**30,
    )
    return fits
