"""Eval-mode forward of CLIPDenoiser vs. the reference-equivalent path that also computes layer4.

The reference ``CLIPDenoising`` runs the CLIP ResNet's layer4 and throws the result away; ours removes
it. Timings alternate the two variants in one process (fair under load from other processes); the
peak memory of one forward (resident on CPU, allocated on CUDA) is measured in a fresh process per
variant. Random weights (timing and memory do not depend on them).

    python benchmarks/network_forward.py                 # 1x1x512x512, RN50, CPU
    python benchmarks/network_forward.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from ldct_clip.networks import CLIPDenoiser
from ldct_clip.networks.decoder import run_up_path
from ldct_clip.networks.denoiser import pad_to_multiple

OURS = "ldct-clip CLIPDenoiser"
REFERENCE = "reference-equivalent (+ layer4)"
VARIANTS = (OURS, REFERENCE)


class WithLayer4(nn.Module):
    """Our network plus the reference's wasted work: layer4 on the layer3 tap, output discarded."""

    def __init__(self, model: CLIPDenoiser) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        # output_dim/heads only shape the attention pool, which is not used.
        full = ModifiedResNet(cfg["layers"], output_dim=1024, heads=32, image_size=224, width=cfg["width"])
        self.layer4 = full.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        taps = self.model.encode(pad_to_multiple(x))
        layer4 = self.layer4(taps[-1])  # noqa: F841 - computed and kept alive like the reference's
        y = self.model.last(run_up_path(self.model.up_path, taps))
        return y[..., :h, :w]


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the process's peak RSS to the current RSS (Linux ``clear_refs``) and return it, in MiB.

    Without the reset, the peak would include building the models (open_clip builds layer4 and the
    attention pool before we delete them), which hides the forward's own peak.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def build(variant: str, clip_model: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = CLIPDenoiser(in_channels=1, out_channels=1, clip_model=clip_model)
    net = WithLayer4(model) if variant == REFERENCE else model
    return net.eval().to(device)


def peak_memory_child(variant: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    """In a fresh process: the memory one eval forward needs beyond the built model."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = build(variant, args.clip_model, device)
    x = torch.rand(1, 1, args.size, args.size, device=device)
    with torch.inference_mode():
        net(x)  # warm-up: one-off allocations of the kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            net(x)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            before = reset_peak_rss()
            net(x)
            peak = _status_mib("VmHWM") - before
    queue.put(peak)


def peak_memory(variant: str, args: argparse.Namespace) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=peak_memory_child, args=(variant, args, queue))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def timings(args: argparse.Namespace) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and process-CPU milliseconds per forward, the variants alternating so that load from other
    processes on a shared machine hits both alike."""
    device = torch.device(args.device)
    nets = {v: build(v, args.clip_model, device) for v in VARIANTS}
    x = torch.rand(1, 1, args.size, args.size, device=device)
    result: dict[str, tuple[list[float], list[float]]] = {v: ([], []) for v in VARIANTS}
    with torch.inference_mode():
        for v in VARIANTS:
            nets[v](x)  # warm-up
        for _ in range(args.repeats):
            for v in VARIANTS:
                wall, cpu = time.perf_counter(), time.process_time()
                nets[v](x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                result[v][0].append((time.perf_counter() - wall) * 1000.0)
                result[v][1].append((time.process_time() - cpu) * 1000.0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--clip-model", default="RN50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = timings(args)
    # Every allocation above 64 KiB as its own mapping, returned on free: the peak RSS then follows the
    # live tensors instead of glibc's heap growth, which depends on allocation order. Read by the
    # spawned children at start-up (this process keeps its allocator, so the timings above are normal).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    memory = {v: peak_memory(v, args) for v in VARIANTS}
    memory_label = "peak CUDA alloc MiB" if args.device.startswith("cuda") else "peak RSS delta MiB"
    print(
        f"eval forward, 1x1x{args.size}x{args.size}, {args.clip_model}, random weights, {args.device}, "
        f"{args.threads} threads, {args.repeats} alternating repeats"
    )
    print(f"| variant | wall ms/slice (median) | CPU ms/slice (median) | {memory_label} | parameters |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for v in VARIANTS:
        params = sum(p.numel() for p in build(v, args.clip_model, torch.device("cpu")).parameters())
        wall, cpu = times[v]
        print(
            f"| {v} | {statistics.median(wall):.0f} | {statistics.median(cpu):.0f} | {memory[v]:.0f} | {params:,} |"
        )


if __name__ == "__main__":
    main()
