"""The training step's precision and memory format (``TrainingStepInferer``): bf16 autocast and channels_last
on CPUs, "auto" decided by measurement without disturbing the run, kept across a resume, and a loss curve
that stays within the noise of float32's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from training_helpers import TRAIN_CONFIG, one_thread, phantom_volumes, tiny_overrides

from ldct_clip.cli.train import train_recording_losses
from ldct_clip.errors import InputError
from ldct_clip.networks import CLIPDenoiser
from ldct_clip.training import (
    StepFormat,
    TrainingStepInferer,
    candidate_formats,
    choose_step_format,
    cuda_amp_kwargs,
)
from ldct_clip.training import precision as precision_module

FP32, FP32_CL = StepFormat("fp32", "contiguous"), StepFormat("fp32", "channels_last")
BF16, BF16_CL = StepFormat("bf16", "contiguous"), StepFormat("bf16", "channels_last")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run many times faster on one thread than on two busy cores (and time more steadily)."""
    with one_thread():
        yield


def _tiny(**kwargs) -> CLIPDenoiser:
    torch.manual_seed(3)
    return CLIPDenoiser(layers=(1, 1, 1, 1), width=8, **kwargs)


def test_bf16_channels_last_step_autocasts_and_returns_float32():
    model = _tiny().eval()
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    seen = []
    model.up_path[1].conv_block.block[0].register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    x = torch.rand(2, 1, 48, 40) * 0.5
    with torch.no_grad():
        out = TrainingStepInferer("bf16", "channels_last")(x, model)
        expected = reference(x)
    # the network computes in bf16 and NHWC; the loss sees float32
    assert seen[0][1].dtype == torch.bfloat16 and out.dtype == torch.float32 and out.shape == x.shape
    assert seen[0][0].is_contiguous(memory_format=torch.channels_last)
    # the weights converted in place: the optimizer's Parameter objects are the network's
    assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(a is b for a, b in zip(parameters, model.parameters(), strict=True))
    relative = float((out - expected).norm() / expected.norm())
    assert 1e-5 < relative < 3e-2  # bf16 rounding, not a different network
    # float32 channels_last: the same numbers up to float32 rounding
    model32 = copy.deepcopy(reference)
    with torch.no_grad():
        out32 = TrainingStepInferer("fp32", "channels_last")(x, model32)
    assert out32.dtype == torch.float32 and float((out32 - expected).abs().max()) < 1e-5


