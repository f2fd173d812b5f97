"""Denoising image files (sRGB and synthetic-noise tasks): one image or a folder in, denoised images out.

The image counterpart of :func:`ldct_clip.inference.denoise_volume`, shared by the RGB bundles'
``inference.json``, ``ldct-clip denoise --bundle srgb_denoising|synthetic_denoising`` and ``ldct-clip
robustness``. Each image goes through :class:`ldct_clip.inference.SlicePredictor` (reflect-padded to a
multiple of 32 as the reference evaluation does, optional mixed precision, cropped back), is clamped to
[0, 1] and written with :func:`ldct_clip.io.images.save_image` at the bit depth it was read with.

Which bundles are image bundles: their ``metadata.json`` says ``"denoising_task": "srgb"`` or
``"synthetic"`` (:func:`bundle_task`; the CT bundle has no such key).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import MetaTensor
from torch import nn
from tqdm.auto import tqdm

from ldct_clip.bundles import bundle_network_def
from ldct_clip.errors import InputError, LdctClipError, OutputError, WeightsError
from ldct_clip.io.images import IMAGE_SUFFIXES, list_images, load_image, save_image

__all__ = [
    "IMAGE_TASKS",
    "ImageDenoiser",
    "bundle_metadata",
    "bundle_network_def",
    "bundle_task",
    "denoise_images",
    "load_image_denoiser",
    "plan_image_outputs",
]

logger = logging.getLogger(__name__)

#: ``denoising_task`` values of the image bundles, and the RGB metric protocol of each.
IMAGE_TASKS: dict[str, str] = {"srgb": "srgb", "synthetic": "synthetic"}


def bundle_metadata(bundle: str | os.PathLike) -> dict:
    """The bundle's ``configs/metadata.json`` as a dict (a bundle name or folder, see ``resolve_bundle``)."""
    from ldct_clip.bundles import resolve_bundle

    path = resolve_bundle(bundle) / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(
            f"cannot read the bundle metadata {path}: {error}; fix or restore the file"
        ) from error


def bundle_task(bundle: str | os.PathLike) -> str:
    """``"srgb"``, ``"synthetic"`` (image bundles) or ``"ct"`` (bundles without ``denoising_task``)."""
    return str(bundle_metadata(bundle).get("denoising_task", "ct"))


def load_image_denoiser(
    weights: str | os.PathLike, bundle: str | os.PathLike, device: str | torch.device = "cpu"
) -> nn.Module:
    """The network of an image bundle with ``weights``, in eval mode on ``device``.

    Raises:
        WeightsError: unreadable weights, or weights whose channels differ from the bundle's (e.g. a CT
            checkpoint given to the sRGB bundle).
    """
    from ldct_clip.inference import load_denoiser

    model = load_denoiser(weights, network_def=lambda: bundle_network_def(bundle), device=device)
    expected = bundle_metadata(bundle)["network_data_format"]["inputs"]["image"]["num_channels"]
    config = getattr(model, "config", {})
    if config.get("in_channels", expected) != expected:
        raise WeightsError(
            f"{weights} is a {config['in_channels']}-channel network but the bundle denoises "
            f"{expected}-channel images: give weights trained with this bundle (or the matching bundle)"
        )
    return model


class ImageDenoiser:
    """Denoises (C, H, W) images in [0, 1] with a network on a device; returns (C, H, W) float32 on the CPU.

    Args:
        network: a ``CLIPDenoiser`` (in eval mode) or any ``(B, C, H, W) -> (B, C, H, W)`` callable.
        device: compute device ("auto", "cpu", "cuda:N"...).
        channels: channels the network takes; grey images are repeated to them and the result averaged back
            to one channel.
        multiple: reflect-pad height and width to this multiple (32, as the reference evaluation).
        amp: mixed precision as :func:`ldct_clip.inference.resolve_amp` ("fp32" keeps the metric numbers
            of the reference protocol; "auto" is the CT path's measured default).

    Runs NHWC on CPUs as the CT path does (``default_channels_last``; converts ``network`` in place).
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        device: str | torch.device = "auto",
        channels: int = 3,
        multiple: int = 32,
        amp: str | bool | None = "fp32",
    ) -> None:
        from ldct_clip.inference import SlicePredictor, default_channels_last, resolve_amp, resolve_device

        self.device = resolve_device(device)
        self.channels = int(channels)
        self.predictor = SlicePredictor(
            network,
            multiple=multiple,
            amp_dtype=resolve_amp(amp, self.device),
            channels_last=default_channels_last(self.device),
        )

    @torch.no_grad()
    def predict_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in -> denoised (B, C, H, W) float32 on the CPU, unclamped."""
        return self.predictor(batch.to(self.device, torch.float32)).cpu()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = torch.as_tensor(image, dtype=torch.float32)
        grey = image.shape[0] == 1 and self.channels == 3
        if image.shape[0] != self.channels and not grey:
            raise InputError(
                f"the network denoises {self.channels}-channel images, got {image.shape[0]} channels"
            )
        batch = (image.repeat(3, 1, 1) if grey else image)[None]
        output = self.predict_batch(batch)[0]
        return output.mean(0, keepdim=True) if grey else output


