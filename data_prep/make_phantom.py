"""Write the synthetic anthropomorphic CT phantom as a DICOM series and/or NIfTI file.

    python data_prep/make_phantom.py --dicom out/phantom_dicom --nifti out/phantom.nii.gz --size 256 --slices 16

See ``ldct_clip.data.phantom`` for the anatomy and HU values.
"""

from __future__ import annotations

import argparse
import sys

from ldct_clip.data.phantom import make_phantom, write_phantom_dicom
from ldct_clip.errors import LdctClipError
from ldct_clip.io import save_nifti


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom", help="folder to write the CT series into")
    parser.add_argument("--nifti", help="NIfTI file (.nii / .nii.gz) to write")
    parser.add_argument("--size", type=int, default=256, help="in-plane matrix (default 256)")
    parser.add_argument("--slices", type=int, default=8, help="number of slices (default 8)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 3.0), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0, help="anatomical variation (default 0)")
    parser.add_argument("--no-fov-padding", action="store_true", help="no -3024 HU outside the circular FOV")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    if not args.dicom and not args.nifti:
        parser.error("give --dicom and/or --nifti")
    volume = make_phantom(args.size, args.slices, args.spacing, args.seed, not args.no_fov_padding)
    try:
        if args.dicom:
            write_phantom_dicom(
                args.dicom,
                seed=args.seed,
                fov_padding=not args.no_fov_padding,
                overwrite=args.overwrite,
                volume=volume,
            )
            print(f"wrote {args.slices} DICOM slices to {args.dicom}")
        if args.nifti:
            save_nifti(volume, args.nifti, overwrite=args.overwrite)
            print(f"wrote {args.nifti}")
    except LdctClipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
