"""Synthetic phantom: realistic HU per tissue, seeding, geometry, DICOM/NIfTI writers, data_prep script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from io_helpers import dciodvfy_errors

from ldct_clip.data.phantom import (
    FOV_PADDING_HU,
    TISSUE_HU,
    make_phantom,
    make_water_cylinder,
    write_phantom_dicom,
    write_phantom_nifti,
)
from ldct_clip.io import load_ct


@pytest.fixture(scope="module")
def volume():
    return make_phantom(128, 6, spacing=(0.8, 0.8, 3.0), seed=0, texture_hu=0.0)


def _fraction_near(v: np.ndarray, hu: float, tol: float = 3.0) -> float:
    return float((np.abs(v - hu) <= tol).mean())


def test_shape_dtype_affine(volume):
    assert volume.shape == (1, 128, 128, 6) and volume.dtype == torch.float32
    np.testing.assert_allclose(np.diag(volume.affine.numpy()), [-0.8, -0.8, 3.0, 1.0])
    # Centred on the isocentre.
    centre = volume.affine.numpy() @ np.array([63.5, 63.5, 2.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_tissue_values_present(volume):
    v = volume[0].numpy()
    for tissue in ("air", "lung", "fat", "soft_tissue", "muscle", "liver", "spleen", "lesion"):
        assert _fraction_near(v, TISSUE_HU[tissue]) > 0.001, tissue
    assert float((v > 700).mean()) > 0.001  # spine and ribs
    assert _fraction_near(v, TISSUE_HU["air"]) > 0.1
    assert 700 <= float(v.max()) <= 1200  # bone
    assert float(v.min()) == FOV_PADDING_HU


def test_low_contrast_lesions_in_liver(volume):
    v = volume[0].numpy()
    lesion = np.abs(v - TISSUE_HU["lesion"]) <= 1
    liver = np.abs(v - TISSUE_HU["liver"]) <= 1
    assert 10 <= TISSUE_HU["lesion"] - TISSUE_HU["liver"] <= 20
    assert lesion.sum() > 10 and liver.sum() > 20 * lesion.sum() / 10
    # Every lesion voxel sits in a neighbourhood with liver next to it.
    xs, ys, zs = np.nonzero(lesion)
    near_liver = [liver[max(x - 4, 0) : x + 5, max(y - 4, 0) : y + 5, z].any() for x, y, z in zip(xs, ys, zs)]
    assert np.mean(near_liver) > 0.95


def test_fov_padding_in_corners_only():
    padded = make_phantom(48, 2, fov_padding=True)[0].numpy()
    plain = make_phantom(48, 2, fov_padding=False)[0].numpy()
    corner = padded[0, 0]
    assert (corner == FOV_PADDING_HU).all() and (padded[24, 24] != FOV_PADDING_HU).all()
    assert (plain >= -1000.5).all()
    assert np.array_equal(
        padded == FOV_PADDING_HU, np.broadcast_to((padded == FOV_PADDING_HU)[..., :1], padded.shape)
    )


def test_seeded_and_varies_along_z():
    a, b, c = make_phantom(48, 4, seed=1), make_phantom(48, 4, seed=1), make_phantom(48, 4, seed=2)
    assert torch.equal(a, b)
    assert float((a - c).abs().mean()) > 1.0
    slices = a[0].numpy()
    assert np.abs(slices[..., 0] - slices[..., -1]).mean() > 5.0  # lung bases grow, liver shrinks
    lung = [float((np.abs(slices[..., k] - TISSUE_HU["lung"]) < 5).mean()) for k in range(4)]
    assert lung == sorted(lung) and lung[-1] > lung[0]


def test_water_cylinder():
    cyl = make_water_cylinder(64, 2, diameter_mm=40.0, spacing=(1.0, 1.0, 2.0))
    v = cyl[0].numpy()
    assert set(np.unique(v)) == {0.0, -1000.0}
    area_mm2 = (v[..., 0] == 0).sum() * 1.0
    assert abs(area_mm2 - np.pi * 20.0**2) / (np.pi * 20.0**2) < 0.05
    with pytest.raises(ValueError, match="does not fit"):
        make_water_cylinder(32, 1, diameter_mm=100.0, spacing=(1.0, 1.0, 1.0))


def test_dicom_series_valid_and_read_back(tmp_path):
    folder = write_phantom_dicom(tmp_path / "p", size=32, slices=3, seed=4, PatientName="Test^Phantom")
    files = sorted(folder.glob("*.dcm"))  # beside them: the ldct-clip manifest
    assert len(files) == 3
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert ds.PatientName == "Test^Phantom"
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == 3
    assert dciodvfy_errors(files[1]) == []
    back = load_ct(folder)
    assert float((back - make_phantom(32, 3, seed=4)).abs().max()) <= 0.5


def test_tag_none_deletes_element(tmp_path):
    folder = write_phantom_dicom(tmp_path / "p", size=16, slices=1, RescaleSlope=None)
    assert "RescaleSlope" not in pydicom.dcmread(next(folder.glob("*.dcm")))


def test_nifti_writer(tmp_path):
    path = write_phantom_nifti(tmp_path / "p.nii.gz", size=32, slices=2, seed=1)
    assert float((load_ct(path) - make_phantom(32, 2, seed=1)).abs().max()) <= 0.5


def test_data_prep_script(tmp_path, capsys):
    script = Path(__file__).resolve().parents[1] / "data_prep" / "make_phantom.py"
    spec = importlib.util.spec_from_file_location("make_phantom_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [
        "--dicom",
        str(tmp_path / "d"),
        "--nifti",
        str(tmp_path / "p.nii.gz"),
        "--size",
        "32",
        "--slices",
        "2",
    ]
    assert module.main(args) == 0
    assert torch.equal(load_ct(tmp_path / "d"), load_ct(tmp_path / "p.nii.gz"))
    assert module.main(args) == 2  # outputs exist, no --overwrite
    assert "already exists" in capsys.readouterr().err
