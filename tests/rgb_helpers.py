"""Shared fixtures of the image-task tests (sRGB and synthetic bundles): small sample images, a tiny
3-channel checkpoint, tiny training overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from skimage import data, transform

from ldct_clip.bundles import resolve_bundle
from ldct_clip.io.images import save_image
from ldct_clip.networks import CLIPDenoiser, save_checkpoint

TINY = {"layers": (1, 1, 1, 1), "width": 8}
RGB_BUNDLES = ("synthetic_denoising", "srgb_denoising")


def bundle_config(bundle: str, name: str) -> Path:
    return resolve_bundle(bundle) / "configs" / name


def sample_image(name: str, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A scikit-image sample image resized to ``size``, channel first, float in [0, 1]."""
    image = transform.resize(getattr(data, name)(), size, anti_aliasing=True)
    return image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)


def write_images(
    folder: Path, names=("astronaut", "coffee", "chelsea"), size=(48, 64), suffix=".png"
) -> Path:
    """Small 8-bit copies of scikit-image sample images."""
    for name in names:
        save_image(sample_image(name, size), folder / f"{name}{suffix}")
    return folder


def tiny_rgb_checkpoint(path: Path, in_channels: int = 3, seed: int = 0) -> Path:
    """Random-init ``CLIPDenoiser(in_channels, out_channels, layers=(1, 1, 1, 1), width=8)`` checkpoint."""
    torch.manual_seed(seed)
    return save_checkpoint(path, CLIPDenoiser(in_channels=in_channels, out_channels=in_channels, **TINY))


def tiny_train_overrides(
    data_dir: Path, val_dir: Path, output_dir: Path, iterations: int = 3, **more
) -> dict:
    """A tiny CPU run: random 8-wide encoder, 32^2 crops, batch 2, no loader workers."""
    return {
        "data_dir": str(data_dir),
        "val_dir": str(val_dir),
        "output_dir": str(output_dir),
        "encoder_weights": None,
        "layers": list(TINY["layers"]),
        "width": TINY["width"],
        "iterations": iterations,
        "checkpoint_interval": iterations,
        "batch_size": 2,
        "crop_size": 32,
        "num_workers": 0,
        **more,
    }


class one_thread:
    """torch on one thread: tiny networks run ~100x faster than on two contended cores."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
