"""``ldct-clip benchmark``: our model and classical baselines on low-/normal-dose pairs, with a report.

Argument checking and wiring only: the pairs come from ``find_pairs`` (the layout ``ldct-clip evaluate
--pairs`` reads), the measurements from ``ldct_clip.apps.benchmark_report.run_benchmark``, the files from
``write_benchmark_report``. The model is the bundle's shipped weights unless ``--weights`` names others.
The output folder appears complete or not at all.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ldct_clip.cli.overrides import add_model_options, model_overrides
from ldct_clip.errors import InputError, OutputError, WeightsError

METHODS_HELP = "comma-separated: clip (our model), nlm, tv, bm3d (needs `pip install bm3d`)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="compare the model with classical denoisers (NLM, TV, BM3D) on low-/normal-dose pairs",
        description=(
            "Run our model and classical baselines on low-/normal-dose CT pairs and write report.md (PSNR, "
            "SSIM, RMSE, noise std, seconds per slice), benchmark.csv, summary.json and figures."
        ),
    )
    parser.add_argument(
        "pairs",
        type=Path,
        help="pairs folder, as for `ldct-clip evaluate --pairs`: {patient}/low/ + {patient}/full/ (DICOM series "
        "or one NIfTI each), {patient}_low.nii.gz + {patient}_full.nii.gz, or Mayo {patient}_{slice}_input|target.npy",
    )
    parser.add_argument("--methods", default="clip,nlm,tv", help=f"{METHODS_HELP} (default: clip,nlm,tv)")
    parser.add_argument(
        "--protocol",
        default="paper",
        choices=("paper", "redcnn", "ldctbench"),
        help="metric protocol of ldct_clip.evaluation (default: paper)",
    )
    parser.add_argument(
        "--anatomy",
        default="abdomen",
        choices=("chest", "abdomen", "head"),
        help="window of the ldctbench protocol (default: abdomen)",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to create for the report")
    parser.add_argument(
        "--max-slices",
        type=int,
        default=None,
        help="at most N slices per patient, evenly spaced (default: all)",
    )
    parser.add_argument(
        "--noise-estimator",
        default="flat",
        choices=("flat", "wavelet"),
        help="how the baselines estimate each slice's noise: flat (std in the flattest windows, right for "
        "correlated CT noise; default) or wavelet (scikit-image estimate_sigma, right for white noise)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(
        parser,
        weights_help="model checkpoint (.pt) for clip; default: the CT bundle's shipped models/model.pt",
        bundle_help="CT bundle folder or shipped bundle name (default: lowdose_ct_denoising)",
    )
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> list[str]:
    from ldct_clip.apps.benchmark_report import parse_methods
    from ldct_clip.baselines import get_baseline
    from ldct_clip.io.staging import check_output_path

    methods = parse_methods(args.methods)
    for method in methods:
        if method != "clip":
            get_baseline(method, args.noise_estimator)  # bm3d without its package fails here, before any work
    if "clip" in methods:
        if args.weights is not None and not args.weights.is_file():
            raise WeightsError(f"weights file {args.weights} does not exist; check the path")
    elif args.weights is not None:
        print("ldct-clip benchmark: note: --weights is unused: clip is not among --methods", file=sys.stderr)
    if args.max_slices is not None and args.max_slices < 1:
        raise InputError(f"--max-slices {args.max_slices} must be at least 1")
    if not args.pairs.is_dir():
        raise InputError(f"pairs folder {args.pairs} does not exist or is not a folder")
    if args.output.exists() and not args.overwrite:
        raise OutputError(f"output folder {args.output} already exists: choose another or pass --overwrite")
    # Refused before any work: the output must neither be, contain, nor lie inside the pairs folder.
    check_output_path(args.pairs, args.output, args.overwrite)
    return methods


def run(args: argparse.Namespace) -> int:
    from ldct_clip.apps.benchmark_report import run_benchmark, write_benchmark_report
    from ldct_clip.bundles import DEFAULT_CT_BUNDLE, BundlePipeline
    from ldct_clip.data.layouts import find_pairs
    from ldct_clip.io.staging import staged_output

    methods = _check_args(args)
    pairs = find_pairs(args.pairs)
    denoise = None
    if "clip" in methods:
        overrides = {"progress": False, "inplace": False, "jobs": [], **model_overrides(args)}
        pipeline = BundlePipeline(args.bundle or DEFAULT_CT_BUNDLE, overrides=overrides)
        pipeline.load_weights()
        denoise = pipeline.denoiser()

    result = run_benchmark(
        pairs,
        methods,
        protocol=args.protocol,
        denoise=denoise,
        max_slices=args.max_slices,
        progress=not args.no_progress,
        n_patients=len(pairs),
        noise_estimator=args.noise_estimator,
        anatomy=args.anatomy,
    )
    if denoise is not None and getattr(pipeline.get("predictor"), "self_ensemble", False):
        result.descriptions["clip"] += (
            "; self-ensemble: the mean over each slice's 8 rotations and mirror images (--self-ensemble)"
        )
    command = "ldct-clip " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    with staged_output(args.output, overwrite=args.overwrite, is_dir=True) as staging:
        write_benchmark_report(result, staging, source=str(args.pairs), command=command)
    _print_table(result)
    print(f"report: {args.output / 'report.md'}")
    return 0


def _print_table(result) -> None:
    import math

    from ldct_clip.apps.benchmark_report import LOW_DOSE, METHOD_LABELS

    def cell(value: float, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if math.isfinite(value) else f"{'-':>{width}}"

    summary = result.summary()
    print(f"{'method':<16}{'PSNR':>9}{'SSIM':>9}{'RMSE HU':>10}{'noise HU':>10}{'s/slice':>9}")
    for method in (LOW_DOSE, *result.methods):
        s = summary[method]
        print(
            f"{METHOD_LABELS.get(method, method):<16}{cell(s['psnr'], 9, 2)}{cell(s['ssim'], 9, 4)}"
            f"{cell(s['rmse_hu'], 10, 1)}{cell(s['noise_std_hu'], 10, 1)}{cell(s['seconds'], 9, 3)}"
        )
