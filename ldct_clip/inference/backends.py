"""How the 2-D network runs for inference: eager PyTorch, torch.compile, ONNX Runtime, OpenVINO.

:func:`prepare_network` wraps a network into a :class:`PreparedNetwork` that builds its backend lazily, on
the first batch: a bundle's ``CheckpointLoader`` handler loads the weights when the evaluator starts,
after the pipeline objects exist, and compiled or exported backends must see the loaded weights (a later
change of the weights rebuilds the backend). ``backend="auto"`` asks :func:`choose_backend`, which times
the available backends on this machine at the batch shape in use and remembers the winner per machine
(CPU model, torch version, shape) in ``~/.cache/ldct-clip/backend_choice.json``. Every backend computes
the float32 network; the tests hold each to the eager output within 1e-4 relative error with the
shipped weights. Speeds per machine: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

from ldct_clip import __version__
from ldct_clip.errors import InputError

__all__ = [
    "BACKENDS",
    "PreparedNetwork",
    "available_backends",
    "backend_cache_dir",
    "choose_backend",
    "cpu_description",
    "prepare_network",
]

logger = logging.getLogger(__name__)

#: Backend name -> what it is. "auto" picks among the available ones by measurement.
BACKENDS = {
    "eager": "PyTorch eager; NHWC on CPUs (oneDNN's fast layout), NCHW on GPUs (the default before 'auto')",
    "eager_nchw": "PyTorch eager in NCHW, the plain forward (the reference's layout)",
    "eager_infer": "PyTorch eager with the network's inference ops (CLIPDenoiser.infer: cheaper first/last "
    "convolutions, in-place activations), NHWC on CPUs",
    "inductor": "torch.compile (inductor) with frozen weights: BatchNorm folded, oneDNN weights prepacked, "
    "convolution + activation/residual fused, upsampling fused into the concatenation",
    "cudagraphs": "torch.compile with CUDA graphs (mode reduce-overhead); GPU only",
    "onnxruntime": "ONNX Runtime (CPU), from an ONNX export cached per weights; pip install 'ldct-clip[onnx]'",
    "openvino": "OpenVINO (CPU, float32 forced), from the same ONNX export; pip install 'ldct-clip[openvino]'",
}
#: Preference order among backends whose probe times are within ``margin`` of each other: simpler first.
_PREFERENCE = ("eager", "eager_infer", "eager_nchw", "inductor", "cudagraphs", "onnxruntime", "openvino")
_CPU_ONLY = ("onnxruntime", "openvino")
_CUDA_ONLY = ("cudagraphs",)
_PACKAGES = {
    "onnxruntime": ("onnxruntime", "onnx", "onnxscript"),
    "openvino": ("openvino", "onnx", "onnxscript"),
}
#: Backends compiled for one input shape: other batch sizes are padded up to it or split.
_STATIC_SHAPE = ("inductor", "cudagraphs", "openvino")


def backend_cache_dir(*parts: str) -> Path:
    """``$LDCT_CLIP_CACHE_DIR`` or ``$XDG_CACHE_HOME/ldct-clip`` or ``~/.cache/ldct-clip``, joined with
    ``parts`` (created)."""
    root = os.environ.get("LDCT_CLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldct-clip"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_description() -> dict:
    """The CPU as /proc/cpuinfo names it (model name, family/model/stepping, the vector and matrix
    flags that decide convolution speed), or what ``platform`` says elsewhere."""
    info: dict = {"model_name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "avx_vnni")
        info.update(
            model_name=fields.get("model name", info["model_name"]),
            family=fields.get("cpu family"),
            model=fields.get("model"),
            stepping=fields.get("stepping"),
            flags=[f for f in wanted if f in fields.get("flags", "").split()],
        )
    return info


def available_backends(device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None) -> list[str]:
    """The backends that can run here on ``device`` (packages installed, right device kind, the
    precision supported), in preference order."""
    kind = torch.device(device).type
    names = []
    for name in _PREFERENCE:
        if (kind == "cuda" and name in _CPU_ONLY) or (kind != "cuda" and name in _CUDA_ONLY):
            continue
        if name in _CPU_ONLY and amp_dtype is not None:
            continue  # they run the float32 graph only
        if all(find_spec(p) is not None for p in _PACKAGES.get(name, ())):
            names.append(name)
    return names


def _tensors(network: nn.Module) -> list[torch.Tensor]:
    return [*network.parameters(), *network.buffers()]


def _weights_signature(network: nn.Module) -> tuple:
    """Changes when the weights are replaced or written in place (``load_state_dict``, ``.to()``)."""
    signature = []
    for tensor in _tensors(network):
        try:
            version = tensor._version
        except RuntimeError:  # inference tensors keep no version counter
            version = -1
        signature.append((tensor.data_ptr(), version))
    return tuple(signature)


def _weights_digest(network: nn.Module) -> str:
    """sha256 of the network's state (names, shapes and values): names the cached ONNX export."""
    digest = hashlib.sha256(f"{type(network).__name__} {__version__} {torch.__version__}".encode())
    for name, tensor in network.state_dict().items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class _InferenceForm(nn.Module):
    """``network.infer`` (cheaper inference ops, same numbers) as a module's forward, where it has one."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.infer(x) if hasattr(self.network, "infer") else self.network(x)


class _HeapReuse:
    """glibc only: a network call's allocations come from the heap and stay there for the next call.

    Why: PyTorch's CPU allocator caches nothing, and glibc hands every allocation above its mmap
    threshold (at most 32 MB; 1 MB after :func:`ldct_clip.inference.limit_heap_fragmentation`) to mmap
    and back to the system on free, so each batch faults its activations in again, zero-filled by the
    kernel: hundreds of thousands of page faults per 512x512 batch, 10-25% of the time of the torch
    backends (benchmarks/README.md). Inside the call mmap is off (``M_MMAP_MAX`` 0) and the heap top is
    never trimmed (``M_TRIM_THRESHOLD``, process-wide), so the next batch finds its memory resident.
    Outside the call the process's own policy holds: volumes still go to mmap and back when freed. A
    large allocation that another thread makes during the call lands in the heap too and stays resident.
    The first call (compilation, one-off allocations) runs under the process's policy.
    """

    M_TRIM_THRESHOLD, M_MMAP_MAX, GLIBC_MMAP_MAX = -1, -4, 65536
    _libc: ctypes.CDLL | None = None

    def __init__(self) -> None:
        self.calls = 0
        if _HeapReuse._libc is None and platform.libc_ver()[0] == "glibc":
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL("libc.so.6")
                if libc.mallopt(self.M_TRIM_THRESHOLD, 2**31 - 1):
                    _HeapReuse._libc = libc

    def __enter__(self) -> None:
        self.calls += 1
        if self._libc is not None and self.calls > 1:
            self._libc.mallopt(self.M_MMAP_MAX, 0)

    def __exit__(self, *exc) -> None:
        if self._libc is not None and self.calls > 1:
            self._libc.mallopt(self.M_MMAP_MAX, self.GLIBC_MMAP_MAX)


class _TorchRunner:
    """A torch callable run in inference (``no_grad``), under autocast if asked, returning float32."""

    def __init__(
        self, fn: Callable, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool
    ):
        self.fn, self.device, self.amp_dtype, self.channels_last = fn, device, amp_dtype, channels_last
        self.memory = _HeapReuse() if device.type == "cpu" else contextlib.nullcontext()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast, self.memory:
            y = self.fn(x)
            return y.float()


class _HostStaging:
    """Host batches to a GPU runner and back through reused pinned buffers with non-blocking copies
    (no pageable staging copy by the driver); batches already on the GPU go straight through."""

    def __init__(self, runner: Callable, device: torch.device):
        self.runner, self.device = runner, device
        self.pinned_in: torch.Tensor | None = None
        self.pinned_out: torch.Tensor | None = None

    @staticmethod
    def _pinned(buffer: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        return buffer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.runner(x)
        self.pinned_in = self._pinned(self.pinned_in, x)
        self.pinned_in.copy_(x)
        y = self.runner(self.pinned_in.to(self.device, non_blocking=True))
        self.pinned_out = self._pinned(self.pinned_out, y)
        self.pinned_out.copy_(y, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # the buffers are reused by the next batch
        return self.pinned_out.clone()


class _FixedBatch:
    """A runner compiled for one batch size: smaller batches are padded (last slice repeated), larger
    ones split, so that the last short batch of a series costs one compiled call, not a recompilation."""

    def __init__(self, runner: Callable, batch: int):
        self.runner, self.batch = runner, batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.batch:
            return self.runner(x)
        outputs = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start : start + self.batch]
            count = chunk.shape[0]
            if count < self.batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch - count, *chunk.shape[1:])])
            outputs.append(self.runner(chunk)[:count])
        return torch.cat(outputs)


def _onnx_file(network: nn.Module, example: torch.Tensor) -> Path:
    """The network's ONNX export (inference form), cached under the sha256 of its weights."""
    from ldct_clip.networks.export import export_onnx

    path = backend_cache_dir("onnx") / f"{_weights_digest(network)[:32]}.onnx"
    if not path.is_file():
        started = time.perf_counter()
        partial = path.with_suffix(f".{os.getpid()}.partial")
        export_onnx(_InferenceForm(network).cpu().eval(), partial, example=example[:2].cpu().float())
        os.replace(partial, path)
        logger.info("exported the network to %s in %.0f s", path, time.perf_counter() - started)
    return path


