"""CLIP encoder weights: every supported file kind loads exactly; every bad file gives one clear line."""

from __future__ import annotations

import hashlib

import pytest
import torch
from network_helpers import (
    TINY,
    FakeCLIP,
    expected_encoder_state,
    random_visual,
    write_hf_cache,
    write_torchscript,
)
from safetensors.torch import save_file

from ldct_clip.errors import WeightsError
from ldct_clip.networks import CLIPDenoiser, cached_pretrained_file, read_encoder_state_dict


@pytest.fixture
def visual():
    return random_visual()


def assert_encoder_equals(model, visual):
    expected = expected_encoder_state(visual)
    state = model.encoder.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str):
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_openai_torchscript_file(tmp_path, visual):
    path = write_torchscript(visual, tmp_path / "RN50.pt")
    model = CLIPDenoiser(**TINY, encoder_weights=path)
    assert_encoder_equals(model, visual)
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_open_clip_checkpoint_with_state_dict_and_module_prefix(tmp_path, visual):
    clip = FakeCLIP(visual)
    path = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, path)
    assert_encoder_equals(CLIPDenoiser(**TINY, encoder_weights=str(path)), visual)


def test_open_clip_safetensors(tmp_path, visual):
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in FakeCLIP(visual).state_dict().items()}, str(path))
    assert_encoder_equals(CLIPDenoiser(**TINY, encoder_weights=path), visual)


def test_visual_only_state_dict_in_half_precision(tmp_path, visual):
    path = tmp_path / "visual.bin"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in visual.state_dict().items()}, path)
    model = CLIPDenoiser(**TINY, encoder_weights=path)
    assert model.encoder.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(model.encoder.conv1.weight, visual.conv1.weight, rtol=1e-3, atol=1e-3)


def test_weights_change_the_output(tmp_path, visual):
    path = tmp_path / "visual.pt"
    torch.save(visual.state_dict(), path)
    torch.manual_seed(0)
    a = CLIPDenoiser(**TINY).eval()
    torch.manual_seed(0)
    b = CLIPDenoiser(**TINY, encoder_weights=path).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_sha256_checked_before_loading(tmp_path, visual):
    path = tmp_path / "visual.pt"
    torch.save(visual.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert_encoder_equals(CLIPDenoiser(**TINY, encoder_weights=path, encoder_sha256=digest.upper()), visual)
    with pytest.raises(WeightsError) as error:
        read_encoder_state_dict(path, sha256="0" * 64)
    assert_one_line(error, "SHA-256", digest, "download it again")


@pytest.mark.parametrize("kind", ["torchscript", "pickle"])
def test_truncated_file(tmp_path, visual, kind):
    path = tmp_path / "RN50.pt"
    if kind == "torchscript":
        write_torchscript(visual, path)
    else:
        torch.save(visual.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights=path)
    assert_one_line(error, str(path), "truncated")
    assert error.value.__suppress_context__


def test_text_file_and_pickled_module_are_refused(tmp_path, visual):
    text = tmp_path / "RN50.pt"
    text.write_text("<html>404 not found</html>")
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights=text)
    assert_one_line(error, "cannot read CLIP weights")
    # A whole pickled module needs code execution: weights_only=True refuses it.
    pickled = tmp_path / "module.pt"
    torch.save(visual, pickled)
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights=pickled)
    assert_one_line(error, "cannot read CLIP weights")


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path, visual):
    state = visual.state_dict()
    del state["layer2.0.conv2.weight"]
    state["layer3.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "visual.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights=path)
    assert_one_line(
        error, "1 missing key(s) ('layer2.0.conv2.weight')", "1 unexpected key(s) ('layer3.0.extra.weight')"
    )

    wide = tmp_path / "wide.pt"
    torch.save(random_visual(width=16).state_dict(), wide)
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights=wide)
    assert_one_line(error, "shape mismatch", "conv1.weight (8, 3, 3, 3) != (4, 3, 3, 3)")


def test_file_without_image_tower(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"text.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights=path)
    assert_one_line(error, "no CLIP image-tower weights")


def test_missing_file_and_unknown_tag():
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights="/nonexistent/RN50.pt")
    assert_one_line(error, "does not exist")
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, encoder_weights="laion9000")
    assert_one_line(error, "'laion9000'", "openai")


def test_offline_tag_without_cache_names_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError) as error:
        CLIPDenoiser(**TINY, clip_model="RN50", encoder_weights="openai", cache_dir=str(tmp_path / "cache"))
    assert_one_line(
        error,
        "RN50/openai",
        "HF_HUB_OFFLINE",
        "timm/resnet50_clip.openai",
        "https://openaipublic.azureedge.net/clip/models/",
        "encoder_weights='/path/to/RN50.pt'",
        "--encoder-weights /path/to/RN50.pt",
    )


def test_tag_resolved_from_hugging_face_cache(tmp_path, monkeypatch, visual):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    state = {"visual." + k: v for k, v in visual.state_dict().items()}
    target = write_hf_cache(cache, "timm/resnet50_clip.openai", "open_clip_model.safetensors", state)
    assert cached_pretrained_file("RN50", "openai", cache_dir=str(cache)) == target
    model = CLIPDenoiser(**TINY, clip_model="RN50", encoder_weights="openai", cache_dir=str(cache))
    assert_encoder_equals(model, visual)


def test_tag_resolved_from_open_clip_url_cache(tmp_path, monkeypatch, visual):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "clip"
    cache.mkdir()
    write_torchscript(visual, cache / "RN50.pt")
    assert cached_pretrained_file("RN50", "openai", cache_dir=str(cache)) == cache / "RN50.pt"
    assert_encoder_equals(CLIPDenoiser(**TINY, encoder_weights="openai", cache_dir=str(cache)), visual)
