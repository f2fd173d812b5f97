"""The robustness report: run a noise suite over clean images, denoise, score, report.

The protocol of the reference's synthetic test script (``alwaysuu/CLIPDenoising``,
``Denoising/test_synthetic_denoising.py``): for every noise type and level, every clean image gets noise
drawn with the generator reset to seed 0 (:mod:`ldct_clip.transforms.noise`), the noisy image is
reflect-padded to a multiple of 32 (:func:`ldct_clip.networks.pad_to_multiple`), denoised, cropped back,
and scored against the clean image with :func:`ldct_clip.evaluation.rgb_metrics` (clamp, x255, PSNR over
all channels, MATLAB SSIM). The noisy input is
scored the same way, so each row shows what the denoiser gained.

Outputs of :func:`write_robustness_report`: ``robustness.csv`` (mean PSNR/SSIM per noise type and level,
noisy input and denoised), ``robustness.md`` (the same as a table) and ``robustness.png`` (PSNR and SSIM
against level, one panel per noise type).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ldct_clip.errors import InputError
from ldct_clip.evaluation import plot_robustness, rgb_metrics, save_figure, write_csv
from ldct_clip.io.images import load_image
from ldct_clip.io.staging import staged_output
from ldct_clip.networks import pad_to_multiple
from ldct_clip.transforms.noise import make_noise

__all__ = ["denoise_image", "evaluate_robustness", "summarise_robustness", "write_robustness_report"]

Denoiser = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise_image(denoiser: Denoiser, image: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Denoise one (C, H, W) image the reference's way: reflect-pad bottom/right to ``multiple``, run the
    denoiser on the (1, C, H', W') batch, crop back. Returns (C, H, W) on the input's device, unclamped."""
    height, width = image.shape[-2:]
    output = denoiser(pad_to_multiple(image.unsqueeze(0), multiple))
    return output[0, :, :height, :width].to(image.device)


def _named_images(images: Sequence[str | os.PathLike | tuple[str, torch.Tensor]], channels: int | None):
    for item in images:
        if isinstance(item, tuple):
            yield item[0], torch.as_tensor(item[1], dtype=torch.float32)
        else:
            path = Path(item)
            yield path.name, load_image(path, channels=channels).as_tensor()


def evaluate_robustness(
    denoiser: Denoiser,
    images: Sequence[str | os.PathLike | tuple[str, torch.Tensor]],
    suite: Mapping[str, Sequence[float]],
    protocol: str = "synthetic",
    channels: int | None = 3,
    fixed_seed: int = 0,
    multiple: int = 32,
    progress: bool = True,
) -> list[dict[str, object]]:
    """Score a denoiser on every (noise type, level) of a suite and every image.

    Args:
        denoiser: maps a (1, C, H, W) float tensor in [0, 1] to the denoised batch (e.g. a ``CLIPDenoiser``
            in eval mode, or a function that moves data to a GPU and back).
        images: image files, or ``(name, (C, H, W) tensor in [0, 1])`` pairs.
        suite: noise type -> levels, e.g. ``NOISE_SUITES["paper"]``.
        protocol: RGB metric protocol of :func:`ldct_clip.evaluation.rgb_metrics` ("synthetic" for these
            noises).
        channels: channels the denoiser takes (grey images are repeated to RGB for 3); None keeps the files'.
        fixed_seed: seed the generator is reset to before each image (0: the reference protocol).
        multiple: padding multiple (32 in the reference).
        progress: show a progress bar.

    Returns:
        one row per (noise, level, image): ``noise``, ``level``, ``image``, ``psnr_noisy``, ``ssim_noisy``,
        ``psnr_denoised``, ``ssim_denoised``.
    """
    if not images:
        raise InputError("no images to evaluate; pass at least one clean image")
    named = list(_named_images(images, channels))
    jobs = [(noise, float(level)) for noise, levels in suite.items() for level in levels]
    if not jobs:
        raise InputError("the noise suite is empty")
    rows: list[dict[str, object]] = []
    bar = tqdm(total=len(jobs) * len(named), desc="robustness", unit="image", disable=not progress)
    for noise_type, level in jobs:
        corrupt = make_noise(noise_type, level, fixed_seed=fixed_seed)
        for name, clean in named:
            noisy = corrupt(clean)
            denoised = denoise_image(denoiser, noisy, multiple)
            before = rgb_metrics(clean, noisy, protocol)
            after = rgb_metrics(clean, denoised, protocol)
            rows.append(
                {
                    "noise": noise_type,
                    "level": level,
                    "image": name,
                    "psnr_noisy": before["psnr"],
                    "ssim_noisy": before["ssim"],
                    "psnr_denoised": after["psnr"],
                    "ssim_denoised": after["ssim"],
                }
            )
            bar.update()
    bar.close()
    return rows


_LEVEL_LABELS = {
    "gaussian": "sigma (1/255)",
    "spatial_gaussian": "sigma before the 3x3 box (1/255)",
    "poisson": "scale",
    "speckle": "relative sigma (1/255)",
    "salt_pepper": "fraction of samples",
    "mixture": "Gaussian sigma (1/255)",
}
_METRICS = ("psnr_noisy", "ssim_noisy", "psnr_denoised", "ssim_denoised")


def summarise_robustness(rows: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Mean of each metric over the images, per (noise, level), in the rows' order (as the reference prints)."""
    groups: dict[tuple[str, float], list[Mapping[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["noise"]), float(row["level"])), []).append(row)
    summary = []
    for (noise, level), members in groups.items():
        entry: dict[str, object] = {"noise": noise, "level": level, "images": len(members)}
        for key in _METRICS:
            entry[key] = float(np.mean([float(m[key]) for m in members]))
        summary.append(entry)
    return summary


def _markdown(summary: Sequence[Mapping[str, object]], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "Mean over the images; PSNR in dB (peak 255, all channels), SSIM MATLAB-style (11x11 Gaussian, "
        "sigma 1.5, valid region), averaged over channels. Noise drawn with the generator reset to seed 0 "
        "for every image.",
        "",
        "| noise | level | images | PSNR noisy | PSNR denoised | gain | SSIM noisy | SSIM denoised |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        gain = float(s["psnr_denoised"]) - float(s["psnr_noisy"])
        lines.append(
            f"| {s['noise']} | {float(s['level']):g} | {s['images']} | {float(s['psnr_noisy']):.2f} | "
            f"{float(s['psnr_denoised']):.2f} | {gain:+.2f} | {float(s['ssim_noisy']):.4f} | "
            f"{float(s['ssim_denoised']):.4f} |"
        )
    return "\n".join(lines) + "\n"


def write_robustness_report(
    rows: Sequence[Mapping[str, object]],
    output_dir: str | os.PathLike,
    title: str = "Robustness to unseen noise",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``robustness.csv``, ``robustness.md`` and ``robustness.png`` into ``output_dir`` (created whole
    or not at all; an existing folder is refused unless ``overwrite``).

    Returns:
        ``{"csv": path, "markdown": path, "figure": path}``.
    """
    if not rows:
        raise InputError("no robustness results to report")
    summary = summarise_robustness(rows)
    output_dir = Path(output_dir)
    with staged_output(output_dir, overwrite=overwrite, is_dir=True) as tmp:
        write_csv(summary, tmp / "robustness.csv")
        (tmp / "robustness.md").write_text(_markdown(summary, title))
        save_figure(plot_robustness(summary, title, _LEVEL_LABELS), tmp / "robustness.png")
    return {
        "csv": output_dir / "robustness.csv",
        "markdown": output_dir / "robustness.md",
        "figure": output_dir / "robustness.png",
    }
