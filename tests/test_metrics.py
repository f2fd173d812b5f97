"""Metric protocols: the reference code's numbers, scikit-image for LDCTBench, one MONAI metric and one ignite
handler for CT and RGB, tables."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct_clip import evaluation as M
from ldct_clip.conventions import model_to_hu, window_bounds
from ldct_clip.errors import InputError

FIXTURE = Path(__file__).parent / "data" / "reference" / "reference_ct_metrics.json"


@pytest.fixture(scope="module")
def reference():
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize(
    "setting,protocol",
    [
        ("full_range_4096", "paper"),
        ("full_range_4096_as_in_reference_test_script", "paper"),
        ("window_-160_240", "redcnn"),
    ],
)
def test_reference_numbers_reproduced(reference, setting, protocol):
    pairs = torch.tensor(reference["inputs_normalised"])  # (3, [noisy, clean], H, W), model range
    params = reference["results"][setting]["params"]
    norm_range = (params["norm_range_min"], params["norm_range_max"])
    proto = M.get_protocol(protocol)
    assert (
        proto.trunc == (params["trunc_min"], params["trunc_max"]) and proto.data_range == params["data_range"]
    )
    noisy = model_to_hu(pairs[:, 0], norm_range)
    clean = model_to_hu(pairs[:, 1], norm_range)
    expected = reference["results"][setting]["per_pair"]
    np.testing.assert_allclose(
        M.psnr(noisy, clean, protocol).numpy(), [e["psnr"] for e in expected], rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        M.ssim(noisy, clean, protocol).numpy(), [e["ssim"] for e in expected], rtol=0, atol=1e-6
    )

    # the same numbers through the MONAI metric on model-range batches
    metric = M.ProtocolMetric("psnr", protocol, norm_range=norm_range, reduction="none")
    metric(pairs[:, :1], pairs[:, 1:])
    np.testing.assert_allclose(metric.aggregate().flatten().numpy(), [e["psnr"] for e in expected], atol=1e-6)


def test_zero_padding_matters():
    # MONAI's valid-convolution SSIM gives a different number: the reason for our own implementation
    from monai.metrics import SSIMMetric

    rng = np.random.default_rng(0)
    clean = torch.tensor(rng.normal(40, 30, (1, 1, 64, 64)), dtype=torch.float32)
    noisy = clean + torch.tensor(rng.normal(0, 20, (1, 1, 64, 64)), dtype=torch.float32)
    ours = M.ssim(noisy, clean, "redcnn").item()
    monai_valid = SSIMMetric(2, data_range=400)(noisy.clamp(-160, 240), clean.clamp(-160, 240)).item()
    assert abs(ours - monai_valid) > 1e-3


@pytest.mark.parametrize("anatomy", ["chest", "abdomen", "head"])
def test_ldctbench_matches_skimage(anatomy):
    rng = np.random.default_rng(1)
    clean = rng.normal(0, 300, (2, 1, 48, 40))
    noisy = clean + rng.normal(0, 40, clean.shape)
    low, high = window_bounds(f"ldctbench_{anatomy}")
    width = high - low
    got = M.compute_ct_metrics(torch.tensor(noisy), torch.tensor(clean), "ldctbench", anatomy)
    for i in range(2):
        a = (np.clip(noisy[i, 0], low, high) - low) / width
        b = (np.clip(clean[i, 0], low, high) - low) / width
        assert got["ssim"][i].item() == pytest.approx(structural_similarity(a, b, data_range=1.0), abs=1e-10)
        assert got["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-9)
        rmse = np.sqrt(np.mean((np.clip(noisy[i, 0], -1024, 1900) - np.clip(clean[i, 0], -1024, 1900)) ** 2))
        assert got["rmse"][i].item() == pytest.approx(rmse, rel=1e-12)


def test_rmse_and_perfect_prediction():
    clean = torch.full((1, 1, 32, 32), 100.0)
    noisy = clean + 10.0
    assert M.rmse(noisy, clean, "paper").item() == pytest.approx(10.0)
    assert M.ssim(clean, clean, "paper").item() == pytest.approx(1.0, abs=1e-6)
    # the redcnn window truncates at 240 HU: an offset above the window vanishes
    assert M.rmse(clean + 500, clean + 600, "redcnn").item() == 0.0


def test_bad_protocol_and_anatomy():
    with pytest.raises(InputError, match="protocol"):
        M.get_protocol("nope")
    with pytest.raises(InputError, match="anatomy"):
        M.get_protocol("ldctbench", "knee")


def test_ignite_handlers_on_an_engine():
    rng = np.random.default_rng(2)
    clean = torch.tensor(rng.uniform(0.2, 0.3, (4, 1, 32, 32)), dtype=torch.float32)
    noisy = clean + torch.tensor(rng.normal(0, 0.01, clean.shape), dtype=torch.float32)
    batches = [{"pred": noisy[:2], "label": clean[:2]}, {"pred": noisy[2:], "label": clean[2:]}]
    engine = Engine(lambda e, b: b)
    M.MetricHandler("psnr", "paper").attach(engine, "psnr")
    M.MetricHandler("rmse", "paper").attach(engine, "rmse")
    engine.run(batches, max_epochs=1)
    hu_noisy, hu_clean = model_to_hu(noisy), model_to_hu(clean)
    assert engine.state.metrics["psnr"] == pytest.approx(M.psnr(hu_noisy, hu_clean).mean().item(), rel=1e-6)
    assert engine.state.metrics["rmse"] == pytest.approx(M.rmse(hu_noisy, hu_clean).mean().item(), rel=1e-6)
    assert engine.state.metrics["rmse"] == pytest.approx(0.01 * 4096, rel=0.1)


def test_metric_table_csv_json(tmp_path):
    table = M.MetricTable("paper")
    table.add(
        "A",
        0,
        {"input": {"psnr": 30, "ssim": 0.8, "rmse": 20}, "denoised": {"psnr": 40, "ssim": 0.9, "rmse": 10}},
    )
    table.add(
        "A",
        1,
        {"input": {"psnr": 32, "ssim": 0.8, "rmse": 20}, "denoised": {"psnr": 42, "ssim": 0.9, "rmse": 10}},
    )
    table.add(
        "B",
        0,
        {"input": {"psnr": 20, "ssim": 0.5, "rmse": 50}, "denoised": {"psnr": 30, "ssim": 0.7, "rmse": 30}},
    )
    summary = table.summary()
    assert summary["denoised"]["psnr"] == pytest.approx(112 / 3)  # mean over slices
    assert summary["per_patient"]["A"]["input"]["psnr"] == pytest.approx(31)
    assert summary["per_patient"]["B"]["n_slices"] == 1
    table.write_csv(tmp_path / "m.csv")
    table.write_json(tmp_path / "s.json")
    rows = list(csv.DictReader((tmp_path / "m.csv").read_text().splitlines()))
    assert len(rows) == 3 and rows[2]["patient"] == "B" and float(rows[0]["denoised_psnr"]) == 40
    assert json.loads((tmp_path / "s.json").read_text())["protocol"] == "paper"
    assert "all" in table.format_table()


def test_one_registry_for_ct_and_rgb():
    """Every protocol by name, the ldctbench ones with their anatomy's named window, the RGB ones beside."""
    assert set(M.PROTOCOLS) == {
        "paper",
        "redcnn",
        "ldctbench-chest",
        "ldctbench-abdomen",
        "ldctbench-head",
        "synthetic",
        "srgb",
    }
    paper, redcnn = M.get_protocol("paper"), M.get_protocol("redcnn")
    assert (paper.trunc, paper.data_range) == ((-1024.0, 3072.0), 4096.0)
    assert (redcnn.trunc, redcnn.data_range) == ((-160.0, 240.0), 400.0)
    head = M.get_protocol("ldctbench", "head")
    assert head is M.PROTOCOLS["ldctbench-head"] and head.trunc == (0.0, 80.0) and head.data_range == 1.0
    assert M.get_protocol("srgb").kind == "rgb" and M.get_protocol("srgb").rounding
    assert M.get_protocol("synthetic").metric_names == ("psnr", "ssim")
    with pytest.raises(InputError, match="scores RGB images"):
        M.psnr(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), "srgb")
    with pytest.raises(InputError, match="scores CT slices"):
        M.rgb_metrics(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), "paper")
    with pytest.raises(InputError, match="no metric 'rmse'"):
        M.ProtocolMetric("rmse", "synthetic")


def test_the_same_metric_and_handler_score_rgb_images():
    rng = np.random.default_rng(5)
    clean = torch.tensor(rng.uniform(0, 1, (3, 3, 24, 20)), dtype=torch.float32)
    noisy = clean + torch.tensor(rng.normal(0, 0.05, clean.shape), dtype=torch.float32)
    expected = {m: [M.rgb_metrics(c, n, "srgb")[m] for c, n in zip(clean, noisy)] for m in ("psnr", "ssim")}
    metric = M.ProtocolMetric("ssim", "srgb", reduction="none")
    metric(noisy, clean)
    np.testing.assert_allclose(metric.aggregate().flatten().numpy(), expected["ssim"], rtol=0, atol=1e-12)
    engine = Engine(lambda e, b: b)
    M.MetricHandler("psnr", "srgb").attach(engine, "psnr")
    engine.run(
        [{"pred": noisy[:2], "label": clean[:2]}, {"pred": noisy[2:], "label": clean[2:]}], max_epochs=1
    )
    assert engine.state.metrics["psnr"] == pytest.approx(np.mean(expected["psnr"]), rel=1e-6)  # via float32
