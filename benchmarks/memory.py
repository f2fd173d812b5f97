"""Working memory of one forward pass per batch size and slice size: where ``ldct_clip.inference.memory``'s
``BYTES_PER_PIXEL`` and ``FIXED_BYTES`` come from, and whether they still hold on this machine.

Each measurement runs in a fresh process (peak RSS only grows): the paper's CT network (random weights:
memory does not depend on their values) is built, one warm-up slice of 32x32 runs, then one forward of
``batch`` slices of ``size`` x ``size`` in the default CPU configuration (float32, NHWC). The table shows the
peak RSS increase of that forward, the fitted per-pixel slope and intercept, and what
``ldct_clip.inference.memory`` assumes.

    python benchmarks/memory.py                   # batches 1, 2, 4 at 256 and 512
    python benchmarks/memory.py --sizes 512 768
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, resource, sys, torch
from ldct_clip.bundles import bundle_network_def
from ldct_clip.inference import SlicePredictor
batch, size = int(sys.argv[1]), int(sys.argv[2])
net = bundle_network_def().eval()
predictor = SlicePredictor(net, channels_last=True)
with torch.no_grad():
    predictor(torch.rand(1, 1, 32, 32))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    predictor(torch.rand(batch, 1, size, size))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kb": base, "peak_kb": peak}))
"""


def measure(batch: int, size: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(batch), str(size)], capture_output=True, text=True, check=True
    )
    values = json.loads(done.stdout.strip().splitlines()[-1])
    return {"batch": batch, "size": size, "delta_mb": (values["peak_kb"] - values["base_kb"]) / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args(argv)
    from ldct_clip.inference.memory import BYTES_PER_PIXEL, FIXED_BYTES, working_set_bytes

    rows = [measure(b, s) for s in args.sizes for b in args.batches]
    pixels = np.array([r["batch"] * r["size"] ** 2 for r in rows], dtype=float)
    delta = np.array([r["delta_mb"] * 2**20 for r in rows])
    slope, intercept = np.polyfit(pixels, delta, 1)
    print(f"CPU: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'batch':>6}{'size':>6}{'measured MB':>13}{'assumed MB':>12}")
    for r in rows:
        assumed = working_set_bytes(r["batch"], r["size"], r["size"]) / 2**20
        print(f"{r['batch']:>6}{r['size']:>6}{r['delta_mb']:>13.0f}{assumed:>12.0f}")
    print(f"fit: {slope:.0f} bytes/pixel + {intercept / 2**20:.0f} MB")
    print(f"ldct_clip.inference.memory: {BYTES_PER_PIXEL} bytes/pixel + {FIXED_BYTES / 2**20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
