"""``ldct-clip benchmark`` end to end on tiny simulated pairs, and its refusals."""

import csv
import hashlib
import json
import math
import shutil
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
from denoise_helpers import TINY_SET
from monai.data import MetaTensor

import ldct_clip.bundles.locate
from ldct_clip.apps.benchmark_report import parse_methods, run_benchmark
from ldct_clip.cli import main
from ldct_clip.data.phantom import make_phantom
from ldct_clip.errors import InputError
from ldct_clip.evaluation import select_slices
from ldct_clip.io import save_nifti
from ldct_clip.io.manifest import MANIFEST_NAME
from ldct_clip.networks import CLIPDenoiser, save_checkpoint
from ldct_clip.simulation import simulate_low_dose

METHODS = ("clip", "nlm", "tv")
PNGS = ("slices.png", "differences.png", "nps.png")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """One patient: a 64x64x3 phantom (5 mm pixels: a body-sized 320 mm field of view) and its simulated
    quarter dose, as NIfTI pair files. Pixels of 5 mm average away most of the noise of the default photon
    count, so the count is lowered to give ~25 HU, the noise of a real quarter-dose slice."""
    root = tmp_path_factory.mktemp("pairs")
    full = make_phantom(size=64, slices=3, spacing=(5.0, 5.0, 3.0), seed=0)
    low = simulate_low_dose(full, dose=0.25, photons=3e3, n_views=48, seed=0, workers=1, progress=False)
    save_nifti(low, root / "p1_low.nii.gz")
    save_nifti(full, root / "p1_full.nii.gz")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, CLIPDenoiser(layers=(1, 1, 1, 1), width=8))
    return path


