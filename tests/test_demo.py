"""``ldct-clip demo``: outputs, metrics, refusals; with a tiny random network and a small phantom."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from denoise_helpers import TINY_SET

import ldct_clip.apps.demo
import ldct_clip.bundles.locate
from ldct_clip.apps.demo import DEMO_SPACING, DemoResult, run_demo
from ldct_clip.bundles import bundle_weights
from ldct_clip.cli import main
from ldct_clip.data.phantom import make_phantom, phantom_affine
from ldct_clip.errors import WeightsError
from ldct_clip.evaluation import psnr
from ldct_clip.io import load_ct
from ldct_clip.io.manifest import STAGING_PREFIX
from ldct_clip.networks import CLIPDenoiser, save_checkpoint

SIZE, SLICES = 64, 3
METRIC_KEYS = [
    f"{metric}_{which}" for metric in ("psnr", "ssim", "rmse") for which in ("low_dose", "denoised")
] + ["noise_std_normal_dose", "noise_std_low_dose", "noise_std_denoised"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, CLIPDenoiser(layers=(1, 1, 1, 1), width=8))
    return path


@pytest.fixture
def small_demo(monkeypatch):
    """The CLI with the library's demo shrunk to a 64 x 64 x 3 phantom (the CLI itself has no size options)."""
    original = ldct_clip.apps.demo.run_demo
    monkeypatch.setattr(
        ldct_clip.apps.demo, "run_demo", functools.partial(original, size=SIZE, slices=SLICES, workers=1)
    )


def _fake_bundle(root, weights=None, sha256=None):
    """A copy of the shipped CT bundle, with or without ``models/model.pt`` and its sha256."""
    real = ldct_clip.bundles.locate.resolve_bundle("lowdose_ct_denoising")
    bundle = shutil.copytree(real, root / "lowdose_ct_denoising", ignore=shutil.ignore_patterns("*.pt"))
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    if sha256:
        metadata["shipped_weights"]["sha256"] = sha256
    else:
        del metadata["shipped_weights"]
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    if weights is not None:
        shutil.copy(weights, bundle / "models" / "model.pt")
    return bundle


def test_demo_writes_series_volumes_figure_and_metrics(tmp_path, tiny_weights, small_demo, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--output",
            str(out),
            "--weights",
            str(tiny_weights),
            "--device",
            "cpu",
            "--no-progress",
            *TINY_SET,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 4 and str(out) in printed[0]
    assert printed[1].startswith("redcnn protocol") and printed[2].startswith("paper protocol")
    assert all("PSNR" in line and "dB" in line and "SSIM" in line and "RMSE" in line for line in printed[1:3])
    assert printed[3].startswith("noise std in a flat region")
    assert not list(tmp_path.glob(".partial-*")) and not list(tmp_path.glob(STAGING_PREFIX + "*"))

    for name in ("normal_dose_dicom", "low_dose_dicom", "denoised_dicom"):
        assert len(list((out / name).glob("*.dcm"))) == SLICES
    phantom = make_phantom(SIZE, SLICES, DEMO_SPACING, seed=0)
    expected_affine = phantom_affine(SIZE, DEMO_SPACING, SLICES)
    volumes = {}
    for name in ("normal_dose", "low_dose", "denoised"):
        image = nib.load(out / f"{name}.nii.gz")
        np.testing.assert_allclose(image.affine, expected_affine, atol=1e-4)
        volumes[name] = np.asarray(image.dataobj, dtype=np.float64)
        # the NIfTI and the DICOM series hold the same HU values
        dicom = load_ct(out / f"{name}_dicom")[0].numpy()
        np.testing.assert_array_equal(volumes[name], dicom)
    # normal dose is the phantom (integer HU as stored); low dose differs from it by noise inside the body only
    np.testing.assert_allclose(volumes["normal_dose"], np.rint(phantom[0].numpy()), atol=0.5)
    body = volumes["normal_dose"] > -500
    noise = volumes["low_dose"] - volumes["normal_dose"]
    assert noise[body].std() > 1.0 and abs(noise[body].mean()) < 1.0

    figure = matplotlib.image.imread(out / "comparison.png")
    assert figure.shape[0] > 600 and figure.shape[1] > 600 and figure[..., :3].std() > 0.05

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "redcnn"
    for key in METRIC_KEYS:
        assert math.isfinite(metrics[key]), key
    for key in METRIC_KEYS[:6]:  # PSNR, SSIM, RMSE under the paper's protocol as well
        assert math.isfinite(metrics["paper"][key]), key
    # the reported numbers are those of the written volumes
    as_slices = {k: torch.from_numpy(v).permute(2, 0, 1)[:, None] for k, v in volumes.items()}
    for which in ("low_dose", "denoised"):
        for protocol, where in (("redcnn", metrics), ("paper", metrics["paper"])):
            value = float(psnr(as_slices[which], as_slices["normal_dose"], protocol).mean())
            assert where[f"psnr_{which}"] == pytest.approx(value, abs=1e-3)
    assert metrics["noise_std_low_dose"] > metrics["noise_std_normal_dose"]
    assert metrics["weights_sha256"] == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    assert metrics["seconds"]["total"] > 0 and metrics["slices"] == SLICES
    # the printed numbers are those of metrics.json, and a worse number is called worse (a random network
    # makes the low-dose input worse under both protocols)
    for line, where in ((printed[1], metrics), (printed[2], metrics["paper"])):
        before, after = round(where["psnr_low_dose"], 2), round(where["psnr_denoised"], 2)
        assert f"PSNR {before:.2f} -> {after:.2f} dB: WORSE by {before - after:.2f} dB" in line


def test_demo_refuses_existing_output(tmp_path, tiny_weights, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["demo", "--output", str(out), "--weights", str(tiny_weights), *TINY_SET])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "already exists" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_demo_without_bundled_weights_says_so(tmp_path, monkeypatch, capsys):
    _fake_bundle(tmp_path / "bundles")
    monkeypatch.setattr(ldct_clip.bundles.locate, "bundle_search_paths", lambda: [tmp_path / "bundles"])
    out = tmp_path / "demo"
    code = main(["demo", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        len(err.splitlines()) == 1
        and "model.pt" in err
        and "no trained weights" in err
        and "--weights" in err
    )
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))