def plan_image_outputs(
    inputs: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False, suffix: str | None = None
) -> list[tuple[Path, Path]]:
    """(input file, output file) of every image; checked before any work.

    One input image and an ``output`` ending in an image suffix: that file. Otherwise ``output`` is a
    folder that gets each image under its own name (its suffix replaced by ``suffix`` when given).

    Raises:
        InputError: no images, or an unknown ``suffix``.
        OutputError: the output would replace an input, lie inside the input folder, or replace an
            existing file without ``overwrite``.
    """
    from ldct_clip.io import check_output_path

    files = list_images(inputs)
    output = Path(output)
    if suffix is not None:
        suffix = suffix if suffix.startswith(".") else f".{suffix}"
        if suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(
                f"output suffix {suffix} is not an image type: use one of {', '.join(IMAGE_SUFFIXES)}"
            )
    if Path(inputs).is_file() and output.suffix.lower() in IMAGE_SUFFIXES:
        check_output_path(inputs, output, overwrite)
        return [(files[0], output)]
    if output.exists() and not output.is_dir():
        raise OutputError(
            f"output {output} is a file; give a folder for the denoised images (or an image path for one input)"
        )
    if Path(inputs).is_dir():
        check_output_path(inputs, output, overwrite=True)
    plan = [(f, output / (f.name if suffix is None else f.stem + suffix)) for f in files]
    names = [dst.name for _, dst in plan]
    if len(set(names)) != len(names):
        raise OutputError(
            f"two inputs would be written to the same file in {output}: keep the input suffixes"
        )
    for src, dst in plan:
        check_output_path(src, dst, overwrite)
    return plan


def denoise_images(
    inputs: str | os.PathLike,
    output: str | os.PathLike,
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    overwrite: bool = False,
    suffix: str | None = None,
    progress: bool = True,
) -> dict:
    """Denoise an image file or every image of a folder and write the results.

    All outputs are checked before the first image is denoised, and if an image fails, the files already
    written by this call are removed again: either every image is written or none.

    Args:
        inputs: an image file (PNG, JPEG, TIFF, BMP) or a folder of them (not recursive).
        output: a folder (created), or an image file path when ``inputs`` is one image.
        denoiser: (C, H, W) in [0, 1] -> (C, H, W), e.g. :class:`ImageDenoiser`.
        overwrite: replace existing output files.
        suffix: write this image type instead of each input's own (e.g. ".png" for JPEG inputs).
        progress: show a progress bar.

    Returns:
        ``{"images": n, "pixels": total H*W, "seconds": denoising time, "outputs": [paths]}``.
    """
    if inputs is None:
        raise InputError("no input given: pass an image file or a folder of images (bundle: --input PATH)")
    plan = plan_image_outputs(inputs, output, overwrite, suffix)
    written: list[Path] = []
    pixels = 0
    start = time.perf_counter()
    try:
        for src, dst in tqdm(plan, desc="denoising", unit="image", disable=not progress):
            image = load_image(src)
            result = torch.as_tensor(denoiser(image.as_tensor())).clamp(0.0, 1.0)
            save_image(
                MetaTensor(result, meta={"bit_depth": image.meta["bit_depth"]}), dst, overwrite=overwrite
            )
            written.append(dst)
            pixels += int(image.shape[-1] * image.shape[-2])
    except (LdctClipError, OSError, RuntimeError):
        for path in written:
            path.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - start
    logger.info("denoised %d image(s) in %.1f s -> %s", len(written), seconds, Path(output))
    return {"images": len(written), "pixels": pixels, "seconds": seconds, "outputs": written}
