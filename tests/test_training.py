"""Training wiring: mixup, clipping, LR schedule, a tiny run that learns, exact resume."""

import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import (
    TRAIN_CONFIG,
    one_thread,
    phantom_volumes,
    state_dict_max_difference,
    tiny_overrides,
)

from ldct_clip import training as T
from ldct_clip.cli.train import run_config
from ldct_clip.conventions import model_to_hu
from ldct_clip.data.ct_dataset import make_val_dataset
from ldct_clip.evaluation import psnr
from ldct_clip.networks import load_model


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return phantom_volumes(tmp_path_factory.mktemp("data") / "volumes")


def test_mixup_mixes_noisy_and_clean_alike():
    mixup = T.Mixup(prob=1.0, beta=1.2)
    clean = torch.arange(8, dtype=torch.float32).reshape(8, 1, 1, 1).expand(8, 1, 4, 4).contiguous()
    noisy = 3 * clean + 1
    mixed_noisy, mixed_clean = mixup({"image": noisy, "label": clean})
    # same lambda and permutation: the affine relation between the two survives the mix
    torch.testing.assert_close(mixed_noisy, 3 * mixed_clean + 1)
    assert not torch.equal(mixed_clean, clean)
    # convex combinations of two batch items
    assert float(mixed_clean.min()) >= 0 and float(mixed_clean.max()) <= 7


def test_mixup_probability_and_identity():
    mixup = T.Mixup(prob=0.5)
    x = torch.rand(6, 1, 4, 4)
    mixed = sum(not torch.equal(mixup.mix(x, x)[0], x) for _ in range(400))
    assert 160 < mixed < 240  # Binomial(400, 0.5): +-4 standard deviations
    unchanged, _ = T.Mixup(prob=0.0).mix(x, x)
    assert torch.equal(unchanged, x)


def test_gradient_clip_on_trainable_parameters_only():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    net[0].requires_grad_(False)
    net(torch.randn(8, 4)).pow(2).sum().mul(100).backward()
    assert T.trainable_parameters(net) == list(net[1].parameters())

    class FakeEngine:
        network = net
        amp = False

    T.GradientClipHandler(0.01)(FakeEngine())
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net[1].parameters()]))
    assert float(norm) == pytest.approx(0.01, rel=1e-4)
    assert net[0].weight.grad is None


def test_cosine_lr_reaches_eta_min_per_iteration():
    # the CT recipe: the one schedule with nothing constant, a cosine from the first step
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = T.constant_then_cosine(opt, iterations=100, constant_iterations=0, eta_min=1e-6)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    lrs = []
    for _ in range(100):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[49] == pytest.approx((3e-4 + 1e-6) / 2, rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-6)
    assert max(abs(lr - T.constant_then_cosine_lr(i + 1, 3e-4, 100, 0)) for i, lr in enumerate(lrs)) < 1e-12


def test_round_length():
    assert T.round_length(40000, 1000) == 1000
    assert T.round_length(300, 1000) == 300
    assert T.round_length(20, 10) == 10
    assert T.round_length(21, 10) == 7


def test_training_state_round_trip(tmp_path):
    state = T.TrainingState()
    torch.manual_seed(5)
    np.random.seed(5)
    saved = state.state_dict()
    expected = (torch.rand(3), np.random.rand(3))
    torch.save(saved, tmp_path / "s.pt")
    torch.manual_seed(9)
    np.random.seed(9)
    state.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])


def _noisy_psnr_and_model_psnr(model, val_ds):
    inferer = T.PaddedInferer(32)
    noisy_scores, model_scores = [], []
    with torch.no_grad():
        for i in range(len(val_ds)):
            item = val_ds[i]
            noisy, clean = torch.as_tensor(item["image"])[None], torch.as_tensor(item["label"])[None]
            pred = inferer(noisy, model)
            noisy_scores.append(psnr(model_to_hu(noisy), model_to_hu(clean)).item())
            model_scores.append(psnr(model_to_hu(pred), model_to_hu(clean)).item())
    return float(np.mean(noisy_scores)), float(np.mean(model_scores))


@pytest.mark.slow
def test_tiny_training_beats_the_noisy_input(volumes, tmp_path):
    out = tmp_path / "run"
    with one_thread():
        overrides = tiny_overrides(
            volumes, out, 300, learning_rate=3e-3, crop_size=48, checkpoint_interval=150
        )
        run_config([TRAIN_CONFIG], overrides)
        model = load_model(out / "model.pt").eval()
        val_ds = make_val_dataset(volumes, ["C"], cache_dir=tmp_path / "cache")
        noisy_psnr, model_psnr = _noisy_psnr_and_model_psnr(model, val_ds)
    print(f"validation PSNR: noisy {noisy_psnr:.2f} dB, model {model_psnr:.2f} dB")
    assert 34 < noisy_psnr < 37  # sigma 5/255 on the model range; the air below -1024 HU is truncated
    assert model_psnr > noisy_psnr + 0.5  # measured: 35.6 -> 36.8 dB
    # best.pt (CheckpointSaver, full resume dict) rebuilds the network too
    best = torch.load(out / "best.pt", weights_only=True)
    assert {"model", "network", "optimizer", "lr_scheduler", "trainer", "training_state"} <= best.keys()
    assert best["trainer"]["iteration"] in (150, 300)
    assert load_model(out / "best.pt") is not None
    assert glob.glob(str(out / "runs" / "events.out.tfevents.*"))


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _stop_and_resume(volumes, out: Path, **overrides) -> Path:
    """A 20-iteration run stopped after its first round of 10 (as if killed), then resumed from that
    round's checkpoint; returns the checkpoint."""
    stopped = tiny_overrides(volumes, out, 20, checkpoint_interval=10, **overrides)
    run_config([TRAIN_CONFIG], {**stopped, "train#trainer#max_epochs": 1})
    checkpoint = out / "checkpoint_epoch=1.pt"
    assert torch.load(checkpoint, weights_only=True)["trainer"]["iteration"] == 10
    run_config([TRAIN_CONFIG], {**stopped, "resume": str(checkpoint)})
    return checkpoint


