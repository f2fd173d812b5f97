"""``ldct-clip train`` and ``ldct-clip evaluate`` end to end on phantom data."""

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from denoise_helpers import TINY_SET
from monai.data import MetaTensor
from training_helpers import TRAIN_CONFIG, one_thread, phantom_volumes

import ldct_clip.bundles.locate
import ldct_clip.evaluation
from ldct_clip.cli import main
from ldct_clip.conventions import hu_to_model
from ldct_clip.data.phantom import make_phantom, write_phantom_dicom
from ldct_clip.evaluation import psnr
from ldct_clip.io import load_ct, save_nifti
from ldct_clip.networks import CLIPDenoiser, save_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = phantom_volumes(root / "data", size=48, slices=2)
    out = root / "run"
    argv = [
        "train", "--config", TRAIN_CONFIG, "--data", str(data), "--output", str(out), "--encoder-weights", "none",
        "--iterations", "4", "--batch", "2", "--crop", "32", "--workers", "0", "--val-patients", "C",
        "--layers", "1,1,1,1", "--width", "8", "--set", f'cache_dir="{root / "cache"}"',
    ]  # fmt: skip
    with one_thread():
        assert main(argv) == 0
    return out, argv


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i, patient in enumerate(("P1", "P2")):
        full = make_phantom(size=48, slices=3, seed=10 + i)
        low = full.clone()
        low += torch.as_tensor(rng.normal(0, 40, full.shape), dtype=torch.float32)
        save_nifti(full, root / f"{patient}_full.nii.gz")
        save_nifti(low, root / f"{patient}_low.nii.gz")
    return root


def test_train_writes_model_and_checkpoints(trained):
    out, _ = trained
    assert (out / "model.pt").is_file() and (out / "best.pt").is_file()
    assert torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 4


def test_train_refuses_to_overwrite_a_trained_model(trained, capsys):
    out, argv = trained
    before = (out / "model.pt").stat().st_mtime_ns
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "already holds a trained model.pt" in err
        and "Traceback" not in err
        and len(err.strip().splitlines()) == 1
    )
    assert (out / "model.pt").stat().st_mtime_ns == before


