"""``ldct-clip simulate``: a normal-dose CT series or volume in, a simulated lower-dose twin out.

Projection-domain noise insertion (``ldct_clip.simulation``); the outputs are laid out like those of
``ldct-clip denoise`` (``ldct_clip.io.jobs.plan_outputs``): a derived DICOM series for a DICOM input,
NIfTI otherwise, or both in one folder; each staged, published whole with its manifest, and checked
(writable, enough space, replaceable) before the simulation starts.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import ldct_clip
from ldct_clip.conventions import DEFAULT_ELECTRONIC_NOISE, DEFAULT_N_VIEWS, DEFAULT_PHOTONS, FBP_FILTERS
from ldct_clip.errors import InputError

#: File name of the NIfTI output when the output path is a folder.
NIFTI_NAME = "simulated.nii.gz"
#: Diameter of the calibration water cylinder for ``--target-noise-hu`` (a typical abdomen).
CALIBRATION_DIAMETER_MM = 300.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="simulate a lower-dose scan of a normal-dose CT series or volume (projection-domain noise)",
        description=(
            "Simulate a lower-dose CT scan: the extra quantum noise of a lower dose (Poisson photon noise plus "
            "electronic noise) is inserted in the projections of each slice and reconstructed by filtered "
            "back-projection onto the normal-dose image; anatomy is untouched. Writes a derived DICOM series "
            "(DICOM input) and/or NIfTI."
        ),
    )
    parser.add_argument(
        "input", type=Path, help="normal-dose DICOM series folder or file, NIfTI, or other ITK volume"
    )
    parser.add_argument(
        "output", type=Path, help="output folder (DICOM or both), or a .nii.gz file for --format nifti"
    )
    parser.add_argument(
        "--dose",
        type=float,
        default=0.25,
        help="dose fraction of the input, in (0, 1] (default: 0.25, quarter dose)",
    )
    level = parser.add_mutually_exclusive_group()
    level.add_argument(
        "--photons",
        type=float,
        default=None,
        help=f"full-dose photons per view on 1 mm of detector, 3 mm slice, 1000 views (default: {DEFAULT_PHOTONS:g}, "
        "about 20 HU added in a 300 mm water cylinder at quarter dose on 0.7 mm pixels)",
    )
    level.add_argument(
        "--target-noise-hu",
        type=float,
        default=None,
        help="calibrate the photons so that --dose adds this noise std (HU) in the centre of a 300 mm water "
        "cylinder at the input's pixel size and slice thickness",
    )
    parser.add_argument(
        "--electronic-noise",
        type=float,
        default=DEFAULT_ELECTRONIC_NOISE,
        help=f"electronic noise std in counts (default: {DEFAULT_ELECTRONIC_NOISE:g})",
    )
    parser.add_argument(
        "--views",
        type=int,
        default=DEFAULT_N_VIEWS,
        help=f"projection angles over 180 degrees (default: {DEFAULT_N_VIEWS})",
    )
    parser.add_argument(
        "--slice-thickness",
        type=float,
        default=None,
        help="slice thickness in mm (default: the DICOM SliceThickness, else the slice spacing)",
    )
    parser.add_argument(
        "--filter", choices=FBP_FILTERS, default="ramp", help="FBP filter of the noise (default: ramp)"
    )
    parser.add_argument(
        "--no-modulation",
        action="store_true",
        help="no tube current modulation: every view gets the same photons",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--format",
        choices=("auto", "dicom", "nifti", "both"),
        default="auto",
        help="output format; auto: DICOM for DICOM input, NIfTI otherwise (default: auto)",
    )
    parser.add_argument(
        "--series-uid", default=None, help="SeriesInstanceUID to take when INPUT holds several"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: one per CPU, at most one per slice)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not args.input.exists():
        raise InputError(f"input {args.input} does not exist")
    if not 0.0 < args.dose <= 1.0:
        raise InputError(f"--dose {args.dose} must be a fraction of the input's dose in (0, 1], e.g. 0.25")
    if args.photons is not None and not (math.isfinite(args.photons) and args.photons > 0):
        raise InputError(f"--photons {args.photons} must be a positive photon count")
    if args.target_noise_hu is not None:
        if not (math.isfinite(args.target_noise_hu) and args.target_noise_hu > 0):
            raise InputError(f"--target-noise-hu {args.target_noise_hu} must be a positive noise std in HU")
        if args.dose == 1.0:
            raise InputError("--target-noise-hu needs --dose below 1: the full dose adds no noise")
    if args.views < 2:
        raise InputError(f"--views {args.views} must be at least 2")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers} must be >= 1")
    if args.slice_thickness is not None and not args.slice_thickness > 0:
        raise InputError(f"--slice-thickness {args.slice_thickness} must be a positive thickness in mm")


def _targets(args: argparse.Namespace, source_kind: str) -> dict[str, Path]:
    from ldct_clip.io.jobs import NIFTI_NAME as DENOISE_NIFTI_NAME
    from ldct_clip.io.jobs import plan_outputs

    targets = plan_outputs(args.output, args.format, source_kind)
    if "nifti" in targets and targets["nifti"].name == DENOISE_NIFTI_NAME and targets["nifti"] != args.output:
        targets["nifti"] = targets["nifti"].with_name(NIFTI_NAME)
    return targets


def _photons(args: argparse.Namespace, volume, spacing: float, thickness: float) -> float:
    if args.photons is not None:
        return args.photons
    if args.target_noise_hu is None:
        return DEFAULT_PHOTONS
    from ldct_clip.simulation import calibrate_photon_count

    size = int(max(volume.shape[-3:-1]))
    # The calibration cylinder must fit the inscribed circle of the input's field of view.
    diameter = min(CALIBRATION_DIAMETER_MM, 0.95 * size * spacing)
    return calibrate_photon_count(
        args.target_noise_hu,
        dose=args.dose,
        size=size,
        spacing=spacing,
        diameter_mm=diameter,
        electronic_noise=args.electronic_noise,
        n_views=args.views,
        slice_thickness=thickness,
        filter_name=args.filter,
    )


def _needed_bytes(targets: dict[str, Path], volume) -> dict[str, int]:
    from ldct_clip.io.preflight import dicom_series_bytes, nifti_bytes

    columns, rows, slices = (int(n) for n in volume.shape[-3:])
    sizes = {
        "dicom": dicom_series_bytes(slices, rows, columns),
        "nifti": nifti_bytes((columns, rows, slices)),
    }
    return {kind: sizes[kind] for kind in targets}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ldct_clip.io import Provenance, install_signal_handlers, load_ct, save_dicom_series, save_nifti
    from ldct_clip.io.dicom_series import select_series
    from ldct_clip.io.load import sniff_format
    from ldct_clip.io.manifest import default_command
    from ldct_clip.io.preflight import check_output, check_readable
    from ldct_clip.io.staging import staged_output
    from ldct_clip.simulation import simulate_low_dose, slice_thickness

    install_signal_handlers()  # SIGTERM cleans up like Ctrl-C
    _check_args(args)
    check_readable(args.input)
    # Each DICOM header is read once: the series found here is what is loaded and what the output derives from.
    series = None
    if sniff_format(args.input) == "dicom":
        # a folder holding only series ldct-clip denoised is read as given (simulate has no --include-derived)
        series = select_series(args.input, args.series_uid, include_derived=None)
    volume = load_ct(series if series is not None else args.input, series_uid=args.series_uid)
    if volume.meta.get("skipped"):
        print(f"{args.input}: {volume.meta['skipped']}")
    targets = _targets(args, str(volume.meta.get("source_kind", "")))
    needed = _needed_bytes(targets, volume)
    # Every target is checked before the (long) simulation: a refusal costs nothing and writes nothing.
    if len(targets) > 1:  # both formats: one folder, written as a whole
        check_output(args.input, args.output, args.overwrite, sum(needed.values()), is_dir=True)
    else:
        for kind, target in targets.items():
            check_output(args.input, target, args.overwrite, needed[kind], is_dir=kind == "dicom")
    spacing = float(np.mean(np.asarray(volume.pixdim[:2], dtype=np.float64)))
    thickness = args.slice_thickness or slice_thickness(volume, series)
    photons = _photons(args, volume, spacing, thickness)

    start = time.perf_counter()
    low = simulate_low_dose(
        volume,
        dose=args.dose,
        photons=photons,
        electronic_noise=args.electronic_noise,
        n_views=args.views,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
        slice_thickness=thickness,
        filter_name=args.filter,
        modulation=not args.no_modulation,
    )
    seconds = time.perf_counter() - start

    command = default_command()
    provenance = Provenance(task=f"simulated {args.dose:g} dose", command=command)
    derivation = (
        f"Simulated {args.dose:g} dose (projection-domain noise insertion, {photons:.3g} photons, "
        f"seed {args.seed}) by ldct-clip {ldct_clip.__version__} simulate"
    )

    def write(dicom: Path | None, nifti: Path | None, overwrite: bool) -> None:
        if dicom is not None:
            save_dicom_series(
                low, series, dicom, overwrite=overwrite, derivation=derivation, provenance=provenance
            )
        if nifti is not None:
            save_nifti(low, nifti, overwrite=overwrite, provenance=provenance)

    if len(targets) > 1:
        with staged_output(
            args.output, overwrite=args.overwrite, is_dir=True, provenance=provenance, command=command
        ) as folder:
            write(folder / targets["dicom"].name, folder / targets["nifti"].name, False)
    else:
        write(targets.get("dicom"), targets.get("nifti"), args.overwrite)
    n_slices = int(volume.shape[-1])
    where = ", ".join(str(path) for path in targets.values())
    print(
        f"simulated dose {args.dose:g} ({photons:.3g} photons, {thickness:g} mm slices) on {n_slices} slices "
        f"in {seconds:.1f} s -> {where}"
    )
    return 0
