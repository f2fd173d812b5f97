"""Check load_ct and the derived-series writer on a real clinical DICOM series (not part of the test suite).

    python benchmarks/check_clinical_dicom.py [SERIES_FOLDER]

Default folder: ../shared/data/totalseg_example_ct_dicom (JPEG 2000, not available in CI). Prints the
geometry and HU statistics, the agreement with SimpleITK/GDCM, the derived-series round trip and what
dciodvfy says about a source slice and a derived slice.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ldct_clip.io import find_ct_series, load_ct, save_dicom_series

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_example_ct_dicom"


def _dciodvfy(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        return ["(dciodvfy not installed)"]
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _sitk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).T.astype(np.float64), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT))
    folder = Path(parser.parse_args(argv).folder)
    if not folder.is_dir():
        print(f"{folder} not found", file=sys.stderr)
        return 2
    rows: list[tuple[str, str]] = []
    series = find_ct_series(folder)
    rows.append(("series", "; ".join(s.summary() for s in series)))
    first = pydicom.dcmread(series[0].files[0], stop_before_pixels=True)
    rows.append(("transfer syntax", first.file_meta.TransferSyntaxUID.name))
    rows.append(("rescale", f"slope {first.RescaleSlope}, intercept {first.RescaleIntercept}"))
    rows.append(("slice thickness", f"{first.SliceThickness} mm"))
    start = time.perf_counter()
    volume = load_ct(folder)
    rows.append(("load_ct time", f"{time.perf_counter() - start:.2f} s"))
    v = volume[0].numpy()
    affine = volume.affine.numpy()
    rows.append(("shape (X, Y, Z)", str(tuple(v.shape))))
    rows.append(("voxel size (mm)", str(np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist())))
    rows.append(("affine (RAS)", np.array2string(affine, precision=4, suppress_small=True).replace("\n", "")))
    rows.append(("HU min / max / mean", f"{v.min():.0f} / {v.max():.0f} / {v.mean():.1f}"))
    p = np.percentile(v, [1, 50, 99])
    rows.append(("HU p1 / p50 / p99", f"{p[0]:.0f} / {p[1]:.0f} / {p[2]:.0f}"))
    pixels, sitk_affine = _sitk(folder)
    rows.append(("max |HU - SimpleITK|", f"{np.abs(pixels - v).max():.3g}"))
    rows.append(("max |affine - SimpleITK|", f"{np.abs(sitk_affine - affine).max():.3g}"))
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = save_dicom_series(volume, folder, Path(tmp) / "derived")
        for w in caught:
            rows.append(("writer warning", str(w.message)))
        back = load_ct(out)
        rows.append(("derived: max |HU diff|", f"{float((back - volume).abs().max()):.3g}"))
        rows.append(("derived: max |affine diff|", f"{float((back.affine - volume.affine).abs().max()):.3g}"))
        rows.append(("derived: SimpleITK max |HU diff|", f"{np.abs(_sitk(out)[0] - v).max():.3g}"))
        derived = sorted(out.iterdir())[0]
        rows.append(("dciodvfy derived slice", " | ".join(_dciodvfy(derived)) or "no errors"))
        # The anonymised sample blanks SOPClassUID/SOPInstanceUID, which stops dciodvfy before the IOD check;
        # a copy with those restored from the file meta shows which errors the source itself carries.
        source = pydicom.dcmread(series[0].files[0])
        source.SOPClassUID = source.SOPClassUID or source.file_meta.MediaStorageSOPClassUID
        source.SOPInstanceUID = source.SOPInstanceUID or source.file_meta.MediaStorageSOPInstanceUID
        source.save_as(Path(tmp) / "source_fixed.dcm")
        rows.append(
            (
                "dciodvfy source (UIDs restored)",
                " | ".join(_dciodvfy(Path(tmp) / "source_fixed.dcm")) or "no errors",
            )
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