def test_init_weights_start_from_a_trained_model(trained, tmp_path, capsys):
    out, argv = trained
    trained_state = torch.load(out / "model.pt", weights_only=True)["model"]
    run = tmp_path / "fine-tuned"
    argv = [str(run) if a == str(out) else a for a in argv]
    # learning rate 0: every learnable tensor must come out as the warm start put it in
    frozen_lr = ["--iterations", "1", "--set", "learning_rate=0.0", "--init-weights", str(out / "model.pt")]
    with one_thread():
        assert main([*argv, *frozen_lr]) == 0
    state = torch.load(run / "model.pt", weights_only=True)["model"]
    statistics = ("running_mean", "running_var", "num_batches_tracked")  # batch-stats BatchNorm moves them
    compared = [k for k in trained_state if not k.endswith(statistics)]
    assert len(compared) > 20 and all(torch.equal(state[k], trained_state[k]) for k in compared)
    capsys.readouterr()

    # without the warm start the same run starts from the seed's random decoder: not the trained one
    with one_thread():
        assert main([*argv, *frozen_lr[:4], "--overwrite"]) == 0
    state = torch.load(run / "model.pt", weights_only=True)["model"]
    assert not all(torch.equal(state[k], trained_state[k]) for k in compared)

    # weights of another network: one line naming what does not fit; with --resume: refused
    other = save_checkpoint(tmp_path / "other.pt", CLIPDenoiser(layers=(1, 1, 1, 1), width=16))
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--init-weights", str(other)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "other.pt" in err, err
    resume = str(out / "checkpoint_epoch=1.pt")
    assert main([*argv, "--overwrite", "--init-weights", str(other), "--resume", resume]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_train_bad_data_folder(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--config",
                TRAIN_CONFIG,
                "--data",
                str(tmp_path / "nope"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_folder_without_ct(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [
        "train",
        "--config",
        TRAIN_CONFIG,
        "--data",
        str(tmp_path / "empty"),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--encoder-weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "no CT data in" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_evaluate_writes_table_csv_and_summary(trained, pairs, tmp_path, capsys):
    out, _ = trained
    result = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--pairs",
            str(pairs),
            "--weights",
            str(out / "model.pt"),
            *TINY_SET,
            "--output",
            str(result),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "P1" in printed and "denoised psnr" in printed
    rows = list(csv.DictReader((result / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 6 and {r["patient"] for r in rows} == {"P1", "P2"}
    assert {
        "patient",
        "slice",
        "input_psnr",
        "input_ssim",
        "input_rmse",
        "denoised_psnr",
        "denoised_ssim",
        "denoised_rmse",
    } == set(rows[0])
    summary = json.loads((result / "summary.json").read_text())
    assert summary["protocol"] == "paper"
    for group in ("input", "denoised"):
        assert set(summary[group]) == {"psnr", "ssim", "rmse"}
    assert set(summary["per_patient"]) == {"P1", "P2"}
    # the input row is the low-dose volume scored against normal dose, slice by slice
    low, full = load_ct(pairs / "P1_low.nii.gz"), load_ct(pairs / "P1_full.nii.gz")
    expected = psnr(low[0].permute(2, 0, 1)[:, None], full[0].permute(2, 0, 1)[:, None]).mean().item()
    assert summary["per_patient"]["P1"]["input"]["psnr"] == pytest.approx(expected, abs=1e-6)
    assert (result / "example.png").stat().st_size > 1000


def test_evaluate_protocols_differ(trained, pairs, tmp_path):
    out, _ = trained
    scores = {}
    for protocol in ("redcnn", "ldctbench"):
        result = tmp_path / protocol
        argv = [
            "evaluate",
            "--pairs",
            str(pairs),
            "--weights",
            str(out / "model.pt"),
            *TINY_SET,
            "--output",
            str(result),
            "--protocol",
            protocol,
            "--no-progress",
        ]
        assert main(argv) == 0
        scores[protocol] = json.loads((result / "summary.json").read_text())
    assert scores["ldctbench"]["protocol"] == "ldctbench-abdomen"
    # a 400 HU window makes 40 HU noise look worse than the 4096 HU range does
    assert scores["redcnn"]["input"]["psnr"] < 30


def test_evaluate_bad_input(trained, tmp_path, capsys):
    out, _ = trained
    code = main(
        [
            "evaluate",
            "--pairs",
            str(tmp_path / "missing"),
            "--weights",
            str(out / "model.pt"),
            *TINY_SET,
            "--output",
            str(tmp_path / "e"),
        ]
    )
    assert code == 2 and "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "evaluate",
            "--pairs",
            str(tmp_path / "empty"),
            "--weights",
            str(out / "model.pt"),
            *TINY_SET,
            "--output",
            str(tmp_path / "e"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no low-/normal-dose pairs" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_bundle_evaluate_config(trained):
    from pathlib import Path

    from ldct_clip.cli.train import run_config

    out, argv = trained
    data = argv[argv.index("--data") + 1]
    evaluate = str(Path(TRAIN_CONFIG).with_name("evaluate.json"))
    overrides = {
        "data_dir": data,
        "output_dir": str(out),
        "layers": [1, 1, 1, 1],
        "width": 8,
        "val_patients": ["C"],
    }
    overrides["cache_dir"] = str(out.parent / "cache")
    run_config([TRAIN_CONFIG, evaluate], overrides)
    rows = list(csv.DictReader((out / "eval" / "val_psnr_raw.csv").read_text().splitlines()))
    assert [r["filename"] for r in rows] == ["C_0", "C_1"]  # one row per validation slice
    summary = dict(csv.reader((out / "eval" / "metrics.csv").read_text().splitlines()))
    assert float(summary["val_psnr"]) == pytest.approx(np.mean([float(r["mean"]) for r in rows]), abs=1e-3)
    assert (out / "eval" / "val_rmse_summary.csv").is_file()


def test_evaluate_mayo_npy_pairs(trained, tmp_path):
    from training_helpers import phantom_mayo_npy

    out, _ = trained
    pairs = phantom_mayo_npy(tmp_path / "mayo", patients=("L506",), size=48, slices=2)
    result = tmp_path / "eval"
    argv = [
        "evaluate",
        "--pairs",
        str(pairs),
        "--weights",
        str(out / "model.pt"),
        "--output",
        str(result),
        *TINY_SET,
    ]
    assert main([*argv, "--no-progress"]) == 0
    summary = json.loads((result / "summary.json").read_text())
    # the Mayo input is the target plus N(0, (5/255)^2) in the model range: ~35.6 dB under "paper"
    assert 34 < summary["per_patient"]["L506"]["input"]["psnr"] < 37
    assert summary["n_slices"] == 2


def test_train_with_simulated_noise(tmp_path, monkeypatch, capsys):
    import ldct_clip.data.caches

    calls = []
    original = ldct_clip.data.caches.simulate_low_dose

    def counting(*args, **kwargs):
        calls.append(kwargs["dose"] if "dose" in kwargs else args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(ldct_clip.data.caches, "simulate_low_dose", counting)
    data = phantom_volumes(tmp_path / "data", size=48, slices=2)
    out = tmp_path / "run"
    argv = [
        "train", "--config", TRAIN_CONFIG, "--data", str(data), "--output", str(out), "--encoder-weights", "none",
        "--iterations", "3", "--batch", "2", "--crop", "32", "--workers", "0", "--val-patients", "C",
        "--layers", "1,1,1,1", "--width", "8", "--set", f'cache_dir="{tmp_path / "cache"}"',
        "--noise", "simulated", "--noise-dose", "0.5", "--noise-realizations", "3",
        "--set", "simulation#n_views=60", "--set", "simulation#workers=1",
    ]  # fmt: skip
    with one_thread():
        assert main(argv) == 0
    # 2 training patients x 3 realisations + 1 for the validation patient, at the requested dose
    assert calls == [0.5] * 7
    assert torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 3
    assert (out / "model.pt").is_file()
    capsys.readouterr()
    assert main([*argv[:-6], "--noise", "simulated", "--noise-dose", "1.5", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--noise-dose must be a dose fraction" in err and len(err.strip().splitlines()) == 1


def test_train_simulated_noise_refuses_mayo_npy(tmp_path, capsys):
    from training_helpers import phantom_mayo_npy

    data = phantom_mayo_npy(tmp_path / "mayo", patients=("P1", "P2"), size=32, slices=2)
    argv = [
        "train", "--config", TRAIN_CONFIG, "--data", str(data), "--output", str(tmp_path / "o"),
        "--encoder-weights", "none", "--val-patients", "P2", "--noise", "simulated", "--workers", "0",
        "--layers", "1,1,1,1", "--width", "8",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Mayo npy" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "model.pt").exists()


# A display-oriented slice (rows anterior -> posterior, columns patient's right -> left), 48 x 64, with a bright
# block in the patient's anterior-left: it must be plotted at the top right, whatever the input layout.
ROWS, COLS, BLOCK = 48, 64, (slice(4, 14), slice(44, 60))


def _display_slice() -> np.ndarray:
    image = np.zeros((ROWS, COLS), np.float32)
    image[BLOCK] = 1000.0
    return image


def _ras_volume(slices: int = 2) -> MetaTensor:
    """The same anatomy as a (1, X, Y, Z) RAS volume: x runs towards the patient's right, y anterior."""
    ras = _display_slice()[::-1, ::-1].T  # (X, Y): display row r is y = ROWS-1-r, column c is x = COLS-1-c
    volume = np.repeat(np.ascontiguousarray(ras)[None, ..., None], slices, axis=-1)
    return MetaTensor(torch.from_numpy(volume), affine=torch.diag(torch.tensor([0.8, 0.8, 3.0, 1.0])))


def _write_layout(layout: str, root) -> None:
    full = _ras_volume()
    low = full.clone() + 1.0  # the model is random: what matters is where the block is drawn
    if layout == "nifti":
        save_nifti(full, root / "P_full.nii.gz")
        save_nifti(low, root / "P_low.nii.gz")
    elif layout == "dicom":
        write_phantom_dicom(root / "P" / "full", volume=full, manifest=False)
        write_phantom_dicom(root / "P" / "low", volume=low, manifest=False)
    else:  # Mayo npy: slices stored in display orientation, in the model range
        for z in range(2):
            np.save(root / f"L1_{z}_target.npy", hu_to_model(_display_slice()))
            np.save(root / f"L1_{z}_input.npy", hu_to_model(_display_slice() + 1.0))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, CLIPDenoiser(layers=(1, 1, 1, 1), width=8))
    return path


@pytest.mark.parametrize("layout", ["nifti", "dicom", "mayo_npy"])
def test_evaluate_example_figure_is_upright_for_every_layout(layout, tiny_weights, tmp_path, monkeypatch):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _write_layout(layout, pairs)
    saved = []
    original = ldct_clip.evaluation.save_figure

    def keep(figure, path, *args, **kwargs):
        saved.append(figure)
        return original(figure, path, *args, **kwargs)

    monkeypatch.setattr(ldct_clip.evaluation, "save_figure", keep)
    argv = [
        "evaluate",
        "--pairs",
        str(pairs),
        "--weights",
        str(tiny_weights),
        "--output",
        str(tmp_path / "e"),
        *TINY_SET,
    ]
    assert main([*argv, "--protocol", "redcnn", "--device", "cpu", "--no-progress"]) == 0
    (figure,) = saved
    assert [ax.get_title() for ax in figure.axes] == ["low dose", "denoised", "normal dose"]
    for panel in (0, 2):  # the inputs, whose values are known
        shown = np.asarray(figure.axes[panel].images[0].get_array())
        assert shown.shape == (ROWS, COLS), layout
        rows, cols = np.nonzero(shown > 500)
        assert rows.max() < ROWS // 2 and cols.min() >= COLS // 2, f"{layout}: the block is not top right"
        np.testing.assert_allclose(shown[BLOCK], 1000.0 + (panel == 0), atol=0.01)


@pytest.mark.slow
def test_evaluate_defaults_to_the_bundles_weights(pairs, tiny_weights, tmp_path, monkeypatch):
    """Without --weights: the CT bundle's models/model.pt, sha256-checked against its metadata.json."""
    real = ldct_clip.bundles.locate.resolve_bundle("lowdose_ct_denoising")
    bundle = shutil.copytree(
        real, tmp_path / "bundles" / "lowdose_ct_denoising", ignore=shutil.ignore_patterns("*.pt")
    )
    shutil.copy(tiny_weights, bundle / "models" / "model.pt")
    digest = hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["shipped_weights"]["sha256"] = digest
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    monkeypatch.setattr(ldct_clip.bundles.locate, "bundle_search_paths", lambda: [tmp_path / "bundles"])
    scores = {}
    for name, extra in (("default", []), ("named", ["--weights", str(tiny_weights)])):
        out = tmp_path / name
        argv = ["evaluate", "--pairs", str(pairs), "--output", str(out), "--no-progress", *TINY_SET]
        assert main([*argv, *extra]) == 0
        scores[name] = json.loads((out / "summary.json").read_text())
    assert scores["default"]["weights"] == str((bundle / "models" / "model.pt").resolve())
    assert scores["default"]["denoised"] == scores["named"]["denoised"]
    (bundle / "models" / "model.pt").write_bytes(b"damaged")
    assert (
        main(["evaluate", "--pairs", str(pairs), "--output", str(tmp_path / "x"), "--no-progress", *TINY_SET])
        == 2
    )
    assert not (tmp_path / "x").exists()
