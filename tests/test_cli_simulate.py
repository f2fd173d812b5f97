"""``ldct-clip simulate`` end to end on phantom NIfTI and DICOM series (tiny sizes, few views)."""

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_helpers import dicom_files

from ldct_clip.cli import main
from ldct_clip.data.phantom import make_water_cylinder, write_phantom_dicom, write_phantom_nifti
from ldct_clip.io import load_ct, save_nifti
from ldct_clip.simulation import measure_noise_std

# few views; photons for a visible noise on big test pixels (noise grows as pixels shrink)
FAST = ["--views", "64", "--workers", "1", "--no-progress"]
NOISY = ["--photons", "2e4"]


def test_nifti_in_nifti_out_keeps_affine_and_padding(tmp_path, capsys):
    source = write_phantom_nifti(tmp_path / "normal.nii.gz", size=48, slices=3, spacing=(6.0, 6.0, 3.0))
    output = tmp_path / "out" / "low.nii.gz"
    assert main(["simulate", str(source), str(output), "--dose", "0.25", "--seed", "1", *NOISY, *FAST]) == 0
    assert "simulated dose 0.25" in capsys.readouterr().out
    normal, low = nib.load(source), nib.load(output)
    np.testing.assert_allclose(low.affine, normal.affine)
    before, after = normal.get_fdata(), low.get_fdata()
    assert after.shape == before.shape
    padding = before < -2000
    assert padding.any() and np.array_equal(after[padding], before[padding])
    assert np.abs(after - before)[~padding].mean() > 1.0
    # same seed, same result; the folder form of OUTPUT names the file simulated.nii.gz
    assert main(["simulate", str(source), str(tmp_path / "again"), "--seed", "1", *NOISY, *FAST]) == 0
    np.testing.assert_array_equal(nib.load(tmp_path / "again" / "simulated.nii.gz").get_fdata(), after)


def test_target_noise_calibrates_the_added_noise(tmp_path):
    source = save_nifti(make_water_cylinder(64, 8, 300.0, (5.0, 5.0, 3.0)), tmp_path / "water.nii.gz")
    output = tmp_path / "low.nii.gz"
    assert main(["simulate", str(source), str(output), "--target-noise-hu", "30", "--seed", "5", *FAST]) == 0
    added = nib.load(output).get_fdata() - nib.load(source).get_fdata()
    assert measure_noise_std(added, radius=10.0) == pytest.approx(30.0, rel=0.10)


def test_dicom_in_derived_dicom_out(tmp_path):
    source = write_phantom_dicom(tmp_path / "normal", size=48, slices=3, spacing=(6.0, 6.0, 3.0))
    output = tmp_path / "low"
    assert (
        main(["simulate", str(source), str(output), "--format", "both", "--dose", "0.5", *NOISY, *FAST]) == 0
    )
    normal, low = load_ct(source), load_ct(output / "dicom")
    assert low.shape == normal.shape
    np.testing.assert_allclose(low.affine.numpy(), normal.affine.numpy(), atol=1e-4)
    assert np.abs((low - normal).numpy()).max() > 5.0
    header = pydicom.dcmread(dicom_files(output / "dicom")[0], stop_before_pixels=True)
    original = pydicom.dcmread(dicom_files(source)[0], stop_before_pixels=True)
    assert header.SeriesInstanceUID != original.SeriesInstanceUID
    assert header.StudyInstanceUID == original.StudyInstanceUID
    assert "simulated 0.5 dose" in " ".join(
        str(header.get(keyword, "")) for keyword in ("SeriesDescription", "DerivationDescription")
    )
    nifti = nib.load(output / "simulated.nii.gz")
    np.testing.assert_allclose(nifti.affine, normal.affine.numpy(), atol=1e-4)


def test_refuses_output_inside_input_and_existing_output(tmp_path, capsys):
    source = write_phantom_dicom(tmp_path / "normal", size=32, slices=2)
    before = sorted(p.name for p in source.iterdir())
    assert main(["simulate", str(source), str(source / "low"), *FAST]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("ldct-clip simulate: error:") and "\n" not in message
    assert sorted(p.name for p in source.iterdir()) == before

    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["simulate", str(source), str(existing), *FAST]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["simulate", str(source), str(existing), "--overwrite", *FAST]) == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (["--dose", "0"], "--dose"),
        (["--dose", "1.5"], "--dose"),
        (["--photons", "-5"], "--photons"),
        (["--views", "1"], "--views"),
        (["--format", "dicom"], "DICOM output needs a DICOM series"),
    ],
)
def test_bad_options_one_line_and_nothing_written(tmp_path, capsys, options, message):
    source = write_phantom_nifti(tmp_path / "normal.nii.gz", size=32, slices=2)
    output = tmp_path / "out"
    assert main(["simulate", str(source), str(output), *FAST, *options]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not output.exists()
