"""Image datasets of the sRGB and synthetic-noise tasks: training stream of noisy crops and validation pairs.

Two layouts (``is_paired_folder`` tells them apart):

- a folder of clean images (PNG, JPEG, TIFF, BMP): the noise is made on the fly, by a configured
  dictionary transform in training (``GaussianNoised`` for the synthetic task, ``CameraPipelineNoised`` for
  sRGB) and by a configured array transform, reseeded per image, for validation;
- BasicSR's paired folders ``ROOT/noisy/NAME`` and ``ROOT/clean/NAME`` (``data_prep/make_srgb_pairs.py``
  writes them; SIDD-style test sets can be arranged so), paired by file name: the noisy image is read.

The training stream is the CT task's: :class:`ldct_clip.data.stream.StreamDataset` over the clean (or
paired) images with per-item seeded crops, flips/rotations and noise, sampled by
:class:`~ldct_clip.data.stream.StreamSampler`, so resuming and multi-GPU sharding work the same way.
Images are decoded per item (``ldct_clip.io.images.load_image``): the paper's training sets (CBSD432,
DIV2K crops) hold thousands of images, too many to keep decoded in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from monai.transforms import Compose, CopyItemsd, EnsureTyped, RandSpatialCropd, SpatialPadd
from torch.utils.data import Dataset

from ldct_clip.data.stream import StreamDataset
from ldct_clip.errors import InputError
from ldct_clip.io.images import list_images, load_image
from ldct_clip.transforms.augment import RandDihedrald

__all__ = [
    "ImageFolderDataset",
    "image_train_transforms",
    "is_paired_folder",
    "make_image_train_dataset",
    "make_image_val_dataset",
]


def is_paired_folder(root: str | os.PathLike) -> bool:
    """True when ``root`` holds ``noisy/`` and ``clean/`` sub-folders (BasicSR's paired layout)."""
    root = Path(root)
    return (root / "noisy").is_dir() and (root / "clean").is_dir()


class ImageFolderDataset(Dataset):
    """Images of a folder as ``{"label": clean (C, H, W) float32 in [0, 1], "image": noisy, "name"}``.

    ``"image"`` is the paired noisy file in the paired layout; in the clean-folder layout it is made by
    ``noise`` (an array transform, reseeded with ``seed + index`` before each image, so every epoch and
    every run sees the same noisy images), or absent when ``noise`` is None (training: the noise comes later).

    Args:
        root: folder of clean images, or a paired folder (``noisy/`` + ``clean/``).
        channels: channels of the network (3: grey files are repeated to RGB).
        noise: array transform making the noisy image from the clean one (clean-folder layout only).
        seed: base seed of ``noise``.
        max_images: keep the first ``max_images`` images in name order (None: all).
        transform: applied to each item.

    Raises:
        InputError: no images, or a paired folder whose names do not match.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        channels: int | None = 3,
        noise: Callable | None = None,
        seed: int = 0,
        max_images: int | None = None,
        transform: Callable | None = None,
    ) -> None:
        root = Path(root)
        self.paired = is_paired_folder(root)
        self.channels = channels
        self.noise = noise
        self.seed = int(seed)
        self.transform = transform
        if self.paired:
            clean = list_images(root / "clean")
            noisy = {p.name: p for p in list_images(root / "noisy")}
            missing = [p.name for p in clean if p.name not in noisy]
            if missing:
                raise InputError(
                    f"{root / 'clean' / missing[0]} has no noisy partner in {root / 'noisy'} "
                    f"({len(missing)} missing): pair the files by name"
                )
            self.files = [(p, noisy[p.name]) for p in clean]
        else:
            if not root.is_dir():
                raise InputError(f"image folder {root} does not exist; give a folder of clean images")
            self.files = [(p, None) for p in list_images(root)]
        if max_images is not None:
            self.files = self.files[: int(max_images)]
        if not self.files:
            raise InputError(f"no images in {root}; check the folder")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        clean_path, noisy_path = self.files[index]
        clean = load_image(clean_path, channels=self.channels).as_tensor()
        item: dict = {"label": clean, "name": clean_path.name}
        if noisy_path is not None:
            noisy = load_image(noisy_path, channels=self.channels).as_tensor()
            if noisy.shape != clean.shape:
                raise InputError(
                    f"{noisy_path} {tuple(noisy.shape)} and {clean_path} {tuple(clean.shape)} differ in size"
                )
            item["image"] = noisy
        elif self.noise is not None:
            if hasattr(self.noise, "set_random_state"):
                self.noise.set_random_state(seed=(self.seed + index) % 2**32)
            item["image"] = torch.as_tensor(self.noise(clean), dtype=torch.float32)
        return self.transform(item) if self.transform is not None else item


def image_train_transforms(
    crop_size: int = 128, noise: Callable | None = None, dihedral: bool = True
) -> Compose:
    """Random crop, one of the 8 flips/rotations, then noise: the training sample of the RGB tasks.

    Clean-only samples (``{"label"}``) get ``"image"`` as a copy of the clean crop, then ``noise`` (a
    dictionary transform on ``"image"``, e.g. ``GaussianNoised("image", sigma=15)`` or
    ``CameraPipelineNoised("image", noisy_key="image")``). Paired samples (``{"image", "label"}``) are
    cropped and flipped alike and get no further noise. Images smaller than the crop are reflect-padded.
    """
    keys = ("image", "label")
    transforms: list[Callable] = [
        SpatialPadd(keys, spatial_size=(crop_size, crop_size), mode="reflect", allow_missing_keys=True),
        RandSpatialCropd(keys, roi_size=(crop_size, crop_size), random_size=False, allow_missing_keys=True),
    ]
    if dihedral:
        transforms.append(RandDihedrald(keys, allow_missing_keys=True))
    transforms.append(_NoiseIfClean(noise))
    # plain tensors: MetaTensor bookkeeping in every network op costs more than the network itself
    transforms.append(EnsureTyped(keys, data_type="tensor", track_meta=False))
    return Compose(transforms)


class _NoiseIfClean(Compose):
    """Copies the clean crop to ``"image"`` and applies the noise, unless the sample is already paired.

    A ``Compose`` so that ``StreamDataset``'s ``set_random_state`` reaches the noise transform."""

    def __init__(self, noise: Callable | None) -> None:
        super().__init__([CopyItemsd("label", names="image")] + ([noise] if noise is not None else []))

    def __call__(self, data, *args, **kwargs):  # type: ignore[override]
        if "image" in data:
            return data
        return super().__call__(data, *args, **kwargs)


def make_image_train_dataset(
    data_dir: str | os.PathLike,
    crop_size: int = 128,
    noise: Callable | None = None,
    seed: int = 0,
    channels: int = 3,
) -> StreamDataset:
    """The training stream of an RGB task (the CT task's :class:`StreamDataset`, seeded per item).

    Args:
        data_dir: folder of clean images, or a paired folder (``noisy/`` + ``clean/``; ``noise`` unused).
        crop_size: square crop side (128 in the paper).
        noise: dictionary transform adding the training noise to ``"image"``.
        seed: seed of the whole stream.
        channels: network channels.
    """
    base = ImageFolderDataset(data_dir, channels=channels)
    return StreamDataset(base, image_train_transforms(crop_size, noise), seed=seed)


def make_image_val_dataset(
    val_dir: str | os.PathLike,
    noise: Callable | None = None,
    seed: int = 0,
    channels: int = 3,
    max_images: int | None = None,
) -> ImageFolderDataset:
    """Validation/evaluation pairs ``{"image": noisy, "label": clean, "name"}`` (whole images).

    Args:
        val_dir: paired folder (real noisy images, e.g. sRGB pairs or SIDD), or clean images.
        noise: array transform for the clean-folder layout (e.g. ``GaussianNoise(50)``,
            ``CameraPipelineNoise("fixed")``), reseeded per image.
        seed: base seed of ``noise``.
        channels: network channels.
        max_images: use the first ``max_images`` images only.

    Raises:
        InputError: a clean folder and no ``noise``.
    """
    if noise is None and not is_paired_folder(val_dir):
        raise InputError(
            f"{val_dir} holds clean images only and no validation noise is configured: give a paired folder "
            "(noisy/ + clean/) or set the config's val_noise"
        )
    return ImageFolderDataset(val_dir, channels=channels, noise=noise, seed=seed, max_images=max_images)
