"""Training with the three bundles' train configs (CT, sRGB, synthetic noise): one engine wiring that
differs only by configuration, the paper's LR schedules, tiny CPU trainings of the RGB tasks, the RGB
training stream, and the evaluate overlay on a trained model."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from monai.bundle import ConfigParser
from rgb_helpers import RGB_BUNDLES, bundle_config, one_thread, tiny_train_overrides, write_images

from ldct_clip.bundles import resolve_bundle
from ldct_clip.cli.train import run_config
from ldct_clip.data.images import make_image_train_dataset, make_image_val_dataset
from ldct_clip.errors import InputError
from ldct_clip.evaluation import rgb_metrics
from ldct_clip.networks import load_model
from ldct_clip.training import PaddedInferer, constant_then_cosine, constant_then_cosine_lr
from ldct_clip.transforms import CameraPipelineNoised, GaussianNoise

sys.path.insert(0, str(resolve_bundle("srgb_denoising").parents[1] / "data_prep"))
from make_srgb_pairs import make_srgb_pairs  # noqa: E402

BUNDLES = ("lowdose_ct_denoising", *RGB_BUNDLES)
AUG_LEVEL = {"synthetic_denoising": 0.025, "srgb_denoising": 0.05}


def _json(bundle: str, name: str) -> dict:
    return json.loads(bundle_config(bundle, name).read_text())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train")
    write_images(root / "val", names=("astronaut", "chelsea"))
    make_srgb_pairs(root / "train", root / "pairs", progress=False)
    return root


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """Three-iteration runs: synthetic (clean folder + Gaussian), sRGB (camera noise on the fly), sRGB
    (paired folder of data_prep/make_srgb_pairs.py)."""
    runs = {}
    with one_thread():
        for key, bundle, data in (
            ("synthetic", "synthetic_denoising", "train"),
            ("srgb", "srgb_denoising", "train"),
            ("srgb_pairs", "srgb_denoising", "pairs"),
        ):
            out = tmp_path_factory.mktemp(key)
            overrides = tiny_train_overrides(images / data, images / "val", out)
            run_config([str(bundle_config(bundle, "train.json"))], overrides)
            runs[key] = out
    return runs


def test_the_three_bundles_share_one_engine_wiring():
    train = {bundle: _json(bundle, "train.json") for bundle in BUNDLES}
    ct, synthetic, srgb = (train[b] for b in BUNDLES)
    # the same trainer, handlers (mixup, clipping, resume, checkpoints...) and evaluator for the three tasks
    for section in ("train", "validate"):
        assert ct[section].keys() == synthetic[section].keys() == srgb[section].keys(), section
        for key in ct[section]:
            if key not in ("dataset", "key_metric", "additional_metrics"):
                assert synthetic[section][key] == srgb[section][key] == ct[section][key], (section, key)
    # the datasets differ by their task's factory; each takes the configured noise transform and seed
    for config in train.values():
        assert {
            "data_dir": "@data_dir",
            "crop_size": "@crop_size",
            "noise": "@train_noise",
            "seed": "@seed",
        }.items() <= config["train"]["dataset"].items()
        assert {"noise": "@val_noise", "seed": "@seed"}.items() <= config["validate"]["dataset"].items()
        assert {"train_noise", "val_noise", "constant_iterations"} <= config.keys()
    # one multi-GPU overlay for the three
    multi_gpu = [_json(bundle, "multi_gpu_train.json") for bundle in BUNDLES]
    assert multi_gpu[0] == multi_gpu[1] == multi_gpu[2]
    # one LR schedule: the CT task holds nothing constant
    assert synthetic["lr_scheduler"] == srgb["lr_scheduler"] == ct["lr_scheduler"]
    assert ct["lr_scheduler"]["_target_"] == "ldct_clip.training.constant_then_cosine"
    assert ct["constant_iterations"] == 0
    task_keys = {
        "aug_level",
        "metric_protocol",
        "train_noise",
        "val_noise",
        "noise_std",
        "val_noise_sigma",
        "camera_noise",
    }
    differing = {k for k in synthetic.keys() | srgb.keys() if synthetic.get(k) != srgb.get(k)}
    assert differing <= task_keys, differing - task_keys
    for bundle in RGB_BUNDLES:
        for name in ("train.json", "inference.json"):
            net = _json(bundle, name)["network_def"]
            assert net["_target_"] == "ldct_clip.networks.CLIPDenoiser"
            assert net["in_channels"] == net["out_channels"] == 3 and net["bias"] is False
        assert (
            _json(bundle, "train.json")["aug_level"]
            == _json(bundle, "inference.json")["network_def"]["aug_level"]
        )
        assert _json(bundle, "train.json")["aug_level"] == AUG_LEVEL[bundle]


def test_the_papers_learning_rate_schedule():
    parser = ConfigParser()
    parser.read_config(str(bundle_config("srgb_denoising", "train.json")))
    assert parser.get_parsed_content("iterations") == 300000
    assert parser.get_parsed_content("constant_iterations") == 92000
    assert parser.get_parsed_content("learning_rate") == 3e-4 and parser.get_parsed_content("eta_min") == 1e-6
    # the same schedule, 1000x shorter: constant for 92 steps, cosine to 1e-6 at step 300
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    scheduler = constant_then_cosine(optimizer, 300, 92, 1e-6)
    lrs = []
    for _ in range(300):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == lrs[91] == lrs[92] == 3e-4
    assert lrs[196] == pytest.approx((3e-4 + 1e-6) / 2, rel=1e-6)  # half-way through the cosine
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
    assert max(abs(lr - constant_then_cosine_lr(i, 3e-4, 300, 92)) for i, lr in enumerate(lrs)) < 1e-12
    # resumable: a scheduler restored at step 150 continues identically
    optimizer2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    restored = constant_then_cosine(optimizer2, 300, 92, 1e-6)
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    reference = constant_then_cosine(probe, 300, 92, 1e-6)
    for _ in range(150):
        probe.step()
        reference.step()
    restored.load_state_dict(reference.state_dict())
    optimizer2.param_groups[0]["lr"] = probe.param_groups[0]["lr"]
    for step in range(150, 200):
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(lrs[step], rel=1e-9)
        optimizer2.step()
        restored.step()
    with pytest.raises(InputError, match="constant part"):
        constant_then_cosine(optimizer, 100, 100)
    # the CT config builds the same function with nothing constant: plain cosine annealing
    parser = ConfigParser()
    parser.read_config(str(bundle_config("lowdose_ct_denoising", "train.json")))
    parser["optimizer"] = {
        "_target_": "torch.optim.AdamW",
        "params": "$[torch.nn.Parameter(torch.zeros(1))]",
        "lr": 3e-4,
    }
    parser["imports"] = ["$import torch", "$import ldct_clip"]
    parser["iterations"] = 300
    ct_scheduler = parser.get_parsed_content("lr_scheduler")
    assert isinstance(ct_scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and ct_scheduler.T_max == 300


@pytest.mark.parametrize("run", ["synthetic", "srgb", "srgb_pairs"])
def test_tiny_training_runs_the_shared_engine(trained, run):
    out = trained[run]
    model = load_model(out / "model.pt")
    assert model.config["in_channels"] == model.config["out_channels"] == 3
    assert model.config["aug_level"] == (0.025 if run == "synthetic" else 0.05)
    checkpoint = torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 3
    assert {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()} == {3}
    assert checkpoint["lr_scheduler"]["_last_lr"][0] == pytest.approx(1e-6)  # cosine over 3 iterations
    assert (out / "best.pt").is_file()  # validation ran and its PSNR decided the "best" checkpoint


@pytest.mark.slow
def test_a_short_synthetic_training_learns_to_denoise(tmp_path):
    write_images(tmp_path / "train", size=(64, 96))
    write_images(tmp_path / "val", names=("astronaut", "chelsea"), size=(64, 96))
    overrides = tiny_train_overrides(
        tmp_path / "train", tmp_path / "val", tmp_path / "out", iterations=150, batch_size=4, crop_size=48
    )
    overrides.update(learning_rate=3e-3, noise_std=25 / 255, val_noise_sigma=25)
    with one_thread():
        run_config([str(bundle_config("synthetic_denoising", "train.json"))], overrides)
        model = load_model(tmp_path / "out" / "model.pt").eval()
        noisy, denoised = [], []
        with torch.no_grad():
            for item in make_image_val_dataset(tmp_path / "val", noise=GaussianNoise(25), seed=100):
                noisy.append(rgb_metrics(item["label"], item["image"])["psnr"])
                denoised.append(
                    rgb_metrics(item["label"], PaddedInferer(32)(item["image"][None], model)[0])["psnr"]
                )
    print(f"PSNR noisy {sum(noisy) / 2:.2f} dB, denoised {sum(denoised) / 2:.2f} dB")
    assert 20 < sum(noisy) / 2 < 21.5  # sigma 25/255: 20.2 dB before clamping
    assert sum(denoised) / 2 > sum(noisy) / 2 + 1.0  # measured: 20.4 -> 24.0 dB after 150 iterations


def test_evaluate_config_scores_with_the_rgb_protocol(trained, images, tmp_path):
    out, bundle = trained["synthetic"], "synthetic_denoising"
    overrides = {
        **tiny_train_overrides(images / "train", images / "val", out),
        "ckpt_path": str(out / "model.pt"),
        "eval_dir": str(tmp_path / "eval"),
    }
    with one_thread():
        run_config(
            [str(bundle_config(bundle, "train.json")), str(bundle_config(bundle, "evaluate.json"))], overrides
        )
        with open(tmp_path / "eval" / "val_psnr_raw.csv") as f:
            reported = {row["filename"]: float(row["mean"]) for row in csv.DictReader(f)}
        # the same pairs scored directly: Gaussian sigma 50/255 reseeded per image, padded to 32
        pairs = make_image_val_dataset(images / "val", noise=GaussianNoise(50), seed=100)
        model = load_model(out / "model.pt").eval()
        with torch.no_grad():
            expected = {
                item["name"]: rgb_metrics(
                    item["label"], PaddedInferer(32)(item["image"][None], model)[0], "synthetic"
                )["psnr"]
                for item in pairs
            }
    assert reported.keys() == expected.keys() == {"astronaut.png", "chelsea.png"}
    for name in expected:
        assert reported[name] == pytest.approx(expected[name], abs=1e-3)


def test_training_stream_is_seeded_and_paired_crops_stay_aligned(images, tmp_path):
    stream = make_image_train_dataset(
        images / "train", crop_size=32, noise=CameraPipelineNoised("image", noisy_key="image"), seed=3
    )
    first, again, other = stream[5], stream[5], stream[6]
    assert first["image"].shape == first["label"].shape == (3, 32, 32)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["label"], other["label"])
    assert float((first["image"] - first["label"]).std()) > 0.01  # camera noise added on the fly
    # pairs whose noisy image equals the clean one: crops and flips must hit both alike
    write_images(tmp_path / "same" / "clean")
    write_images(tmp_path / "same" / "noisy")
    paired = make_image_train_dataset(tmp_path / "same", crop_size=32, seed=0)
    for position in range(12):
        item = paired[position]
        assert torch.equal(item["image"], item["label"])
    with pytest.raises(InputError, match="val_noise"):
        make_image_val_dataset(images / "val")
    (tmp_path / "same" / "noisy" / "coffee.png").unlink()
    with pytest.raises(InputError, match="no noisy partner"):
        make_image_val_dataset(tmp_path / "same")
