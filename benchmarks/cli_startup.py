"""How fast the command line answers: ``ldct-clip --help``, ``ldct-clip denoise --help`` and a usage error.

Target: under 1.5 s each (issue 13). Each command runs ``--repeats`` times in a fresh interpreter; the
median wall time is reported. Where one is over the target, the slowest imports of that command
(``python -X importtime``) are listed, so the module to make lazy is named.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeats 5 --top 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

TARGET_S = 1.5
COMMANDS = {
    "ldct-clip --help": ["--help"],
    "ldct-clip denoise --help": ["denoise", "--help"],
    "ldct-clip denoise (usage error: no arguments)": ["denoise"],
}


def run(args: list[str], importtime: bool = False) -> tuple[float, subprocess.CompletedProcess]:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "ldct_clip", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, done


def slowest_imports(args: list[str], top: int) -> list[tuple[int, str]]:
    """(cumulative microseconds, module) of the ``top`` slowest top-level imports of the command."""
    _, done = run(args, importtime=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if cumulative.isdigit() and not name.startswith(" "):
            rows.append((int(cumulative), name))
    rows.sort(reverse=True)
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="slow imports listed for a command over target")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {sys.version.split()[0]}, load average {load:.2f}, {args.repeats} runs each (median)")
    print("| command | exit code | median s | max s | under 1.5 s |")
    print("| --- | ---: | ---: | ---: | --- |")
    over = []
    for label, argv in COMMANDS.items():
        times, code = [], None
        for _ in range(args.repeats):
            seconds, done = run(argv)
            times.append(seconds)
            code = done.returncode
        median = statistics.median(times)
        print(
            f"| {label} | {code} | {median:.2f} | {max(times):.2f} | {'yes' if median < TARGET_S else 'NO'} |"
        )
        if median >= TARGET_S:
            over.append((label, argv))
    for label, argv in over:
        print(f"\nslowest imports of `{label}` (cumulative, python -X importtime):")
        for micros, name in slowest_imports(argv, args.top):
            print(f"  {micros / 1e6:6.2f} s  {name}")


if __name__ == "__main__":
    main()
