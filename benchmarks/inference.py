"""Volume inference speed and memory: ldct_clip.inference.denoise_volume against a naive baseline.

Each configuration runs in its own subprocess, so its peak RSS (``resource.getrusage``) is its own. The
volume is a noisy phantom (``ldct_clip.data.phantom``, Gaussian noise of sigma 5/255 in the model range)
of SIZE x SIZE x N slices; the network is CLIPDenoiser with the RN50 architecture, random-init with a
fixed seed (no CLIP or trained weights are needed, the cost is the same).

naive: what the reference evaluation does, slice after slice: fp32, ``torch.no_grad``, the whole volume
converted to float and normalised up front, one slice per forward, reflect-pad to 32, layer4 of the
CLIP ResNet computed on layer3's output and thrown away (the reference's encoder runs it), the outputs
collected in a list and stacked.

Accuracy of mixed precision: PSNR (model range, data range 1) of each output against the clean phantom,
and of each output against ours-fp32 (identical outputs give inf).

    python benchmarks/inference.py                       # speed table, 8 slices of 512x512
    python benchmarks/inference.py --memory-slices 300   # + peak RSS of 512x512x300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIGMA = 5 / 255  # training noise of the CT recipe, in the model range
CONFIGS = {
    "naive fp32 (reference loop)": {"mode": "naive"},
    "ours fp32 batch 1": {"mode": "ours", "batch": 1, "amp": "fp32"},
    "ours fp32 batch 2": {"mode": "ours", "batch": 2, "amp": "fp32"},
    "ours fp32 batch 2 channels_last": {"mode": "ours", "batch": 2, "amp": "fp32", "channels_last": True},
    "ours bf16 batch 2": {"mode": "ours", "batch": 2, "amp": "bf16"},
    "ours bf16 batch 1 channels_last": {"mode": "ours", "batch": 1, "amp": "bf16", "channels_last": True},
    "ours bf16 batch 2 channels_last": {"mode": "ours", "batch": 2, "amp": "bf16", "channels_last": True},
    "ours bf16 batch 4 channels_last": {"mode": "ours", "batch": 4, "amp": "bf16", "channels_last": True},
    # memory of the volume-sized buffers: a tiny network makes 300+ slices quick to run
    "naive, tiny net": {"mode": "naive", "model": "tiny"},
    "ours streaming, tiny net": {"mode": "ours", "batch": 2, "amp": "fp32", "model": "tiny"},
    "ours streaming, new output, tiny net": {
        "mode": "ours",
        "batch": 2,
        "amp": "fp32",
        "model": "tiny",
        "inplace": False,
    },
    "MONAI SliceInferer, tiny net": {
        "mode": "ours",
        "batch": 2,
        "amp": "fp32",
        "model": "tiny",
        "monai": True,
    },
}
MEMORY_CONFIGS = [
    "naive, tiny net",
    "ours streaming, tiny net",
    "ours streaming, new output, tiny net",
    "MONAI SliceInferer, tiny net",
    "ours bf16 batch 2 channels_last",
]


def _rss_mb(peak: bool = True) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_volume(size: int, slices: int):
    """Noisy phantom (1, X, Y, N) HU and its clean version's file; built slice-wise so that making it
    costs no more than the volume itself (peak RSS stays the inference's)."""
    import torch
    from monai.data import MetaTensor

    from ldct_clip.data.phantom import make_phantom

    base = make_phantom(size=size, slices=min(slices, 8), seed=0)
    # an axial series as ldct_clip.io.load_ct returns DICOM: x to the left, y to posterior (LPS axes)
    affine = torch.diag(torch.tensor([-0.8, -0.8, 3.0, 1.0], dtype=torch.float64))
    volume = MetaTensor(torch.empty((1, size, size, slices), dtype=torch.float32), affine=affine)
    generator = torch.Generator().manual_seed(1)
    data = volume.as_tensor()
    for k in range(slices):
        noise = torch.randn((size, size), generator=generator) * (SIGMA * 4096)
        data[0, :, :, k] = base.as_tensor()[0, :, :, k % base.shape[-1]] + noise
    return base, volume


def _model(device, name: str = "rn50"):
    import torch

    from ldct_clip.networks import CLIPDenoiser

    torch.manual_seed(0)
    kwargs = {"layers": (1, 1, 1, 1), "width": 8} if name == "tiny" else {}
    return CLIPDenoiser(**kwargs).eval().to(device)


def _add_layer4(model, device) -> None:
    """Make ``model`` compute the CLIP ResNet's layer4 on layer3's output and discard it, as the
    reference's encoder (the whole ModifiedResNet) does."""
    from open_clip.modified_resnet import ModifiedResNet

    width = model.encoder.width
    full = ModifiedResNet([3, 4, 6, 3], output_dim=width * 16, heads=1, image_size=224, width=width)
    layer4 = full.layer4.to(device).eval()

    def run_layer4(module, args, taps):
        layer4(taps[-1])

    model.encoder.register_forward_hook(run_layer4)


def _naive(volume, model, device):
    """The reference evaluation's way (model prepared by :func:`_add_layer4`), see the module docstring."""
    import torch
    import torch.nn.functional as F

    x = (torch.as_tensor(np.asarray(volume), dtype=torch.float32) + 1024.0) / 4096.0
    outputs = []
    with torch.no_grad():
        for k in range(x.shape[-1]):
            slice_ = x[..., k][None].to(device)
            h, w = slice_.shape[-2:]
            padded = F.pad(slice_, (0, -w % 32, 0, -h % 32), mode="reflect")
            outputs.append(model(padded)[..., :h, :w].cpu())
    return torch.stack(outputs, dim=-1)[0] * 4096.0 - 1024.0


def worker(config: dict) -> dict:
    import torch

    torch.set_num_threads(config["threads"])
    from ldct_clip.inference import denoise_volume, limit_heap_fragmentation

    if config["mode"] == "ours":
        limit_heap_fragmentation()  # as ldct-clip denoise does

    device = torch.device(config["device"])
    base, volume = _make_volume(config["size"], config["slices"])
    model = _model(device, config.get("model", "rn50"))
    if config.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if config["mode"] == "naive":
        _add_layer4(model, device)
    rss_before = _rss_mb(peak=False)

    def run(vol):
        if config["mode"] == "naive":
            return _naive(vol, model, device)
        return denoise_volume(
            vol,
            model,
            device=device,
            batch_size=config["batch"],
            amp=config["amp"],
            progress=False,
            channels_last=bool(config.get("channels_last")),
            roi_size=vol.shape[1:3] if config.get("monai") else None,
            inplace=config.get("inplace", not config.get("monai")),  # as ldct-clip denoise does
        )

    run(volume[..., : config.get("batch", 1)].clone())  # warm-up: first-call allocations, oneDNN kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = run(volume)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "slices": config["slices"],
        "seconds": seconds,
        "slices_per_s": config["slices"] / seconds,
        "cpu_s_per_slice": cpu_seconds / config["slices"],
        "peak_rss_mb": _rss_mb(),
        "rss_before_mb": rss_before,
        "volume_mb": volume.numel() * 4 / 2**20,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if config.get("save"):
        clean = base[0].numpy()
        out = np.asarray(out).reshape(volume.shape)[0][..., : clean.shape[-1]]
        np.save(config["save"], out)
        result["psnr_clean_db"] = _psnr(out, clean)
    return result


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in the model range x = (HU + 1024) / 4096, data range 1."""
    mse = float(np.mean(((a - b) / 4096.0) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _run_worker(config: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=8, help="slices of the speed runs")
    parser.add_argument(
        "--memory-slices", type=int, default=0, help="also measure peak RSS at this many slices"
    )
    parser.add_argument("--memory-configs", nargs="*", default=MEMORY_CONFIGS)
    parser.add_argument(
        "--configs",
        nargs="*",
        default=[c for c in CONFIGS if c not in MEMORY_CONFIGS],
        help="CONFIGS to time",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, {args.size}x{args.size}")
    rows = []
    outputs = tempfile.TemporaryDirectory()  # each configuration's output, for the PSNR columns
    for name in args.configs:
        config = dict(CONFIGS[name], size=args.size, slices=args.slices, device=args.device)
        config.update(threads=args.threads, save=str(Path(outputs.name) / f"{len(rows)}.npy"))
        rows.append((name, _run_worker(config), config["save"]))
        print(f"  done: {name}: {rows[-1][1]['slices_per_s']:.3f} slices/s", file=sys.stderr, flush=True)
    if rows:
        naive = next((r for n, r, _ in rows if n.startswith("naive")), None)
        fp32 = next((p for n, _, p in rows if n == "ours fp32 batch 2"), None)
        print(f"\nspeed, {args.slices} slices of {args.size}x{args.size} (random-init RN50 CLIPDenoiser)")
        print(
            "| configuration | slices/s | s/slice | vs naive | CPU s/slice | vs naive (CPU) | peak RSS MB "
            "| PSNR vs clean dB | PSNR vs ours fp32 dB |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, r, path in rows:
            ratio = r["slices_per_s"] / naive["slices_per_s"] if naive else float("nan")
            cpu_ratio = naive["cpu_s_per_slice"] / r["cpu_s_per_slice"] if naive else float("nan")
            vs_fp32 = _psnr(np.load(path), np.load(fp32)) if fp32 else float("nan")
            print(
                f"| {name} | {r['slices_per_s']:.3f} | {1 / r['slices_per_s']:.2f} | {ratio:.2f}x | "
                f"{r['cpu_s_per_slice']:.2f} | {cpu_ratio:.2f}x | {r['peak_rss_mb']:.0f} | "
                f"{r['psnr_clean_db']:.3f} | {vs_fp32:.1f} |"
            )
    outputs.cleanup()
    if args.memory_slices:
        print(f"\nmemory, {args.size}x{args.size}x{args.memory_slices}")
        print("| configuration | slices/s | volume MB | RSS before MB | peak RSS MB | peak - volume MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name in args.memory_configs:
            config = dict(CONFIGS[name], size=args.size, slices=args.memory_slices, device=args.device)
            config.update(threads=args.threads)
            r = _run_worker(config)
            print(
                f"| {name} | {r['slices_per_s']:.3f} | {r['volume_mb']:.0f} | {r['rss_before_mb']:.0f} | "
                f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['volume_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
