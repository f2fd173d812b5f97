"""The inference backends themselves: how each one is built for a network and runs a batch.

:mod:`ldct_clip.inference.backends` chooses among them and builds them lazily (:func:`prepare_network`);
this module holds what each backend is (:data:`BACKENDS`), whether it can run here
(:func:`available_backends`), the runners and the per-backend builders.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import nn

from ldct_clip import __version__
from ldct_clip.inference.machine import backend_cache_dir

__all__ = ["BACKENDS", "available_backends", "backend_cache_dir", "build_backend"]

logger = logging.getLogger(__name__)

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
        if name in ("eager", "eager_nchw") and amp_dtype is not None:
            # under autocast eager_infer computes the same numbers as the plain forward (both keep the
            # first and last convs in float32) with less work around the convolutions
            continue
        if name == "inductor" and kind == "cpu" and os.environ.get("ONEDNN_MAX_CPU_ISA"):
            # with oneDNN's instruction set capped below the CPU's, inductor's prepacked convolutions
            # corrupt memory (torch 2.14.1: "double free or corruption", or inf outputs; benchmarks/README.md)
            continue
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
    ``LDCT_CLIP_HEAP_REUSE=0`` in the environment switches it off (less resident memory, slower).
    """

    M_TRIM_THRESHOLD, M_MMAP_MAX, GLIBC_MMAP_MAX = -1, -4, 65536
    _libc: ctypes.CDLL | None = None

    def __init__(self) -> None:
        self.calls = 0
        self.enabled = os.environ.get("LDCT_CLIP_HEAP_REUSE", "1") != "0"
        if self.enabled and _HeapReuse._libc is None and platform.libc_ver()[0] == "glibc":
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL("libc.so.6")
                if libc.mallopt(self.M_TRIM_THRESHOLD, 2**31 - 1):
                    _HeapReuse._libc = libc

    def __enter__(self) -> None:
        self.calls += 1
        if self.enabled and self._libc is not None and self.calls > 1:
            self._libc.mallopt(self.M_MMAP_MAX, 0)

    def __exit__(self, *exc) -> None:
        if self.enabled and self._libc is not None and self.calls > 1:
            self._libc.mallopt(self.M_MMAP_MAX, self.GLIBC_MMAP_MAX)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    :class:`_HeapReuse` turns heap trimming off for the whole process, so memory that a released backend
    freed would otherwise stay resident; the backend probe calls this between candidates."""
    if platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


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


class _SignalStackKept:
    """Restore the calling thread's alternate signal stack on exit.

    OpenVINO's CPU plugin replaces the thread's ``sigaltstack`` with a buffer of its own when it compiles a
    model, and frees that buffer with the model without restoring the previous stack (seen with openvino
    2026.4). Python runs its SIGINT/SIGTERM handlers on the alternate stack, so Ctrl-C or SIGTERM after an
    OpenVINO model was freed crashed the process (SIGSEGV) instead of removing the staged output.
    """

    class _Stack(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    _libc = None
    if platform.system() == "Linux":
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self) -> None:
        self.saved = self._Stack()
        if self._libc is None or self._libc.sigaltstack(None, ctypes.byref(self.saved)) != 0:
            self.saved = None

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            self._libc.sigaltstack(ctypes.byref(self.saved), None)


class _OpenVinoRunner:
    """An OpenVINO compiled model and its infer request, built, run and freed with the signal stack kept."""

    def __init__(self, network: nn.Module, example: torch.Tensor) -> None:
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
        with _SignalStackKept():
            self.compiled = core.compile_model(model, "CPU", config)
            self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with _SignalStackKept():
            self.request.infer({0: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())

    def __del__(self) -> None:
        with _SignalStackKept():
            self.__dict__.pop("request", None)
            self.__dict__.pop("compiled", None)


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


def build_backend(
    name: str,
    network: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> Callable:
    """One backend's runner for ``network`` at the shape of ``example`` (on ``device``); torch backends
    convert ``network`` in place (eval mode, device, memory format)."""
    if name == "onnxruntime":
        runner = _build_onnxruntime(network, example)
    elif name == "openvino":
        runner = _OpenVinoRunner(network, example)
    else:
        runner = _build_torch(name, network, device, amp_dtype, channels_last)
        if device.type == "cuda":
            runner = _HostStaging(runner, device)
    return _FixedBatch(runner, example.shape[0]) if name in _STATIC_SHAPE else runner
