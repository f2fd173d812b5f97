"""CLIPDenoiser: equality with the reference network, paper configurations, augmentation, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from network_helpers import TINY, reference_fixture, reference_manifest, rel_error

from ldct_clip.errors import InputError
from ldct_clip.networks import CLIPDenoiser, infer_network_config, load_reference_state_dict, pad_to_multiple

CHANNELS = {"ct": 1, "rgb": 3}


def tiny_from_reference(kind: str, **kwargs):
    ref = reference_fixture(kind)
    config = infer_network_config(ref["state_dict"])
    model = CLIPDenoiser(**{**config, **kwargs})
    load_reference_state_dict(model, ref["state_dict"])
    return model, ref


@pytest.mark.parametrize("kind", ["ct", "rgb"])
def test_eval_output_equals_reference(kind):
    model, ref = tiny_from_reference(kind)
    assert model.config["bias"] == ref["config"]["bias"]
    with torch.no_grad():
        out = model.eval()(ref["input"])
    assert out.shape == ref["output_eval"].shape
    assert rel_error(out, ref["output_eval"]) < 1e-5


@pytest.mark.parametrize("kind", ["ct", "rgb"])
def test_train_forward_without_augmentation_equals_reference(kind):
    model, ref = tiny_from_reference(kind, aug_level=0.0, encoder_bn="batch_stats")
    out = model.train()(ref["input"])
    assert rel_error(out, ref["output_train_no_pfa"]) < 1e-5
    state = model.state_dict()
    expected = ref["running_stats_after_train_forward"]
    compared = [k for k in expected if k in state]
    # Only the reference's unused layer4 statistics have no counterpart.
    assert all(k.startswith("encoder.layer4.") for k in expected if k not in state)
    assert len(compared) == 30
    for key in compared:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-6)
    # The statistics really moved (the fixture's start values differ from the ones after the forward).
    moved = [k for k in compared if not torch.allclose(ref["state_dict"][k], expected[k])]
    assert len(moved) == len(compared)


def test_frozen_encoder_bn_keeps_running_stats():
    model, ref = tiny_from_reference("ct", aug_level=0.0, encoder_bn="frozen")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.train()
    assert model.training and not model.encoder.training
    assert model.up_path.training
    out = model(ref["input"])
    for key, value in model.state_dict().items():
        if "running_" in key:
            assert torch.equal(value, before[key]), key
    # Without augmentation and with a frozen encoder, training and eval forward coincide.
    assert rel_error(out, ref["output_eval"]) < 1e-5


@pytest.mark.parametrize("kind", ["ct", "rgb"])
def test_paper_configuration_matches_reference_manifest(kind):
    manifest = reference_manifest(kind)
    channels = CHANNELS[kind]
    model = CLIPDenoiser(in_channels=channels, out_channels=channels)  # RN50, random init
    state = model.state_dict()
    shapes = manifest["shapes"]
    for key, tensor in state.items():
        assert key in shapes, key
        assert list(tensor.shape) == list(shapes[key]), key
    leftover = [k for k in shapes if k not in state]
    assert leftover and all(k.startswith("encoder.layer4.") for k in leftover)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == {"ct": 10_987_779, "rgb": 10_988_928}[kind]
    assert sum(p.numel() for p in model.encoder.parameters()) == 8_562_528
    assert not hasattr(model.encoder, "layer4") and not hasattr(model.encoder, "attnpool")


@pytest.mark.parametrize("clip_model", ["RN101", "RN50x4"])
def test_other_clip_resnets_build_and_run(clip_model):
    model = CLIPDenoiser(clip_model=clip_model).eval()
    assert not any(k.startswith(("encoder.layer4", "encoder.attnpool")) for k in model.state_dict())
    width = model.config["width"]
    assert model.encoder.tap_channels == (3, width, 4 * width, 8 * width, 16 * width)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 20, 24)).shape == (1, 1, 20, 24)


def tap_recorder(model):
    """Record the encoder's clean taps and what each decoder step receives as its tap."""
    seen = {}
    model.encoder.register_forward_hook(
        lambda m, args, out: seen.__setitem__("clean", [t.detach() for t in out])
    )
    model.up_path[0].register_forward_pre_hook(lambda m, args: seen.__setitem__(4, args[0].detach()))
    for i in range(1, 5):
        model.up_path[i].register_forward_pre_hook(
            lambda m, args, i=i: seen.__setitem__(4 - i, args[1].detach())
        )
    return seen


def test_feature_augmentation_sigma_per_tap():
    aug_level = 0.1
    model = CLIPDenoiser(**TINY, aug_level=aug_level, encoder_bn="frozen")
    seen = tap_recorder(model)
    x = torch.rand(4, 1, 64, 64)
    model.train()(x)
    clean = seen["clean"]
    assert torch.equal(seen[0], clean[0])  # the image tap is untouched
    torch.testing.assert_close(clean[0], model.first(x))  # and it is the 1x1 conv's output for CT
    for i in range(1, 5):
        mask = clean[i].abs() > 1e-3
        ratio = seen[i][mask] / clean[i][mask] - 1.0
        assert ratio.numel() > 2000
        assert abs(float(ratio.std()) - i * aug_level) < 0.08 * i * aug_level, i
        assert abs(float(ratio.mean())) < 0.1 * i * aug_level, i
    model.eval()
    with torch.no_grad():
        model(x)
    for i in range(5):
        assert torch.equal(seen[i], seen["clean"][i])


