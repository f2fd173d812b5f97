"""``ldct-clip evaluate``: score a trained denoiser on low-/normal-dose pairs under a metric protocol.

For every patient of ``--pairs`` the low-dose volume is denoised slice by slice by the CT bundle's
pipeline (its ``inference.json`` through :class:`ldct_clip.bundles.BundlePipeline`: reflect-padding to a
multiple of 32 as the reference evaluation, float32 unless ``--amp``), then the low-dose input and the
denoised output are scored against the normal-dose volume, slice by slice, under the protocol: the pairs
loop of ``ldct_clip.evaluation``. The model is the bundle's shipped weights unless ``--weights`` names
others. Output folder: ``metrics.csv``
(one row per slice), ``summary.json`` (means over all slices and per patient) and ``example.png`` (one
slice: low dose, denoised, normal dose, upright whatever the input layout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldct_clip.cli.overrides import add_model_options, model_overrides
from ldct_clip.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a trained model on low-/normal-dose pairs (PSNR, SSIM, RMSE under a protocol)",
        description=(
            "Denoise the low-dose volumes of a pairs folder and score input and output against normal "
            "dose. Layouts: {patient}/low/ + {patient}/full/ (DICOM series or one NIfTI each), "
            "{patient}_low.nii.gz + {patient}_full.nii.gz, or Mayo {patient}_{slice}_input|target.npy."
        ),
    )
    parser.add_argument("--pairs", required=True, metavar="DIR", help="folder of low-/normal-dose pairs")
    parser.add_argument(
        "--protocol",
        choices=["paper", "redcnn", "ldctbench"],
        default="paper",
        help="metric protocol (default: paper, HU [-1024, 3072], range 4096)",
    )
    parser.add_argument(
        "--anatomy",
        choices=["chest", "abdomen", "head"],
        default="abdomen",
        help="display window of the ldctbench protocol (default abdomen)",
    )
    parser.add_argument(
        "--output", default="evaluation", metavar="DIR", help="output folder (default ./evaluation)"
    )
    parser.add_argument(
        "--amp", action="store_true", help="mixed precision (default float32, as the reference)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(
        parser,
        weights_help="trained model (model.pt, best.pt...); default: the CT bundle's shipped models/model.pt",
        bundle_help="CT bundle folder or shipped bundle name (default: lowdose_ct_denoising)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ldct_clip.bundles import DEFAULT_CT_BUNDLE, BundlePipeline
    from ldct_clip.data.layouts import find_pairs
    from ldct_clip.evaluation import MetricTable, get_protocol, plot_slices, save_figure, score_pairs
    from ldct_clip.io.staging import check_output_path, staged_output

    pairs_dir = Path(args.pairs).expanduser()
    if not pairs_dir.is_dir():
        raise InputError(
            f"--pairs {args.pairs!r} is not a folder: give the folder with the low-/normal-dose pairs"
        )
    overrides = {
        "amp": "on" if args.amp else "fp32",
        "progress": False,
        "inplace": False,  # the low-dose volume is scored too
        "jobs": [],
        **model_overrides(args),
    }
    protocol = get_protocol(args.protocol, args.anatomy)  # a bad protocol fails before any work
    output = check_output_path(pairs_dir, args.output, args.overwrite)
    pairs = find_pairs(pairs_dir)
    pipeline = BundlePipeline(args.bundle or DEFAULT_CT_BUNDLE, overrides=overrides)
    weights = Path(pipeline.load_weights().load_path)
    denoise = pipeline.denoiser()

    table = MetricTable(protocol.name)
    example = None
    progress = tqdm(pairs, desc="patients", unit="patient", disable=args.no_progress)
    for record in score_pairs(progress, denoise, (protocol,)):
        table.add_batch(record.patient, record.slice_numbers, record.scores[protocol.name])
        if example is None:
            mid = len(record.indices) // 2
            shown = {"low dose": "low", "denoised": "denoised", "normal dose": "full"}
            example = plot_slices(
                {title: record.display(which, mid) for title, which in shown.items()},
                protocol.display_window,
                title=f"patient {record.patient}, slice {record.slice_numbers[mid]}",
            )
    summary = table.summary()
    summary.update({"weights": str(weights.resolve()), "pairs": str(pairs_dir.resolve())})
    with staged_output(output, overwrite=args.overwrite, is_dir=True) as tmp:
        table.write_csv(tmp / "metrics.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        save_figure(example, tmp / "example.png")
    print(table.format_table())
    print(f"wrote {output / 'metrics.csv'}, {output / 'summary.json'} and {output / 'example.png'}")
    return 0
