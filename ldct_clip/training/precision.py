"""The training step's precision and memory format, as the trainer's inferer.

MONAI's ``SupervisedTrainer`` autocasts only on CUDA (``amp``: ``torch.autocast("cuda")`` and a
``GradScaler``); on a CPU its step runs in float32 and NCHW, whatever the CPU can do faster.
:class:`TrainingStepInferer` runs the network under ``torch.autocast`` on CPUs too (bfloat16, which needs
no ``GradScaler``: it has float32's exponent range) and in ``channels_last``, and returns float32, so the
loss, the gradients, the clipping and the optimizer stay in float32. On CUDA the precision stays MONAI's
``amp`` (see :func:`cuda_amp_kwargs`); only the memory format is the inferer's.

Which is faster depends on the machine (a CPU without bf16 units runs bfloat16 slower than float32), so
``"auto"`` is decided by measurement at the first iteration, on the batch in use: a copy of the network
runs a forward and backward pass in each candidate format (:func:`measure_step_formats`). A resumed run
keeps the choice of the run it continues (``ldct_clip.training.TrainingState`` saves it).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from monai.inferers import Inferer
from torch import nn

from ldct_clip.errors import InputError
from ldct_clip.training.distributed import is_main_process

__all__ = [
    "MEMORY_FORMATS",
    "PRECISIONS",
    "StepFormat",
    "TrainingStepInferer",
    "candidate_formats",
    "choose_step_format",
    "cuda_amp_kwargs",
    "measure_step_formats",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH_MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass(frozen=True)
class StepFormat:
    """How a training step runs the network.

    Args:
        precision: ``"fp32"``, ``"bf16"`` (autocast by :class:`TrainingStepInferer`, on CPUs) or, on CUDA,
            ``"amp"`` (MONAI's autocast and ``GradScaler``, configured by the trainer's ``amp``).
        memory_format: ``"contiguous"`` (NCHW) or ``"channels_last"`` (NHWC) for the network's weights
            and the batches.
    """

    precision: str
    memory_format: str

    def __str__(self) -> str:
        return f"{self.precision}/{self.memory_format}"


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InputError(f"{name}={value!r} is not one of {', '.join(choices)}: set it to one of them")
    return value


def cuda_amp_kwargs(precision: str) -> dict:
    """The ``amp_kwargs`` of MONAI's trainer on CUDA for a configured ``train_precision``: bfloat16
    autocast for ``"bf16"``, MONAI's default (float16 with ``GradScaler``) otherwise.

    Raises:
        InputError: an unknown precision.
    """
    _check_choice("train_precision", precision, PRECISIONS)
    return {"dtype": torch.bfloat16} if precision == "bf16" else {}


def candidate_formats(
    device_type: str, precision: str = "auto", memory_format: str = "auto"
) -> list[StepFormat]:
    """The step formats a run may use, float32 first (the reference loop's), for
    :func:`measure_step_formats` to choose from.

    On CUDA the precision is MONAI's ``amp`` (the trainer's autocast and ``GradScaler``; off for ``"fp32"``),
    so only the memory format is a candidate.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (float32 and bfloat16), ``"fp32"`` or ``"bf16"``; ``"fp16"`` on CUDA only.
        memory_format: ``"auto"`` (both), ``"contiguous"`` or ``"channels_last"``.

    Raises:
        InputError: an unknown choice, or float16 on a CPU (it needs MONAI's ``GradScaler``, CUDA only).
    """
    _check_choice("train_precision", precision, PRECISIONS)
    _check_choice("train_memory_format", memory_format, MEMORY_FORMATS)
    if device_type == "cuda":
        precisions = ["fp32" if precision == "fp32" else "amp"]  # the trainer's ``amp`` follows precision
    elif precision == "fp16":
        raise InputError(
            "train_precision='fp16' needs a GradScaler, which MONAI's amp gives on CUDA only: "
            "use 'bf16', 'fp32' or 'auto' on a CPU"
        )
    else:
        precisions = ["fp32", "bf16"] if precision == "auto" else [precision]
    formats = ["contiguous", "channels_last"] if memory_format == "auto" else [memory_format]
    return [StepFormat(p, f) for p in precisions for f in formats]


def _autocast(device_type: str, precision: str):
    """Our autocast for ``precision`` on CPUs; on CUDA (``"amp"``) MONAI's trainer autocasts around us."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None and device_type != "cuda")


def _to_memory_format(module: nn.Module, memory_format: str) -> None:
    # ``Module.to`` replaces the parameters' data in place: the optimizer keeps the same Parameter objects
    module.to(memory_format=_TORCH_MEMORY_FORMATS[memory_format])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_formats(
    network: nn.Module,
    inputs: torch.Tensor,
    candidates: Sequence[StepFormat],
    repeats: int = 2,
    convert_network: bool = True,
    drop_slower_than: float = 1.25,
) -> dict[StepFormat, float]:
    """Seconds of a forward and backward pass of a copy of ``network`` on ``inputs``, per candidate.

    After a warm-up pass of each candidate, up to ``repeats`` timed passes each, interleaved (a change of
    the machine's load hits every candidate alike); a candidate more than ``drop_slower_than`` times
    slower than the best so far is not timed again. Each time is the candidate's fastest pass. The loss
    is the mean absolute output (the cost of L1's backward). ``network``, its gradients and the random
    generators are left as they were (feature augmentation draws noise in the pass).

    Args:
        network: the (possibly DDP-wrapped) network, in the mode it trains in.
        inputs: a batch as the trainer gives it (its shape decides the timing).
        candidates: formats to time (see :func:`candidate_formats`).
        repeats: timed passes per candidate.
        convert_network: whether the format's memory format applies to the weights too (not under DDP,
            whose gradient buckets keep the layout the weights had when it wrapped them).
        drop_slower_than: ratio to the best so far above which a candidate is not timed again.
    """
    module = getattr(network, "module", network)
    device = inputs.device
    times = dict.fromkeys(candidates, math.inf)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(module)
        probe.train(module.training)
        probe.zero_grad(set_to_none=True)
        batch = inputs.detach().clone()
        for round_index in range(repeats + 1):
            best = min(times.values())
            for candidate in candidates:
                if round_index > 1 and times[candidate] > drop_slower_than * best:
                    continue
                seconds = _timed_pass(probe, batch, candidate, convert_network)
                if round_index > 0:  # round 0 warms up (oneDNN primitives, allocator, autocast caches)
                    times[candidate] = min(times[candidate], seconds)
    return times


def _timed_pass(probe: nn.Module, batch: torch.Tensor, candidate: StepFormat, convert_network: bool) -> float:
    memory_format = _TORCH_MEMORY_FORMATS[candidate.memory_format]
    _to_memory_format(probe, candidate.memory_format if convert_network else "contiguous")
    batch = batch.contiguous(memory_format=memory_format)
    _synchronize(batch.device)
    start = time.perf_counter()
    with _autocast(batch.device.type, candidate.precision):
        output = probe(batch)
    output.float().abs().mean().backward()
    _synchronize(batch.device)
    seconds = time.perf_counter() - start
    probe.zero_grad(set_to_none=True)
    return seconds


def choose_step_format(times: dict[StepFormat, float], margin: float = 0.05) -> StepFormat:
    """The fastest measured format; a reduced precision only where it beats the fastest float32 format
    (or MONAI's ``amp`` on CUDA) by more than ``margin`` (a tie keeps float32, the reference's numbers).

    Args:
        times: seconds per candidate (:func:`measure_step_formats`).
        margin: the relative speed-up a reduced precision must show.
    """
    fastest = min(times, key=times.get)
    full = [c for c in times if c.precision in ("fp32", "amp")]
    if full and fastest.precision not in ("fp32", "amp"):
        fastest_full = min(full, key=times.get)
        if times[fastest_full] <= (1 + margin) * times[fastest]:
            return fastest_full
    return fastest


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


class TrainingStepInferer(Inferer):
    """The inferer of MONAI's ``SupervisedTrainer``: runs the network in the step's precision and memory
    format and returns float32 (see the module docstring).

    At the first call the format is settled: taken from a resumed run's checkpoint (through
    :meth:`load_state_dict`), or fixed by the configuration, or measured among the candidates (rank 0
    measures in a distributed run and every rank takes its choice). Then the network is converted to
    the memory format once (its weights' data replaced in place, so the optimizer keeps its parameters;
    a DDP-wrapped network keeps its layout, see :func:`measure_step_formats`). Every batch is then made
    contiguous in that memory format and run under ``torch.autocast`` where the precision is reduced.

    Args:
        precision: ``"auto"`` (measured), ``"fp32"``, ``"bf16"``, or ``"fp16"`` (CUDA only). On CUDA the
            trainer's ``amp`` decides the precision (MONAI's autocast and ``GradScaler``); configure it
            with :func:`cuda_amp_kwargs`.
        memory_format: ``"auto"`` (measured), ``"channels_last"`` or ``"contiguous"``.
        probe_repeats: timed passes per candidate of the measurement.
        margin: relative speed-up a reduced precision must show to be chosen.
    """

    def __init__(
        self,
        precision: str = "auto",
        memory_format: str = "auto",
        probe_repeats: int = 2,
        margin: float = 0.05,
    ) -> None:
        super().__init__()
        self.precision = _check_choice("train_precision", precision, PRECISIONS)
        self.memory_format = _check_choice("train_memory_format", memory_format, MEMORY_FORMATS)
        self.probe_repeats = int(probe_repeats)
        self.margin = float(margin)
        self.format: StepFormat | None = None
        self.times: dict[StepFormat, float] = {}
        self._restored: dict | None = None
        self._device_type: str | None = None
        self._network: nn.Module | None = None

    def state_dict(self) -> dict:
        """The settled format (empty before the first call), for a resumed run to keep it."""
        if self.format is None:
            return {}
        return {
            "device_type": self._device_type,
            "precision": self.format.precision,
            "memory_format": self.format.memory_format,
        }

    def load_state_dict(self, state: dict) -> None:
        """Keeps a checkpoint's format for the first call (where ``"auto"`` is configured, on the same
        kind of device)."""
        self._restored = dict(state) if state else None

    def settle(self, inputs: torch.Tensor, network: nn.Module) -> StepFormat:
        """Decides the step's format for ``network`` on batches like ``inputs`` (see the class docstring)."""
        device_type = inputs.device.type
        self._device_type = device_type
        candidates = candidate_formats(device_type, self.precision, self.memory_format)
        convert_network = not isinstance(network, nn.parallel.DistributedDataParallel)
        kept = None
        if self._restored and self._restored.get("device_type") == device_type:
            kept = StepFormat(self._restored["precision"], self._restored["memory_format"])
            # a configured (not "auto") choice overrides the checkpoint's
            candidates = [c for c in candidates if c == kept] or candidates
        if len(candidates) == 1:
            chosen = candidates[0]
            how = "kept from the checkpoint" if chosen == kept else "configured"
        else:
            chosen = self._measure(network, inputs, candidates, convert_network)
            how = "measured: " + ", ".join(
                f"{c} {self.times[c]:.3g} s" for c in candidates if c in self.times
            )
        if is_main_process():  # one line per run, not per rank
            logger.info(
                "training step: %s (%s; forward+backward of batch %s on %s)",
                chosen,
                how,
                tuple(inputs.shape),
                _machine(inputs.device),
            )
        return chosen

    def _measure(
        self, network: nn.Module, inputs: torch.Tensor, candidates: list[StepFormat], convert_network: bool
    ) -> StepFormat:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        result: list = [None]
        if not distributed or dist.get_rank() == 0:
            times = measure_step_formats(network, inputs, candidates, self.probe_repeats, convert_network)
            result = [(choose_step_format(times, self.margin), times)]
        if distributed:
            # one format for all ranks, and no rank's probe slowed by the others'
            dist.broadcast_object_list(result, src=0)
        chosen, self.times = result[0]
        return chosen

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        if self.format is None or network is not self._network:
            self.format = self.settle(inputs, network)
            if not isinstance(network, nn.parallel.DistributedDataParallel):
                _to_memory_format(network, self.format.memory_format)
            self._network = network
        inputs = inputs.contiguous(memory_format=_TORCH_MEMORY_FORMATS[self.format.memory_format])
        with _autocast(inputs.device.type, self.format.precision):
            output = network(inputs, *args, **kwargs)
        return output.float()
