"""`ldct-clip denoise`: DICOM/NIfTI out with the input's geometry, recursive runs, and clean refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from denoise_helpers import HAVE_DCIODVFY, TINY_SET, dciodvfy_errors, phantom_series, tiny_checkpoint

from ldct_clip.cli import main
from ldct_clip.io import load_ct, save_nifti


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise")
    return {
        "weights": tiny_checkpoint(root / "tiny.pt"),
        "series": phantom_series(root / "series"),
        "root": root,
    }


def denoise(*argv) -> int:
    return main(["denoise", *map(str, argv), "--device", "cpu", "--no-progress", *TINY_SET])


def test_dicom_in_dicom_out_same_geometry_valid_dicom(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert denoise(data["series"], out, "--weights", data["weights"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("denoised 4 slices in ") and str(out) in summary[0]
    source, result = load_ct(data["series"]), load_ct(out)
    assert result.shape == source.shape == (1, 64, 64, 4)
    assert torch.allclose(result.affine, source.affine, atol=1e-4)
    assert len(list(out.glob("*.dcm"))) == 4
    # the network changed the image but kept the padding outside the field of view
    assert (result - source).abs().max() > 1
    outside = source <= -3024
    assert outside.any() and torch.equal(result[outside], source[outside])
    if HAVE_DCIODVFY:
        assert dciodvfy_errors(out) == []


def test_nifti_output_has_the_input_affine(data, tmp_path):
    out = tmp_path / "denoised.nii.gz"
    assert denoise(data["series"], out, "--weights", data["weights"], "--format", "nifti") == 0
    image = nib.load(out)
    source = load_ct(data["series"])
    assert image.shape == (64, 64, 4)
    np.testing.assert_allclose(image.affine, source.affine.numpy(), atol=1e-4)


def test_both_formats_and_overwrite(data, tmp_path):
    out = tmp_path / "both"
    assert denoise(data["series"], out, "--weights", data["weights"], "--format", "both", "--batch", "3") == 0
    dicom, nifti = load_ct(out / "dicom"), load_ct(out / "denoised.nii.gz")
    assert torch.equal(dicom.as_tensor(), nifti.as_tensor())  # both int16-rounded HU of one result
    assert denoise(data["series"], out, "--weights", data["weights"], "--format", "both", "--overwrite") == 0


def test_nifti_input_gives_nifti_output(data, tmp_path):
    source = tmp_path / "in.nii.gz"
    save_nifti(load_ct(data["series"]), source)
    out = tmp_path / "out"
    assert denoise(source, out, "--weights", data["weights"]) == 0
    assert load_ct(out / "denoised.nii.gz").shape == (1, 64, 64, 4)


def test_recursive_gives_each_series_its_own_folder(data, tmp_path, capsys):
    tree = tmp_path / "tree"
    phantom_series(tree / "patient1" / "ct", seed=1)
    phantom_series(tree / "patient2" / "ct", seed=2)
    out = tmp_path / "out"
    assert denoise(tree, out, "--weights", data["weights"], "--recursive") == 0
    assert load_ct(out / "patient1" / "ct").shape == (1, 64, 64, 4)
    assert load_ct(out / "patient2" / "ct").shape == (1, 64, 64, 4)
    assert capsys.readouterr().out.count("denoised 4 slices") == 2


def _refused(capsys, argv, output: Path, match: str) -> None:
    code = denoise(*argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return code


def test_without_weights_the_error_says_where_weights_come_from(data, tmp_path, capsys):
    from ldct_clip.bundles import resolve_bundle

    bundle = shutil.copytree(resolve_bundle(), tmp_path / "bundle", ignore=shutil.ignore_patterns("model.pt"))
    _refused(capsys, [data["series"], tmp_path / "o", "--bundle", bundle], tmp_path / "o", "import-reference")
    assert not (tmp_path / "o").exists()


def test_non_ct_series_is_refused(data, tmp_path, capsys):
    mr = phantom_series(tmp_path / "mr", Modality="MR")
    _refused(capsys, [mr, tmp_path / "o", "--weights", data["weights"]], tmp_path / "o", "MR")
    assert not (tmp_path / "o").exists()


def test_empty_folder_is_refused(data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _refused(
        capsys, [tmp_path / "empty", tmp_path / "o", "--weights", data["weights"]], tmp_path / "o", "empty"
    )
    assert not (tmp_path / "o").exists()


def test_truncated_file_is_refused(data, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data["series"], broken)
    victim = sorted(broken.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:3000])
    before = {p.name: p.read_bytes() for p in broken.iterdir()}
    _refused(capsys, [broken, tmp_path / "o", "--weights", data["weights"]], tmp_path / "o", victim.name)
    assert not (tmp_path / "o").exists()
    assert {p.name: p.read_bytes() for p in broken.iterdir()} == before  # input untouched


def test_output_inside_the_input_is_refused(data, tmp_path, capsys):
    series = shutil.copytree(data["series"], tmp_path / "series")
    names = sorted(p.name for p in series.iterdir())
    _refused(capsys, [series, series / "out", "--weights", data["weights"]], series / "out", "inside")
    assert sorted(p.name for p in series.iterdir()) == names


def test_existing_output_is_refused_without_overwrite(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(capsys, [data["series"], out, "--weights", data["weights"]], out, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_dicom_output_of_a_nifti_input_is_refused(data, tmp_path, capsys):
    source = tmp_path / "in.nii.gz"
    save_nifti(load_ct(data["series"]), source)
    _refused(
        capsys,
        [source, tmp_path / "o", "--weights", data["weights"], "--format", "dicom"],
        tmp_path / "o",
        "nifti",
    )
    assert not (tmp_path / "o").exists()


def test_bad_weights_file_is_refused(data, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data["weights"].read_bytes()[:1000])
    _refused(capsys, [data["series"], tmp_path / "o", "--weights", bad], tmp_path / "o", "bad.pt")
    assert not (tmp_path / "o").exists()


def test_series_uid_picks_one_of_several_series(data, tmp_path, capsys):
    folder = tmp_path / "two"
    phantom_series(folder / "a", seed=1)
    phantom_series(folder / "b", seed=2)
    wanted = load_ct(folder / "b")
    uid = wanted.meta["series_uid"]
    _refused(capsys, [folder, tmp_path / "o", "--weights", data["weights"]], tmp_path / "o", "--series-uid")
    assert denoise(folder, tmp_path / "o", "--weights", data["weights"], "--series-uid", uid) == 0
    assert torch.allclose(load_ct(tmp_path / "o").affine, wanted.affine)


def test_weights_default_to_the_bundles_model(data, tmp_path):
    from ldct_clip.bundles import resolve_bundle

    bundle = shutil.copytree(resolve_bundle(), tmp_path / "bundle")
    shutil.copy(data["weights"], bundle / "models" / "model.pt")  # a user's own weights: no sha256 check
    assert denoise(data["series"], tmp_path / "out", "--bundle", bundle) == 0
    assert load_ct(tmp_path / "out").shape == (1, 64, 64, 4)


def test_an_oversized_batch_is_reduced_with_a_note(data, tmp_path, capsys):
    # 64x64 slices are small: a million of them would need ~4 TB of working memory
    assert denoise(data["series"], tmp_path / "out", "--weights", data["weights"], "--batch", "1000000") == 0
    captured = capsys.readouterr()
    assert "batch of 1000000 slices reduced to" in captured.err
    assert captured.out.startswith("denoised 4 slices")
