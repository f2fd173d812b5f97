"""The sRGB and synthetic-noise MONAI bundles: metadata, `monai.bundle run` inference and `verify_net_in_out`
(their training: ``test_bundles_training.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bundle_spec import REQUIRED_KEYS, TENSOR_KEYS
from denoise_helpers import TINY_BUNDLE_ARGS, TINY_SET
from monai.bundle import verify_net_in_out
from rgb_helpers import (
    RGB_BUNDLES,
    bundle_config,
    one_thread,
    sample_image,
    tiny_rgb_checkpoint,
    write_images,
)

import ldct_clip
from ldct_clip.bundles import resolve_bundle
from ldct_clip.cli import main
from ldct_clip.io.images import load_image, save_image

PROTOCOL = {"synthetic_denoising": "synthetic", "srgb_denoising": "srgb"}
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _json(bundle: str, name: str) -> dict:
    return json.loads(bundle_config(bundle, name).read_text())


@pytest.mark.parametrize("bundle", RGB_BUNDLES)
def test_metadata_has_the_specification_fields(bundle):
    meta = _json(bundle, "metadata.json")
    assert not [k for k in REQUIRED_KEYS if k not in meta]
    assert meta["version"] in meta["changelog"]
    assert meta["required_packages_version"]["ldct-clip"] == ldct_clip.__version__
    assert meta["denoising_task"] == meta["metric_protocol"] == PROTOCOL[bundle]
    for tensor in (
        meta["network_data_format"]["inputs"]["image"],
        meta["network_data_format"]["outputs"]["pred"],
    ):
        assert not [k for k in TENSOR_KEYS if k not in tensor]
        assert tensor["num_channels"] == 3 and len(tensor["channel_def"]) == 3
        assert tensor["value_range"] == [0, 1] and tensor["dtype"] == "float32"
    root = resolve_bundle(bundle)
    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "logging.conf"):
        assert (root / "configs" / name).is_file(), name
    assert "MIT License" in (root / "LICENSE").read_text()
    assert (root / "docs" / "README.md").is_file() and (root / "models" / "README.md").is_file()


@pytest.mark.parametrize("bundle", RGB_BUNDLES)
def test_bundle_inference_on_a_folder(bundle, tmp_path):
    inputs = write_images(tmp_path / "in", names=("astronaut",))
    save_image(sample_image("coffee"), inputs / "coffee16.png", bit_depth=16)
    save_image(sample_image("camera"), inputs / "camera.png")  # grey
    weights = tiny_rgb_checkpoint(tmp_path / "tiny.pt")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle_config(bundle, "inference.json")),
    ]
    cmd += ["--input", str(inputs), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(weights)]
    done = subprocess.run(
        [*cmd, "--device", "cpu", "--progress", "False", *TINY_BUNDLE_ARGS],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("astronaut.png", "coffee16.png", "camera.png"):
        source, result = load_image(inputs / name), load_image(tmp_path / "out" / name)
        assert result.shape == source.shape, name
        assert result.meta["bit_depth"] == source.meta["bit_depth"], name
        assert (result - source).abs().mean() > 0.01, name  # denoised (here: a random network), not copied
    assert load_image(tmp_path / "out" / "coffee16.png").meta["bit_depth"] == 16
    # `ldct-clip denoise --bundle` is the same code path: the same files, byte for byte
    argv = ["denoise", str(inputs), str(tmp_path / "cli"), "--bundle", bundle, "--weights", str(weights)]
    with one_thread():
        assert main([*argv, "--device", "cpu", "--no-progress", *TINY_SET]) == 0
    for name in ("astronaut.png", "coffee16.png", "camera.png"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


@pytest.mark.parametrize("bundle", RGB_BUNDLES)
def test_verify_net_in_out(bundle):
    # the bundle's own network_def (RN50 with a random encoder: the CLIP weights come with the checkpoint)
    with one_thread():
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(bundle_config(bundle, "metadata.json")),
            config_file=str(bundle_config(bundle, "inference.json")),
            device="cpu",
            n=1,
            any=1,
        )
