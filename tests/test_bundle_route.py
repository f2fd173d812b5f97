"""The bundles as MONAI users run them: relocatable folders, one clear error line, the docs' commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from denoise_helpers import TINY_BUNDLE_ARGS, phantom_series, tiny_checkpoint

from ldct_clip.bundles import available_bundles, resolve_bundle
from ldct_clip.io import load_ct
from ldct_clip.networks import CLIPDenoiser, save_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}


def bundle_run(config: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    return {
        "weights": tiny_checkpoint(root / "tiny.pt"),
        "series": phantom_series(root / "series"),
        "root": root,
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", available_bundles())
def test_a_copied_bundle_runs_its_own_configs_and_weights(name, data, tmp_path):
    """``monai.bundle run --config_file COPY/configs/inference.json`` from elsewhere: the copy's config and
    the copy's ``models/model.pt`` (a tiny network the installed bundles' weights would not fit)."""
    copy = shutil.copytree(resolve_bundle(name), tmp_path / "copy", ignore=shutil.ignore_patterns("model.pt"))
    config = json.loads((copy / "configs" / "inference.json").read_text())
    if name == "lowdose_ct_denoising":
        shutil.copy(data["weights"], copy / "models" / "model.pt")
        config["output_format"] = "nifti"  # a change only the copy has
        source = data["series"]
    else:
        from rgb_helpers import tiny_rgb_checkpoint, write_images

        tiny_rgb_checkpoint(copy / "models" / "model.pt")
        config["output_suffix"] = ".tif"  # a change only the copy has
        source = write_images(tmp_path / "images", names=("astronaut",))
    (copy / "configs" / "inference.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    done = bundle_run(
        copy / "configs" / "inference.json",
        "--input", source, "--output_dir", out, "--device", "cpu", "--progress", "False",
        *TINY_BUNDLE_ARGS,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    if name == "lowdose_ct_denoising":
        assert load_ct(out / "denoised.nii.gz").shape == (1, 64, 64, 4)
    else:
        assert (out / "astronaut.tif").is_file()


def _one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    """Apart from MONAI's own warning that every config it parses runs code (printed by every
    ``monai.bundle run`` with the source line that raised it), stderr holds one line: the error."""
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    trust = [i for i, line in enumerate(lines) if "UserWarning: parsing config_file" in line]
    lines = [line for i, line in enumerate(lines) if i not in trust and i - 1 not in trust]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_missing_weights_are_one_line(data, tmp_path):
    config = resolve_bundle() / "configs" / "inference.json"
    done = bundle_run(
        config, "--input", data["series"], "--output_dir", tmp_path / "o", "--ckpt_path", tmp_path / "no.pt",
        "--device", "cpu",
    )  # fmt: skip
    _one_error_line(done, "no.pt", "does not exist")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", available_bundles())
def test_train_config_errors_are_one_line(name, tmp_path):
    # the train configs install the same excepthook as the inference ones: a bad warm start, one line
    config = resolve_bundle(name) / "configs" / "train.json"
    done = bundle_run(
        config, "--init_weights", tmp_path / "no.pt", "--encoder_weights", "none", "--data_dir", tmp_path,
        "--output_dir", tmp_path / "o", "--layers", "[1,1,1,1]", "--width", "8",
    )  # fmt: skip
    _one_error_line(done, "no.pt", "does not exist")
    assert not (tmp_path / "o").exists()
    # the evaluate.json overlay replaces initialize: it installs the hook too
    overlay = f"['{config}', '{config.parent / 'evaluate.json'}']"
    done = bundle_run(
        overlay, "--ckpt_path", tmp_path / "no.pt", "--encoder_weights", "none", "--data_dir", tmp_path,
        "--output_dir", tmp_path / "o", "--layers", "[1,1,1,1]", "--width", "8",
    )  # fmt: skip
    _one_error_line(done, "no.pt", "does not exist")


def test_broken_weights_are_one_line(data, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data["weights"].read_bytes()[:2000])
    config = resolve_bundle() / "configs" / "inference.json"
    done = bundle_run(
        config, "--input", data["series"], "--output_dir", tmp_path / "o", "--ckpt_path", broken,
        "--device", "cpu", *TINY_BUNDLE_ARGS,
    )  # fmt: skip
    _one_error_line(done, "broken.pt")
    assert not (tmp_path / "o").exists()


def test_weights_of_another_network_say_which_overrides_fit(data, tmp_path):
    config = resolve_bundle() / "configs" / "inference.json"
    done = bundle_run(
        config, "--input", data["series"], "--output_dir", tmp_path / "o", "--ckpt_path", data["weights"],
        "--device", "cpu",
    )  # fmt: skip
    _one_error_line(done, "network_def#layers=[1,1,1,1]", "network_def#width=8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_unavailable_device_is_one_line(data, tmp_path):
    config = resolve_bundle() / "configs" / "inference.json"
    done = bundle_run(
        config, "--input", data["series"], "--output_dir", tmp_path / "o", "--ckpt_path", data["weights"],
        "--device", "cuda", *TINY_BUNDLE_ARGS,
    )  # fmt: skip
    _one_error_line(done, "cuda", "device cpu")


def test_an_unreadable_input_is_one_line(data, tmp_path):
    config = resolve_bundle() / "configs" / "inference.json"
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a CT series")
    done = bundle_run(
        config, "--input", junk, "--output_dir", tmp_path / "o", "--ckpt_path", data["weights"],
        "--device", "cpu", *TINY_BUNDLE_ARGS,
    )  # fmt: skip
    _one_error_line(done, "junk.dcm")
    assert junk.read_bytes() == b"not a CT series"


def _doc_commands(readme: Path) -> list[str]:
    """The shell commands of a bundle README's ```bash blocks that run a bundle (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if "monai.bundle" in line]
    return commands


