"""``ldct-clip demo`` speed: seconds per stage with an RN50-sized network (target: under 2 minutes on 2 CPU cores).

The network is ``CLIPDenoiser()`` (RN50 encoder, random weights: speed does not depend on the values),
saved with ``save_checkpoint`` and passed as the demo's weights; the other settings are the demo's
defaults. The shipped weights may be fp16 on disk; they are loaded as float32, so the timing is the same.
Python start-up and imports (10-15 s on a busy 2-core machine) come on top of "total".

    python benchmarks/demo.py                  # the demo's default size, CPU
    python benchmarks/demo.py --size 256 --slices 8 --device cuda
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from ldct_clip.apps.demo import DEMO_SIZE, DEMO_SLICES, run_demo
from ldct_clip.networks import CLIPDenoiser, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=DEMO_SIZE)
    parser.add_argument("--slices", type=int, default=DEMO_SLICES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        weights = Path(scratch) / "rn50_random.pt"
        torch.manual_seed(0)
        save_checkpoint(weights, CLIPDenoiser())
        rows = []
        for repeat in range(args.repeats):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            result = run_demo(
                Path(scratch) / f"demo{repeat}",
                weights=weights,
                device=args.device,
                progress=False,
                size=args.size,
                slices=args.slices,
            )
            wall = time.perf_counter() - start
            rows.append((load, wall, result.metrics["seconds"]))

    stages = list(rows[0][2])
    print(
        f"ldct-clip demo, {args.size}x{args.size}x{args.slices}, RN50-sized random network, {args.device}, "
        f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}"
    )
    print("| run | load avg | " + " | ".join(stages) + " | wall (s) |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in stages) + " | ---: |")
    for i, (load, wall, seconds) in enumerate(rows):
        print(f"| {i} | {load:.1f} | " + " | ".join(f"{seconds[s]:.1f}" for s in stages) + f" | {wall:.1f} |")


if __name__ == "__main__":
    main()
