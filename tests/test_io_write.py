"""Derived DICOM series and NIfTI output: round trips, tags, dciodvfy, refusals, atomic writes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from io_helpers import SLICES, SMALL, dciodvfy_errors, dicom_files, sitk_series, snapshot
from monai.data import MetaTensor
from monai.transforms import Orientation
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless

import ldct_clip
from ldct_clip.cli import main
from ldct_clip.data.phantom import make_phantom, write_phantom_dicom
from ldct_clip.errors import OutputError
from ldct_clip.io import (
    SERIES_NUMBER_OFFSET,
    check_output_path,
    dicom_writer,
    load_ct,
    save_dicom_series,
    save_nifti,
)


@pytest.fixture
def source(tmp_path):
    return write_phantom_dicom(tmp_path / "source", size=SMALL, slices=SLICES, seed=2, SeriesNumber=7)


@pytest.fixture
def denoised(source):
    volume = load_ct(source)
    # Stand-in for a denoiser: a smooth change with fractional values, padding kept.
    out = volume.clone()
    inside = volume > -1500
    out[inside] = volume[inside] * 0.9 + 3.3
    return out


def _by_position(folder):
    files = [pydicom.dcmread(p) for p in dicom_files(folder)]
    return {tuple(round(float(v), 3) for v in ds.ImagePositionPatient): ds for ds in files}


def test_round_trip_pydicom_and_simpleitk(tmp_path, source, denoised):
    out = save_dicom_series(denoised, source, tmp_path / "den")
    back = load_ct(out)
    assert float((back - denoised).abs().max()) <= 0.5
    np.testing.assert_allclose(back.affine.numpy(), denoised.affine.numpy(), atol=1e-5)
    pixels, affine = sitk_series(out)
    assert np.abs(pixels - denoised[0].numpy()).max() <= 0.5
    np.testing.assert_allclose(affine, denoised.affine.numpy(), atol=1e-4)
    assert float(back.min()) == -3024.0  # scanner padding written back


def test_derived_series_tags(tmp_path, source, denoised):
    out = save_dicom_series(denoised, source, tmp_path / "den")
    src, dst = _by_position(source), _by_position(out)
    assert src.keys() == dst.keys() and len(dst) == SLICES
    series_uids = {ds.SeriesInstanceUID for ds in dst.values()}
    assert len(series_uids) == 1 and series_uids.isdisjoint({ds.SeriesInstanceUID for ds in src.values()})
    sop_uids = {ds.SOPInstanceUID for ds in dst.values()}
    assert len(sop_uids) == SLICES and sop_uids.isdisjoint({ds.SOPInstanceUID for ds in src.values()})
    for position, ds in dst.items():
        s = src[position]
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "StudyDate"):
            assert ds[keyword].value == s[keyword].value, keyword
        for keyword in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness", "InstanceNumber"):
            assert ds[keyword].value == s[keyword].value, keyword
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert (
            "CLIPDenoiser" in ds.DerivationDescription and ldct_clip.__version__ in ds.DerivationDescription
        )
        ref = ds.SourceImageSequence[0]
        assert (
            ref.ReferencedSOPInstanceUID == s.SOPInstanceUID and ref.ReferencedSOPClassUID == CTImageStorage
        )
        assert ds.SeriesDescription == s.SeriesDescription + " [denoised]"
        assert ds.SeriesNumber == 7 + SERIES_NUMBER_OFFSET
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (
            ds.BitsAllocated,
            ds.PixelRepresentation,
            float(ds.RescaleSlope),
            float(ds.RescaleIntercept),
        ) == (
            16,
            1,
            1.0,
            0.0,
        )
        assert ds.pixel_array.dtype == np.int16
        assert ds.PixelPaddingValue == -3024


def test_description_series_number_and_model_name(tmp_path, source, denoised):
    out = save_dicom_series(
        denoised, source, tmp_path / "den", description="Custom", model_name="MyNet", series_number=42
    )
    ds = pydicom.dcmread(dicom_files(out)[0])
    assert (ds.SeriesDescription, ds.SeriesNumber) == ("Custom", 42)
    assert ds.DerivationDescription.startswith("Denoised by MyNet")


def test_derivation_and_description_suffix_for_non_denoised_series(tmp_path, source, denoised):
    out = save_dicom_series(
        denoised,
        source,
        tmp_path / "low",
        description_suffix=" [simulated 0.25 dose]",
        derivation="Simulated 0.25 dose (projection-domain noise insertion) by test",
    )
    for path in dicom_files(out):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SeriesDescription == "Phantom seed 2 [simulated 0.25 dose]"
        assert ds.DerivationDescription == "Simulated 0.25 dose (projection-domain noise insertion) by test"
    # An explicit description is the whole text: no suffix is added to it.
    out = save_dicom_series(denoised, source, tmp_path / "full", description="CT [simulated 0.25 dose]")
    assert pydicom.dcmread(dicom_files(out)[0]).SeriesDescription == "CT [simulated 0.25 dose]"


def test_long_source_description_keeps_the_suffix(tmp_path, denoised):
    source = write_phantom_dicom(
        tmp_path / "long", size=SMALL, slices=SLICES, seed=2, SeriesDescription="A" * 64
    )
    out = save_dicom_series(load_ct(source), source, tmp_path / "den")
    assert pydicom.dcmread(dicom_files(out)[0]).SeriesDescription == "A" * 53 + " [denoised]"  # LO: 64


def test_simulate_cli_writes_simulated_not_denoised_descriptions(tmp_path):
    source = write_phantom_dicom(tmp_path / "normal", size=SMALL, slices=2, spacing=(6.0, 6.0, 3.0))
    argv = ["simulate", str(source), str(tmp_path / "low"), "--dose", "0.25", "--views", "32"]
    assert main([*argv, "--workers", "1", "--no-progress", "--seed", "3"]) == 0
    ds = pydicom.dcmread(dicom_files(tmp_path / "low")[0], stop_before_pixels=True)
    assert ds.SeriesDescription == "Phantom seed 0 [simulated 0.25 dose]"
    assert ds.DerivationDescription.startswith("Simulated 0.25 dose (projection-domain noise insertion, ")
    assert ds.DerivationDescription.endswith(f"seed 3) by ldct-clip {ldct_clip.__version__} simulate")
    assert "enoised" not in ds.SeriesDescription + ds.DerivationDescription


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"BodyPartExamined": "PARTIALBODY"}, ""),  # non-standard term (Siemens clinical series): unknown
        ({"BodyPartExamined": None}, ""),  # anonymised away: a paired structure cannot be ruled out
        ({"BodyPartExamined": "KIDNEY"}, ""),  # paired, side not given by the source: empty = unknown
        ({"BodyPartExamined": "KIDNEY", "Laterality": "L"}, "L"),  # the source's own value is kept
        ({"BodyPartExamined": "ABDOMEN"}, None),  # unpaired: Laterality must stay absent
    ],
)
def test_laterality_type_2c_passes_dciodvfy(tmp_path, tags, expected):
    source = write_phantom_dicom(tmp_path / "src", size=SMALL, slices=2, seed=1, **tags)
    out = save_dicom_series(load_ct(source), source, tmp_path / "den")
    last = dicom_files(out)[-1]
    ds = pydicom.dcmread(last)
    assert ds.get("Laterality") == expected
    assert dciodvfy_errors(last) == []
    if expected == "":
        # Without it dciodvfy reports the clinical series' error: the condition is really taken as met.
        del ds.Laterality
        ds.save_as(tmp_path / "without.dcm")
        assert dciodvfy_errors(tmp_path / "without.dcm") == [
            "Error - Missing attribute Type 2C Conditional Element=<Laterality> Module=<GeneralSeries>"
        ]


def test_unpaired_body_parts_agree_with_dciodvfy(tmp_path, source, denoised):
    out = save_dicom_series(denoised, source, tmp_path / "den")
    ds = pydicom.dcmread(dicom_files(out)[0])
    others = ["PARTIALBODY", "KIDNEY", "LUNG", "KNEE", "BREAST", "EYE", "ADRENAL"]
    for term in [*sorted(dicom_writer.UNPAIRED_BODY_PARTS), *others]:
        ds.BodyPartExamined = term
        if "Laterality" in ds:
            del ds.Laterality
        dicom_writer._complete_laterality(ds)
        assert ("Laterality" in ds) == (term in others), term
        ds.save_as(tmp_path / "term.dcm")
        assert dciodvfy_errors(tmp_path / "term.dcm") == [], term


def test_values_clipped_to_int16(tmp_path, source, denoised):
    loud = denoised.clone()
    loud[0, 3, 4, 1] = 1e6
    loud[0, 5, 6, 2] = -1e6
    back = load_ct(save_dicom_series(loud, source, tmp_path / "den"))
    assert float(back[0, 3, 4, 1]) == 32767.0 and float(back[0, 5, 6, 2]) == -32768.0


def test_dciodvfy_reports_no_errors(tmp_path, source, denoised):
    out = save_dicom_series(denoised, source, tmp_path / "den")
    for path in (dicom_files(source)[0], dicom_files(out)[-1]):
        assert dciodvfy_errors(path) == [], path


def test_jpeg2000_source_gives_uncompressed_output(tmp_path):
    phantom = make_phantom(SMALL, 3, seed=4)
    source = write_phantom_dicom(tmp_path / "j2k", volume=phantom, transfer_syntax=JPEG2000Lossless)
    volume = load_ct(source)
    out = save_dicom_series(volume, source, tmp_path / "den")
    ds = pydicom.dcmread(dicom_files(out)[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert torch.equal(load_ct(out), volume)
    assert dciodvfy_errors(dicom_files(out)[0]) == []


def test_plain_array_without_meta(tmp_path, source, denoised):
    out = save_dicom_series(denoised.numpy()[0], source, tmp_path / "den")
    assert float((load_ct(out) - denoised).abs().max()) <= 0.5


@pytest.mark.parametrize(
    ("make_volume", "pattern"),
    [
        (lambda v: Orientation(axcodes="RAS")(v), r"affine differs from the source"),
        (lambda v: v[..., :-1], r"volume shape \(32, 32, 4\) does not match the source series \(32, 32, 5\)"),
        (
            lambda v: MetaTensor(v.flip(3).as_tensor(), affine=v.affine @ _flip_z(v.shape[-1])),
            r"affine differs",
        ),
        (lambda v: v.repeat(2, 1, 1, 1), r"volume has 2 channels"),
    ],
)
def test_volume_not_matching_source_is_refused(tmp_path, source, denoised, make_volume, pattern):
    before = snapshot(source)
    with pytest.raises(OutputError, match=pattern):
        save_dicom_series(make_volume(denoised), source, tmp_path / "den")
    assert not (tmp_path / "den").exists()
    assert snapshot(source) == before


def _flip_z(n: int) -> torch.Tensor:
    flip = torch.eye(4, dtype=torch.float64)
    flip[2, 2], flip[2, 3] = -1.0, n - 1.0
    return flip


def test_unsafe_outputs_are_refused(tmp_path, source, denoised):
    before = snapshot(source)
    with pytest.raises(OutputError, match="is the input itself"):
        save_dicom_series(denoised, source, source, overwrite=True)
    with pytest.raises(OutputError, match="lies inside the input folder"):
        save_dicom_series(denoised, source, source / "denoised")
    with pytest.raises(OutputError, match="contains the input"):
        save_dicom_series(denoised, source, tmp_path, overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists; .* overwrite=True"):
        save_dicom_series(denoised, source, tmp_path / "taken")
    assert snapshot(source) == before
    save_dicom_series(denoised, source, tmp_path / "taken", overwrite=True)
    assert len(dicom_files(tmp_path / "taken")) == SLICES


def test_without_dicom_source_dicom_output_is_refused_nifti_works(tmp_path):
    phantom = make_phantom(SMALL, 3)
    nifti = save_nifti(phantom, tmp_path / "in.nii.gz")
    volume = load_ct(nifti)
    with pytest.raises(OutputError, match="DICOM output needs a DICOM source.*write NIfTI instead"):
        save_dicom_series(volume, nifti, tmp_path / "den")
    with pytest.raises(OutputError, match="DICOM output needs the DICOM series"):
        save_dicom_series(volume, None, tmp_path / "den")
    assert not (tmp_path / "den").exists()
    out = save_nifti(volume, tmp_path / "out.nii.gz")
    assert float((load_ct(out) - phantom).abs().max()) <= 0.5


def test_interrupted_write_leaves_no_partial_output(tmp_path, source, denoised, monkeypatch):
    real_write = dicom_writer.write_dataset
    calls = []

    def failing_write(ds, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-series
        real_write(ds, path, *args, **kwargs)

    monkeypatch.setattr(dicom_writer, "write_dataset", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_dicom_series(denoised, source, tmp_path / "den")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no output, no temporary sibling

    # With an existing output and overwrite=True, a failure keeps the old output complete.
    monkeypatch.setattr(dicom_writer, "write_dataset", real_write)
    out = save_dicom_series(denoised, source, tmp_path / "den")
    old = snapshot(out)
    calls.clear()
    monkeypatch.setattr(dicom_writer, "write_dataset", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_dicom_series(denoised * 0, source, out, overwrite=True)
    assert snapshot(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["den", "source"]


def test_nifti_int16_affine_and_refusals(tmp_path, source, denoised):
    path = save_nifti(denoised, tmp_path / "den.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.affine, denoised.affine.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.rint(denoised[0].numpy()).astype(np.int16))
    with pytest.raises(OutputError, match="already exists"):
        save_nifti(denoised, path)
    with pytest.raises(OutputError, match="lies inside the input folder"):
        save_nifti(denoised, source / "x.nii.gz")  # meta source_path is the DICOM folder
    with pytest.raises(OutputError, match="must end in .nii"):
        save_nifti(denoised, tmp_path / "den.mha")
    bad = denoised.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(OutputError, match="NaN"):
        save_nifti(bad, tmp_path / "nan.nii.gz")
    assert not (tmp_path / "nan.nii.gz").exists()


def test_check_output_path(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    assert check_output_path(src, tmp_path / "out", overwrite=False) == (tmp_path / "out").resolve()
    assert check_output_path(None, tmp_path / "out", overwrite=False) == (tmp_path / "out").resolve()
    with pytest.raises(OutputError, match="is the input itself"):
        check_output_path(src, tmp_path / "in" / ".." / "in", overwrite=True)
    with pytest.raises(OutputError, match="lies inside"):
        check_output_path(src, src / "a" / "b", overwrite=False)
    with pytest.raises(OutputError, match="contains the input"):
        check_output_path(src, tmp_path, overwrite=True)
