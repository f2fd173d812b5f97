"""The demo weights shipped in the low-dose CT bundle: the file metadata.json names, the paper's CT network,
small enough to ship, and better than the low-dose input on a phantom they were not trained on."""

import json

import pytest
import torch

from ldct_clip.apps.demo import run_demo
from ldct_clip.bundles import SHIPPED_WEIGHTS, bundle_weights, resolve_bundle
from ldct_clip.networks import load_model
from ldct_clip.networks.clip_weights import sha256_of

#: Trainable parameters of the paper's one-channel (CT) network (tests/test_network.py checks the count).
PAPER_CT_TRAINABLE = 10_987_779


def test_shipped_weights_are_the_file_metadata_names():
    bundle = resolve_bundle()
    shipped = json.loads((bundle / "configs" / "metadata.json").read_text())["shipped_weights"]
    path = bundle_weights()
    assert path == bundle / SHIPPED_WEIGHTS and shipped["path"] == SHIPPED_WEIGHTS.as_posix()
    assert sha256_of(path) == shipped["sha256"]
    assert path.stat().st_size <= 45_000_000


def test_shipped_weights_are_the_papers_ct_network_in_float16():
    checkpoint = torch.load(bundle_weights(), map_location="cpu", weights_only=True)
    floats = [t for t in checkpoint["model"].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    model = load_model(bundle_weights())
    assert model.config["in_channels"] == 1 and model.config["out_channels"] == 1
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PAPER_CT_TRAINABLE
    assert all(p.dtype == torch.float32 for p in model.parameters())  # cast back on load


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two slices of the demo (512 x 512 phantom of a seed never trained on, simulated quarter dose)."""
    return run_demo(tmp_path_factory.mktemp("demo") / "demo", slices=2, workers=1, progress=False)


@pytest.mark.slow
def test_demo_with_the_shipped_weights_beats_the_low_dose_input(demo):
    result = demo
    metrics = result.metrics
    assert metrics["weights_sha256"] == sha256_of(bundle_weights())
    assert result.psnr_gain > 1.0, metrics
    assert metrics["ssim_denoised"] > metrics["ssim_low_dose"]
    assert metrics["noise_std_denoised"] < 0.5 * metrics["noise_std_low_dose"]


@pytest.mark.slow
def test_self_ensemble_of_the_shipped_weights_is_better_on_the_demo(demo, tmp_path):
    """The mean over the 8 rotated and mirrored views (``--self-ensemble``) gains on the same two slices
    (measured in benchmarks/README.md)."""
    overrides = {"self_ensemble": True}
    ensemble = run_demo(tmp_path / "demo", slices=2, workers=1, progress=False, overrides=overrides).metrics
    assert ensemble["psnr_low_dose"] == demo.metrics["psnr_low_dose"]  # the same input
    assert ensemble["psnr_denoised"] > demo.metrics["psnr_denoised"] + 0.08, (ensemble, demo.metrics)
    assert ensemble["ssim_denoised"] >= demo.metrics["ssim_denoised"]


def test_a_series_denoised_with_the_demo_weights_says_so_in_the_pacs(tmp_path):
    """Provenance: the derived series names the weights (12-hex sha256 prefix), the bundle and its version,
    the ldct-clip version, and says "demo weights" where a PACS lists series."""
    import pydicom
    from denoise_helpers import phantom_series

    import ldct_clip
    from ldct_clip.cli import main

    series = phantom_series(tmp_path / "series")
    out = tmp_path / "out"
    assert main(["denoise", str(series), str(out), "--device", "cpu", "--no-progress"]) == 0
    shipped = json.loads((resolve_bundle() / "configs" / "metadata.json").read_text())
    for path in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert "demo weights" in ds.SeriesDescription
        assert shipped["shipped_weights"]["sha256"][:12] in ds.DerivationDescription
        assert (
            "lowdose_ct_denoising" in ds.DerivationDescription
            and shipped["version"] in ds.DerivationDescription
        )
        (equipment,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "ldct-clip"]
        assert ldct_clip.__version__ in str(equipment.SoftwareVersions)
    sidecar = json.loads((out / "ldct-clip-manifest.json").read_text())
    assert sidecar["provenance"]["weights_sha256"] == shipped["shipped_weights"]["sha256"]
    assert sidecar["provenance"]["demo_weights"] is True