def test_augmentation_is_reproducible_with_a_seed():
    model = CLIPDenoiser(**TINY).train()
    x = torch.rand(2, 1, 32, 32)
    torch.manual_seed(3)
    a = model(x)
    torch.manual_seed(3)
    b = model(x)
    c = model(x)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


@pytest.mark.parametrize("encoder_bn", ["batch_stats", "frozen"])
def test_encoder_gets_no_gradients_and_never_changes(encoder_bn):
    model = CLIPDenoiser(**TINY, encoder_bn=encoder_bn).train()
    params_before = {k: p.clone() for k, p in model.encoder.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    x = torch.rand(2, 1, 32, 32)
    loss = (model(x) - x).abs().mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert model.first.weight.grad is not None and model.first.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.up_path.parameters())
    for key, param in model.encoder.named_parameters():
        assert torch.equal(param, params_before[key]), key


@pytest.mark.parametrize("shape", [(1, 1, 97, 131), (1, 1, 8, 8), (2, 1, 1, 5), (1, 3, 17, 16)])
def test_any_input_size_comes_back_at_input_size(shape):
    model = CLIPDenoiser(in_channels=shape[1], out_channels=shape[1], **TINY).eval()
    with torch.no_grad():
        out = model(torch.rand(shape))
    assert out.shape == shape
    assert torch.isfinite(out).all()


def test_padding_matches_reference_evaluation_padding():
    # The reference scripts reflect-pad bottom/right before calling the network, then crop.
    model = CLIPDenoiser(**TINY).eval()
    x = torch.rand(1, 1, 97, 131)
    with torch.no_grad():
        ours = model(x)
        theirs = model(F.pad(x, (0, 13, 0, 15), mode="reflect"))[..., :97, :131]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(8, 8), (3, 5), (1, 7), (40, 33)])
def test_pad_to_multiple_is_numpy_reflect(size):
    x = torch.rand(1, 2, *size)
    padded = pad_to_multiple(x, 16)
    expected = x.numpy()
    for axis, n in ((2, size[0]), (3, size[1])):
        pad = [(0, 0)] * 4
        pad[axis] = (0, -n % 16)
        # A size-1 axis cannot be reflected: it is repeated.
        expected = np.pad(expected, pad, mode="edge" if n == 1 else "reflect")
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    np.testing.assert_array_equal(padded.numpy(), expected)


def test_sizes_already_multiple_of_16_are_not_padded():
    x = torch.rand(1, 1, 32, 48)
    assert pad_to_multiple(x, 16) is x


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"encoder_bn": "train"}, "batch_stats, frozen"),
        ({"in_channels": 2}, "use 1"),
        ({"decoder_depth": 4}, "decoder_depth=4"),
        ({"clip_model": "ViT-B-32"}, "RN50"),
        ({"layers": (1, 1, 1)}, "four positive ints"),
        ({"aug_level": -0.1}, "aug_level"),
    ],
)
def test_invalid_arguments_give_clear_errors(kwargs, fragment):
    args = {**TINY, **kwargs} if "clip_model" not in kwargs else kwargs
    with pytest.raises(InputError, match=fragment) as info:
        CLIPDenoiser(**args)
    assert "\n" not in str(info.value)


def test_wrong_input_shape_is_an_input_error():
    with pytest.raises(InputError, match=r"\(B, 1, H, W\)"):
        CLIPDenoiser(**TINY)(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("channels, bias", [(1, False), (3, True)])
def test_inference_ops_equal_forward(channels, bias):
    # CLIPDenoiser.infer (what the inference backends run) equals forward up to float rounding, in both
    # memory formats
    model = CLIPDenoiser(in_channels=channels, out_channels=channels, bias=bias, **TINY).eval()
    x = torch.rand(2, channels, 97, 131)
    with torch.no_grad():
        expected = model(x)
        assert rel_error(model.infer(x), expected) < 1e-5
        model.to(memory_format=torch.channels_last)
        assert rel_error(model.infer(x), expected) < 1e-5


@pytest.mark.parametrize("out_channels", [1, 3])
def test_conv3x3_by_taps_equals_conv2d(out_channels):
    from ldct_clip.networks.decoder import conv3x3_by_taps

    x = torch.rand(2, 8, 13, 9)
    weight, bias = torch.randn(out_channels, 8, 3, 3), torch.randn(out_channels)
    torch.testing.assert_close(conv3x3_by_taps(x, weight, bias), F.conv2d(x, weight, bias, padding=1))
    torch.testing.assert_close(conv3x3_by_taps(x, weight), F.conv2d(x, weight, padding=1))