def test_bf16_step_keeps_the_first_and_last_convs_in_float32_as_inference_does():
    # Weights learn the numbers of the step they are trained with. The whole forward in bf16 rounded the
    # step's output image to ~8 HU steps and the 1x1 conv's weights to bf16, and weights trained that way
    # came out ~1.3 HU brighter in inference (CLIPDenoiser.infer: first and last in float32) than in training.
    model = _tiny().eval()
    dtypes = {}

    def record(name):
        return lambda module, inputs, output: dtypes.update({name: output.dtype})  # None: output kept

    model.first.register_forward_hook(record("first"))
    model.last.register_forward_hook(record("last"))
    model.up_path[1].conv_block.block[0].register_forward_hook(record("decoder"))
    x = torch.rand(2, 1, 48, 40) * 0.5
    with torch.no_grad():
        step = TrainingStepInferer("bf16", "contiguous")(x, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inference = model.infer(x)
    assert dtypes == {"first": torch.float32, "decoder": torch.bfloat16, "last": torch.float32}
    assert not torch.equal(step, step.bfloat16().float())  # not a bf16 image cast back
    assert float((step - inference).norm() / inference.norm()) < 1e-2  # bf16 rounding inside, same network


def test_auto_measures_once_without_touching_the_run(monkeypatch):
    model = _tiny().train()  # feature augmentation draws noise, encoder BatchNorm updates its statistics
    twin = copy.deepcopy(model)
    x = torch.rand(2, 1, 32, 32) * 0.5
    calls = []
    measure = precision_module.measure_step_formats
    monkeypatch.setattr(
        precision_module, "measure_step_formats", lambda *a, **k: calls.append(1) or measure(*a, **k)
    )
    inferer = TrainingStepInferer()  # "auto" precision and memory format
    torch.manual_seed(11)
    out = inferer(x, model)
    assert set(inferer.times) == {FP32, FP32_CL, BF16, BF16_CL}
    assert all(0 < t < 10 for t in inferer.times.values())
    assert inferer.format in inferer.times
    # the measurement ran on a copy, in a forked random stream: the run continues as if the format
    # had been configured (same output, same encoder BatchNorm statistics, no gradients left)
    torch.manual_seed(11)
    pinned = TrainingStepInferer(inferer.format.precision, inferer.format.memory_format)
    assert torch.equal(pinned(x, twin), out)
    for (name, ours), theirs in zip(model.named_buffers(), twin.buffers(), strict=True):
        assert torch.equal(ours, theirs), name
    assert int(model.encoder.bn1.num_batches_tracked) == 1
    assert all(p.grad is None for p in model.parameters())
    inferer(x, model)
    assert len(calls) == 1  # measured at the first call only


def test_choice_rules():
    # a reduced precision must earn its place: more than 5% faster than the fastest float32 format
    assert choose_step_format({FP32: 2.0, FP32_CL: 1.0, BF16: 0.99, BF16_CL: 0.97}) == FP32_CL
    assert choose_step_format({FP32: 2.0, FP32_CL: 1.0, BF16: 0.99, BF16_CL: 0.5}) == BF16_CL
    assert choose_step_format({FP32: 1.0, FP32_CL: 1.2, BF16: 3.0, BF16_CL: 2.0}) == FP32
    assert choose_step_format({BF16: 1.0, BF16_CL: 0.9}) == BF16_CL
    assert candidate_formats("cpu") == [FP32, FP32_CL, BF16, BF16_CL]
    assert candidate_formats("cpu", "bf16", "channels_last") == [BF16_CL]
    # on CUDA the precision is MONAI's amp (autocast and GradScaler): only the memory format is measured
    assert candidate_formats("cuda", "bf16") == [
        StepFormat("amp", "contiguous"),
        StepFormat("amp", "channels_last"),
    ]
    assert candidate_formats("cuda", "fp32", "channels_last") == [FP32_CL]
    assert cuda_amp_kwargs("bf16") == {"dtype": torch.bfloat16} and cuda_amp_kwargs("auto") == {}
    with pytest.raises(InputError, match="GradScaler"):
        candidate_formats("cpu", "fp16")
    with pytest.raises(InputError, match="train_precision='half'"):
        TrainingStepInferer("half")
    with pytest.raises(InputError, match="train_memory_format"):
        TrainingStepInferer(memory_format="nhwc")


def test_a_resumed_run_keeps_the_measured_format(monkeypatch):
    x = torch.rand(2, 1, 32, 32)
    first = TrainingStepInferer()
    first.format = StepFormat("bf16", "channels_last")  # as if measured
    first._device_type = "cpu"
    state = first.state_dict()
    assert state == {"device_type": "cpu", "precision": "bf16", "memory_format": "channels_last"}

    def no_measurement(*args, **kwargs):
        raise AssertionError("a resumed run must not measure again")

    monkeypatch.setattr(precision_module, "measure_step_formats", no_measurement)
    resumed = TrainingStepInferer()
    resumed.load_state_dict(state)
    model = _tiny().eval()
    resumed(x, model)
    assert resumed.format == BF16_CL and model.encoder.conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    # a configured format wins over the checkpoint's
    configured = TrainingStepInferer("fp32", "contiguous")
    configured.load_state_dict(state)
    configured(x, _tiny().eval())
    assert configured.format == FP32
    # a checkpoint of another kind of device is measured again
    monkeypatch.undo()
    elsewhere = TrainingStepInferer(memory_format="contiguous")
    elsewhere.load_state_dict({**state, "device_type": "cuda"})
    elsewhere(x, _tiny().eval())
    assert set(elsewhere.times) == {FP32, BF16}


def test_config_keys_choose_the_step():
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    assert parser["train_precision"] == parser["train_memory_format"] == "auto"
    inferer = parser.get_parsed_content("train#inferer")
    assert isinstance(inferer, TrainingStepInferer) and (inferer.precision, inferer.memory_format) == (
        "auto",
        "auto",
    )
    # overridable as any config key (ldct-clip train --set train_precision=fp32)
    parser = ConfigParser()
    parser.read_config(TRAIN_CONFIG)
    parser.update({"train_precision": "fp32", "train_memory_format": "contiguous"})
    inferer = parser.get_parsed_content("train#inferer")
    assert (inferer.precision, inferer.memory_format) == ("fp32", "contiguous")
    assert parser.get_parsed_content("amp") is False  # MONAI's CUDA amp follows train_precision
    assert parser.get_parsed_content("training_state").step is inferer  # checkpoints keep the format


def _window_means(losses: list[float], window: int = 20) -> np.ndarray:
    return np.asarray(losses).reshape(-1, window).mean(axis=1)


def _loss_curve(data, out, seed: int, **step) -> tuple[list[float], dict]:
    """Per-iteration losses of a 200-iteration tiny run of the CT bundle's train config."""
    overrides = tiny_overrides(data, out, 200, seed=seed, progress=False, val_max_slices=1, **step)
    losses, trainer, _ = train_recording_losses([TRAIN_CONFIG], overrides)
    return losses, trainer.inferer.state_dict()


@pytest.mark.slow
def test_the_fast_step_keeps_the_loss_curve_within_the_noise_of_float32(tmp_path):
    data = phantom_volumes(tmp_path / "data")
    fp32_a, _ = _loss_curve(
        data, tmp_path / "a", 100, train_precision="fp32", train_memory_format="contiguous"
    )
    fp32_b, _ = _loss_curve(data, tmp_path / "b", 7, train_precision="fp32", train_memory_format="contiguous")
    fast, used = _loss_curve(
        data, tmp_path / "fast", 100, train_precision="bf16", train_memory_format="channels_last"
    )
    assert used["precision"] == "bf16" and used["memory_format"] == "channels_last"
    a, b, f = (_window_means(c) for c in (fp32_a, fp32_b, fast))
    band = np.abs(b - a).max()  # how far two float32 runs that differ only by their seed lie apart
    print(
        f"windows of 20: fp32 seed 100 {np.round(a, 4)}, seed 7 {np.round(b, 4)}, bf16+NHWC {np.round(f, 4)}"
    )
    print(f"noise band {band:.4f}, bf16+NHWC vs fp32 (same seed) {np.abs(f - a).max():.4f}")
    assert a[-1] < 0.5 * a[0]  # it trains
    assert np.abs(f - a).max() <= band
