"""Prepare the demo weights' training volumes and held-out low-/normal-dose pairs from ../shared/data.

    python data_prep/make_demo_training_data.py [--data ../shared/data] --output /path/to/demo_data

Writes OUTPUT/train/ (normal-dose volumes for ``ldct-clip train --data OUTPUT/train``), OUTPUT/heldout/
(``{name}_low.nii.gz`` + ``{name}_full.nii.gz`` pairs for ``ldct-clip evaluate`` / ``benchmark``) and
OUTPUT/manifest.json. Keep OUTPUT outside the repository: the data must not be committed. See
``demo_data.py`` next to this script for what goes where and why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from demo_data import DICOM_TRAIN_SPACINGS_MM, NIFTI_SPACINGS_MM, prepare_demo_data  # next to this script

from ldct_clip.errors import LdctClipError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data"),
        help="folder with totalseg_example_ct_dicom/ and totalseg_example_ct.nii.gz (default ../shared/data)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder to create (outside the repository)"
    )
    parser.add_argument(
        "--dose", type=float, default=0.25, help="dose of the held-out low-dose volumes (default 0.25)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated noise (default 0)")
    parser.add_argument(
        "--nifti-spacing",
        type=float,
        nargs="+",
        default=list(NIFTI_SPACINGS_MM),
        help="in-plane mm the 3 mm NIfTI volume is resampled to, one training volume each (every other slice "
        "after the first); 0 keeps 3 mm (default 1.0 0.75)",
    )
    parser.add_argument(
        "--dicom-spacing",
        type=float,
        nargs="*",
        default=list(DICOM_TRAIN_SPACINGS_MM),
        help="in-plane mm the DICOM training slices are also resampled to (default 0.75 1.25; none: native only)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="simulation processes (default one per CPU)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        prepare_demo_data(
            args.data,
            args.output,
            overwrite=args.overwrite,
            dose=args.dose,
            seed=args.seed,
            nifti_spacing_mm=args.nifti_spacing,
            dicom_spacings_mm=args.dicom_spacing,
            workers=args.workers,
        )
    except LdctClipError as error:
        print(f"make_demo_training_data: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
