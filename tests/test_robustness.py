"""Robustness evaluation: the reference protocol end to end with stand-in denoisers, and the report files."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from ldct_clip.apps.robustness_report import (
    denoise_image,
    evaluate_robustness,
    summarise_robustness,
    write_robustness_report,
)
from ldct_clip.errors import InputError, OutputError


def _images():
    astronaut = data.astronaut()[100:170, 180:260].astype(np.float32) / 255  # 70 x 80: padded to 96 x 96
    coffee = data.coffee()[50:114, 100:164].astype(np.float32) / 255
    return [
        ("astronaut", torch.from_numpy(astronaut).permute(2, 0, 1)),
        ("coffee", torch.from_numpy(coffee).permute(2, 0, 1)),
    ]


def _identity(batch):
    assert batch.shape[0] == 1 and batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0
    return batch


def _box_blur(batch):
    return F.avg_pool2d(F.pad(batch, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_identity_denoiser_scores_like_the_noisy_input_and_gaussian_psnr_is_right():
    rows = evaluate_robustness(_identity, _images(), {"gaussian": [25]}, progress=False)
    assert [r["image"] for r in rows] == ["astronaut", "coffee"]
    for row in rows:
        assert row["psnr_denoised"] == row["psnr_noisy"] and row["ssim_denoised"] == row["ssim_noisy"]
        # sigma 25/255 white noise: 20 log10(255/25) = 20.17 dB (clamping to [0, 1] trims a little)
        assert 20.1 < row["psnr_noisy"] < 20.8
    again = evaluate_robustness(_identity, _images(), {"gaussian": [25]}, progress=False)
    assert again == rows  # seed 0 per image: the same noise every run


def test_a_denoiser_gains_on_strong_noise_and_rows_cover_the_suite():
    suite = {"gaussian": [50], "spatial_gaussian": [55], "poisson": [3.5], "salt_pepper": [0.05]}
    rows = evaluate_robustness(_box_blur, _images(), suite, progress=False)
    assert len(rows) == 4 * 2
    summary = summarise_robustness(rows)
    assert [(s["noise"], s["level"], s["images"]) for s in summary] == [
        ("gaussian", 50.0, 2),
        ("spatial_gaussian", 55.0, 2),
        ("poisson", 3.5, 2),
        ("salt_pepper", 0.05, 2),
    ]
    gaussian = summary[0]
    assert gaussian["psnr_denoised"] > gaussian["psnr_noisy"] + 3
    assert gaussian["psnr_noisy"] == pytest.approx(np.mean([r["psnr_noisy"] for r in rows[:2]]))


def test_denoise_image_pads_and_crops_back():
    image = torch.rand(3, 45, 70)
    seen = []

    def record(batch):
        seen.append(tuple(batch.shape))
        return batch * 2

    out = denoise_image(record, image)
    assert seen == [(1, 3, 64, 96)] and out.shape == (3, 45, 70)
    assert torch.equal(out, image * 2)


def test_report_files(tmp_path):
    rows = evaluate_robustness(
        _identity, _images()[:1], {"gaussian": [15, 50], "poisson": [2]}, progress=False
    )
    paths = write_robustness_report(rows, tmp_path / "report")
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["noise"], float(r["level"])) for r in table] == [
        ("gaussian", 15.0),
        ("gaussian", 50.0),
        ("poisson", 2.0),
    ]
    assert float(table[0]["psnr_noisy"]) == pytest.approx(rows[0]["psnr_noisy"], rel=1e-5)
    markdown = paths["markdown"].read_text()
    assert "| gaussian | 15 | 1 |" in markdown and "+0.00" in markdown
    with Image.open(paths["figure"]) as figure:
        assert figure.size[0] > 500 and figure.size[1] > 400
    with pytest.raises(OutputError, match="already exists"):
        write_robustness_report(rows, tmp_path / "report")
    with pytest.raises(InputError, match="no images"):
        evaluate_robustness(_identity, [], {"gaussian": [15]})
    assert math.isfinite(rows[0]["ssim_noisy"])
