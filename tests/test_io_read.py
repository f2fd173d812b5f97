"""load_ct on every reader path: DICOM series / file / enhanced multi-frame / compressed syntaxes, NIfTI, .mha/.nrrd."""

from __future__ import annotations

import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from io_helpers import SLICES, SMALL, dicom_files, dicom_test_file, sitk_affine, sitk_series
from monai.data import MetaTensor
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from ldct_clip.data.phantom import make_phantom, write_phantom_dicom
from ldct_clip.io import find_ct_series, load_ct, save_nifti


@pytest.fixture
def phantom():
    return make_phantom(SMALL, SLICES, seed=3)


@pytest.fixture
def series(tmp_path, phantom):
    return write_phantom_dicom(tmp_path / "series", volume=phantom, seed=3)


def test_dicom_series_hu_affine_and_meta(series, phantom):
    volume = load_ct(series)
    assert isinstance(volume, MetaTensor)
    assert volume.shape == (1, SMALL, SMALL, SLICES) and volume.dtype == torch.float32
    # Stored integers: the phantom's float HU come back within rounding.
    assert float((volume - phantom).abs().max()) <= 0.5
    assert float(volume.min()) == -3024.0  # FOV padding survives (int16 storage)
    np.testing.assert_allclose(volume.affine.numpy(), phantom.affine.numpy(), atol=1e-5)
    assert volume.meta["source_kind"] == "dicom"
    assert volume.meta["source_path"] == str(series.resolve())
    assert volume.meta["series_uid"] == pydicom.dcmread(dicom_files(series)[0]).SeriesInstanceUID


def test_affine_matches_simpleitk(series):
    volume = load_ct(series)
    pixels, affine = sitk_series(series)
    np.testing.assert_allclose(volume.affine.numpy(), affine, atol=1e-4)
    np.testing.assert_array_equal(volume[0].numpy(), pixels)


def test_oblique_sagittal_geometry_matches_simpleitk(tmp_path):
    # Sagittal slices: rows run posterior, columns inferior, slices along the normal (towards the right).
    lps = np.array([[0, 0, -2.5, -10], [0.9, 0, 0, -12], [0, -0.7, 0, 30], [0, 0, 0, 1.0]])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = MetaTensor(make_phantom(SMALL, 3, seed=1).as_tensor(), affine=torch.as_tensor(ras))
    folder = write_phantom_dicom(tmp_path / "sag", volume=volume)
    loaded = load_ct(folder)
    pixels, affine = sitk_series(folder)
    np.testing.assert_allclose(loaded.affine.numpy(), ras, atol=1e-4)
    np.testing.assert_allclose(affine, ras, atol=1e-4)
    np.testing.assert_array_equal(loaded[0].numpy(), pixels)


def test_slices_ordered_by_position_not_instance_number(series):
    reference = load_ct(series)
    files = dicom_files(series)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 100 - 7 * i  # reversed and gapped
        ds.save_as(f)
    for i, f in enumerate(files):  # names no longer in position order either
        f.rename(series / f"z{(i * 3) % len(files)}_{i}.dcm")
    reordered = load_ct(series)
    assert torch.equal(reordered, reference)
    np.testing.assert_allclose(reordered.affine, reference.affine)


def test_recursive_discovery_and_series_selection(tmp_path, phantom):
    root = tmp_path / "export"
    a = write_phantom_dicom(root / "patient" / "study" / "a", volume=phantom, SeriesDescription="Abdomen 3mm")
    write_phantom_dicom(
        root / "patient" / "study" / "b", size=SMALL, slices=3, seed=5, SeriesDescription="Other"
    )
    (root / "README.txt").write_text("not DICOM")
    (root / "DICOMDIR-like.bin").write_bytes(b"\0" * 300)
    found = {s.description: s for s in find_ct_series(root)}
    assert set(found) == {"Abdomen 3mm", "Other"}
    assert found["Abdomen 3mm"].n_slices == SLICES and found["Other"].n_slices == 3
    assert found["Abdomen 3mm"].path == a
    volume = load_ct(root, series_uid=found["Other"].uid)
    assert volume.shape == (1, SMALL, SMALL, 3)
    assert volume.meta["series_description"] == "Other"


