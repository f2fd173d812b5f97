"""Does the fast training step train like float32? Loss curves of short runs of a bundle's train config.

Three runs of ``--iterations`` iterations through the train config (``ldct-clip train``'s code path): float32
NCHW (the reference loop's way) with seed A, the same with seed B, and the fast step (``--fast``, default
bf16 autocast + channels_last) with seed A. The two float32 runs differ only by their seed (initial
decoder weights, data order, crops, noise, mixup, feature augmentation): how far apart their smoothed
curves lie is the noise band a change of the step must stay inside. Printed: the mean loss per window of
``--window`` iterations for each run, the band (largest window difference between the float32 seeds)
and the largest window difference of the fast step from float32 with the same seed.

Data: ``--data`` (a training folder as ``ldct-clip train`` takes it), or ``--volume`` (one CT volume,
split along its slices into a training and a validation "patient"), else phantom volumes.

    python benchmarks/training_loss_curve.py --volume ct.nii.gz --batch 16 --crop 64
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ldct_clip.bundles import resolve_bundle
from ldct_clip.cli.train import train_recording_losses
from ldct_clip.data.phantom import write_phantom_nifti


def split_volume(volume: Path, folder: Path) -> list[str]:
    """Two patients from one volume: the first 3/4 of its slices for training ("train"), the rest for
    validation ("val"). Returns the validation patients."""
    image = nib.load(str(volume))
    data = np.asarray(image.dataobj)
    cut = data.shape[2] * 3 // 4
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", data[:, :, :cut]), ("val", data[:, :, cut:])):
        nib.save(nib.Nifti1Image(part, image.affine, image.header), str(folder / f"{name}.nii.gz"))
    return ["val"]


def phantoms(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, patient in enumerate(("A", "B", "C")):
        write_phantom_nifti(folder / f"{patient}.nii.gz", size=128, slices=8, seed=i)
    return ["C"]


def loss_curve(config: str, overrides: dict) -> tuple[list[float], str, float]:
    """Per-iteration losses of one run, the step format it used and its seconds per iteration."""
    losses, trainer, seconds = train_recording_losses([config], overrides)
    return losses, str(trainer.inferer.format), seconds / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(resolve_bundle("lowdose_ct_denoising") / "configs" / "train.json")
    )
    parser.add_argument("--data", type=Path, help="training data folder")
    parser.add_argument("--val-patients", default=None, help="comma-separated, with --data")
    parser.add_argument("--volume", type=Path, help="one CT volume, split into training and validation")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs=2, default=(100, 7), metavar=("A", "B"))
    parser.add_argument(
        "--fast", default="bf16/channels_last", help="precision/memory_format of the fast step"
    )
    parser.add_argument("--layers", help="e.g. 1,1,1,1 for a tiny network (default: the config's, RN50)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ldct_clip.training.precision").setLevel(logging.INFO)

    work = Path(tempfile.mkdtemp(prefix="loss_curve_"))
    if args.data is not None:
        data, val = args.data, (args.val_patients or "").split(",")
    elif args.volume is not None:
        data = work / "data"
        val = split_volume(args.volume, data)
    else:
        data = work / "data"
        val = phantoms(data)
    base = {
        "data_dir": str(data),
        "cache_dir": str(work / "cache"),
        "val_patients": [p for p in val if p] or None,
        "val_max_slices": 2,
        "encoder_weights": None,  # random-init encoder: CLIP weights need a download (cost is the same)
        "iterations": args.iterations,
        "checkpoint_interval": args.iterations,
        "batch_size": args.batch,
        "crop_size": args.crop,
        "num_workers": args.workers,
        "progress": False,
    }
    if args.layers:
        base["layers"] = [int(v) for v in args.layers.split(",")]
    if args.width:
        base["width"] = args.width
    seed_a, seed_b = args.seeds
    precision, memory_format = args.fast.split("/")
    runs = {
        f"fp32 NCHW, seed {seed_a}": (seed_a, "fp32", "contiguous"),
        f"fp32 NCHW, seed {seed_b}": (seed_b, "fp32", "contiguous"),
        f"{args.fast}, seed {seed_a}": (seed_a, precision, memory_format),
    }
    curves, formats, speeds = {}, {}, {}
    for name, (seed, run_precision, run_memory_format) in runs.items():
        overrides = {
            **base,
            "seed": seed,
            "output_dir": str(work / name.replace(" ", "_").replace(",", "").replace("/", "_")),
            "train_precision": run_precision,
            "train_memory_format": run_memory_format,
        }
        losses, formats[name], speeds[name] = loss_curve(args.config, overrides)
        curves[name] = np.asarray(losses).reshape(-1, args.window).mean(axis=1)
        print(f"{name}: {formats[name]}, {speeds[name]:.2f} s/iteration", flush=True)

    names = list(runs)
    print(f"\ndata {data}; batch {args.batch} of {args.crop}^2; {torch.get_num_threads()} threads\n")
    header = " | ".join(f"{(w + 1) * args.window}" for w in range(len(curves[names[0]])))
    print(f"| mean L1 loss over iterations ... | {header} |")
    print("| --- |" + " ---: |" * len(curves[names[0]]))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in curves[name]) + " |")
    band = np.abs(curves[names[1]] - curves[names[0]])
    fast = np.abs(curves[names[2]] - curves[names[0]])
    print(
        "| abs difference, the two fp32 seeds (noise band) | " + " | ".join(f"{v:.4f}" for v in band) + " |"
    )
    print(
        f"| abs difference, {args.fast} vs fp32 (same seed) | " + " | ".join(f"{v:.4f}" for v in fast) + " |"
    )
    print(
        f"\nnoise band (largest window difference of the fp32 seeds): {band.max():.4f}; "
        f"{args.fast} vs fp32, same seed: largest {fast.max():.4f}, mean {fast.mean():.4f} "
        f"({'within' if fast.max() <= band.max() else 'OUTSIDE'} the band)"
    )


if __name__ == "__main__":
    main()
