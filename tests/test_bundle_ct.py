"""The CT MONAI bundle: metadata per the bundle specification, `monai.bundle run` equal to the CLI,
`verify_net_in_out` and a TorchScript `ckpt_export`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch
from bundle_spec import REQUIRED_KEYS, TENSOR_KEYS
from denoise_helpers import TINY, TINY_BUNDLE_ARGS, TINY_SET, phantom_series, tiny_checkpoint
from monai.bundle import ckpt_export, verify_net_in_out

import ldct_clip
from ldct_clip.bundles import DEFAULT_CT_BUNDLE, resolve_bundle
from ldct_clip.cli import main
from ldct_clip.errors import InputError
from ldct_clip.io import load_ct
from ldct_clip.networks import CLIPDenoiser

BUNDLE = resolve_bundle(DEFAULT_CT_BUNDLE)
META = BUNDLE / "configs" / "metadata.json"
INFERENCE = BUNDLE / "configs" / "inference.json"

VERSION = re.compile(r"^\d+\.\d+(\.\d+)?")


@pytest.fixture(scope="module")
def meta():
    return json.loads(META.read_text())


def test_metadata_has_every_field_the_specification_requires(meta):
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    assert not missing, missing
    for key in ("version", "monai_version", "pytorch_version", "numpy_version"):
        assert VERSION.match(meta[key]), (key, meta[key])
    assert meta["version"] in meta["changelog"]
    for key in ("task", "description", "authors", "copyright", "intended_use", "data_source", "data_type"):
        assert isinstance(meta[key], str) and meta[key].strip(), key
    assert meta["references"] and all(isinstance(r, str) for r in meta["references"])
    packages = meta["required_packages_version"]
    assert packages["ldct-clip"] == ldct_clip.__version__
    assert {"open_clip_torch", "pydicom", "nibabel", "SimpleITK"} <= set(packages)
    assert all(VERSION.match(v) for v in packages.values())


def test_metadata_tensor_formats(meta):
    formats = meta["network_data_format"]
    assert set(formats) == {"inputs", "outputs"}
    assert set(formats["inputs"]) == {"image"} and set(formats["outputs"]) == {"pred"}
    for tensor in (formats["inputs"]["image"], formats["outputs"]["pred"]):
        missing = [k for k in TENSOR_KEYS if k not in tensor]
        assert not missing, missing
        assert tensor["type"] == "image" and tensor["format"] == "hounsfield" and tensor["modality"] == "CT"
        assert tensor["num_channels"] == 1 and len(tensor["channel_def"]) == 1
        assert len(tensor["spatial_shape"]) == 2 and tensor["dtype"] == "float32"
        assert len(tensor["value_range"]) == 2 and isinstance(tensor["is_patch_data"], bool)
        assert "(HU + 1024) / 4096" in tensor["channel_def"]["0"]


def test_bundle_layout_and_resolution(tmp_path):
    for name in ("configs/inference.json", "configs/logging.conf", "docs/README.md", "LICENSE", "models"):
        assert (BUNDLE / name).exists(), name
    assert "MIT License" in (BUNDLE / "LICENSE").read_text()
    assert resolve_bundle(BUNDLE) == BUNDLE
    with pytest.raises(InputError, match=DEFAULT_CT_BUNDLE):
        resolve_bundle(tmp_path)


@pytest.mark.slow
def test_bundle_run_equals_the_cli(tmp_path):
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    series = phantom_series(tmp_path / "series")
    bundle_out, cli_out = tmp_path / "bundle", tmp_path / "cli"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE)]
    cmd += ["--input", str(series), "--output_dir", str(bundle_out), "--ckpt_path", str(weights)]
    cmd += ["--output_format", "both", "--device", "cpu", "--progress", "False", *TINY_BUNDLE_ARGS]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    argv = ["denoise", str(series), str(cli_out), "--weights", str(weights), "--format", "both"]
    assert main([*argv, "--device", "cpu", "--no-progress", *TINY_SET]) == 0
    source = load_ct(series)
    for part in ("dicom", "denoised.nii.gz"):
        from_bundle, from_cli = load_ct(bundle_out / part), load_ct(cli_out / part)
        assert torch.equal(from_bundle.as_tensor(), from_cli.as_tensor()), part
        assert torch.allclose(from_bundle.affine, source.affine, atol=1e-4)
        assert (from_bundle - source).abs().max() > 1  # denoised, not copied


def test_verify_net_in_out(tmp_path):
    verify_net_in_out(
        net_id="network_def", meta_file=str(META), config_file=str(INFERENCE), device="cpu", n=2, any=1
    )


def test_ckpt_export_torchscript(tmp_path):
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    target = tmp_path / "model.ts"
    # open_clip/ldct_clip modules are not scriptable (see docs/README.md): trace at a slice size the
    # predictor produces (a multiple of 32); any multiple of 16 then runs the traced graph exactly
    ckpt_export(
        net_id="network_def",
        filepath=str(target),
        ckpt_file=str(weights),
        meta_file=str(META),
        config_file=str(INFERENCE),
        key_in_ckpt="model",
        use_trace=True,
        input_shape=[1, 1, 64, 64],
        **{"network_def#layers": list(TINY["layers"]), "network_def#width": TINY["width"]},
    )
    exported = torch.jit.load(str(target))
    torch.manual_seed(0)
    reference = CLIPDenoiser(**TINY).eval()
    reference.load_state_dict(torch.load(weights, weights_only=True)["model"])
    x = torch.rand(2, 1, 96, 128)
    with torch.no_grad():
        assert torch.allclose(exported(x), reference(x), atol=1e-5)
    with zipfile.ZipFile(target) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith("extra/metadata.json"))
        assert json.loads(archive.read(metadata))["version"] == json.loads(META.read_text())["version"]


@pytest.mark.slow
def test_the_wheel_ships_the_bundle(tmp_path):
    pytest.importorskip("setuptools")
    root = BUNDLE.parents[1]
    if not (root / "setup.py").is_file():
        pytest.skip("not a source checkout")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root)]
    done = subprocess.run([*build, "-w", str(tmp_path)], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("ldct_clip-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    # the unpacked wheel first on the path: resolve_bundle must find the bundle inside the package
    # and the demo weights inside it, sha256-checked against its metadata.json
    code = "import ldct_clip.bundles as b; print(b.resolve_bundle()); print(b.bundle_weights())"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    found, weights = done.stdout.split()
    assert found == str(tmp_path / "site" / "ldct_clip" / "bundles" / DEFAULT_CT_BUNDLE)
    assert weights == found + "/models/model.pt"
    assert json.loads(
        (
            tmp_path / "site" / "ldct_clip" / "bundles" / DEFAULT_CT_BUNDLE / "configs" / "metadata.json"
        ).read_text()
    )


def test_the_network_sees_every_volume_in_the_training_orientation(tmp_path):
    # the same anatomy stored as LPS DICOM and as a RAS NIfTI: the inferer flips each batch of slices to LPS
    # on the way in and back on the way out, so both give the same denoised voxels (in their own layout)
    from monai.transforms import Orientation

    from ldct_clip.io import save_nifti

    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    series = phantom_series(tmp_path / "series")
    ras = Orientation(axcodes="RAS", labels=None)(load_ct(series))
    source = save_nifti(ras, tmp_path / "ras.nii.gz")
    for name, given in (("lps", series), ("ras", source)):
        argv = ["denoise", str(given), str(tmp_path / name), "--weights", str(weights), "--format", "nifti"]
        assert main([*argv, "--device", "cpu", "--no-progress", *TINY_SET]) == 0
    from_lps = load_ct(tmp_path / "lps" / "denoised.nii.gz")
    from_ras = load_ct(tmp_path / "ras" / "denoised.nii.gz")
    back = Orientation(axcodes="LPS", labels=None)(from_ras)
    assert torch.equal(back.as_tensor(), from_lps.as_tensor())
    assert torch.allclose(from_ras.affine, load_ct(source).affine)
    assert (from_ras - load_ct(source)).abs().max() > 1
