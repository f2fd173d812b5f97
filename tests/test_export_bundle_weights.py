"""data_prep/export_bundle_weights.py: the float16 bundle file, and what metadata.json records of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from network_helpers import TINY

from ldct_clip.networks import CLIPDenoiser, load_model, save_checkpoint
from ldct_clip.networks.clip_weights import sha256_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_prep"))
from export_bundle_weights import main  # noqa: E402


def test_export_records_sha256_and_note_and_keeps_the_demo_flag(tmp_path, capsys):
    trained = save_checkpoint(tmp_path / "model.pt", CLIPDenoiser(**TINY).eval())
    metadata = tmp_path / "metadata.json"
    before = {"version": "1", "shipped_weights": {"demo": True, "note": "old weights", "sha256": "0" * 64}}
    metadata.write_text(json.dumps(before))
    out = tmp_path / "models" / "model.pt"
    out.parent.mkdir()

    # without a note the recorded one would be lost (and with it what `ldct-clip info` says of the weights)
    assert main([str(trained), str(out), "--metadata", str(metadata)]) == 2
    assert "--note" in capsys.readouterr().err
    assert json.loads(metadata.read_text()) == before and not out.exists()

    assert main([str(trained), str(out), "--metadata", str(metadata), "--note", "demo weights 2"]) == 0
    shipped = json.loads(metadata.read_text())["shipped_weights"]
    assert shipped == {
        "demo": True,
        "note": "demo weights 2",
        "sha256": sha256_of(out),
        "path": "models/model.pt",
        "dtype": "float16",
    }
    original, exported = load_model(trained), load_model(out)
    for name, tensor in original.state_dict().items():
        expected = tensor.half().to(tensor.dtype) if tensor.is_floating_point() else tensor
        torch.testing.assert_close(exported.state_dict()[name], expected)
