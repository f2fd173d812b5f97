"""Shared fixtures of the denoising tests: a tiny network's checkpoint and small phantom series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from ldct_clip.data.phantom import write_phantom_dicom
from ldct_clip.networks import CLIPDenoiser, save_checkpoint

TINY = {"layers": (1, 1, 1, 1), "width": 8}
#: The bundle config overrides that build the tiny network (``ldct-clip denoise ... --weights tiny.pt``).
TINY_SET = ["--set", "network_def#layers=[1,1,1,1]", "--set", "network_def#width=8"]
#: The same overrides for ``python -m monai.bundle run``.
TINY_BUNDLE_ARGS = ["--network_def#layers", "[1,1,1,1]", "--network_def#width", "8"]


def tiny_checkpoint(path: Path) -> Path:
    """Random-init ``CLIPDenoiser(layers=(1, 1, 1, 1), width=8)`` saved as an ldct-clip checkpoint."""
    torch.manual_seed(0)
    return save_checkpoint(path, CLIPDenoiser(**TINY))


def phantom_series(path: Path, seed: int = 0, **tags) -> Path:
    """A 64x64x4 phantom CT DICOM series."""
    return write_phantom_dicom(path, size=64, slices=4, seed=seed, **tags)


def dciodvfy_errors(folder: Path) -> list[str]:
    """The "Error" lines dciodvfy reports for every file of ``folder``."""
    errors = []
    for file in sorted(folder.glob("*.dcm")):  # not the ldct-clip manifest beside them
        done = subprocess.run(["dciodvfy", str(file)], capture_output=True, text=True, check=False)
        errors += [
            f"{file.name}: {line}" for line in (done.stdout + done.stderr).splitlines() if "Error" in line
        ]
    return errors


HAVE_DCIODVFY = shutil.which("dciodvfy") is not None
