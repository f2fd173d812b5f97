"""How the 2-D network runs for inference: eager PyTorch, torch.compile, ONNX Runtime, OpenVINO.

:func:`prepare_network` wraps a network into a :class:`PreparedNetwork` that builds its backend lazily, on
the first batch: a bundle's ``CheckpointLoader`` handler loads the weights when the evaluator starts,
after the pipeline objects exist, and compiled or exported backends must see the loaded weights (a later
change of the weights rebuilds the backend). ``backend="auto"`` asks :func:`choose_backend`, which times
the available backends on this machine at the batch shape in use and remembers the winner per machine
(CPU model, torch version, shape) in ``~/.cache/ldct-clip/backend_choice.json``. In float32 every
backend computes the same network (the tests hold each to the eager output within 1e-4 relative error
with the shipped weights); mixed precision (``amp_dtype``) is for the torch backends only. The
backends themselves are in :mod:`ldct_clip.inference.backend_runners`. Speeds per machine:
benchmarks/README.md.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ldct_clip.errors import InputError
from ldct_clip.inference.backend_runners import (
    _STATIC_SHAPE,
    BACKENDS,
    _tensors,
    _weights_signature,
    available_backends,
    backend_cache_dir,
    build_backend,
    release_freed_memory,
)
from ldct_clip.inference.machine import (
    cpu_description,
    machine_name,
    read_measurements,
    remember_measurement,
)

__all__ = [
    "BACKENDS",
    "PROBE_MIN_PIXELS",
    "PROBE_DRIFT",
    "PROBE_TOLERANCE",
    "PreparedNetwork",
    "available_backends",
    "backend_cache_dir",
    "choose_backend",
    "cpu_description",
    "prepare_network",
]

logger = logging.getLogger(__name__)

#: ``"auto"`` measures the backends only for batches of at least this many pixels (one 512 x 512 slice):
#: below, building and timing every candidate would take longer than the work, and ``eager_infer`` (the
#: fastest backend that needs no build, within 7 % of the best at 512 x 512 here) runs without a probe.
PROBE_MIN_PIXELS = 512 * 512
#: Relative L2 difference to the plain float32 forward a backend may show in ``"auto"``'s probe (float32,
#: mixed precision): the equality the tests hold every backend to (1e-4), and for bf16 ten times what it
#: measures with the shipped weights (benchmarks/README.md).
PROBE_TOLERANCE = {False: 1e-4, True: 1e-2}
#: Relative change of the fastest backend's time between its turn in the probe and a second timing after
#: all candidates, above which the load is taken to have changed and the choice is not remembered.
PROBE_DRIFT = 0.2
_CHOICES = "backend_choice.json"


def _choice_key(network: nn.Module, shape: Sequence[int], device: torch.device, amp_dtype, names) -> str:
    machine = machine_name(device)
    architecture = hashlib.sha256(
        repr([(k, tuple(v.shape)) for k, v in network.state_dict().items()]).encode()
    ).hexdigest()[:12]
    return (
        f"{machine} | torch {torch.__version__} | {device.type} x{torch.get_num_threads()} | "
        f"{type(network).__name__} {architecture} | shape {list(shape)} | amp {amp_dtype} | {','.join(names)}"
    )


def _probe(
    network: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    names: Sequence[str],
    repeats: int,
) -> tuple[dict[str, float], dict[str, Callable], bool]:
    """Seconds per batch of each backend (best of ``repeats`` calls after a warm-up), the runner of the
    fastest (built on a copy of ``network``), and whether the load held steady through the probe.

    One backend at a time: each is built, checked, timed and released before the next is built, so the
    probe's memory is the largest backend's, not their sum (with all five alive at once, the first
    512x512x300 run on a machine peaked 1.2 GB above later runs; benchmarks/README.md). A backend whose
    warm-up output strays from the plain float32 forward (beyond :data:`PROBE_TOLERANCE` of its
    precision, or not finite) is left out: a fast wrong answer must never be chosen."""
    kept, seconds = {}, {}
    with torch.no_grad():
        expected = copy.deepcopy(network).to(device).eval()(example).float()
    release_freed_memory()
    tolerance = PROBE_TOLERANCE[amp_dtype is not None]
    for name in names:
        try:
            runner = build_backend(name, copy.deepcopy(network), example, device, amp_dtype, channels_last)
            output = runner(example).float()  # warm-up: compilation, first-call allocations
            error = float((output - expected).norm() / expected.norm().clamp_min(1e-12))
            del output
            if not error <= tolerance:  # also catches NaN
                raise RuntimeError(
                    f"its output differs from the float32 forward by {error:.1e} (relative; allowed "
                    f"{tolerance:.0e})"
                )
            seconds[name] = min(_timed(runner, example, device) for _ in range(repeats))
        except Exception as error:  # a backend that cannot run this network here is simply not chosen
            logger.warning("backend %s is not usable here: %s", name, str(error).splitlines()[0][:200])
            seconds.pop(name, None)
            continue
        if not kept or seconds[name] < seconds[next(iter(kept))]:
            kept = {name: runner}  # the one released here is rebuilt if the margin prefers it
        del runner
        gc.collect()
        release_freed_memory()
    if len(seconds) > 1:
        # the candidates were timed one after another, so a change of load in between skews the comparison:
        # the fastest is timed again, and a choice whose time moved by more than PROBE_DRIFT is not remembered
        name, runner = next(iter(kept.items()))
        again = min(_timed(runner, example, device) for _ in range(repeats))
        if abs(again / seconds[name] - 1) > PROBE_DRIFT:
            logger.warning(
                "the machine's load changed during the backend probe (%s: %.2f s, then %.2f s): the choice "
                "of %s holds for this run only and will be measured again",
                name,
                seconds[name],
                again,
                name,
            )
            return seconds, kept, False
    return seconds, kept, True


def _timed(runner: Callable, example: torch.Tensor, device: torch.device) -> float:
    _synchronize(device)
    started = time.perf_counter()
    runner(example)
    _synchronize(device)
    return time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_backend(
    network: nn.Module,
    batch_shape: Sequence[int],
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    candidates: Sequence[str] | None = None,
    use_cache: bool = True,
    repeats: int = 3,
    margin: float = 0.03,
) -> str:
    """The fastest backend for ``network`` on this machine at ``batch_shape``, by measurement.

    A short probe builds each available candidate in turn, checks its output against the float32 forward
    and times it on a random batch of ``batch_shape`` (best of ``repeats`` calls; whole slices on half
    their width), then times the fastest again: a choice made while the load changed is not kept.
    Otherwise it is remembered per machine (CPU model or GPU name, instruction-set caps, torch version,
    threads, architecture, shape, precision, candidates) in ``backend_choice.json`` under
    :func:`backend_cache_dir`, so later runs do not probe again.

    Args:
        network: the network (not changed: the probe runs copies).
        batch_shape: ``(B, C, H, W)`` of the batches it will see.
        device: compute device.
        amp_dtype: autocast dtype, or None for float32.
        channels_last: NHWC for the torch backends; None: on CPUs.
        candidates: backends to consider (default: :func:`available_backends`).
        use_cache: read and write the remembered choices.
        repeats: timed rounds.
        margin: a backend must be this much faster (relative) to beat one earlier in preference order.
    """
    return _choose(
        network,
        batch_shape,
        torch.device(device),
        amp_dtype,
        channels_last,
        candidates,
        use_cache,
        repeats,
        margin,
    )[0]


def _choose(network, batch_shape, device, amp_dtype, channels_last, candidates, use_cache, repeats, margin):
    names = [
        n
        for n in (candidates or available_backends(device, amp_dtype))
        if n in available_backends(device, amp_dtype)
    ]
    if not names:
        raise InputError(f"none of the backends {list(candidates or [])} can run on {device} here")
    channels_last = device.type == "cpu" if channels_last is None else channels_last
    key = _choice_key(network, batch_shape, device, amp_dtype, names)
    if use_cache and key in (known := read_measurements(_CHOICES)):
        return known[key]["backend"], None
    # slices of 512 x 512 and more are timed on half their width: the same kernels at half the probe's
    # memory, which the first run on a machine adds on top of a loaded volume (benchmarks/README.md)
    probe_shape = (*batch_shape[:-1], batch_shape[-1] // 2) if batch_shape[-1] >= 512 else tuple(batch_shape)
    example = torch.rand(*probe_shape, device=device)
    seconds, runners, steady = _probe(network, example, device, amp_dtype, channels_last, names, repeats)
    if probe_shape != tuple(batch_shape):
        runners = {}  # built for the probe's shape: the caller builds the chosen one for the real one
    if not seconds:
        raise InputError(f"none of the backends {names} could run the network on {device}")
    best = min(seconds.values())
    chosen = next(n for n in names if n in seconds and seconds[n] <= best * (1 + margin))
    logger.info("backend %s chosen (%s)", chosen, ", ".join(f"{n} {s:.2f} s" for n, s in seconds.items()))
    if use_cache and steady:
        remember_measurement(
            _CHOICES,
            key,
            {
                "backend": chosen,
                "seconds_per_batch": {n: round(s, 4) for n, s in seconds.items()},
                "probe_shape": list(probe_shape),
                "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            },
        )
    return chosen, runners.get(chosen)  # None: built again by the caller


class PreparedNetwork(nn.Module):
    """A network run by a backend that is built on the first batch (and rebuilt if the weights change).

    Called with ``(B, C, H, W)`` batches, returns the float32 prediction on the batch's device. The
    network is a submodule (``.eval()``/``.to()`` reach it; its state dict keys get a ``network.``
    prefix). Memory format and mixed precision are handled here: give the predictor plain batches.

    Args:
        network: the 2-D network.
        backend: a name of :data:`BACKENDS`, or ``"auto"`` (:func:`choose_backend` on the first batch).
        device: where it runs; None: where the network's weights are.
        amp_dtype: autocast dtype for the torch backends, or None (float32).
        channels_last: NHWC for the torch backends; None: on CPUs.
        use_cache: ``"auto"`` may reuse (and record) the choice remembered for this machine.
        candidates: the backends ``"auto"`` chooses among (default: every available one).
        probe_min_pixels: ``"auto"`` measures only batches of at least this many pixels (:data:`PROBE_MIN_PIXELS`).
    """

    def __init__(
        self,
        network: nn.Module,
        backend: str = "auto",
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        use_cache: bool = True,
        candidates: Sequence[str] | None = None,
        probe_min_pixels: int = PROBE_MIN_PIXELS,
    ) -> None:
        super().__init__()
        self.probe_min_pixels = int(probe_min_pixels)
        if backend != "auto" and backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}: use auto or one of {', '.join(BACKENDS)}")
        self.network = network
        self.backend = backend
        self.device = torch.device(device) if device is not None else None
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.use_cache = use_cache
        self.candidates = list(candidates) if candidates is not None else None
        self.chosen: str | None = None  # the backend in use, once built
        self._runner: Callable | None = None
        self._signature: tuple | None = None
        self._shape: tuple | None = None

    def _build(self, x: torch.Tensor) -> None:
        first = next(iter(_tensors(self.network)), None)
        device = self.device or (first.device if first is not None else x.device)
        channels_last = device.type == "cpu" if self.channels_last is None else self.channels_last
        shape = tuple(x.shape)
        runner = None
        if self.backend == "auto" and shape[0] * shape[-2] * shape[-1] < self.probe_min_pixels:
            # the probe builds every candidate (inductor compiles for 20-60 s): more than small inputs cost
            name = "eager_infer" if hasattr(self.network, "infer") else "eager"
        elif self.backend == "auto":
            name, runner = _choose(
                self.network,
                shape,
                device,
                self.amp_dtype,
                channels_last,
                self.candidates,
                self.use_cache,
                3,
                0.03,
            )
        else:
            name = self.backend
            if name not in available_backends(device, self.amp_dtype):
                raise InputError(
                    f"backend {name} cannot run on {device.type}"
                    + (" in mixed precision" if self.amp_dtype is not None else "")
                    + f" here; available: {', '.join(available_backends(device, self.amp_dtype))}"
                )
        if runner is None:
            example = torch.rand(shape, device=device)
            runner = build_backend(name, self.network, example, device, self.amp_dtype, channels_last)
        self.chosen, self._runner, self._shape = name, runner, shape[1:]
        self._signature = _weights_signature(self.network)
        logger.info("inference backend: %s on %s", name, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self._runner is None
            or tuple(x.shape[1:]) != self._shape
            and self.chosen in _STATIC_SHAPE
            or _weights_signature(self.network) != self._signature
        ):
            self._build(x)
        return self._runner(x)


def prepare_network(
    network: nn.Module,
    backend: str = "auto",
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    candidates: Sequence[str] | None = None,
    probe_min_pixels: int = PROBE_MIN_PIXELS,
) -> PreparedNetwork:
    """``network`` run by ``backend``, built lazily on the first batch (see :class:`PreparedNetwork`).

    Args:
        network: the 2-D network (its weights may be loaded after this call, before the first batch).
        backend: ``"auto"`` (the fastest here, measured once per machine and shape) or a name of
            :data:`BACKENDS`.
        device: where it runs; None: where the network's weights are at the first batch.
        amp_dtype: autocast dtype (torch backends), None for float32.
        channels_last: NHWC for the torch backends; None: on CPUs.
        candidates: what ``"auto"`` chooses among (default: every available backend).
        probe_min_pixels: ``"auto"`` measures only batches of at least this many pixels; smaller ones run
            ``eager_infer`` (:data:`PROBE_MIN_PIXELS`).
    """
    return PreparedNetwork(
        network,
        backend=backend,
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        candidates=candidates,
        probe_min_pixels=probe_min_pixels,
    )