def test_localizer_next_to_axial_series_is_skipped(tmp_path, phantom):
    write_phantom_dicom(tmp_path / "x" / "axial", volume=phantom)
    write_phantom_dicom(
        tmp_path / "x" / "scout", size=SMALL, slices=1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]
    )
    assert load_ct(tmp_path / "x").shape[-1] == SLICES


@pytest.mark.parametrize(
    "syntax", [JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian]
)
def test_phantom_series_in_other_transfer_syntaxes(tmp_path, phantom, syntax):
    reference = load_ct(write_phantom_dicom(tmp_path / "ref", volume=phantom))
    folder = write_phantom_dicom(tmp_path / "enc", volume=phantom, transfer_syntax=syntax)
    assert pydicom.dcmread(dicom_files(folder)[0]).file_meta.TransferSyntaxUID == syntax
    assert torch.equal(load_ct(folder), reference)


def test_unsigned_storage(tmp_path, phantom):
    volume = load_ct(write_phantom_dicom(tmp_path / "u16", volume=phantom, pixel_representation=0))
    inside = phantom > -1024
    assert float((volume - phantom)[inside].abs().max()) <= 0.5
    assert float(volume.min()) == -1024.0  # padding clips to stored 0 with unsigned pixels


# Real files with compressed syntaxes, each against its uncompressed twin (lossless: exact).
TWINS = [
    ("693_J2KR.dcm", "693_UNCR.dcm", False),  # CT, JPEG 2000 lossless
    ("693_J2KI.dcm", "693_UNCI.dcm", False),  # CT, JPEG 2000 lossy vs its decoded twin
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", True),  # JPEG 2000 lossless
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", True),  # JPEG-LS lossless
    ("MR_small_RLE.dcm", "MR_small.dcm", True),  # RLE lossless
    ("MR_small_implicit.dcm", "MR_small.dcm", True),
    ("MR_small_bigendian.dcm", "MR_small.dcm", True),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", True),  # multi-frame, JPEG 2000
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", True),  # multi-frame, JPEG-LS
    ("emri_small_RLE.dcm", "emri_small.dcm", True),  # multi-frame, RLE
]


@pytest.mark.parametrize(("compressed", "reference", "non_ct"), TWINS)
def test_compressed_file_equals_uncompressed_twin(compressed, reference, non_ct):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # emri files carry no plane geometry: warned, not tested here
        a = load_ct(dicom_test_file(compressed), allow_non_ct=non_ct)
        b = load_ct(dicom_test_file(reference), allow_non_ct=non_ct)
    assert a.shape == b.shape and a.shape[-1] >= 1
    assert float(a.std()) > 0
    assert torch.equal(a, b)


# No uncompressed twin ships for these: GDCM (inside SimpleITK) is an independent decoder.
GDCM_CHECKED = [
    ("JPEG-LL.dcm", True),  # JPEG lossless, process 14 SV1 (NM)
    ("bad_sequence.dcm", False),  # JPEG lossless, CT
    ("image_dfl.dcm", True),  # deflated explicit VR little endian
]


@pytest.mark.parametrize(("name", "non_ct"), GDCM_CHECKED)
def test_compressed_file_equals_gdcm_decoding(name, non_ct):
    path = dicom_test_file(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_ct(path, allow_non_ct=non_ct)[0].numpy()
    gdcm = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).T.astype(np.float64)
    assert float(ours.std()) > 0
    np.testing.assert_array_equal(ours, gdcm.reshape(ours.shape))


def test_ct_jpeg2000_hu_values():
    volume = load_ct(dicom_test_file("693_J2KR.dcm"))
    ds = pydicom.dcmread(dicom_test_file("693_UNCR.dcm"))
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume[0, :, :, 0].numpy(), expected.T)
    assert float(volume.min()) == -3024.0 and float(volume.max()) == 1468.0


def test_single_classic_ct_file():
    path = dicom_test_file("CT_small.dcm")
    volume = load_ct(path)
    ds = pydicom.dcmread(path)
    assert volume.shape == (1, 128, 128, 1)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume[0, :, :, 0].numpy(), expected.T)
    np.testing.assert_allclose(
        sitk_affine(sitk.ReadImage(str(path)))[:3, 3], volume.affine[:3, 3].numpy(), atol=1e-4
    )