@pytest.fixture(scope="module")
def report(pairs_dir, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bench"
    argv = ["benchmark", str(pairs_dir), "--methods", ",".join(METHODS), "--weights", str(weights), *TINY_SET]
    code = main([*argv, "--protocol", "redcnn", "--output", str(out), "--no-progress"])
    assert code == 0
    return out


def test_report_files_and_figures(report):
    assert sorted(p.name for p in report.iterdir()) == sorted(
        ["report.md", "benchmark.csv", "summary.json", MANIFEST_NAME, *PNGS]
    )
    for name in PNGS:
        image = matplotlib.image.imread(report / name)
        assert image.ndim == 3 and image.shape[0] >= 250 and image.shape[1] >= 400, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"
    text = (report / "report.md").read_text()
    for name in PNGS:
        assert f"]({name})" in text
    assert "`redcnn`" in text and "[-160, 240]" in text


def _table(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("method",):
            rows[cells[0]] = cells[1:]
    return rows


def test_report_table_has_finite_numbers_per_method(report):
    table = _table((report / "report.md").read_text())
    assert set(table) == {"low dose", "CLIP denoiser", "NLM", "TV", "normal dose"}
    for method in ("CLIP denoiser", "NLM", "TV"):
        psnr, ssim, rmse, noise, seconds = (float(v) for v in table[method])
        assert all(math.isfinite(v) for v in (psnr, ssim, rmse, noise, seconds)), method
        assert 0 < ssim <= 1 and rmse > 0 and seconds > 0
    # The classical denoisers do reduce the noise of the simulated quarter dose (same ROI for all).
    low_noise = float(table["low dose"][3])
    assert low_noise > 5.0
    assert float(table["NLM"][3]) < 0.7 * low_noise and float(table["TV"][3]) < 0.7 * low_noise


def test_csv_and_summary(report):
    with (report / "benchmark.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (len(METHODS) + 2)  # 3 slices x (low dose, methods, normal dose)
    for row in rows:
        if row["method"] != "normal_dose":
            assert all(math.isfinite(float(row[k])) for k in ("psnr", "ssim", "rmse_hu", "noise_std_hu"))
    assert all(float(r["sigma_hu"]) > 0 for r in rows if r["method"] in ("nlm", "tv"))
    summary = json.loads((report / "summary.json").read_text())
    assert summary["protocol"] == "redcnn"
    for method in METHODS:
        values = summary["summary"][method]
        assert values["n_slices"] == 3
        assert all(
            isinstance(values[k], float) for k in ("psnr", "ssim", "rmse_hu", "noise_std_hu", "seconds")
        )
    assert set(summary["nps"]) == {"low_dose", *METHODS}
    nps = summary["nps"]["low_dose"]
    assert len(nps["frequency_per_mm"]) == len(nps["nps_hu2_mm2"]) > 3
    assert max(nps["frequency_per_mm"]) <= 0.5 / 5.0 + 1e-9  # Nyquist of 5 mm pixels


@pytest.mark.slow
def test_self_ensemble_reaches_the_model_and_the_report(pairs_dir, weights, tmp_path, report):
    out = tmp_path / "bench"
    argv = ["benchmark", str(pairs_dir), "--methods", ",".join(METHODS), "--weights", str(weights), *TINY_SET]
    assert (
        main([*argv, "--protocol", "redcnn", "--self-ensemble", "--output", str(out), "--no-progress"]) == 0
    )
    with (out / "benchmark.csv").open() as f, (report / "benchmark.csv").open() as g:
        ensemble, plain = ({(r["method"], r["slice"]): r for r in csv.DictReader(h)} for h in (f, g))
    clip = [k for k in plain if k[0] == "clip"]
    # the tiny random network's output lies mostly outside the PSNR window: its noise tells the views apart
    noise = [(float(ensemble[k]["noise_std_hu"]), float(plain[k]["noise_std_hu"])) for k in clip]
    assert len(clip) == 3 and all(abs(a - b) > 0.05 for a, b in noise), noise
    for k in plain:  # the baselines are not touched
        if k[0] != "clip":
            assert ensemble[k]["psnr"] == plain[k]["psnr"] and ensemble[k]["ssim"] == plain[k]["ssim"]
    assert "self-ensemble" in (out / "report.md").read_text()
    assert "self-ensemble" not in (report / "report.md").read_text()


def test_existing_output_is_refused_then_overwritten(pairs_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["benchmark", str(pairs_dir), "--methods", "tv", "--output", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 2  # a folder ldct-clip did not write is never replaced
    assert "keep.txt" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert main([*argv, "--max-slices", "2"]) == 0
    assert main([*argv, "--max-slices", "1", "--overwrite"]) == 0  # an earlier report is
    with (out / "benchmark.csv").open() as f:
        assert {r["slice"] for r in csv.DictReader(f)} == {"0"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "clip,tv", "--weights", "absent.pt"], "absent.pt does not exist"),
        (["--methods", "tv,wiener"], "unknown method(s) wiener"),
        (["--methods", "tv", "--max-slices", "0"], "--max-slices"),
    ],
)
def test_bad_arguments_fail_cleanly(pairs_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "bench"
    assert main(["benchmark", str(pairs_dir), "--output", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_bm3d_without_package(pairs_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)
    out = tmp_path / "bench"
    assert main(["benchmark", str(pairs_dir), "--methods", "tv,bm3d", "--output", str(out)]) == 2
    assert "pip install bm3d" in capsys.readouterr().err
    assert not out.exists()


def test_mismatched_pair_leaves_no_output(tmp_path, capsys):

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    affine = torch.diag(torch.tensor([1.0, 1.0, 3.0, 1.0]))
    save_nifti(MetaTensor(torch.zeros(1, 32, 32, 2), affine=affine), pairs / "a_low.nii.gz")
    save_nifti(MetaTensor(torch.zeros(1, 32, 32, 3), affine=affine), pairs / "a_full.nii.gz")
    out = tmp_path / "bench"
    assert main(["benchmark", str(pairs), "--methods", "tv", "--output", str(out), "--no-progress"]) == 2
    assert "differ" in capsys.readouterr().err
    assert not out.exists()


def test_method_parsing_and_slice_selection():
    assert parse_methods("TV, nlm,tv") == ["tv", "nlm"]
    with pytest.raises(InputError):
        parse_methods(" , ")
    assert select_slices(5, None) == [0, 1, 2, 3, 4]
    assert select_slices(9, 3) == [0, 4, 8]
    assert select_slices(2, 10) == [0, 1]
    assert np.all(np.diff(select_slices(100, 7)) > 0)


def test_methods_never_see_normal_dose():
    """Changing the normal-dose volume changes the scores, never what a method produces or estimates."""
    rng = np.random.default_rng(0)
    affine = torch.diag(torch.tensor([-1.0, -1.0, 3.0, 1.0]))
    full = np.full((1, 48, 48, 2), -1000.0, dtype=np.float32)
    full[:, 6:42, 6:42] = 40.0
    full[:, 20:28, 10:18] = 300.0
    low = MetaTensor(torch.from_numpy(full + rng.normal(0, 30, full.shape).astype(np.float32)), affine=affine)
    seen = []

    def clip(volume):
        seen.append(volume.clone())
        return volume * 0.5 + 20.0

    results = []
    for offset in (0.0, 50.0):
        reference = MetaTensor(torch.from_numpy(full + offset), affine=affine)
        results.append(
            run_benchmark([("p", low, reference)], ["clip", "nlm", "tv"], "redcnn", clip, progress=False)
        )
    first, second = results
    for method in ("clip", "nlm", "tv"):
        np.testing.assert_array_equal(first.figure["images"][method], second.figure["images"][method])
    for a, b in zip(first.rows, second.rows):
        assert a.get("sigma_hu") == b.get("sigma_hu")
        if a["method"] != "normal_dose":
            assert a["psnr"] != b["psnr"]
    # The model got the low-dose slices, nothing else (warm-up slice, then the volume, per run).
    assert all(torch.equal(s.as_tensor(), low[..., : s.shape[-1]].as_tensor()) for s in seen)


def test_unreadable_weights_fail_before_any_output(pairs_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "bench"
    argv = [
        "benchmark",
        str(pairs_dir),
        "--methods",
        "clip",
        "--weights",
        str(bad),
        "--output",
        str(out),
        *TINY_SET,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_clip_defaults_to_the_bundles_weights(pairs_dir, weights, tmp_path, monkeypatch, report):
    """Without --weights the model is the CT bundle's models/model.pt, sha256-checked: the same model rows as
    naming that file."""
    real = ldct_clip.bundles.locate.resolve_bundle("lowdose_ct_denoising")
    bundle = shutil.copytree(
        real, tmp_path / "bundles" / "lowdose_ct_denoising", ignore=shutil.ignore_patterns("*.pt")
    )
    shutil.copy(weights, bundle / "models" / "model.pt")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["shipped_weights"]["sha256"] = digest
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    monkeypatch.setattr(ldct_clip.bundles.locate, "bundle_search_paths", lambda: [tmp_path / "bundles"])
    out = tmp_path / "bench"
    argv = ["benchmark", str(pairs_dir), "--methods", ",".join(METHODS), "--protocol", "redcnn", *TINY_SET]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 0
    with (out / "benchmark.csv").open() as f, (report / "benchmark.csv").open() as g:
        default, named = ([r for r in csv.DictReader(h) if r["method"] == "clip"] for h in (f, g))
    assert [r["psnr"] for r in default] == [r["psnr"] for r in named] and len(default) == 3
    (bundle / "models" / "model.pt").write_bytes(b"damaged")
    assert main([*argv, "--output", str(tmp_path / "other"), "--no-progress"]) == 2
