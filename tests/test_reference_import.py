"""Reference (BasicSR) checkpoints, our checkpoint format and ``ldct-clip import-reference``."""

from __future__ import annotations

import pytest
import torch
from network_helpers import TINY, reference_fixture, reference_manifest, rel_error

from ldct_clip import __version__
from ldct_clip.cli import main
from ldct_clip.errors import InputError, WeightsError
from ldct_clip.networks import (
    CLIPDenoiser,
    infer_network_config,
    load_checkpoint,
    load_model,
    load_model_weights,
    load_reference_state_dict,
    read_reference_checkpoint,
    save_checkpoint,
)


def test_infer_config_of_tiny_and_paper_state_dicts():
    assert infer_network_config(reference_fixture("ct")["state_dict"]) == {
        "in_channels": 1,
        "out_channels": 1,
        "bias": False,
        "layers": [1, 1, 1, 1],
        "width": 8,
    }
    assert infer_network_config(reference_fixture("rgb")["state_dict"])["bias"] is True
    for kind, channels in (("ct", 1), ("rgb", 3)):
        shapes = reference_manifest(kind)["shapes"]
        state = {k: torch.empty(s) for k, s in shapes.items()}
        config = infer_network_config(state)
        assert config == {
            "in_channels": channels,
            "out_channels": channels,
            "bias": False,
            "clip_model": "RN50",
        }


def test_load_reference_state_dict_is_strict():
    ref = reference_fixture("ct")["state_dict"]
    model = CLIPDenoiser(**TINY)
    missing = {k: v for k, v in ref.items() if k != "up_path.2.conv_block.block.0.weight"}
    with pytest.raises(WeightsError, match=r"1 missing key\(s\) \('up_path.2.conv_block.block.0.weight'\)"):
        load_reference_state_dict(model, missing)
    with pytest.raises(WeightsError, match=r"unexpected key\(s\) \('last.bias'\)"):
        load_reference_state_dict(model, {**ref, "last.bias": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"shape mismatch.*last.weight \(1, 8, 3, 3\) != \(3, 8, 3, 3\)"):
        load_reference_state_dict(CLIPDenoiser(**TINY, out_channels=3), ref)
    # layer4 is dropped, a DataParallel prefix removed; everything else is loaded.
    load_reference_state_dict(model, {"module." + k: v for k, v in ref.items()})
    torch.testing.assert_close(model.last.weight, ref["last.weight"], rtol=0, atol=0)


def test_checkpoint_round_trip(tmp_path):
    model = CLIPDenoiser(**TINY, aug_level=0.05, encoder_bn="frozen")
    path = save_checkpoint(tmp_path / "model.pt", model, extra={"iteration": 7})
    checkpoint = load_checkpoint(path)
    assert checkpoint["ldct_clip_version"] == __version__
    assert checkpoint["iteration"] == 7
    assert checkpoint["network"] == {
        "in_channels": 1,
        "out_channels": 1,
        "clip_model": "RN50",
        "layers": [1, 1, 1, 1],
        "width": 8,
        "decoder_depth": 5,
        "bias": False,
        "aug_level": 0.05,
        "encoder_bn": "frozen",
    }
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    loaded = load_model(path, aug_level=0.0)
    assert loaded.aug_level == 0.0 and loaded.encoder_bn == "frozen"
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(InputError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", model, extra={"model": 1})


@pytest.mark.parametrize("wrap", ["model", "bare"])
def test_monai_style_and_bare_state_dicts_load_into_a_model(tmp_path, wrap):
    source = CLIPDenoiser(**TINY)
    path = tmp_path / "net.pt"
    torch.save({"model": source.state_dict()} if wrap == "model" else source.state_dict(), path)
    target = load_model_weights(CLIPDenoiser(**TINY), path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    with pytest.raises(WeightsError, match="no 'network' entry"):
        load_model(path)


def test_bad_checkpoint_files(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", CLIPDenoiser(**TINY))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated") as error:
        load_model(path)
    assert "\n" not in str(error.value)
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    other = save_checkpoint(tmp_path / "rgb.pt", CLIPDenoiser(in_channels=3, out_channels=3, **TINY))
    with pytest.raises(WeightsError, match=r"unexpected key\(s\)|missing key\(s\)"):
        load_model_weights(CLIPDenoiser(**TINY), other)


@pytest.mark.parametrize("kind", ["ct", "rgb"])
@pytest.mark.parametrize("wrap", ["params", "params_ema", "bare"])
def test_import_reference_cli(tmp_path, capsys, kind, wrap):
    ref = reference_fixture(kind)
    source = tmp_path / "net_g_latest.pth"
    torch.save(ref["state_dict"] if wrap == "bare" else {wrap: ref["state_dict"]}, source)
    output = tmp_path / "imported.pt"
    assert main(["import-reference", str(source), str(output)]) == 0
    assert "dropped 24 unused encoder.layer4" in capsys.readouterr().out
    model = load_model(output).eval()
    assert not any(k.startswith("encoder.layer4") for k in model.state_dict())
    with torch.no_grad():
        assert rel_error(model(ref["input"]), ref["output_eval"]) < 1e-5


def test_import_reference_key_choice(tmp_path):
    ref = reference_fixture("ct")["state_dict"]
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in ref.items()}
    source = tmp_path / "both.pth"
    torch.save({"params": ref, "params_ema": ema}, source)
    assert torch.equal(read_reference_checkpoint(source)["last.weight"], ref["last.weight"])
    assert torch.equal(read_reference_checkpoint(source, key="params_ema")["last.weight"], ema["last.weight"])
    output = tmp_path / "ema.pt"
    assert main(["import-reference", str(source), str(output), "--key", "params_ema"]) == 0
    assert torch.equal(load_checkpoint(output)["model"]["last.weight"], ema["last.weight"])


def test_import_reference_refuses_bad_input_and_existing_output(tmp_path, capsys):
    ref = reference_fixture("ct")["state_dict"]
    source = tmp_path / "net.pth"
    torch.save({"params": ref}, source)
    output = tmp_path / "out.pt"
    output.write_bytes(b"keep me")
    assert main(["import-reference", str(source), str(output)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"keep me"

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(source.read_bytes()[:1000])
    fresh = tmp_path / "fresh.pt"
    assert main(["import-reference", str(truncated), str(fresh)]) == 2
    err = capsys.readouterr().err
    assert "cannot read reference checkpoint" in err and "Traceback" not in err
    assert not fresh.exists()

    broken = tmp_path / "broken.pth"
    torch.save({"params": {k: v for k, v in ref.items() if not k.startswith("up_path.4")}}, broken)
    assert main(["import-reference", str(broken), str(fresh)]) == 2
    assert "missing key(s)" in capsys.readouterr().err
    assert not fresh.exists()


def test_the_command_line_choices_are_the_librarys():
    from ldct_clip.cli import import_reference
    from ldct_clip.networks.denoiser import ENCODER_BN_MODES
    from ldct_clip.networks.reference import REFERENCE_KEYS

    assert import_reference.REFERENCE_KEYS == REFERENCE_KEYS
    assert import_reference.ENCODER_BN_MODES == ENCODER_BN_MODES