def _build_onnxruntime(network: nn.Module, example: torch.Tensor) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(_onnx_file(network, example)), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        (y,) = session.run(None, {name: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(y)

    return run


def _build_openvino(network: nn.Module, example: torch.Tensor) -> Callable:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(_onnx_file(network, example)))
    model.reshape({0: list(example.shape)})  # static shapes: OpenVINO's fastest kernels
    config = {
        # bf16 is OpenVINO's default on CPUs with bf16 units: not the float32 network any more
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def _build_torch(
    name: str, network: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool
) -> Callable:
    network.eval().to(device)
    nhwc = channels_last and name != "eager_nchw"
    network.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    if name in ("eager", "eager_nchw"):
        return _TorchRunner(network, device, amp_dtype, nhwc)
    form = _InferenceForm(network)
    if name == "eager_infer":
        return _TorchRunner(form, device, amp_dtype, nhwc)
    if name == "inductor":
        # freezing: weights become constants (BatchNorm folded, oneDNN-prepacked); static shapes
        options = {"freezing": True}
        compiled = torch.compile(form, dynamic=False, options=options)
    else:  # cudagraphs
        compiled = torch.compile(form, dynamic=False, mode="reduce-overhead")
    return _TorchRunner(compiled, device, amp_dtype, nhwc)


def _build(
    name: str,
    network: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> Callable:
    """One backend's runner for ``network`` at the shape of ``example`` (on ``device``)."""
    if name == "onnxruntime":
        runner = _build_onnxruntime(network, example)
    elif name == "openvino":
        runner = _build_openvino(network, example)
    else:
        runner = _build_torch(name, network, device, amp_dtype, channels_last)
        if device.type == "cuda":
            runner = _HostStaging(runner, device)
    return _FixedBatch(runner, example.shape[0]) if name in _STATIC_SHAPE else runner


def _choice_key(network: nn.Module, shape: Sequence[int], device: torch.device, amp_dtype, names) -> str:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpu = cpu_description()
        machine = f"{cpu['model_name']} (family {cpu.get('family')} model {cpu.get('model')})"
    architecture = hashlib.sha256(
        repr([(k, tuple(v.shape)) for k, v in network.state_dict().items()]).encode()
    ).hexdigest()[:12]
    return (
        f"{machine} | torch {torch.__version__} | {device.type} x{torch.get_num_threads()} | "
        f"{type(network).__name__} {architecture} | shape {list(shape)} | amp {amp_dtype} | {','.join(names)}"
    )


def _read_choices(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _probe(
    network: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    names: Sequence[str],
    repeats: int,
) -> tuple[dict[str, float], dict[str, Callable]]:
    """Seconds per batch of each backend (best of ``repeats`` rounds, the backends interleaved so that
    load from other processes hits all alike), and the runners built for it (on copies of ``network``)."""
    runners, seconds = {}, {}
    for name in names:
        try:
            runners[name] = _build(name, copy.deepcopy(network), example, device, amp_dtype, channels_last)
            runners[name](example)  # warm-up: compilation, first-call allocations
        except Exception as error:  # a backend that cannot run this network here is simply not chosen
            logger.warning("backend %s is not usable here: %s", name, str(error).splitlines()[0][:200])
            runners.pop(name, None)
    for _ in range(repeats):
        for name, runner in runners.items():
            _synchronize(device)
            started = time.perf_counter()
            runner(example)
            _synchronize(device)
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - started)
    return seconds, runners


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

    A short probe builds each available candidate and times it on a random batch of ``batch_shape``
    (``repeats`` interleaved rounds, best of each). The choice is remembered per machine (CPU model or
    GPU name, torch version, threads, architecture, shape, precision, candidates) in
    ``backend_choice.json`` under :func:`backend_cache_dir`, so later runs do not probe again.

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
    path = backend_cache_dir() / "backend_choice.json"
    if use_cache and key in (known := _read_choices(path)):
        return known[key]["backend"], None
    example = torch.rand(*batch_shape, device=device)
    seconds, runners = _probe(network, example, device, amp_dtype, channels_last, names, repeats)
    if not seconds:
        raise InputError(f"none of the backends {names} could run the network on {device}")
    best = min(seconds.values())
    chosen = next(n for n in names if n in seconds and seconds[n] <= best * (1 + margin))
    logger.info("backend %s chosen (%s)", chosen, ", ".join(f"{n} {s:.2f} s" for n, s in seconds.items()))
    if use_cache:
        known = _read_choices(path)
        known[key] = {
            "backend": chosen,
            "seconds_per_batch": {n: round(s, 4) for n, s in seconds.items()},
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1))
        os.replace(partial, path)
    return chosen, runners[chosen]


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
    ) -> None:
        super().__init__()
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
        if self.backend == "auto":
            name, runner = _choose(
                self.network, shape, device, self.amp_dtype, channels_last, self.candidates, self.use_cache, 3, 0.03
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
            runner = _build(name, self.network, example, device, self.amp_dtype, channels_last)
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
    """
    return PreparedNetwork(
        network,
        backend=backend,
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        candidates=candidates,
    )
