"""Low-dose simulation speed: seconds per 512 x 512 slice of ``ldct_clip.simulation.simulate_low_dose``.

The slices are a 300 mm water cylinder on 0.7 mm pixels. "inscribed" keeps the object inside radon's
inscribed circle (padding outside it, the usual reconstruction field of view); "full square" adds a
patient table outside that circle, which switches the projection to ``circle=False`` (radon pads to the
diagonal). Workers are processes over slices; the noise level is the same for every row by the photon
convention (checked in the last column: added noise std in the central 30 mm at quarter dose).

    python benchmarks/simulation.py                       # 4 slices, 360/720/1000 views, 1 and 2 workers
    python benchmarks/simulation.py --slices 8 --views 720 --workers 1 2 4 --downsample 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ldct_clip.data.phantom import FOV_PADDING_HU, make_water_cylinder
from ldct_clip.simulation import measure_noise_std, simulate_low_dose


def volume(size: int, spacing: float, slices: int, table: bool) -> np.ndarray:
    image = make_water_cylinder(size, 1, 300.0, (spacing, spacing, 3.0))[0, :, :, 0].numpy()
    yy, xx = np.mgrid[:size, :size] - size // 2
    image[yy**2 + xx**2 > (size // 2) ** 2] = FOV_PADDING_HU
    if table:
        # a 10 mm slab of plastic-like material in the bottom corner rows, outside the inscribed circle
        rows = max(1, int(round(10.0 / spacing)))
        image[-rows:, :] = 100.0
    return np.repeat(image[..., None], slices, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--spacing", type=float, default=0.7)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--views", type=int, nargs="+", default=[360, 720, 1000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--downsample", type=int, nargs="+", default=[2], help="projection_downsample values (1: exact)"
    )
    args = parser.parse_args()

    radius = 30.0 / args.spacing
    print(f"{args.slices} slices of {args.size}x{args.size}, {args.spacing} mm, dose 0.25, default photons")
    print("| geometry | views | projection downsample | workers | s/slice | slices/s | added std (HU) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for table in (False, True):
        normal = volume(args.size, args.spacing, args.slices, table)
        for views in args.views:
            for downsample in args.downsample:
                for workers in args.workers:
                    start = time.perf_counter()
                    low = simulate_low_dose(
                        normal,
                        dose=0.25,
                        n_views=views,
                        spacing=args.spacing,
                        workers=workers,
                        progress=False,
                        projection_downsample=downsample,
                    )
                    seconds = time.perf_counter() - start
                    std = measure_noise_std(low - normal, radius=radius)
                    geometry = "full square" if table else "inscribed"
                    print(
                        f"| {geometry} | {views} | {downsample} | {workers} | {seconds / args.slices:.2f} | "
                        f"{args.slices / seconds:.2f} | {std:.1f} |"
                    )


if __name__ == "__main__":
    main()
