"""``ldct-clip simulate``: a normal-dose CT series or volume in, a simulated lower-dose twin out.

Projection-domain noise insertion (``ldct_clip.simulation``); the outputs are laid out like those of
``ldct-clip denoise`` (``ldct_clip.transforms.io.plan_outputs``): a derived DICOM series for a DICOM
input, NIfTI otherwise, or both.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import ldct_clip
from ldct_clip.errors import InputError
from ldct_clip.simulation import (
    DEFAULT_ELECTRONIC_NOISE,
    DEFAULT_N_VIEWS,
    DEFAULT_PHOTONS,
    FILTERS,
    REFERENCE_THICKNESS,
)

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
        "--filter", choices=FILTERS, default="ramp", help="FBP filter of the noise (default: ramp)"
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
    from ldct_clip.transforms.io import NIFTI_NAME as DENOISE_NIFTI_NAME
    from ldct_clip.transforms.io import plan_outputs

    targets = plan_outputs(args.output, args.format, source_kind)
    if "nifti" in targets and targets["nifti"].name == DENOISE_NIFTI_NAME and targets["nifti"] != args.output:
        targets["nifti"] = targets["nifti"].with_name(NIFTI_NAME)
    return targets


def _slice_thickness(volume) -> float:
    """The DICOM SliceThickness of the source series, else the spacing between slices."""
    meta = getattr(volume, "meta", {})
    if meta.get("source_kind") == "dicom":
        from ldct_clip.io.dicom_series import select_series

        try:
            series = select_series(meta["source_path"], meta.get("series_uid") or None, allow_non_ct=True)
            thickness = float(series.headers[0].dataset.get("SliceThickness") or 0)
        except (InputError, TypeError, ValueError):
            thickness = 0.0
        if thickness > 0:
            return thickness
    pixdim = getattr(volume, "pixdim", None)
    if pixdim is not None and len(pixdim) > 2 and float(pixdim[2]) > 0:
        return float(pixdim[2])
    return REFERENCE_THICKNESS


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


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ldct_clip.io import check_output_path, load_ct, save_dicom_series, save_nifti
    from ldct_clip.simulation import simulate_low_dose

    _check_args(args)
    volume = load_ct(args.input, series_uid=args.series_uid)
    targets = _targets(args, str(volume.meta.get("source_kind", "")))
    # Every target is checked before the (long) simulation: a refusal costs nothing and writes nothing.
    for target in targets.values():
        check_output_path(args.input, target, args.overwrite)
    spacing = float(np.mean(np.asarray(volume.pixdim[:2], dtype=np.float64)))
    thickness = args.slice_thickness or _slice_thickness(volume)
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

    if "dicom" in targets:
        save_dicom_series(
            low,
            volume.meta["source_path"],
            targets["dicom"],
            overwrite=args.overwrite,
            description_suffix=f" [simulated {args.dose:g} dose]",
            derivation=(
                f"Simulated {args.dose:g} dose (projection-domain noise insertion, {photons:.3g} photons, "
                f"seed {args.seed}) by ldct-clip {ldct_clip.__version__} simulate"
            ),
        )
    if "nifti" in targets:
        targets["nifti"].parent.mkdir(parents=True, exist_ok=True)
        save_nifti(low, targets["nifti"], overwrite=args.overwrite)
    n_slices = int(volume.shape[-1])
    where = ", ".join(str(path) for path in targets.values())
    print(
        f"simulated dose {args.dose:g} ({photons:.3g} photons, {thickness:g} mm slices) on {n_slices} slices "
        f"in {seconds:.1f} s -> {where}"
    )
    return 0