def test_enhanced_multiframe_ct():
    path = dicom_test_file("eCT_Supplemental.dcm")
    volume = load_ct(path)
    ds = pydicom.dcmread(path)
    assert volume.shape == (1, 512, 512, 2)
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    frames = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])  # this file's IOP is [-1,0,0,0,1,0]: the normal points inferior
    positions = [
        np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    z = [float(p[2]) for p in positions]
    order = np.argsort([p @ normal for p in positions])
    assert list(order) == [1, 0]
    for k, i in enumerate(order):
        np.testing.assert_array_equal(volume[0, :, :, k].numpy(), frames[i].T)
    spacing = float(shared.PixelMeasuresSequence[0].PixelSpacing[0])
    np.testing.assert_allclose(
        np.abs(np.diag(volume.affine.numpy())[:3]), [spacing, spacing, abs(z[1] - z[0])]
    )
    assert volume.meta["multiframe"] is True


def test_nifti_round_trip_int16_and_affine(tmp_path, phantom):
    path = save_nifti(phantom, tmp_path / "p.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.affine, phantom.affine.numpy(), atol=1e-5)
    volume = load_ct(path)
    assert volume.meta["source_kind"] == "nifti"
    assert float((volume - phantom).abs().max()) <= 0.5
    np.testing.assert_allclose(volume.affine.numpy(), phantom.affine.numpy(), atol=1e-5)


def test_float_nifti_and_trailing_singleton_dimension(tmp_path):
    data = np.random.default_rng(0).normal(0, 100, (8, 9, 4, 1)).astype(np.float32)
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "f.nii")
    volume = load_ct(tmp_path / "f.nii")
    assert volume.shape == (1, 8, 9, 4)
    np.testing.assert_allclose(volume[0].numpy(), data[..., 0], atol=1e-4)
    np.testing.assert_allclose(volume.affine.numpy(), affine)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_files_match_dicom_geometry(tmp_path, series, suffix):
    dicom = load_ct(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    sitk.WriteImage(reader.Execute(), str(tmp_path / f"v{suffix}"))
    volume = load_ct(tmp_path / f"v{suffix}")
    assert volume.meta["source_kind"] == "itk"
    assert torch.equal(volume, dicom)
    np.testing.assert_allclose(volume.affine.numpy(), dicom.affine.numpy(), atol=1e-5)


def test_series_folder_copy_is_not_needed(tmp_path, series):
    # A single file of a classic series loads as one slice with that slice's geometry.
    first = dicom_files(series)[0]
    shutil.copy(first, tmp_path / "one.dcm")
    volume = load_ct(tmp_path / "one.dcm")
    full = load_ct(series)
    assert volume.shape == (1, SMALL, SMALL, 1)
    z = float(volume.affine[2, 3])
    k = int(round((z - float(full.affine[2, 3])) / float(full.affine[2, 2])))
    assert torch.equal(volume[..., 0], full[..., k])


def test_gantry_tilt_keeps_the_sheared_step(tmp_path):
    # Slices stepping along z and drifting in y (tilted gantry): the affine keeps the true step vector.
    lps = np.array([[0.8, 0, 0, -10], [0, 0.8, 0.5, -12], [0, 0, 3.0, 30], [0, 0, 0, 1.0]])
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = MetaTensor(make_phantom(SMALL, 3, seed=1).as_tensor(), affine=torch.as_tensor(ras))
    loaded = load_ct(write_phantom_dicom(tmp_path / "tilt", volume=volume))
    np.testing.assert_allclose(loaded.affine.numpy(), ras, atol=1e-5)


def test_ct_chosen_next_to_other_objects(tmp_path, phantom):
    root = tmp_path / "study"
    write_phantom_dicom(root / "ct", volume=phantom)
    write_phantom_dicom(root / "mr", size=SMALL, slices=2, Modality="MR")
    for name in ("test-SR.dcm", "rtplan.dcm"):  # no pixel data: skipped
        shutil.copy(dicom_test_file(name), root / name)
    volume = load_ct(root)
    assert volume.shape == (1, SMALL, SMALL, SLICES) and volume.meta["modality"] == "CT"
    assert [s.modality for s in find_ct_series(root, modalities=None)].count("MR") == 1
