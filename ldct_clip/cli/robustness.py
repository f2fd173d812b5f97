"""``ldct-clip robustness``: score an image bundle's denoiser on a suite of unseen noises.

Thin layer over :mod:`ldct_clip.apps.robustness_report` (the reference's synthetic test protocol) and
the bundle's pipeline (:class:`ldct_clip.bundles.BundlePipeline`: its network, weights and padding).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ldct_clip.cli.overrides import add_set_option, parse_set_options
from ldct_clip.errors import InputError, WeightsError

WEIGHTS_HELP = (
    "train them with the bundle's configs/train.json (see its docs/README.md), or convert the authors' "
    "CLIPDenoising checkpoint with `ldct-clip import-reference`"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "robustness",
        help="PSNR/SSIM of an image denoiser on a suite of unseen noise types and levels (csv, md, png)",
        description=(
            "Add every noise of a suite (the reference's synthetic test protocol: the generator reset to "
            "seed 0 for every image) to a folder of clean images, denoise with an image bundle's network "
            "and write robustness.csv, robustness.md and robustness.png (noisy input vs denoised)."
        ),
    )
    parser.add_argument(
        "--bundle",
        default="synthetic_denoising",
        help="image bundle folder or name (default: synthetic_denoising)",
    )
    parser.add_argument(
        "--images", type=Path, required=True, help="folder of clean images (e.g. CBSD68, Kodak24, McMaster)"
    )
    parser.add_argument(
        "--weights", type=Path, required=True, help="trained weights of the bundle's network (.pt)"
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="output folder (created; gets the three files)"
    )
    parser.add_argument(
        "--suite",
        default="paper",
        help="noise suite name (default: paper = Gaussian 15/25/50, spatial 40-55, Poisson 2-3.5; also "
        "gaussian, spatial, poisson, ours), from --suites-file when given",
    )
    parser.add_argument(
        "--suites-file",
        type=Path,
        default=None,
        help="JSON file of suites {name: {noise type: [levels]}} (format of configs/noise_suites.json)",
    )
    parser.add_argument(
        "--protocol",
        choices=("srgb", "synthetic"),
        default=None,
        help="metric protocol (default: the bundle's metric_protocol)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--max-images", type=int, default=None, help="use the first N images only")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ldct_clip.apps.robustness_report import evaluate_robustness, write_robustness_report
    from ldct_clip.bundles import BundlePipeline
    from ldct_clip.io.images import list_images
    from ldct_clip.io.staging import check_output_path
    from ldct_clip.transforms.noise import load_noise_suites

    if args.max_images is not None and args.max_images < 1:
        raise InputError(f"--max-images {args.max_images} must be >= 1")
    suites = load_noise_suites(args.suites_file)
    if args.suite not in suites:
        raise InputError(f"unknown noise suite {args.suite!r}; choose one of {', '.join(suites)}")
    if not args.weights.is_file():
        raise WeightsError(f"weights file {args.weights} does not exist; {WEIGHTS_HELP}")
    overrides = {
        "ckpt_path": str(args.weights.expanduser().resolve()),
        "device": args.device,
        "amp": "fp32",  # the reference protocol's numbers
        "progress": False,
        "jobs": [],
        **parse_set_options(args.set),
    }
    pipeline = BundlePipeline(args.bundle, overrides=overrides)
    if pipeline.task == "ct":
        raise InputError(
            f"bundle {args.bundle} denoises CT, not images: use --bundle synthetic_denoising or srgb_denoising"
        )
    images = list_images(args.images)[: args.max_images]
    # refuse before the (long) evaluation, not after it
    check_output_path(args.images, args.output, args.overwrite)
    metadata = pipeline.metadata
    protocol = args.protocol or metadata.get("metric_protocol", pipeline.task)
    channels = int(metadata["network_data_format"]["inputs"]["image"]["num_channels"])
    pipeline.load_weights()
    denoise = pipeline.denoiser()

    start = time.perf_counter()
    rows = evaluate_robustness(
        lambda batch: denoise(batch[0])[None],  # the pipeline pads to a multiple of 32 and crops back itself
        images,
        suites[args.suite],
        protocol=protocol,
        channels=channels,
        multiple=1,
        progress=not args.no_progress,
    )
    title = f"Robustness to unseen noise: {metadata.get('name', args.bundle)}, suite {args.suite!r}"
    paths = write_robustness_report(rows, args.output, title=title, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    print(
        f"scored {len(images)} images x {len(rows) // len(images)} noise settings in {seconds:.1f} s -> {paths['csv'].parent}"
    )
    print(paths["markdown"].read_text())
    return 0
