"""``ldct-clip demo``: the first run, on built-in data; see :func:`ldct_clip.demo.run_demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from ldct_clip.demo import DEFAULT_DEMO_OUTPUT, DEMO_DOSE, DEMO_SIZE, DEMO_SLICES

    parser = subparsers.add_parser(
        "demo",
        help="denoise a built-in sample low-dose series and show the result (no data needed)",
        description=(
            f"Make a normal-dose CT series from the built-in phantom ({DEMO_SIZE}x{DEMO_SIZE}, {DEMO_SLICES} "
            f"slices), simulate dose {DEMO_DOSE:g} of it, denoise it with the bundled weights, and write the "
            "three DICOM series, NIfTI volumes, comparison.png and metrics.json (PSNR/SSIM/RMSE, noise) to the "
            "output folder."
        ),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_DEMO_OUTPUT,
        help=f"output folder, created (default: ./{DEFAULT_DEMO_OUTPUT})",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="model weights (ldct-clip checkpoint); default the bundle's models/model.pt",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (GPU if there is one), cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # looked up at call time, so tests can shrink the demo through ldct_clip.demo.run_demo
    from ldct_clip import demo

    result = demo.run_demo(
        args.output,
        weights=args.weights,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(result.summary())
    return 0