def test_the_bundle_docs_say_how_to_run_each_bundle():
    for name in available_bundles():
        commands = _doc_commands(resolve_bundle(name) / "docs" / "README.md")
        assert any(" run " in c for c in commands), name


@pytest.mark.slow
@pytest.mark.parametrize("name", available_bundles())
def test_every_bundle_docs_command_runs_as_written(name, data, tmp_path):
    """Each inference and check command (``python -m monai.bundle run ... inference.json``,
    ``verify_net_in_out``, ``ckpt_export``) of the bundle's docs, run by bash from the repository root with the
    documented variables set to small data (``$SERIES``, ``$IMAGES``, ``$WEIGHTS``, ``$OUT``). The training and
    evaluation commands (``train.json``, its ``evaluate.json`` overlay) run for hours on their datasets; the
    training tests run the same configs with few iterations."""
    bundle = resolve_bundle(name)
    repo = bundle.parents[1]
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 36), (120, 60, 200)).save(images / "a.png")
    weights = tmp_path / "model.pt"
    if name == "lowdose_ct_denoising":
        weights = bundle / "models" / "model.pt"
    else:
        torch.manual_seed(0)
        save_checkpoint(weights, CLIPDenoiser(in_channels=3, out_channels=3))
    env = {**ENV, "SERIES": str(data["series"]), "IMAGES": str(images), "WEIGHTS": str(weights)}
    commands = [c for c in _doc_commands(bundle / "docs" / "README.md") if "train.json" not in c]
    assert commands
    for i, command in enumerate(commands):
        env["OUT"] = str(tmp_path / f"out{i}")
        (tmp_path / f"out{i}").mkdir()
        done = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, env=env, cwd=repo, timeout=600
        )
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("name", available_bundles())
def test_verify_metadata_offline(name):
    # MONAI downloads the schema named in metadata.json; a local copy of that exact file lets it run offline
    from monai.bundle import verify_metadata

    schema = Path(__file__).parent / "data" / "monai_meta_schema_20240725.json"
    verify_metadata(meta_file=str(resolve_bundle(name) / "configs" / "metadata.json"), filepath=str(schema))