def test_resumed_run_reaches_the_same_weights(volumes, tmp_path, monkeypatch):
    with one_thread():
        # the default configuration: the step's precision and memory format are "auto", measured when the
        # run starts, saved in its checkpoints and kept by the resumed run (which must not measure again)
        stopped = tiny_overrides(volumes, tmp_path / "resumed", 20, checkpoint_interval=10)
        run_config([TRAIN_CONFIG], {**stopped, "train#trainer#max_epochs": 1})
        checkpoint = tmp_path / "resumed" / "checkpoint_epoch=1.pt"
        saved = torch.load(checkpoint, weights_only=True)
        assert saved["trainer"]["iteration"] == 10
        step = saved["training_state"]["step"]
        monkeypatch.setattr(T.precision, "measure_step_formats", _no_second_measurement)
        run_config([TRAIN_CONFIG], {**stopped, "resume": str(checkpoint)})
        # the uninterrupted run in the format the stopped one measured (on a tiny network the formats
        # are close calls, which a measurement of its own could decide otherwise)
        measured = {"train_precision": step["precision"], "train_memory_format": step["memory_format"]}
        run_config(
            [TRAIN_CONFIG], tiny_overrides(volumes, tmp_path / "full", 20, checkpoint_interval=10, **measured)
        )
        full, resumed = _weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt")
        assert state_dict_max_difference(full, resumed) <= 1e-6
        assert state_dict_max_difference(full, _weights(checkpoint)) > 1e-4  # the second round did train

        # without the saved RNG states (feature augmentation, mixup) the resumed run diverges
        monkeypatch.setattr(T.TrainingState, "load_state_dict", lambda self, state: None)
        diverged = tiny_overrides(volumes, tmp_path / "diverged", 20, checkpoint_interval=10, **measured)
        run_config([TRAIN_CONFIG], {**diverged, "resume": str(checkpoint)})
        assert state_dict_max_difference(full, _weights(tmp_path / "diverged" / "model.pt")) > 1e-6


def _no_second_measurement(*args, **kwargs):
    raise AssertionError("a resumed run keeps the step format of its checkpoint")


@pytest.mark.slow
def test_resume_is_exact_in_the_bf16_channels_last_step(volumes, tmp_path):
    fast = {"train_precision": "bf16", "train_memory_format": "channels_last"}
    with one_thread():
        run_config(
            [TRAIN_CONFIG], tiny_overrides(volumes, tmp_path / "full", 20, checkpoint_interval=10, **fast)
        )
        _stop_and_resume(volumes, tmp_path / "resumed", **fast)
    full, resumed = _weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt")
    assert state_dict_max_difference(full, resumed) <= 1e-6


def test_recalibrate_encoder_bn_sets_the_statistics_of_the_slices():
    from ldct_clip.networks import CLIPDenoiser

    model = CLIPDenoiser(layers=(1, 1, 1, 1), width=8).train()
    bn = model.encoder.bn1
    seen = []
    handle = bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    slices = torch.rand(3, 1, 40, 56) * 0.5
    assert T.recalibrate_encoder_bn(model, [slices]) == 3
    handle.remove()
    # one batch, momentum None: the running statistics are that batch's (of the 32-padded slices)
    torch.testing.assert_close(bn.running_mean, seen[0].mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, seen[0].var((0, 2, 3), unbiased=True))
    assert seen[0].shape[-2:] == (32, 32)  # stem output (/2) of 64x64: padded to 32's multiple
    assert model.training and bn.momentum == 0.1  # mode and momentum restored
    frozen = CLIPDenoiser(layers=(1, 1, 1, 1), width=8, encoder_bn="frozen")
    with pytest.raises(Exception, match="frozen"):
        T.recalibrate_encoder_bn(frozen, [slices])


def test_progress_bar_covers_the_whole_run_and_resumes_at_the_restored_iteration():
    import io

    from ignite.engine import Engine, Events

    def run(restored_iteration, disable=False):
        stream = io.StringIO()
        engine = Engine(lambda engine, batch: {"loss": torch.tensor(0.25)})

        @engine.on(Events.STARTED)
        def restore(engine):  # what ResumeFromCheckpoint does before the bar opens
            engine.state.iteration = restored_iteration
            engine.state.epoch = restored_iteration // 4

        bar = T.TrainingProgressBar(file=stream, mininterval=0.0, disable=disable)
        bar.attach(engine)
        steps = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(bar.bar.n))
        engine.run(range(4), max_epochs=3, epoch_length=4)
        return stream.getvalue(), steps

    text, steps = run(0)
    assert steps == list(range(1, 13)) and "12/12" in text and "loss=0.2500" in text
    text, steps = run(8)  # resumed after two of three rounds: the bar starts at 8 of 12
    assert steps == [9, 10, 11, 12] and "8/12" in text and "12/12" in text
    text, steps = run(0, disable=True)  # "progress": false in the config
    assert text == ""
