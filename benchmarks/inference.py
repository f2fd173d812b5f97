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
    python benchmarks/inference.py --paths eager --memory-slices 300 --memory-backends eager eager_infer:bf16
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch.utils.flop_counter import FlopCounterMode

from ldct_clip.inference import (
    available_backends,
    choose_backend,
    cpu_description,
    default_batch_size,
    instruction_set_caps,
    prepare_network,
    resolve_amp,
)
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


class ConvFloor:
    """Every convolution shape one slice runs, alone (NHWC on CPU, the batch in use, in ``dtype``): timed
    one round at a time, interleaved with the paths, so that both see the same load."""

    def __init__(
        self, model: CLIPDenoiser, size: int, batch: int, device: torch.device, dtype=torch.float32
    ) -> None:
        self.batch, self.device, self.dtype = batch, device, dtype
        self.label = "fp32" if dtype == torch.float32 else "bf16"
        self.flops = network_flops(model, size, device)
        self.cases = []
        for (cin, cout, k, stride, hw), count in conv_shapes(model, size, device).items():
            conv = torch.nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False).eval()
            conv = conv.to(device=device, dtype=dtype)
            x = torch.rand(batch, cin, *hw, device=device, dtype=dtype)
            if device.type == "cpu":
                conv = conv.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            out_hw = [(n + 2 * (k // 2) - k) // stride + 1 for n in hw]
            flops = 2 * batch * cout * out_hw[0] * out_hw[1] * cin * k * k
            self.cases.append([(cin, cout, k, stride, hw), count, conv, x, flops, float("inf")])
        self.round()  # warm-up

    def round(self) -> None:
        with torch.no_grad():
            for case in self.cases:
                case[5] = min(case[5], timed(lambda c=case: c[2](c[3]), self.device))

    def report(self) -> tuple[float, float]:
        """Print the shapes; return (floor s/slice, conv-only s/slice)."""
        rows = [(c[0], c[1], c[4] / self.batch / 1e9, c[4] / c[5] / 1e9) for c in self.cases]
        best = max(r[3] for r in rows)
        floor = self.flops / 1e9 / best
        conv_only = sum(c[1] * c[5] for c in self.cases) / self.batch
        print(
            f"\nconvolution shapes of one slice ({self.label}, NHWC on CPU, batch {self.batch}, best of the rounds)"
        )
        print("| in -> out | kernel/stride | input | count | GFLOP/slice | GFLOPS |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for (cin, cout, k, stride, hw), count, gflop, gflops in sorted(rows, key=lambda r: -r[1] * r[2]):
            print(
                f"| {cin} -> {cout} | {k}x{k}/{stride} | {hw[0]}x{hw[1]} | {count} | {gflop * count:.2f} | {gflops:.0f} |"
            )
        print(
            f"\n{self.label} network: {self.flops / 1e9:.1f} GFLOP/slice; best conv {best:.0f} GFLOPS -> floor {floor:.3f} "
            f"s/slice; conv-only (each layer at its measured speed) {conv_only:.3f} s/slice = "
            f"{floor / conv_only:.0%} of the floor"
        )
        return floor, conv_only


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


def memory_run(backend: str, slices: int, size: int, batch: int, amp: str) -> None:
    """In this (fresh) process: a ``size`` x ``size`` x ``slices`` float32 volume denoised in place, batch
    after batch, through ``backend``; prints the peak RSS against the volume's size."""
    from ldct_clip.inference import limit_heap_fragmentation

    limit_heap_fragmentation()  # as ldct-clip denoise does
    volume = torch.rand(1, size, size, slices)
    prepared = prepare_network(
        build_network(torch.device("cpu")),
        backend,
        device="cpu",
        amp_dtype=torch.bfloat16 if amp == "bf16" else None,
    )
    start = time.perf_counter()
    for first in range(0, slices, batch):
        x = volume[0, :, :, first : first + batch].permute(2, 0, 1)[:, None].contiguous()
        volume[0, :, :, first : first + batch] = prepared(x)[:, 0].permute(1, 2, 0)
    seconds = (time.perf_counter() - start) / slices
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))
    volume_mb = volume.numel() * 4 / 2**20
    print(
        f"| {backend} {amp} | {slices} | {seconds:.3f} | {volume_mb:.0f} | {peak:.0f} | {peak - volume_mb:.0f} |"
    )


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    cpu = cpu_description()
    caps = instruction_set_caps()
    return (
        f"CPU {cpu['model_name']} (family {cpu.get('family')}, model {cpu.get('model')}, stepping "
        f"{cpu.get('stepping')}), {cpu['cores']} logical cores, flags: {' '.join(cpu.get('flags', [])) or '-'}"
        f"; ATen kernels: {torch.backends.cpu.get_cpu_capability()}"
        + (f"; instruction sets capped: {caps} (an emulated machine type)" if caps else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="slices per forward of the backends")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--paths", nargs="*", help="backends to time (default: every available one)")
    parser.add_argument(
        "--no-bf16", action="store_true", help="no bf16 rows (default: where the CPU flags bf16)"
    )
    parser.add_argument("--memory-slices", type=int, default=0, help="also: peak RSS of a volume this deep")
    parser.add_argument("--memory-backends", nargs="*", default=["eager", "eager_infer"])
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_run(args.memory_worker[0], args.memory_slices, args.size, args.batch, args.memory_worker[1])
        return
    device = torch.device(args.device)
    load_start = os.getloadavg()

    print(describe_machine(device))
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.rounds} interleaved rounds (best kept), weights: "
        f"{'shipped CT model.pt' if WEIGHTS.is_file() else 'random init'}"
    )
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)

    floor_benches = {None: ConvFloor(build_network(device), args.size, args.batch, device)}

    available = available_backends(device)
    names = [(n, None) for n in (args.paths or available)]
    if instruction_set_caps():
        print(
            "  instruction sets capped: onnxruntime and openvino pick their kernels from the CPU itself, so "
            "only the torch backends (oneDNN, ATen) emulate the capped machine here; inductor is left out "
            "under a oneDNN cap (its prepacked convolutions corrupt memory there)"
        )
        names = [(n, amp) for n, amp in names if n not in ("onnxruntime", "openvino")]
    # the default, as `ldct-clip denoise` resolves it here: precision measured (cpu_bf16_is_faster on
    # CPUs), backend measured (choose_backend, cached per machine) among the paths timed, batch as on CLI
    default_amp = resolve_amp("auto", device)
    default_batch = min(args.batch, default_batch_size(device))
    default_backend = choose_backend(
        build_network(device),
        (default_batch, 1, args.size, args.size),
        device,
        amp_dtype=default_amp,
        candidates=[n for n, _ in names if n in available_backends(device, default_amp)],
    )
    if not args.no_bf16 and (
        device.type == "cuda"
        or "avx512_bf16" in cpu_description().get("flags", [])
        or "amx_bf16" in cpu_description().get("flags", [])
    ):
        # bf16 rows where the CPU's flags list bf16, also when capped (to show what the measured choice
        # avoids): the torch backends that run CLIPDenoiser.infer (its output conv stays float32; PSNR
        # cost in benchmarks/README.md)
        names += [(n, torch.bfloat16) for n in ("eager_infer", "inductor") if n in available_backends(device)]
    if (default_backend, default_amp) not in names:
        names.append((default_backend, default_amp))
    if any(amp is not None for _, amp in names) and device.type == "cpu":
        floor_benches[torch.bfloat16] = ConvFloor(
            build_network(device), args.size, args.batch, device, torch.bfloat16
        )
    reference = ReferenceLoop(build_network(device), device)
    batch = torch.rand(args.batch, 1, args.size, args.size, device=device)
    with torch.no_grad():
        expected = build_network(device)(batch)
    paths = {"reference loop (fp32 NCHW, layer4, 1 slice/forward)": reference}
    precision_of = {}
    errors = {}
    default_name = None
    for backend, amp in names:
        name = backend if amp is None else f"{backend} bf16"
        if (backend, amp) == (default_backend, default_amp):
            name = default_name = f"**{name}** (the default here, batch {default_batch})"
        started = time.perf_counter()
        try:
            prepared = prepare_network(build_network(device), backend, device=device, amp_dtype=amp)
            if name == default_name and default_batch < args.batch:
                paths[name] = lambda x, p=prepared: torch.cat([p(c) for c in x.split(default_batch)])
            else:
                paths[name] = prepared
            y = paths[name](batch)  # builds: compiles, exports, warms up
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            print(f"  {name}: not usable here ({type(error).__name__}: {str(error).splitlines()[0][:150]})")
            paths.pop(name, None)
            continue
        precision_of[name] = amp
        errors[name] = float((y.cpu() - expected.cpu()).norm() / expected.cpu().norm())
        print(f"  {name}: built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for floor_bench in floor_benches.values():
            floor_bench.round()
        for name, fn in paths.items():
            times[name].append(timed(lambda fn=fn: fn(batch), device) / args.batch)
    load_end = os.getloadavg()
    floors = {amp: bench.report()[0] for amp, bench in floor_benches.items()}
    ref = min(times[next(iter(paths))])
    print(
        "\n| path | s/slice (best) | s/slice (median) | share of the floor | vs reference | rel. diff to eager fp32 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for amp, floor in floors.items():
        label = "fp32" if amp is None else "bf16"
        print(f"| {label} floor (best {label} conv of our shapes) | {floor:.3f} | | 100% | | |")
    for name, values in times.items():
        best_time = min(values)
        diff = f"{errors[name]:.1e}" if name in errors else "-"
        # a path's share is against the floor of its own precision (bf16 paths: the bf16 floor)
        floor = floors.get(precision_of.get(name), floors[None])
        print(
            f"| {name} | {best_time:.3f} | {statistics.median(values):.3f} | {floor / best_time:.0%} | "
            f"{ref / best_time:.2f}x | {diff} |"
        )
    if default_name in times:
        best_time = min(times[default_name])
        floor = floors.get(default_amp, floors[None])
        print(
            f"\ndefault here: {default_backend}, {'bf16' if default_amp else 'fp32'} (measured choices), "
            f"{floor / best_time:.0%} of its floor, {ref / best_time:.2f}x the reference loop "
            "(targets of issue 13: >= 80 %, >= 1.6x)"
        )
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    if args.memory_slices and device.type == "cpu":
        print(
            f"\nmemory: {args.size}x{args.size}x{args.memory_slices} volume denoised in place, batch {args.batch}, "
            "limit_heap_fragmentation() as ldct-clip denoise; each backend in a fresh process"
        )
        print("| path | slices | s/slice | volume MB | peak RSS MB | peak - volume MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for spec in args.memory_backends:
            backend, _, amp = spec.partition(":")
            command = [
                sys.executable,
                __file__,
                "--memory-worker",
                backend,
                amp or "fp32",
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
                "--memory-slices",
                str(args.memory_slices),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            print(done.stdout.strip() or f"| {spec} | failed: {done.stderr.strip().splitlines()[-1][:120]} |")


if __name__ == "__main__":
    main()
