"""`ldct-clip denoise --recursive` under torchrun: two gloo ranks share the series, each written once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from denoise_helpers import TINY_SET, phantom_series, tiny_checkpoint

from ldct_clip.io import load_ct


@pytest.mark.slow
def test_two_ranks_split_the_series(tmp_path):
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    tree = tmp_path / "tree"
    for i in range(3):
        phantom_series(tree / f"patient{i}", seed=i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ldct_clip", "denoise", str(tree), str(out), "--weights", str(weights)]
    cmd += ["--recursive", "--device", "cpu", "--no-progress", *TINY_SET]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # every series once: three summary lines in all, one output folder each
    assert done.stdout.count("denoised 4 slices") == 3, done.stdout
    for i in range(3):
        assert load_ct(out / f"patient{i}").shape == (1, 64, 64, 4)


@pytest.mark.slow
def test_a_failing_series_makes_every_rank_exit_non_zero(tmp_path):
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    tree = tmp_path / "tree"
    for i in range(2):
        phantom_series(tree / f"patient{i}", seed=i)
    out = tmp_path / "out"
    (out / "patient1").mkdir(parents=True)  # exists: this series is refused without --overwrite
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ldct_clip", "denoise", str(tree), str(out), "--weights", str(weights)]
    cmd += ["--recursive", "--device", "cpu", "--no-progress", *TINY_SET]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "ldct-clip denoise: error:" in done.stderr and "already exists" in done.stderr
    assert load_ct(out / "patient0").shape == (1, 64, 64, 4)
