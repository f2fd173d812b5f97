"""Bad-input corpus: each case gives one clear InputError line (or a warning) and leaves the input byte-identical."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import SMALL, dicom_files, dicom_test_file, snapshot

from ldct_clip.data.phantom import write_phantom_dicom
from ldct_clip.errors import InputError
from ldct_clip.io import load_ct


def _series(root: Path, **tags) -> Path:
    return write_phantom_dicom(root / "series", size=SMALL, slices=4, **tags)


def _edit(folder: Path, index: int, **tags) -> None:
    path = dicom_files(folder)[index]
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def nonexistent(root: Path) -> tuple[Path, dict]:
    return root / "missing", {}


def empty_folder(root: Path):
    (root / "empty").mkdir()
    return root / "empty", {}


def no_dicom_at_all(root: Path):
    folder = root / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n" + b"\0" * 200)
    return folder, {}


def not_ct(root: Path):
    return _series(root, Modality="MR"), {}


def missing_rescale_slope(root: Path):
    return _series(root, RescaleSlope=None), {}


def missing_rescale_intercept(root: Path):
    folder = _series(root)
    ds = pydicom.dcmread(dicom_files(folder)[2])
    del ds.RescaleIntercept
    ds.save_as(dicom_files(folder)[2])
    return folder, {}


def rows_columns_change(root: Path):
    folder = _series(root)
    other = write_phantom_dicom(root / "small", size=SMALL // 2, slices=1)
    ds = pydicom.dcmread(dicom_files(other)[0])
    first = pydicom.dcmread(dicom_files(folder)[0])
    ds.SeriesInstanceUID = first.SeriesInstanceUID
    ds.ImagePositionPatient = [0, 0, 100]
    ds.save_as(folder / "zz_other.dcm")
    shutil.rmtree(other)
    return folder, {}


def orientation_changes(root: Path):
    folder = _series(root)
    _edit(folder, 1, ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    return folder, {}


def duplicate_position(root: Path):
    folder = _series(root)
    ds = pydicom.dcmread(dicom_files(folder)[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "copy.dcm")
    return folder, {}


def truncated_pixel_data(root: Path):
    folder = _series(root)
    path = dicom_files(folder)[2]
    path.write_bytes(path.read_bytes()[:-500])
    return folder, {}


def truncated_header(root: Path):
    folder = _series(root)
    path = dicom_files(folder)[1]
    path.write_bytes(path.read_bytes()[:300])
    return folder, {}


def real_truncated_file(root: Path):
    return dicom_test_file("MR_truncated.dcm"), {"allow_non_ct": True}


def nan_in_nifti(root: Path):
    data = np.zeros((6, 6, 3), np.float32)
    data[2, 3, 1] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "nan.nii.gz")
    return root / "nan.nii.gz", {}


def four_d_nifti(root: Path):
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 3, 2), np.int16), np.eye(4)), root / "t.nii.gz")
    return root / "t.nii.gz", {}


def multi_channel_mha(root: Path):
    image = sitk.GetImageFromArray(np.zeros((3, 6, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(image, str(root / "rgb.mha"))
    return root / "rgb.mha", {}


def rgb_dicom(root: Path):
    return dicom_test_file("SC_rgb.dcm"), {"allow_non_ct": True}


def several_ct_series(root: Path):
    write_phantom_dicom(root / "mixed" / "a", size=SMALL, slices=3, SeriesDescription="Abdomen soft")
    write_phantom_dicom(root / "mixed" / "b", size=SMALL, slices=2, SeriesDescription="Abdomen bone")
    return root / "mixed", {}


def series_uid_not_found(root: Path):
    return _series(root), {"series_uid": "1.2.3.4.5"}


def unsupported_file(root: Path):
    (root / "volume.raw").write_bytes(b"\0" * 1000)
    return root / "volume.raw", {}


def _first_uid(folder: Path) -> str:
    return str(pydicom.dcmread(sorted(p for p in folder.rglob("*.dcm"))[0]).SeriesInstanceUID)


# (builder, regular expression the one-line message must match)
CORPUS: list[tuple[Callable, str]] = [
    (nonexistent, r"missing does not exist; check the path"),
    (empty_folder, r"folder .*empty is empty"),
    (no_dicom_at_all, r"no DICOM images found in .*docs"),
    (not_ct, r"no CT images \(Modality MR\); ldct-clip denoises CT only"),
    (missing_rescale_slope, r"CT0001\.dcm lacks RescaleSlope, so stored values cannot be converted to HU"),
    (missing_rescale_intercept, r"CT0003\.dcm lacks RescaleIntercept"),
    (
        rows_columns_change,
        r"rows/columns change inside series .*32x32 in CT0001\.dcm, 16x16 in zz_other\.dcm",
    ),
    (orientation_changes, r"image orientation changes inside series .*CT0002\.dcm"),
    (
        duplicate_position,
        r"duplicate slice position .* \((CT0002\.dcm and copy\.dcm|copy\.dcm and CT0002\.dcm)\)",
    ),
    (truncated_pixel_data, r"cannot decode the pixel data of .*CT0003\.dcm.*truncated or corrupt"),
    (truncated_header, r"cannot read DICOM file .*CT0002\.dcm.*truncated or corrupt"),
    (real_truncated_file, r"cannot decode the pixel data of .*MR_truncated\.dcm"),
    (nan_in_nifti, r"nan\.nii\.gz contains 2 NaN/Inf voxels"),
    (four_d_nifti, r"t\.nii\.gz is 4-D \(shape \(6, 6, 3, 2\)\)"),
    (multi_channel_mha, r"rgb\.mha has 3 components per voxel \(multi-channel\)"),
    (rgb_dicom, r"SC_rgb\.dcm has 3 samples per pixel"),
    (
        several_ct_series,
        r"holds 2 series; choose one with series_uid .*'Abdomen soft', CT, 3 slices.*'Abdomen bone', CT, 2 slices",
    ),
    (
        series_uid_not_found,
        r"series_uid 1\.2\.3\.4\.5 not found in .*available: .*\('Phantom seed 0', CT, 4 slices\)",
    ),
    (unsupported_file, r"volume\.raw is neither DICOM .* nor NIfTI"),
]


@pytest.mark.parametrize(("builder", "pattern"), CORPUS, ids=[b.__name__ for b, _ in CORPUS])
def test_bad_input_message_and_input_untouched(tmp_path, builder, pattern):
    path, kwargs = builder(tmp_path)
    before = snapshot(path) if path.exists() else {}
    with pytest.raises(InputError, match=pattern) as info:
        load_ct(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert (snapshot(path) if path.exists() else {}) == before


def test_several_series_message_lists_uids(tmp_path):
    folder, _ = several_ct_series(tmp_path)
    with pytest.raises(InputError) as info:
        load_ct(folder)
    for sub in ("a", "b"):
        assert _first_uid(folder / sub) in str(info.value)


def test_not_ct_loads_with_allow_non_ct(tmp_path):
    folder, _ = not_ct(tmp_path)
    assert load_ct(folder, allow_non_ct=True).shape == (1, SMALL, SMALL, 4)


def test_non_uniform_spacing_warns_with_largest_deviation(tmp_path):
    folder = _series(tmp_path)
    before = snapshot(folder)
    dicom_files(folder)[1].unlink()  # positions 0, 6, 9 mm: gaps 6 and 3, median 4.5
    before = snapshot(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = load_ct(folder)
    messages = [str(w.message) for w in caught if "non-uniform slice spacing" in str(w.message)]
    assert len(messages) == 1
    assert "median 4.5 mm, largest deviation 1.5 mm" in messages[0]
    assert volume.shape[-1] == 3
    np.testing.assert_allclose(float(volume.affine[2, 2]), 4.5)  # mean spacing
    assert snapshot(folder) == before
