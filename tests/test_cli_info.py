"""``ldct-clip info``: versions, device, and where the CLIP weights come from (caches only)."""

from __future__ import annotations

import monai
import open_clip
import torch
from network_helpers import random_visual, write_hf_cache

from ldct_clip import __version__
from ldct_clip.cli import main


def test_info_without_cached_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["info", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"ldct-clip {__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert f"monai {monai.__version__}" in out
    assert f"open_clip {open_clip.__version__}" in out
    assert "device: " + ("cuda" if torch.cuda.is_available() else "cpu") in out
    line = next(s for s in out.splitlines() if s.startswith("CLIP weights RN50/openai"))
    assert "NOT AVAILABLE" in line and "timm/resnet50_clip.openai" in line and "--encoder-weights" in line


def test_info_finds_weights_in_the_hugging_face_cache(tmp_path, capsys):
    state = {"visual." + k: v for k, v in random_visual().state_dict().items()}
    target = write_hf_cache(tmp_path, "timm/resnet50_clip.openai", "open_clip_model.safetensors", state)
    assert main(["info", "--cache-dir", str(tmp_path)]) == 0
    assert f"available in the Hugging Face cache: {target}" in capsys.readouterr().out


def test_info_with_a_weight_file(tmp_path, capsys):
    path = tmp_path / "RN50.pt"
    torch.save(random_visual().state_dict(), path)
    assert main(["info", "--encoder-weights", str(path)]) == 0
    assert f"file {path}" in capsys.readouterr().out
    assert main(["info", "--encoder-weights", str(tmp_path / "missing.pt")]) == 0
    assert "does not exist" in capsys.readouterr().out
