"""Camera pipeline: invertibility, raw noise model, Bayer patterns, Malvar demosaicing, response curves."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio

from ldct_clip.errors import InputError
from ldct_clip.transforms.camera_response import CameraResponse, ParametricResponse, load_dorf_curves
from ldct_clip.transforms.isp import (
    XYZ_TO_CAMERA_MATRICES,
    CameraPipelineNoise,
    CameraPipelineNoised,
    add_raw_noise,
    linear_to_srgb,
    srgb_to_linear,
)
from ldct_clip.transforms.mosaic import BAYER_PATTERNS, demosaic_malvar, mosaic


def _smooth_image(h: int = 96, w: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / 128
    base = 0.55 + 0.25 * np.sin(2 * np.pi * (xx + 0.3 * yy)) * np.cos(np.pi * yy)
    return np.stack([base + 0.05 * np.cos(2 * np.pi * yy), base, base - 0.05 * np.sin(2 * np.pi * xx)])


def test_round_trip_without_noise_returns_the_input():
    # every step but demosaicing is inverted exactly (up to gamut clipping): a sharp natural image survives
    astronaut = data.astronaut()[::2, ::2].astype(np.float64).transpose(2, 0, 1) / 255
    for seed in range(3):
        out = CameraPipelineNoise(noise="off", bayer=False, fixed_seed=seed)(astronaut)
        assert peak_signal_noise_ratio(astronaut, out, data_range=1) > 40
    # with the Bayer mosaic and Malvar demosaicing, on an image demosaicing can reproduce (all 4 patterns)
    smooth = _smooth_image()
    for seed, pattern in enumerate(BAYER_PATTERNS):
        pipeline = CameraPipelineNoise(noise="off", patterns=(pattern,), fixed_seed=seed)
        out = pipeline(torch.from_numpy(smooth))
        assert pipeline.params.pattern == pattern
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert peak_signal_noise_ratio(smooth, out.double().numpy(), data_range=1) > 40


def test_raw_noise_matches_the_reference_formula():
    rng = np.random.RandomState(0)
    for level in (0.1, 0.3, 0.6):
        raw = np.full((256, 256), level)
        noisy = add_raw_noise(raw, 0.04, 0.03, rng)
        # reference add_PG_noise: x + N1*sigma_s*x + N2*sigma_c -> std sqrt((sigma_s x)^2 + sigma_c^2)
        assert (noisy - raw).std() == pytest.approx(np.hypot(0.04 * level, 0.03), rel=0.02)
        assert abs((noisy - raw).mean()) < 1e-3
    assert add_raw_noise(np.zeros((64, 64)), 0.04, 0.03, rng).min() == 0  # clipped to [0, 1]


def test_noise_levels_fixed_random_and_pairs():
    img = _smooth_image(64, 64)
    fixed = CameraPipelineNoise(noise="fixed", fixed_seed=0)
    noisy, clean = fixed.simulate(img)
    assert (fixed.params.sigma_s, fixed.params.sigma_c) == (0.04, 0.03)
    assert noisy.shape == clean.shape == img.shape and noisy.min() >= 0 and noisy.max() <= 1
    weak = CameraPipelineNoise(noise=(0.004, 0.003), fixed_seed=0)(img)
    assert np.abs(noisy - clean).std() > 3 * np.abs(weak - clean).std()
    assert np.array_equal(noisy, fixed(img))  # fixed_seed: same draw every call
    random = CameraPipelineNoise(noise="random")
    random.set_random_state(0)
    sigmas = []
    for _ in range(400):
        random.randomize()
        sigmas.append((random.params.sigma_s, random.params.sigma_c))
        assert 0.75 <= random.params.red_gain <= 1 and 0.75 <= random.params.blue_gain <= 1
        np.testing.assert_allclose(random.params.xyz_to_camera.sum(axis=1), 1.0)
    s = np.log(np.array(sigmas))
    assert s[:, 0].min() >= np.log(1e-4) and s[:, 0].max() <= np.log(0.16)
    assert s[:, 1].min() >= np.log(1e-4) and s[:, 1].max() <= np.log(0.06)
    # log-uniform: the median of log sigma is the middle of the log range
    assert np.median(s[:, 0]) == pytest.approx((np.log(1e-4) + np.log(0.16)) / 2, abs=0.4)


def test_dictionary_twin_writes_the_pair():
    img = torch.from_numpy(_smooth_image(48, 48)).float()
    out = CameraPipelineNoised(keys="clean", noisy_key="noisy", noise="fixed", fixed_seed=2)({"clean": img})
    assert out["clean"] is img and out["noisy"].shape == img.shape
    piped = CameraPipelineNoised(keys="clean", clean_target="pipeline", noise="fixed", fixed_seed=2)(
        {"clean": img}
    )
    assert torch.equal(piped["noisy"], out["noisy"]) and not torch.equal(piped["clean"], img)
    with pytest.raises(InputError, match="RGB image"):
        CameraPipelineNoise()(np.zeros((1, 8, 8)))


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bayer_patterns_and_malvar(pattern):
    rgb = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 2.0), np.full((4, 4), 3.0)], -1)
    tile = mosaic(rgb, pattern)[:2, :2]
    value = {"R": 1.0, "G": 2.0, "B": 3.0}
    assert tile.ravel().tolist() == [value[c] for c in pattern]
    # constant image: exact everywhere (the kernels sum to 1, the mirrored border keeps the Bayer phase)
    np.testing.assert_allclose(demosaic_malvar(mosaic(rgb * 0.1, pattern), pattern), rgb * 0.1, atol=1e-12)
    # an affine image per channel: exact wherever the 5x5 window lies inside
    yy, xx = np.mgrid[0:20, 0:24].astype(float)
    affine = np.stack(
        [0.1 + 0.01 * xx + 0.005 * yy, 0.3 + 0.002 * xx - 0.004 * yy, 0.5 - 0.003 * xx + 0.006 * yy], -1
    )
    out = demosaic_malvar(mosaic(affine, pattern), pattern)
    np.testing.assert_allclose(out[2:-2, 2:-2], affine[2:-2, 2:-2], atol=1e-12)


def test_camera_matrices_are_invertible_after_mixing():
    matrices = np.array(list(XYZ_TO_CAMERA_MATRICES.values()))
    assert matrices.shape == (4, 9)
    for m in matrices:
        m = m.reshape(3, 3) / m.reshape(3, 3).sum(axis=1, keepdims=True)
        assert np.linalg.cond(m) < 20


def test_parametric_response_is_monotone_with_exact_inverse():
    x = np.linspace(0, 1, 1001)
    for gamma, knee in ((2.2, 1e6), (1.8, 0.3), (2.6, 30)):
        curve = ParametricResponse(gamma, knee)
        b = curve.apply(x)
        assert b[0] == 0 and b[-1] == pytest.approx(1) and np.all(np.diff(b) > 0)
        np.testing.assert_allclose(curve.invert(b), x, atol=1e-12)
    np.testing.assert_allclose(ParametricResponse(2.2, 1e9).apply(x), x ** (1 / 2.2), atol=1e-8)


def test_dorf_curve_file_parser(tmp_path):
    irradiance = np.linspace(0, 1, 11)
    lines = []
    for name, gamma in (("Agfacolor Futura 100CDRed", 2.0), ("Kodak DCS 315 Green", 2.5)):
        lines += [
            name,
            "graph",
            "I =",
            "   ".join(f"{v:.6e}" for v in irradiance),
            "B =",
            "   ".join(f"{v:.6e}" for v in irradiance ** (1 / gamma)),
            "",
        ]
    path = tmp_path / "dorfCurves.txt"
    path.write_text("\n".join(lines))
    curves = load_dorf_curves(path)
    assert [c.name for c in curves] == ["Agfacolor Futura 100CDRed (graph)", "Kodak DCS 315 Green (graph)"]
    np.testing.assert_allclose(curves[1].brightness, irradiance ** (1 / 2.5), rtol=1e-6)
    x = np.linspace(0, 1, 57)
    np.testing.assert_allclose(curves[0].apply(curves[0].invert(x)), x, atol=1e-6)  # float32 evaluation
    # a user file drives the pipeline
    pipeline = CameraPipelineNoise(noise="off", responses=curves, bayer=False, fixed_seed=0)
    img = _smooth_image(32, 32)
    assert peak_signal_noise_ratio(img, pipeline(img), data_range=1) > 40
    assert pipeline.params.response in curves
    broken = tmp_path / "broken.txt"
    broken.write_text("\n".join(lines[:3] + ["0 0.5 oops"] + lines[4:6]))
    with pytest.raises(InputError, match="line 4: non-numeric"):
        load_dorf_curves(broken)
    (tmp_path / "short.txt").write_text("name\ngraph\nI =\n0 1\n")
    with pytest.raises(InputError, match="line 1: expected a DoRF block"):
        load_dorf_curves(tmp_path / "short.txt")
    with pytest.raises(InputError, match="must not decrease"):
        CameraResponse(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.6, 0.5]))


def test_curve_lookup_and_srgb_transfer_match_library_functions():
    from skimage.color import rgb2xyz, xyz2rgb
    from skimage.color.colorconv import rgb_from_xyz, xyz_from_rgb

    rng = np.random.default_rng(0)
    rgb = rng.random((40, 50, 3))
    np.testing.assert_allclose(srgb_to_linear(rgb) @ xyz_from_rgb.T, rgb2xyz(rgb), atol=1e-12)
    xyz = rng.random((40, 50, 3)) * 0.9
    np.testing.assert_allclose(linear_to_srgb(xyz @ rgb_from_xyz.T), xyz2rgb(xyz), atol=1e-12)
    # a tabulated curve with irregular, clustered samples evaluates like np.interp (in float32)
    irradiance = np.unique(np.concatenate([[0.0, 1.0], rng.random(300) ** 3]))
    brightness = np.sort(rng.random(irradiance.size))
    brightness[0], brightness[-1] = 0.0, 1.0
    curve = CameraResponse(irradiance, brightness)
    q = rng.random((64, 64, 3))
    np.testing.assert_allclose(curve.apply(q), np.interp(q, irradiance, brightness), atol=2e-6)
    # steep inverse segments magnify the float32 rounding of the input (slopes up to ~100 here)
    np.testing.assert_allclose(curve.invert(q), np.interp(q, brightness, irradiance), atol=2e-5)


def _load_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data_prep" / "make_srgb_pairs.py"
    spec = importlib.util.spec_from_file_location("make_srgb_pairs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_srgb_pairs_script(tmp_path, capsys):
    from PIL import Image

    from ldct_clip.errors import OutputError
    from ldct_clip.io.images import load_image

    script = _load_script()
    source = tmp_path / "clean_in"
    source.mkdir()
    Image.fromarray(data.astronaut()[:48, :64]).save(source / "a.png")
    Image.fromarray(data.camera()[:40, :40]).save(source / "b.png")  # grey: repeated to RGB
    out = tmp_path / "pairs"
    assert script.main(["--input", str(source), "--output", str(out)]) == 0
    assert sorted(p.name for p in (out / "noisy").glob("*.png")) == ["a.png", "b.png"]
    assert (out / "noisy" / "ldct-clip-manifest.json").is_file()  # a folder this script wrote, replaceable
    clean, noisy = load_image(out / "clean" / "a.png"), load_image(out / "noisy" / "a.png")
    original = load_image(source / "a.png")
    assert torch.equal(clean.as_tensor(), original.as_tensor())  # the clean image is the original
    assert (
        noisy.shape == (3, 48, 64)
        and 8 < peak_signal_noise_ratio(clean.numpy(), noisy.numpy(), data_range=1) < 30
    )
    assert load_image(out / "noisy" / "b.png").shape == (3, 40, 40)
    # per-image seeds: regenerating gives the same files; the output is refused unless --overwrite
    assert script.main(["--input", str(source), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(OutputError):
        script.make_srgb_pairs(source, out, progress=False)
    script.make_srgb_pairs(source, out, overwrite=True, progress=False)
    assert torch.equal(load_image(out / "noisy" / "a.png").as_tensor(), noisy.as_tensor())
    # a bad file: one line, no partial output
    (source / "c.png").write_text("broken")
    empty = tmp_path / "other"
    assert script.main(["--input", str(source), "--output", str(empty)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert list(empty.iterdir()) == []
