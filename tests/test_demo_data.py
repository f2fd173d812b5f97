"""Demo-weights data preparation (``data_prep/demo_data.py``) on a stand-in for ../shared/data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ldct_clip.data.layouts import find_pairs, find_volumes
from ldct_clip.data.phantom import make_phantom, write_phantom_dicom, write_phantom_nifti
from ldct_clip.errors import InputError
from ldct_clip.io import load_ct

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_prep"))
from demo_data import prepare_demo_data  # noqa: E402


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A 20-slice DICOM series and a 3 mm NIfTI volume under the names of the shared development data."""
    root = tmp_path_factory.mktemp("shared")
    write_phantom_dicom(
        root / "totalseg_example_ct_dicom", size=48, slices=20, seed=5, spacing=(1.0, 1.0, 2.0)
    )
    write_phantom_nifti(
        root / "totalseg_example_ct.nii.gz", size=24, slices=4, spacing=(3.0, 3.0, 3.0), seed=6
    )
    return root


def test_prepare_demo_data_layouts_and_held_out_split(shared, tmp_path):
    out = tmp_path / "demo_data"
    lines: list[str] = []
    manifest = prepare_demo_data(
        shared,
        out,
        train_phantoms=((32, 2, 1), (40, 2, 2)),
        heldout_phantom=(48, 2, 99),
        workers=1,
        progress=False,
        log=lines.append,
    )
    assert {v["patient"] for v in find_volumes(out / "train")} == {
        "totalseg_dicom_train",
        "totalseg_dicom_train_0p75mm",
        "totalseg_dicom_train_1p25mm",
        "totalseg_ct_1mm",
        "totalseg_ct_0p75mm",
        "phantom_seed1",
        "phantom_seed2",
    }
    assert {p["patient"] for p in find_pairs(out / "heldout")} == {"totalseg_dicom_heldout", "phantom_seed99"}
    assert json.loads((out / "manifest.json").read_text())["train"].keys() == manifest["train"].keys()
    assert len(lines) == 7 + 4 + 2 + 1  # one per file, one per pair's noise, the summary

    series = load_ct(shared / "totalseg_example_ct_dicom")
    train = load_ct(out / "train" / "totalseg_dicom_train.nii.gz")
    full = load_ct(out / "heldout" / "totalseg_dicom_heldout_full.nii.gz")
    low = load_ct(out / "heldout" / "totalseg_dicom_heldout_low.nii.gz")
    # slices 0-13 for training, 16-19 held out: same voxels, affines moved to the first slice of each
    assert train.shape[-1] == 14 and full.shape[-1] == 4
    np.testing.assert_array_equal(train[0].numpy(), series[0, ..., :14].numpy())
    np.testing.assert_array_equal(full[0].numpy(), series[0, ..., 16:].numpy())
    step = np.asarray(series.affine)[:3, 2]
    np.testing.assert_allclose(
        np.asarray(full.affine)[:3, 3], np.asarray(series.affine)[:3, 3] + 16 * step, atol=1e-4
    )
    # the low dose is the held-out slices plus noise, as manifest says
    noise = (low - full)[0].numpy()
    body = full[0].numpy() > -500
    stats = manifest["heldout"]["totalseg_dicom_heldout_low.nii.gz"]
    assert stats["added_noise_std_body_hu"] == pytest.approx(float(noise[body].std()), rel=1e-3)
    assert stats["added_noise_std_body_hu"] > 0.5

    # the 3 mm NIfTI is resampled in-plane to 1 mm (24 x 3 mm -> ~72 pixels), slices untouched
    resampled = load_ct(out / "train" / "totalseg_ct_1mm.nii.gz")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(resampled.affine)[:3, :3], axis=0), (1.0, 1.0, 3.0))
    assert abs(resampled.shape[1] - 72) <= 2 and resampled.shape[-1] == 4

    # the training DICOM slices also at 0.75 and 1.25 mm (48 x 1 mm -> 64 and ~38 pixels), same 14 slices
    for name, pixels in (("0p75mm", 64), ("1p25mm", 38)):
        zoomed = load_ct(out / "train" / f"totalseg_dicom_train_{name}.nii.gz")
        assert abs(zoomed.shape[1] - pixels) <= 1 and zoomed.shape[-1] == 14
        np.testing.assert_allclose(
            np.asarray(zoomed.affine)[:3, 3], np.asarray(train.affine)[:3, 3], atol=0.5
        )
    # the finer NIfTI keeps every other slice (6 mm apart), starting on the first
    finer = load_ct(out / "train" / "totalseg_ct_0p75mm.nii.gz")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(finer.affine)[:3, :3], axis=0), (0.75, 0.75, 6.0))
    assert abs(finer.shape[1] - 93) <= 1 and finer.shape[-1] == 2  # (24 - 1) * 3 / 0.75 + 1
    np.testing.assert_allclose(np.asarray(finer.affine)[2, 3], np.asarray(resampled.affine)[2, 3], atol=1e-3)

    phantom = load_ct(out / "heldout" / "phantom_seed99_full.nii.gz")
    np.testing.assert_allclose(phantom[0].numpy(), np.rint(make_phantom(48, 2, seed=99)[0].numpy()), atol=0.5)


def test_prepare_demo_data_refuses_bad_input(shared, tmp_path):
    with pytest.raises(InputError, match="not found"):
        prepare_demo_data(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(InputError, match="training seed"):
        prepare_demo_data(shared, tmp_path / "out", train_phantoms=((32, 2, 1),), heldout_phantom=(32, 2, 1))
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_demo_data(shared, tmp_path / "taken")
    assert not (tmp_path / "out").exists()
