"""Shared fixtures of the training/evaluation tests: small phantom data sets and tiny training configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldct_clip.data.phantom import make_phantom, write_phantom_nifti

TRAIN_CONFIG = str(
    Path(__file__).resolve().parents[1] / "bundles" / "lowdose_ct_denoising" / "configs" / "train.json"
)
NOISE_STD = 5.0 / 255.0


def phantom_volumes(root: Path, patients=("A", "B", "C"), size: int = 64, slices: int = 4) -> Path:
    """Normal-dose phantom volumes, one NIfTI per patient (the "volumes" layout)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, patient in enumerate(patients):
        write_phantom_nifti(root / f"{patient}.nii.gz", size=size, slices=slices, seed=i)
    return root


def phantom_mayo_npy(
    root: Path, patients=("P1", "P2"), size: int = 64, slices: int = 3, seed: int = 0
) -> Path:
    """Phantom slices in the Mayo npy layout: target = normalised HU, input = target + N(0, (5/255)^2)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, patient in enumerate(patients):
        hu = make_phantom(size=size, slices=slices, seed=i, fov_padding=False).numpy()[0]
        for z in range(slices):
            target = ((hu[..., z] + 1024.0) / 4096.0).astype(np.float32)
            np.save(root / f"{patient}_{z}_target.npy", target)
            np.save(
                root / f"{patient}_{z}_input.npy",
                (target + rng.normal(0, NOISE_STD, target.shape)).astype(np.float32),
            )
    return root


def tiny_overrides(data_dir: Path, output_dir: Path, iterations: int, **more) -> dict:
    """Config overrides for a tiny CPU run: random 8-wide encoder, 32^2 crops, batch 4, no workers."""
    return {
        "data_dir": str(data_dir),
        "output_dir": str(output_dir),
        "cache_dir": str(output_dir.parent / "cache"),
        "encoder_weights": None,
        "layers": [1, 1, 1, 1],
        "width": 8,
        "iterations": iterations,
        "checkpoint_interval": iterations,
        "batch_size": 4,
        "crop_size": 32,
        "num_workers": 0,
        "val_patients": ["C"],
        **more,
    }


def state_dict_max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


class one_thread:
    """Context manager: torch on one thread (tiny networks run many times faster than on two busy cores)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