def test_bundled_weights_are_found_in_the_bundle(tmp_path, monkeypatch, tiny_weights):
    digest = hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    bundle = _fake_bundle(tmp_path / "bundles", weights=tiny_weights, sha256=digest)
    monkeypatch.setattr(ldct_clip.bundles.locate, "bundle_search_paths", lambda: [tmp_path / "bundles"])
    assert bundle_weights() == bundle / "models" / "model.pt"


def test_damaged_bundled_weights_are_refused_before_writing(tmp_path, monkeypatch, capsys, tiny_weights):
    """A copy whose sha256 is not metadata.json's (here: a Git LFS pointer file) is named, not loaded."""
    digest = hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    bundle = _fake_bundle(tmp_path / "bundles", weights=tiny_weights, sha256=digest)
    (bundle / "models" / "model.pt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + digest + "\nsize 39000000\n"
    )
    monkeypatch.setattr(ldct_clip.bundles.locate, "bundle_search_paths", lambda: [tmp_path / "bundles"])
    out = tmp_path / "demo"
    code = main(["demo", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "sha256" in err and "Git LFS" in err and "reinstall" in err and "--weights" in err
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))
    _fake_bundle(tmp_path / "missing", sha256=digest)  # metadata promises weights the copy lacks
    monkeypatch.setattr(ldct_clip.bundles.locate, "bundle_search_paths", lambda: [tmp_path / "missing"])
    with pytest.raises(WeightsError, match="its weights are missing"):
        bundle_weights()


def test_demo_rejects_unusable_weights_before_writing(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "demo"
    with pytest.raises(WeightsError):
        run_demo(out, weights=bad, size=SIZE, slices=SLICES)
    assert main(["demo", "--output", str(out), "--weights", str(tmp_path / "absent.pt")]) == 2
    assert "absent.pt" in capsys.readouterr().err
    assert not out.exists()


def _summary(redcnn: tuple[float, float], paper: tuple[float, float]) -> list[str]:
    def scores(psnr_pair: tuple[float, float]) -> dict:
        values = {"ssim_low_dose": 0.9, "ssim_denoised": 0.9, "rmse_low_dose": 20.0, "rmse_denoised": 12.0}
        return {"psnr_low_dose": psnr_pair[0], "psnr_denoised": psnr_pair[1], **values}

    metrics = {
        "protocol": "redcnn",
        **scores(redcnn),
        "paper": scores(paper),
        "noise_std_low_dose": 20.0,
        "noise_std_denoised": 8.0,
        "noise_std_normal_dose": 9.0,
        "seconds": {"total": 12.0},
    }
    return DemoResult(output_dir=Path("demo"), metrics=metrics).summary().splitlines()


def test_summary_gives_both_protocols_and_says_what_got_worse():
    """The issue's numbers: the windowed PSNR rises while the full-range one falls; both are printed."""
    lines = _summary(redcnn=(34.22, 37.74), paper=(52.50, 51.46))
    assert "redcnn protocol (HU in [-160, 240]): PSNR 34.22 -> 37.74 dB: better by 3.52 dB" in lines[1]
    assert "paper protocol (HU in [-1024, 3072]): PSNR 52.50 -> 51.46 dB: WORSE by 1.04 dB" in lines[2]
    assert (
        "SSIM 0.9000 -> 0.9000: unchanged" in lines[1]
        and "RMSE 20.0 -> 12.0 HU: better by 8.0 HU" in lines[1]
    )
    assert lines[3] == (
        "noise std in a flat region: low dose 20.0 -> 8.0 HU: better by 12.0 HU (normal dose 9.0 HU)"
    )
