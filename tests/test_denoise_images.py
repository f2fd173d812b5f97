"""`ldct-clip denoise` with an image bundle: one image or a folder in, denoised images out at the same
size and bit depth, equal to the bundle's `inference.json` path; all outputs or none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from denoise_helpers import TINY_SET
from rgb_helpers import one_thread, sample_image, tiny_rgb_checkpoint, write_images

from ldct_clip.bundles import BundlePipeline
from ldct_clip.cli import main
from ldct_clip.errors import InputError, OutputError
from ldct_clip.inference import SlicePredictor
from ldct_clip.io.images import list_images, load_image, save_image
from ldct_clip.io.jobs import plan_image_jobs
from ldct_clip.networks import load_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_rgb_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.fixture
def folder(tmp_path):
    inputs = write_images(tmp_path / "in", names=("astronaut", "chelsea"))
    save_image(sample_image("coffee"), inputs / "coffee16.tif", bit_depth=16)
    save_image(sample_image("camera"), inputs / "camera.png")
    return inputs


def _denoise(*argv) -> int:
    with one_thread():
        return main(["denoise", *map(str, argv), "--device", "cpu", "--no-progress", *TINY_SET])


def test_bundle_tasks():
    assert BundlePipeline("srgb_denoising").task == "srgb"
    assert BundlePipeline("synthetic_denoising").task == "synthetic"
    assert BundlePipeline("lowdose_ct_denoising").task == "ct"


def test_one_image(weights, folder, tmp_path, capsys):
    out = tmp_path / "one.tif"
    assert _denoise(folder / "coffee16.tif", out, "--bundle", "srgb_denoising", "--weights", weights) == 0
    source, result = load_image(folder / "coffee16.tif"), load_image(out)
    assert result.shape == source.shape == (3, 48, 64) and result.meta["bit_depth"] == 16
    # exactly what the library gives for this image (padded to 32, clamped), to 16-bit rounding
    with torch.no_grad(), one_thread():
        model = load_model(weights).eval()
        expected = SlicePredictor(model, channels_last=True)(source.as_tensor()[None])[0].clamp(0, 1)
    assert (result.as_tensor() - expected).abs().max() <= 0.5 / 65535 + 1e-6
    assert "denoised 1 image" in capsys.readouterr().out


def test_a_folder_keeps_names_sizes_and_bit_depths(weights, folder, tmp_path):
    out = tmp_path / "out"
    assert _denoise(folder, out, "--bundle", "synthetic_denoising", "--weights", weights) == 0
    # the folder is one output: the images and its manifest
    images = list_images(folder)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in images] + ["ldct-clip-manifest.json"]
    )
    for path in images:
        source, result = load_image(path), load_image(out / path.name)
        assert result.shape == source.shape, path.name  # grey stays grey
        assert result.meta["bit_depth"] == source.meta["bit_depth"], path.name
        assert float((result - source).abs().mean()) > 0.01, path.name


def test_existing_outputs_and_outputs_inside_the_input_are_refused(weights, folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    save_image(torch.zeros(3, 8, 8), out / "chelsea.png")
    before = (out / "chelsea.png").read_bytes()
    assert _denoise(folder, out, "--bundle", "srgb_denoising", "--weights", weights) == 2
    assert "already exists" in capsys.readouterr().err
    assert _denoise(folder, folder / "sub", "--bundle", "srgb_denoising", "--weights", weights) == 2
    assert "inside the input folder" in capsys.readouterr().err
    # a folder ldct-clip did not write is never replaced, not even with --overwrite
    assert _denoise(folder, out, "--bundle", "srgb_denoising", "--weights", weights, "--overwrite") == 2
    assert "will not replace" in capsys.readouterr().err
    assert (out / "chelsea.png").read_bytes() == before
    for path in out.iterdir():
        path.unlink()
    out.rmdir()
    assert _denoise(folder, out, "--bundle", "srgb_denoising", "--weights", weights) == 0
    first = (out / "chelsea.png").read_bytes()
    assert _denoise(folder, out, "--bundle", "srgb_denoising", "--weights", weights, "--overwrite") == 0
    assert (out / "chelsea.png").read_bytes() == first  # its own output: replaced by the same result


def test_a_bad_image_leaves_no_output(weights, folder, tmp_path, capsys):
    (folder / "zz_broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    assert _denoise(folder, out, "--bundle", "srgb_denoising", "--weights", weights) == 2
    err = capsys.readouterr().err.strip()
    assert "zz_broken.png" in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_wrong_weights_and_ct_options_are_refused(weights, folder, tmp_path, capsys):
    ct = tiny_rgb_checkpoint(tmp_path / "ct.pt", in_channels=1)
    assert _denoise(folder, tmp_path / "a", "--bundle", "srgb_denoising", "--weights", ct) == 2
    assert "do not fit the network" in capsys.readouterr().err
    assert (
        _denoise(folder, tmp_path / "b", "--bundle", "srgb_denoising", "--weights", weights, "--recursive")
        == 2
    )
    assert "--recursive" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plan_image_jobs(folder, tmp_path):
    jobs = plan_image_jobs(folder, tmp_path / "o", suffix="png")
    assert [Path(j["output"]).name for j in jobs] == [
        "astronaut.png",
        "camera.png",
        "chelsea.png",
        "coffee16.png",
    ]
    assert plan_image_jobs(folder / "camera.png", tmp_path / "x.tif") == [
        {"image": str(folder / "camera.png"), "output": str(tmp_path / "x.tif")}
    ]
    with pytest.raises(InputError, match="not an image type"):
        plan_image_jobs(folder, tmp_path / "o", suffix=".txt")
    with pytest.raises(OutputError, match="input itself"):
        plan_image_jobs(folder / "camera.png", folder / "camera.png", overwrite=True)
    with pytest.raises(InputError, match="no input"):
        plan_image_jobs(None, tmp_path / "o")
