"""Two-process data-parallel training on CPU (torchrun, gloo) through the CLI and the multi-GPU config."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import TRAIN_CONFIG, phantom_volumes

from ldct_clip.networks import load_model

MULTI_GPU_CONFIG = str(Path(TRAIN_CONFIG).with_name("multi_gpu_train.json"))


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    data = phantom_volumes(tmp_path / "data", size=48, slices=2)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "ldct_clip", "train", "--config", TRAIN_CONFIG, "--config", MULTI_GPU_CONFIG,
        "--data", str(data), "--output", str(out), "--encoder-weights", "none", "--iterations", "6",
        "--checkpoint-interval", "3", "--crop", "32", "--workers", "0", "--val-patients", "C",
        "--layers", "1,1,1,1", "--width", "8", "--set", f"cache_dir={str(tmp_path / 'cache')!r}".replace("'", '"'),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(out / "checkpoint_epoch=2.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 6
    # each rank's RNG state is kept (they differ: seed + rank), so a resumed run continues every rank
    ranks = checkpoint["training_state"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert load_model(out / "model.pt") is not None
    # logging on rank 0 only: every event file (trainer's, evaluator's) comes from one process
    event_files = glob.glob(str(out / "runs" / "events.out.tfevents.*"))
    assert event_files and len({Path(f).name.split(".")[-2] for f in event_files}) == 1


@pytest.mark.slow
def test_multi_gpu_config_refuses_a_single_process(tmp_path):
    data = phantom_volumes(tmp_path / "data", patients=("A", "C"), size=32, slices=1)
    command = [
        sys.executable, "-m", "ldct_clip", "train", "--config", TRAIN_CONFIG, "--config", MULTI_GPU_CONFIG,
        "--data", str(data), "--output", str(tmp_path / "run"), "--encoder-weights", "none",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "torchrun --nproc_per_node" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
