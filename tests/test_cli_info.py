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


def test_info_says_what_works_now(tmp_path, capsys):
    from ldct_clip.bundles import bundle_metadata

    assert main(["info", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    sha = bundle_metadata("lowdose_ct_denoising")["shipped_weights"]["sha256"]
    ct = next(s for s in lines if s.startswith("bundle lowdose_ct_denoising"))
    assert f"sha256 {sha[:12]} verified" in ct and "demo weights" in ct and "works now" in ct
    clip = next(s for s in lines if s.startswith("CLIP weights RN50/openai"))
    assert "needed only to train" in clip and "denoising does not need them" in clip


def test_info_check_lists_leftovers_and_changed_outputs(tmp_path, capsys):
    from io_helpers import dicom_files

    from ldct_clip.data.phantom import write_phantom_dicom

    clean = write_phantom_dicom(tmp_path / "clean", size=16, slices=2)
    assert main(["info", "--check", str(tmp_path)]) == 0
    assert "no leftovers of interrupted runs; every ldct-clip output matches" in capsys.readouterr().out
    edited = write_phantom_dicom(tmp_path / "edited", size=16, slices=2)
    dicom_files(edited)[0].write_bytes(b"changed")
    leftover = tmp_path / ".ldct-clip-staging-999999999-0123abcd-clean"  # a pid that cannot be alive
    leftover.mkdir()
    (leftover / "00001.dcm").write_bytes(b"half")
    (leftover / ".ldct-clip-staging.json").write_text('{"pid": 999999999}')
    assert main(["info", "--check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"  {leftover}" in out and f"  {edited}: files changed since ldct-clip wrote them: CT0001.dcm" in out
    )
    assert str(clean) not in out
