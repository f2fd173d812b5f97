"""Make a paired sRGB denoising dataset from clean images with the camera-pipeline noise model.

Writes ``OUTPUT/noisy/NAME.png`` and ``OUTPUT/clean/NAME.png`` for every image of ``INPUT`` (paired by name,
the layout of BasicSR's paired folders). As in the reference (``alwaysuu/CLIPDenoising``, ``ISP_implement.py``
``save_files``), the noisy image is the pipeline's output rounded to the file's bit depth and the clean image
is the original; ``--clean-target pipeline`` writes the noise-free pipeline output instead. Each image gets
its own seed (``--seed`` + its index in name order), so a dataset can be regenerated exactly.

    python data_prep/make_srgb_pairs.py --input DIV2K_train_HR_sub --output div2k_srgb_pairs [--noise fixed]
        [--curves dorfCurves.txt | 201_CRF_data.mat] [--seed 0] [--clean-target input] [--overwrite]

Nothing is written unless every image succeeds: the pairs are made in a hidden folder inside OUTPUT and
moved into place at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from tqdm import tqdm

from ldct_clip.errors import InputError, LdctClipError
from ldct_clip.io.images import list_images, load_image, save_image
from ldct_clip.io.preflight import check_output
from ldct_clip.io.staging import staged_output
from ldct_clip.transforms.camera_response import load_crf_mat, load_dorf_curves
from ldct_clip.transforms.isp import CameraPipelineNoise


def make_srgb_pairs(
    input_dir: str | Path,
    output_dir: str | Path,
    noise: str | tuple[float, float] = "fixed",
    curves: str | Path | None = None,
    seed: int = 0,
    clean_target: str = "input",
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write noisy/clean PNG pairs for every image of ``input_dir``; returns the noisy files.

    Args:
        input_dir: folder of clean images (or one image).
        output_dir: gets ``noisy/`` and ``clean/``.
        noise: "fixed" (the paper's sigma_s 0.04, sigma_c 0.03), "random", or (sigma_s, sigma_c).
        curves: DoRF ``dorfCurves.txt`` or CBDNet ``201_CRF_data.mat``; None: the built-in curve family.
        seed: base seed; image i (in name order) uses ``seed + i``.
        clean_target: "input" (the original image, as the reference) or "pipeline" (noise-free output).
        overwrite: replace ``noisy/`` and ``clean/`` folders an earlier run wrote (never anything else).
        progress: show a progress bar.
    """
    if clean_target not in ("input", "pipeline"):
        raise InputError(f"clean target must be 'input' or 'pipeline', got {clean_target!r}")
    files = list_images(input_dir)
    output_dir = Path(output_dir)
    targets = [output_dir / "noisy", output_dir / "clean"]
    for target in targets:  # before any work; an existing folder is replaced only if this script wrote it
        check_output(input_dir, target, overwrite, is_dir=True)
    responses = None
    if curves is not None:
        responses = load_crf_mat(curves) if str(curves).lower().endswith(".mat") else load_dorf_curves(curves)
    pipeline = CameraPipelineNoise(noise=noise, responses=responses)
    output_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        noisy_dir, clean_dir = (
            stack.enter_context(staged_output(t, overwrite=overwrite, is_dir=True)) for t in targets
        )
        names = set()
        for index, path in enumerate(tqdm(files, desc="sRGB pairs", unit="image", disable=not progress)):
            name = f"{path.stem}.png"
            if name in names:
                raise InputError(f"two input images are both named {path.stem}; rename one")
            names.add(name)
            clean = load_image(path, channels=3)
            pipeline.set_random_state(seed + index)
            noisy, pipeline_clean = pipeline.simulate(clean, return_clean=clean_target == "pipeline")
            depth = min(int(clean.meta["bit_depth"]), 16)
            save_image(noisy, noisy_dir / name, bit_depth=depth, manifest=False)
            save_image(
                pipeline_clean if clean_target == "pipeline" else clean,
                clean_dir / name,
                bit_depth=depth,
                manifest=False,
            )
    return [targets[0] / f"{p.stem}.png" for p in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder of clean images (PNG, JPEG, TIFF)")
    parser.add_argument("--output", required=True, help="output folder (gets noisy/ and clean/)")
    parser.add_argument("--noise", default="fixed", help="fixed, random, or 'SIGMA_S,SIGMA_C'")
    parser.add_argument(
        "--curves", default=None, help="dorfCurves.txt or 201_CRF_data.mat (default: built-in)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean-target", choices=("input", "pipeline"), default="input")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    noise: str | tuple[float, float] = args.noise
    if args.noise not in ("fixed", "random"):
        try:
            sigma_s, sigma_c = (float(v) for v in args.noise.split(","))
        except ValueError:
            print(
                f"make_srgb_pairs: error: --noise must be fixed, random or 'S,C', got {args.noise!r}",
                file=sys.stderr,
            )
            return 2
        noise = (sigma_s, sigma_c)
    try:
        written = make_srgb_pairs(
            args.input, args.output, noise, args.curves, args.seed, args.clean_target, args.overwrite
        )
    except LdctClipError as error:
        print(f"make_srgb_pairs: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} pairs to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
