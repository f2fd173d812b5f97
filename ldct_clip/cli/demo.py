"""``ldct-clip demo``: the first run, on built-in data; see :func:`ldct_clip.apps.demo.run_demo`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ldct_clip.cli.overrides import add_set_option, parse_set_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="denoise a built-in sample low-dose series and show the result (no data needed)",
        description=(
            "Make a normal-dose CT series from the built-in abdomen phantom, simulate a quarter-dose scan of "
            "it, denoise it with the bundled weights, and write the three DICOM series, NIfTI volumes, "
            "comparison.png and metrics.json (PSNR/SSIM/RMSE under the redcnn and paper protocols, noise) to "
            "the output folder."
        ),
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder, created (default: ./ldct-clip-demo)"
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
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo's output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_set_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # looked up at call time, so tests can shrink the demo through ldct_clip.apps.demo.run_demo
    from ldct_clip.apps import demo

    result = demo.run_demo(
        demo.DEFAULT_DEMO_OUTPUT if args.output is None else args.output,
        weights=args.weights,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        overrides=parse_set_options(args.set),
        command=shlex.join(["ldct-clip", *sys.argv[1:]]),
    )
    print(result.summary())
    return 0
