"""Inference speed against this machine's convolution floor and the reference loop, in one run.

Prints, for the machine it runs on:

1. the CPU (model, family/model, vector/matrix flags) or GPU, threads, torch version, load average;
2. the conv floor: every convolution shape the network runs on a 512x512 slice, timed alone (fp32, NHWC,
   the batch in use, best of the rounds); the floor is the network's FLOPs per slice (torch's
   FlopCounterMode) divided by the best of those throughputs. Also the "conv-only" time: each layer at
   its own measured speed, i.e. what a perfect implementation on top of these kernels would take;
3. the reference loop, the authors' way: fp32 NCHW, layer4 of the CLIP ResNet computed and thrown
   away, one slice per forward, reflect-pad to 32;
4. every backend of ``ldct_clip.inference.backends`` available here (the bundle's path, through
   ``prepare_network``), at the batch in use: s/slice, share of the floor, ratio to the reference, and
   the relative difference to eager float32.

All paths are timed in the same process, interleaved round by round, best of the rounds: load from other
processes hits them alike, and the ratios hold even on a shared machine (the load average is printed at
start and end). Shipped CT weights where present (random init otherwise; speed does not depend on them).

    python benchmarks/inference.py                          # CPU, batch 2, 512x512, 3 rounds
    python benchmarks/inference.py --rounds 5 --paths eager inductor
    python benchmarks/inference.py --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch.utils.flop_counter import FlopCounterMode

from ldct_clip.inference.backends import available_backends, cpu_description, prepare_network
from ldct_clip.networks import CLIPDenoiser

WEIGHTS = Path(__file__).resolve().parents[1] / "bundles" / "lowdose_ct_denoising" / "models" / "model.pt"


def build_network(device: torch.device) -> CLIPDenoiser:
    torch.manual_seed(0)
    model = CLIPDenoiser().eval()
    if WEIGHTS.is_file():
        state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    return model.to(device)


def network_flops(model: CLIPDenoiser, size: int, device: torch.device) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 1, size, size, device=device))
    return counter.get_total_flops()


def conv_shapes(model: CLIPDenoiser, size: int, device: torch.device) -> collections.Counter:
    """(in, out, kernel, stride, input size) of every convolution one slice runs, with counts."""
    shapes: collections.Counter = collections.Counter()
    hooks = [
        m.register_forward_hook(
            lambda m, args, out: shapes.update(
                [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], tuple(args[0].shape[-2:]))]
            )
        )
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.rand(1, 1, size, size, device=device))
    for hook in hooks:
        hook.remove()
    return shapes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def conv_floor(model, size, batch, rounds, device) -> tuple[list, float, float, float]:
    """Per shape: (shape, count, GFLOP per slice, best GFLOPS); best GFLOPS; conv-only s/slice; the
    network's FLOPs per slice."""
    shapes = conv_shapes(model, size, device)
    cases = []
    for (cin, cout, k, stride, hw), count in shapes.items():
        conv = torch.nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False).to(device).eval()
        x = torch.rand(batch, cin, *hw, device=device)
        if device.type == "cpu":
            conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        out_hw = [(n + 2 * (k // 2) - k) // stride + 1 for n in hw]
        flops = 2 * batch * cout * out_hw[0] * out_hw[1] * cin * k * k
        cases.append([(cin, cout, k, stride, hw), count, conv, x, flops, float("inf")])
    with torch.no_grad():
        for case in cases:
            case[2](case[3])  # warm-up
        for _ in range(rounds):
            for case in cases:
                case[5] = min(case[5], timed(lambda c=case: c[2](c[3]), device))
    rows = [(c[0], c[1], c[4] / batch / 1e9, c[4] / c[5] / 1e9) for c in cases]
    best = max(r[3] for r in rows)
    conv_only = sum(c[1] * c[5] for c in cases) / batch
    return rows, best, conv_only, network_flops(model, size, device)


class ReferenceLoop:
    """The authors' evaluation: fp32 NCHW, one slice per forward, pad to 32, layer4 computed."""

    def __init__(self, model: CLIPDenoiser, device: torch.device) -> None:
        width = model.encoder.width
        full = ModifiedResNet([3, 4, 6, 3], output_dim=width * 16, heads=1, image_size=224, width=width)
        self.layer4 = full.layer4.to(device).eval()
        self.model = model
        model.encoder.register_forward_hook(self._run_layer4)

    def _run_layer4(self, module, args, taps) -> None:
        self.layer4(taps[-1])  # computed and discarded, as the reference's encoder does

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        outputs = []
        with torch.no_grad():
            for x in batch:
                h, w = x.shape[-2:]
                padded = F.pad(x[None], (0, -w % 32, 0, -h % 32), mode="reflect")
                outputs.append(self.model(padded)[..., :h, :w])
        return torch.cat(outputs)


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    cpu = cpu_description()
    return (
        f"CPU {cpu['model_name']} (family {cpu.get('family')}, model {cpu.get('model')}, stepping "
        f"{cpu.get('stepping')}), {cpu['cores']} logical cores, flags: {' '.join(cpu.get('flags', [])) or '-'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="slices per forward of the backends")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--paths", nargs="*", help="backends to time (default: every available one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_start = os.getloadavg()

    print(describe_machine(device))
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.rounds} interleaved rounds (best kept), weights: "
        f"{'shipped CT model.pt' if WEIGHTS.is_file() else 'random init'}"
    )
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)

    model = build_network(device)
    rows, best, conv_only, flops = conv_floor(model, args.size, args.batch, args.rounds, device)
    floor = flops / 1e9 / best
    print(f"\nconvolution shapes of one {args.size}x{args.size} slice (fp32, NHWC on CPU, batch {args.batch})")
    print("| in -> out | kernel/stride | input | count | GFLOP/slice | GFLOPS |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for (cin, cout, k, stride, hw), count, gflop, gflops in sorted(rows, key=lambda r: -r[1] * r[2]):
        print(f"| {cin} -> {cout} | {k}x{k}/{stride} | {hw[0]}x{hw[1]} | {count} | {gflop * count:.2f} | {gflops:.0f} |")
    print(
        f"\nnetwork: {flops / 1e9:.1f} GFLOP/slice; best conv {best:.0f} GFLOPS -> floor {floor:.3f} s/slice; "
        f"conv-only (each layer at its measured speed) {conv_only:.3f} s/slice = {floor / conv_only:.0%} of "
        "the floor",
        flush=True,
    )

    names = args.paths or available_backends(device)
    reference = ReferenceLoop(build_network(device), device)
    batch = torch.rand(args.batch, 1, args.size, args.size, device=device)
    with torch.no_grad():
        expected = build_network(device)(batch)
    paths = {"reference loop (fp32 NCHW, layer4, 1 slice/forward)": reference}
    errors = {}
    for name in names:
        started = time.perf_counter()
        try:
            paths[name] = prepare_network(build_network(device), name, device=device)
            y = paths[name](batch)  # builds: compiles, exports, warms up
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            print(f"  {name}: not usable here ({type(error).__name__}: {str(error).splitlines()[0][:150]})")
            paths.pop(name, None)
            continue
        errors[name] = float((y.cpu() - expected.cpu()).norm() / expected.cpu().norm())
        print(f"  {name}: built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            times[name].append(timed(lambda fn=fn: fn(batch), device) / args.batch)
    load_end = os.getloadavg()
    ref = min(times[next(iter(paths))])
    print(f"\n| path | s/slice (best) | s/slice (median) | share of the floor | vs reference | rel. diff to eager fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, values in times.items():
        best_time = min(values)
        diff = f"{errors[name]:.1e}" if name in errors else "-"
        print(
            f"| {name} | {best_time:.3f} | {statistics.median(values):.3f} | {floor / best_time:.0%} | "
            f"{ref / best_time:.2f}x | {diff} |"
        )
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")


if __name__ == "__main__":
    main()
