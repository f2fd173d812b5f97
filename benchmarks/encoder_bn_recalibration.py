"""The encoder-BatchNorm hazard of ``encoder_bn="batch_stats"``, measured, and its fix.

The paper trains with the frozen encoder's BatchNorm in train mode: batch statistics in every forward,
running statistics updated on the training crops. Inference (eval mode) normalises full slices with those
running statistics. This script trains a small denoiser with the bundle's train config on phantom CT
(crops a quarter of the slice width, as 128^2 crops of 512^2 slices), then scores the held-out patient's
full, noisy slices (Gaussian sigma 5/255) against the clean ones (PSNR/SSIM, "paper" protocol) with:

- eval, crop statistics: what inference does after training (running statistics from the crops);
- batch statistics: BatchNorm on each slice's own statistics (train-mode BN, feature augmentation off);
- eval, recalibrated on full slices: running statistics re-estimated with
  ``ldct_clip.training.recalibrate_encoder_bn`` on the training patients' full slices (noisy);
- eval, recalibrated on training crops: the same on 256 noisy training crops (the statistics the decoder
  was trained with, without the running average's memory of the initial statistics).

    python benchmarks/encoder_bn_recalibration.py [--iterations 400] [--size 128] [--crop 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from ldct_clip.cli.train import run_config
from ldct_clip.conventions import model_to_hu
from ldct_clip.data.ct_dataset import CTSliceDataset, make_train_dataset, make_val_dataset
from ldct_clip.data.phantom import write_phantom_nifti
from ldct_clip.evaluation import psnr, ssim
from ldct_clip.networks import load_model
from ldct_clip.training import PaddedInferer, recalibrate_encoder_bn

CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "lowdose_ct_denoising" / "configs" / "train.json"


def score(model, val, mode: str) -> tuple[float, float]:
    inferer = PaddedInferer(32)
    p, s = [], []
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            noisy, clean = torch.as_tensor(item["image"])[None], torch.as_tensor(item["label"])[None]
            if mode == "noisy":
                pred = noisy
            elif mode == "batch":
                model.train()
                aug, model.aug_level = model.aug_level, 0.0
                pred = inferer(noisy, model)
                model.aug_level = aug
                model.eval()
            else:
                pred = inferer(noisy, model)
            p.append(psnr(model_to_hu(pred), model_to_hu(clean)).item())
            s.append(ssim(model_to_hu(pred), model_to_hu(clean)).item())
    return float(np.mean(p)), float(np.mean(s))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--size", type=int, default=128, help="phantom slice size")
    parser.add_argument("--crop", type=int, default=32, help="training crop size")
    parser.add_argument("--slices", type=int, default=6, help="slices per phantom patient")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, patient in enumerate(("A", "B", "C")):
            write_phantom_nifti(
                tmp / "data" / f"{patient}.nii.gz", size=args.size, slices=args.slices, seed=i
            )
        overrides = {
            "data_dir": str(tmp / "data"), "output_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache"),
            "encoder_weights": None, "layers": [1, 1, 1, 1], "width": 8, "iterations": args.iterations,
            "checkpoint_interval": args.iterations, "batch_size": 4, "crop_size": args.crop, "num_workers": 0,
            "val_patients": ["C"], "learning_rate": 3e-3,
        }  # fmt: skip
        run_config([str(CONFIG)], overrides)
        model = load_model(tmp / "run" / "model.pt").eval()
        val = make_val_dataset(tmp / "data", ["C"], cache_dir=tmp / "cache")
        rows = {"noisy input": score(model, val, "noisy"), "eval, crop statistics": score(model, val, "eval")}
        rows["batch statistics (per slice)"] = score(model, val, "batch")
        # recalibration inputs look like the network's inputs: noisy (sigma 5/255)
        generator = torch.Generator().manual_seed(0)
        train_slices = CTSliceDataset(tmp / "data", ["A", "B"], cache_dir=tmp / "cache")
        clean = torch.stack([torch.as_tensor(train_slices[i]["label"]) for i in range(len(train_slices))])
        noisy = clean + torch.randn(clean.shape, generator=generator) * 5 / 255
        recalibrate_encoder_bn(model, noisy.split(4))
        rows["eval, recalibrated on full slices"] = score(model.eval(), val, "eval")
        crops = make_train_dataset(tmp / "data", ["C"], crop_size=args.crop, cache_dir=tmp / "cache")
        crop_batches = [torch.stack([crops[4 * b + j]["image"] for j in range(4)]) for b in range(64)]
        recalibrate_encoder_bn(model, crop_batches)
        rows["eval, recalibrated on training crops"] = score(model.eval(), val, "eval")
    print(f"phantom {args.size}^2 slices, crops {args.crop}^2, {args.iterations} iterations, tiny network")
    print("| encoder BatchNorm at inference | PSNR (dB) | SSIM |")
    print("| --- | --- | --- |")
    for name, (p, s) in rows.items():
        print(f"| {name} | {p:.2f} | {s:.4f} |")


if __name__ == "__main__":
    main()
