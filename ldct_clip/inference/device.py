"""Where and in what precision the network runs: device, mixed precision, memory format, batch size.

Runtime policy only (no network, no data): every default here was chosen by measurement on the machines
named in ``benchmarks/README.md``.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time

import torch

from ldct_clip.errors import InputError
from ldct_clip.inference.machine import machine_name, read_measurements, remember_measurement

__all__ = [
    "CPU_AMP_DEFAULT",
    "DEFAULT_BATCH_SIZE",
    "cpu_bf16_is_faster",
    "default_batch_size",
    "default_channels_last",
    "limit_heap_fragmentation",
    "resolve_amp",
    "resolve_device",
]

logger = logging.getLogger(__name__)

#: Slices per forward pass. CPU: 1, as fast as 2 within 2 % on 2 cores (a 512x512 slice already fills them)
#: and one slice's working set less: what keeps 512x512x300 within "volume + 1.5 GB" (benchmarks/README.md).
#: GPU: a starting point that the memory bound (``ldct_clip.inference.memory``) lowers where the GPU is small.
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 16}
#: Mixed precision on CPUs where bf16 convolutions measure faster than float32 (:func:`cpu_bf16_is_faster`)
#: when ``amp`` is left to its default: bf16, with the network's output convolution in float32
#: (``CLIPDenoiser.infer``, the ``eager_infer`` and ``inductor`` backends). Its PSNR cost with the shipped CT
#: weights on held-out simulated quarter dose is under the 0.05 dB allowed, at about twice the float32 speed
#: (benchmarks/README.md); rounding the output image itself to bf16 would cost several times more, which is
#: why the backends that keep the output convolution in float32 are the only bf16 candidates.
CPU_AMP_DEFAULT: torch.dtype | None = torch.bfloat16

_AMP_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The compute device: ``"auto"`` (or None) is the first GPU where there is one, else the CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Raises:
        InputError: an unknown device, or a GPU asked for where none is visible.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for but no CUDA GPU is visible: use device cpu or auto")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(
            f"device {device!r} asked for but only {torch.cuda.device_count()} GPU(s) are visible: "
            f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return resolved


def _cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


#: Convolutions :func:`cpu_bf16_is_faster` times (in, out, input size): two decoder shapes of the network,
#: a deep one and a wide one, at a quarter of their 512x512 area to keep the probe short.
_PROBE_CONVS = ((1024, 256, 32), (192, 64, 128))
#: bf16 must be this much faster (relative) than float32 on the probe to become the default.
_BF16_MARGIN = 0.10
_PRECISION_CHOICES = "precision_choice.json"


def _time_convs(dtype: torch.dtype, rounds: int = 3) -> float:
    total = 0.0
    with torch.no_grad():
        for cin, cout, size in _PROBE_CONVS:
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False).eval()
            conv = conv.to(dtype=dtype, memory_format=torch.channels_last)
            x = torch.rand(1, cin, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
            conv(x)  # warm-up: oneDNN builds its kernels
            best = float("inf")
            for _ in range(rounds):
                started = time.perf_counter()
                conv(x)
                best = min(best, time.perf_counter() - started)
            total += best
    return total


def cpu_bf16_is_faster(use_cache: bool = True) -> bool:
    """Whether bf16 convolutions run faster than float32 ones on this CPU, measured, not guessed from flags.

    CPUs with bf16 in hardware (AVX512-BF16, AMX) run them about twice as fast; elsewhere oneDNN has no
    bf16 or emulates it, slower than float32 (an instruction-set cap, ``ONEDNN_MAX_CPU_ISA``, does that to
    a bf16 CPU whose flags still say bf16). A probe of two decoder convolution shapes (NHWC, batch 1, best
    of 3: a fraction of a second where bf16 is fast, seconds where it is emulated) decides; the answer is
    remembered per machine (:func:`~ldct_clip.inference.machine.machine_name`, torch version, threads) in
    ``precision_choice.json`` under the backend cache directory.

    Args:
        use_cache: read and record the remembered answer.
    """
    if not _cpu_supports_bf16():
        return False
    key = f"{machine_name('cpu')} | torch {torch.__version__} | cpu x{torch.get_num_threads()}"
    if use_cache and key in (known := read_measurements(_PRECISION_CHOICES)):
        return bool(known[key]["bf16"])
    fp32, bf16 = _time_convs(torch.float32), _time_convs(torch.bfloat16)
    faster = bf16 * (1 + _BF16_MARGIN) < fp32
    logger.info(
        "bf16 probe: %.3f s against %.3f s in float32: %s", bf16, fp32, "bf16" if faster else "float32"
    )
    if use_cache:
        entry = {"bf16": faster, "seconds": {"fp32": round(fp32, 4), "bf16": round(bf16, 4)}}
        remember_measurement(_PRECISION_CHOICES, key, entry)
    return faster


def resolve_amp(amp: bool | str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for plain float32.

    Args:
        amp: None / ``"auto"`` for the measured default (bf16 or fp16 on a GPU; on the CPU
            :data:`CPU_AMP_DEFAULT` where :func:`cpu_bf16_is_faster`, else float32); False / ``"fp32"`` /
            ``"none"`` for float32; True / ``"on"`` for the device's best half type (bf16 where supported,
            else fp16 on a GPU, float32 on a CPU without bf16); ``"bf16"`` or ``"fp16"`` (or the torch
            dtype) to force one.
        device: the compute device.

    Raises:
        InputError: an unknown name.
    """
    if isinstance(amp, str):
        key = amp.lower()
        if key in ("fp32", "float32", "none", "off", "false"):
            return None
        if key == "auto":
            amp = None
        elif key in ("on", "true"):
            amp = True
        elif key in _AMP_NAMES:
            amp = _AMP_NAMES[key]
        else:
            raise InputError(f"unknown mixed precision {amp!r}: use auto, bf16, fp16 or fp32")
    if isinstance(amp, torch.dtype):
        return None if amp == torch.float32 else amp
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is None:
        return CPU_AMP_DEFAULT if cpu_bf16_is_faster() else None
    if not _cpu_supports_bf16():
        logger.warning("this CPU has no bf16 support: running in float32")
        return None
    return torch.bfloat16


def default_channels_last(device: torch.device | str) -> bool:
    """NHWC on CPUs, where oneDNN convolutions run much faster so (benchmarks/README.md); NCHW on GPUs."""
    return torch.device(device).type == "cpu"


def default_batch_size(device: torch.device | str) -> int:
    """Slices per forward pass on ``device`` before the memory bound (:data:`DEFAULT_BATCH_SIZE`)."""
    return DEFAULT_BATCH_SIZE.get(torch.device(device).type, 1)


def limit_heap_fragmentation(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with mmap, for the rest of the process.

    A volume denoised batch after batch allocates and frees the same mid-sized activations again and again;
    glibc's heap keeps the freed pages and fragments, which cost ~160 MB of peak RSS at 512x512
    (benchmarks/README.md). With mmap they go back to the system when freed. Process-wide, so called by
    programs (the command line), never by the library itself. Returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
