"""`ldct-clip robustness`: a tiny suite over two small images writes its table and figure, with the
reference protocol's numbers; user errors end in one line and exit 2, writing nothing."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from denoise_helpers import TINY_SET
from PIL import Image
from rgb_helpers import one_thread, tiny_rgb_checkpoint, write_images

from ldct_clip.cli import main
from ldct_clip.evaluation import rgb_metrics
from ldct_clip.io.images import load_image
from ldct_clip.io.manifest import MANIFEST_NAME
from ldct_clip.transforms.noise import make_noise

SUITE = {"tiny": {"gaussian": [15, 50], "poisson": [2]}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    images = write_images(root / "clean", names=("astronaut", "coffee", "chelsea"))
    suites = root / "suites.json"
    suites.write_text(json.dumps(SUITE))
    return {
        "images": images,
        "suites": suites,
        "weights": tiny_rgb_checkpoint(root / "tiny.pt"),
        "root": root,
    }


def _argv(setup, output, *more):
    return [
        "robustness",
        "--bundle",
        "synthetic_denoising",
        "--images",
        str(setup["images"]),
        "--weights",
        str(setup["weights"]),
        "--output",
        str(output),
        "--suite",
        "tiny",
        "--suites-file",
        str(setup["suites"]),
        "--device",
        "cpu",
        "--max-images",
        "2",
        "--no-progress",
        *TINY_SET,
        *more,
    ]


def test_tiny_run_writes_table_and_figure(setup, tmp_path, capsys):
    out = tmp_path / "report"
    with one_thread():
        assert main(_argv(setup, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["robustness.csv", "robustness.md", "robustness.png", MANIFEST_NAME]
    )
    with open(out / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["noise"], float(r["level"])) for r in rows] == [
        ("gaussian", 15),
        ("gaussian", 50),
        ("poisson", 2),
    ]
    for row in rows:
        assert int(row["images"]) == 2  # --max-images 2 of the 3 files
        values = [float(row[k]) for k in ("psnr_noisy", "ssim_noisy", "psnr_denoised", "ssim_denoised")]
        assert all(math.isfinite(v) for v in values)
        assert 0 < float(row["ssim_noisy"]) <= 1
    # the noisy input's scores follow the protocol: sigma 15/255 is ~24.6 dB before clamping to [0, 1]
    by_level = {float(r["level"]): r for r in rows if r["noise"] == "gaussian"}
    assert 24.3 < float(by_level[15]["psnr_noisy"]) < 26.0
    assert float(by_level[50]["psnr_noisy"]) < float(by_level[15]["psnr_noisy"]) - 8
    # and equal a direct computation (first two images in name order: astronaut, chelsea)
    expected = []
    for name in ("astronaut.png", "chelsea.png"):
        clean = load_image(setup["images"] / name).as_tensor()
        expected.append(rgb_metrics(clean, make_noise("gaussian", 15)(clean), "synthetic")["psnr"])
    assert float(by_level[15]["psnr_noisy"]) == pytest.approx(np.mean(expected), abs=1e-3)
    markdown = (out / "robustness.md").read_text()
    assert markdown.count("| gaussian |") == 2 and "| poisson | 2 | 2 |" in markdown
    with Image.open(out / "robustness.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 300 and figure.size[1] > 300
    assert "scored 2 images x 3 noise settings" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (("--bundle", "lowdose_ct_denoising"), "not images"),
        (("--suite", "nonexistent"), "unknown noise suite"),
        (("--weights", "missing.pt"), "does not exist"),
        (("--max-images", "0"), "--max-images"),
    ],
)
def test_user_errors_exit_2_with_one_line(setup, tmp_path, capsys, change, message):
    argv = _argv(setup, tmp_path / "report")
    flag, value = change
    argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "report").exists()


def test_existing_output_is_refused_before_any_work(setup, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_argv(setup, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_ct_checkpoint_is_refused(setup, tmp_path, capsys):
    ct = tiny_rgb_checkpoint(tmp_path / "ct.pt", in_channels=1)
    argv = _argv(setup, tmp_path / "report")
    argv[argv.index("--weights") + 1] = str(ct)
    assert main(argv) == 2
    assert "network_def#in_channels=1" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
