"""Simulate low-dose versions of normal-dose CT series or volumes (thin wrapper of ``ldct-clip simulate``).

One input:
    python data_prep/simulate_low_dose.py INPUT OUTPUT --dose 0.25 [options of ldct-clip simulate]

Several inputs into one output folder (each into OUTPUT_DIR/<input name>, same options for all):
    python data_prep/simulate_low_dose.py --batch OUTPUT_DIR INPUT [INPUT ...] -- --dose 0.25 --seed 1

See ``ldct-clip simulate --help`` for the options and ``ldct_clip.simulation`` for the noise model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldct_clip.cli import main


def _batch(argv: list[str]) -> int:
    options = argv[argv.index("--") + 1 :] if "--" in argv else []
    paths = argv[: argv.index("--")] if "--" in argv else argv
    if len(paths) < 2:
        print(
            "usage: simulate_low_dose.py --batch OUTPUT_DIR INPUT [INPUT ...] -- [options]", file=sys.stderr
        )
        return 2
    output_dir, inputs = Path(paths[0]), [Path(p) for p in paths[1:]]
    status = 0
    for source in inputs:
        target = output_dir / source.name.removesuffix(".gz").removesuffix(".nii")
        status = max(status, main(["simulate", str(source), str(target), *options]))
    return status


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--batch"]:
        sys.exit(_batch(arguments[1:]))
    sys.exit(main(["simulate", *arguments]))
