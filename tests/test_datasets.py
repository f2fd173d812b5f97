"""CT datasets: layouts, patient split, slice and noise caches, the seeded training stream, augmentation,
the CT noise transforms, pairs."""

import dataclasses
import os
from collections import Counter

import numpy as np
import pytest
import torch
from training_helpers import phantom_mayo_npy, phantom_volumes

import ldct_clip.data.caches
from ldct_clip.data.caches import SimulatedNoiseCache, VolumeSliceCache
from ldct_clip.data.ct_dataset import CTSliceDataset, make_train_dataset, make_val_dataset
from ldct_clip.data.layouts import (
    detect_layout,
    find_mayo_npy,
    find_pairs,
    find_volumes,
    load_pair_volumes,
    split_patients,
)
from ldct_clip.data.phantom import make_phantom, make_water_cylinder, write_phantom_dicom, write_phantom_nifti
from ldct_clip.data.stream import StreamSampler
from ldct_clip.errors import InputError
from ldct_clip.io import save_nifti
from ldct_clip.simulation import MU_WATER_PER_MM, measure_noise_std
from ldct_clip.transforms import (
    CTGaussianNoise,
    CTGaussianNoised,
    SimulatedCTNoise,
    SimulatedCTNoised,
    SimulationSettings,
)
from ldct_clip.transforms.augment import RandDihedrald


def test_mayo_layout_and_patient_split(tmp_path):
    for z in (0, 2, 10, 9):
        np.save(tmp_path / f"L067_{z}_target.npy", np.zeros((4, 4), np.float32))
        np.save(tmp_path / f"L067_{z}_input.npy", np.zeros((4, 4), np.float32))
    np.save(tmp_path / "L506_0_target.npy", np.zeros((4, 4), np.float32))
    np.save(tmp_path / "notes.npy", np.zeros(1))
    slices = find_mayo_npy(tmp_path)
    assert [(s["patient"], s["slice"]) for s in slices] == [
        ("L067", 0),
        ("L067", 2),
        ("L067", 9),
        ("L067", 10),
        ("L506", 0),
    ]
    assert slices[-1]["input"] is None
    assert detect_layout(tmp_path) == "mayo_npy"
    assert split_patients(["L067", "L506"], ["L506"]) == (["L067"], ["L506"])
    assert split_patients(["L067", "L506"], "L506") == (["L067"], ["L506"])
    with pytest.raises(InputError, match="L999"):
        split_patients(["L067", "L506"], ["L999"])
    with pytest.raises(InputError, match="no patient left"):
        split_patients(["L067"], ["L067"])


def test_fractional_split_is_seeded():
    patients = [f"P{i}" for i in range(10)]
    train, val = split_patients(patients, val_fraction=0.2, seed=3)
    assert len(val) == 2 and set(train) | set(val) == set(patients) and not set(train) & set(val)
    assert split_patients(patients, val_fraction=0.2, seed=3) == (train, val)
    assert any(split_patients(patients, val_fraction=0.2, seed=s)[1] != val for s in range(4, 10))


def test_dihedral_gives_the_8_transforms_uniformly():
    image = torch.arange(9, dtype=torch.float32).reshape(1, 3, 3)
    transform = RandDihedrald("x")
    transform.set_random_state(0)
    counts = Counter(tuple(transform({"x": image})["x"].flatten().tolist()) for _ in range(1600))
    assert len(counts) == 8  # all 8 elements of the dihedral group, nothing else
    assert all(150 < c < 250 for c in counts.values())  # 200 expected, +-4 sd


def test_volume_cache_decodes_once(tmp_path, monkeypatch):
    path = write_phantom_nifti(tmp_path / "A.nii.gz", size=32, slices=3, seed=0)
    cache = VolumeSliceCache(tmp_path / "cache")
    first = cache.slices(path)
    assert isinstance(first, np.memmap) and first.shape == (3, 32, 32) and first.dtype == np.float32
    # x = (HU + 1024) / 4096 of the same slice (reoriented: compare the sorted body values; int16 file)
    expected = (make_phantom(size=32, slices=3, seed=0).numpy()[0][..., 1] + 1024) / 4096
    got = np.sort(first[1][first[1] > 0.1])
    np.testing.assert_allclose(got, np.sort(expected[expected > 0.1]), atol=0.6 / 4096)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(ldct_clip.data.caches, "load_ct", no_decoding)
    np.testing.assert_array_equal(cache.slices(path), first)
    os.utime(path, ns=(1, 1))  # a changed file is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        cache.slices(path)


def test_dicom_and_nifti_volumes_found(tmp_path):
    write_phantom_nifti(tmp_path / "A.nii.gz", size=32, slices=2, seed=0)
    write_phantom_dicom(tmp_path / "site1" / "B", size=32, slices=2, seed=1)
    volumes = find_volumes(tmp_path)
    assert [v["patient"] for v in volumes] == ["A", "site1_B"]
    assert detect_layout(tmp_path) == "volumes"
    dataset = CTSliceDataset(tmp_path, ["site1_B"], cache_dir=tmp_path / "cache")
    assert (
        len(dataset) == 2 and dataset[1]["patient"] == "site1_B" and dataset[1]["label"].shape == (1, 32, 32)
    )


def test_training_stream_is_a_function_of_seed_and_position(tmp_path):
    root = phantom_mayo_npy(tmp_path / "mayo", patients=("P1", "P2"), size=48, slices=3)
    stream = make_train_dataset(root, val_patients=["P2"], seed=7, crop_size=32)
    assert len(stream) == 3  # P1's slices only
    a = stream[5]
    for p in (0, 9, 2):
        stream[p]
    b = stream[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(stream[6]["image"], a["image"])
    other_seed = make_train_dataset(root, val_patients=["P2"], seed=8, crop_size=32)
    assert not torch.equal(other_seed[5]["image"], a["image"])
    # every pass over the data visits each slice once
    assert sorted(stream[p]["slice"] for p in range(3, 6)) == [0, 1, 2]
    # the paper's noise: Gaussian, std 5/255, not clipped
    noise = torch.cat([(stream[p]["image"] - stream[p]["label"]).flatten() for p in range(40)])
    assert float(noise.std()) == pytest.approx(5 / 255, rel=0.02) and float(noise.mean()) == pytest.approx(
        0, abs=1e-3
    )
    assert a["image"].shape == (1, 32, 32) and a["image"].dtype == torch.float32


def test_stream_sampler_shards_ranks_and_resumes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    r0, r1 = StreamSampler(4, rank=0, world_size=2), StreamSampler(4, rank=1, world_size=2)
    assert take(r0, 8) == [0, 1, 2, 3, 8, 9, 10, 11] and take(r1, 4) == [4, 5, 6, 7]
    single = StreamSampler(4, rank=0, world_size=1)
    full = take(single, 12)
    single.start_iteration = 2
    assert take(single, 4) == full[8:]


def test_validation_pairs(tmp_path):
    volumes = phantom_volumes(tmp_path / "vol", patients=("A", "B"), size=32, slices=2)
    val = make_val_dataset(volumes, ["B"], cache_dir=tmp_path / "cache")
    assert len(val) == 2
    first, again = val[0], val[0]
    np.testing.assert_array_equal(first["image"], again["image"])  # the same noise at every validation
    assert float(np.std(first["image"] - first["label"])) == pytest.approx(5 / 255, rel=0.1)
    mayo = phantom_mayo_npy(tmp_path / "mayo", patients=("P1", "P2"), size=32, slices=3)
    real = make_val_dataset(mayo, ["P2"], max_slices_per_patient=2)
    assert len(real) == 2 and [real[i]["slice"] for i in range(2)] == [0, 2]
    np.testing.assert_array_equal(real[1]["image"][0], np.load(mayo / "P2_2_input.npy"))
    with pytest.raises(InputError, match="no validation patients"):
        make_val_dataset(mayo)


def test_find_pairs_layouts(tmp_path):
    for name in ("X_low", "X_full"):
        write_phantom_nifti(tmp_path / f"{name}.nii.gz", size=16, slices=2, seed=0)
    for kind in ("low", "full"):
        write_phantom_dicom(tmp_path / "Y" / kind, size=16, slices=2, seed=1)
    phantom_mayo_npy(tmp_path, patients=("Z",), size=16, slices=2)
    pairs = find_pairs(tmp_path)
    assert [(p["patient"], p["kind"]) for p in pairs] == [("X", "volume"), ("Y", "volume"), ("Z", "mayo_npy")]
    low, full, oriented = load_pair_volumes(pairs[2])
    assert low.shape == full.shape == (1, 16, 16, 2) and oriented
    np.testing.assert_allclose(
        full[0, ..., 1].numpy(), np.load(tmp_path / "Z_1_target.npy") * 4096 - 1024, atol=1e-3
    )
    (tmp_path / "X_full.nii.gz").unlink()
    with pytest.raises(InputError, match="X_full"):
        find_pairs(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        find_pairs(tmp_path / "missing")


def _settings(**more) -> SimulationSettings:
    # few views and one process: a 48-pixel slice simulates in milliseconds
    return SimulationSettings(n_views=60, workers=1, progress=False, **more)


def _count_simulations(monkeypatch) -> list:
    calls = []
    original = ldct_clip.data.caches.simulate_low_dose

    def counting(*args, **kwargs):
        calls.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ldct_clip.data.caches, "simulate_low_dose", counting)
    return calls


def _dihedral_crops(array: np.ndarray, size: int):
    """All (k, flip, row, col) crops of the 8 flips/rotations of a 2D array, as {key: view}."""
    from numpy.lib.stride_tricks import sliding_window_view

    for k in range(4):
        for flip in (False, True):
            t = np.rot90(array, k)
            t = t[::-1] if flip else t
            windows = sliding_window_view(t, (size, size))
            for r in range(windows.shape[0]):
                for c in range(windows.shape[1]):
                    yield (k, flip, r, c), windows[r, c]


def test_simulated_noise_stream(tmp_path, monkeypatch):
    root = tmp_path / "vol"
    root.mkdir()
    for i, patient in enumerate(("A", "B", "C")):
        volume = make_phantom(size=48, slices=2, seed=i)
        volume[0, 15:24, 14:20, :] = -3024.0  # padding inside the body, off-centre: shows the orientation
        save_nifti(volume, root / f"{patient}.nii.gz")
    calls = _count_simulations(monkeypatch)
    kwargs = {"cache_dir": tmp_path / "cache", "noise": SimulatedCTNoised(settings=_settings())}
    stream = make_train_dataset(root, val_patients=["C"], seed=3, crop_size=32, **kwargs)
    assert len(calls) == 4 and len(set(calls)) == 4  # 2 training volumes x 2 realisations, distinct seeds
    base = stream.base
    noise_cache = SimulatedNoiseCache(tmp_path / "cache", _settings())
    clean_cache = VolumeSliceCache(tmp_path / "cache")
    realisations = {p: noise_cache.noise(root / f"{p}.nii.gz", 2, name=p) for p in ("A", "B")}
    clean = {p: clean_cache.slices(root / f"{p}.nii.gz") for p in ("A", "B")}
    assert len(calls) == 4  # read back from the cache
    for p in ("A", "B"):
        first, second = realisations[p]
        assert first.shape == clean[p].shape == (2, 48, 48) and not np.allclose(first, second)
        assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.3  # independent draws
        # padding (mapped to air, x = 0 exactly) gets no noise; the body does, in the same orientation
        padding = clean[p] == 0.0
        assert padding.sum() > 2 * 54 and not np.array_equal(padding, padding[:, ::-1, :])
        assert not np.array_equal(padding, padding[:, :, ::-1])
        assert np.all(first[padding] == 0) and np.mean(first[clean[p] > 0.2] != 0) > 0.95
    chosen = set()
    for position in range(8):
        item = stream[position]
        patient, z = item["patient"], item["slice"]
        assert item["noise"].shape == item["label"].shape == item["image"].shape == (1, 32, 32)
        assert torch.equal(item["image"], item["label"] + item["noise"])  # unclipped sum
        assert torch.allclose(item["image"] - item["label"], item["noise"], atol=1e-7)
        # the item's noise is one cached realisation under exactly the crop and flip of its label
        matches = [
            (k, key)
            for k in range(2)
            for key, view in _dihedral_crops(realisations[patient][k][z], 32)
            if np.array_equal(view, item["noise"][0].numpy())
        ]
        assert len(matches) == 1
        k, key = matches[0]
        label_view = dict(_dihedral_crops(clean[patient][z], 32))[key]
        np.testing.assert_array_equal(label_view, item["label"][0].numpy())
        chosen.add(k)
    assert chosen == {0, 1}  # both realisations are drawn
    # the stream stays a function of seed and position
    again = stream[5]
    for p in (0, 9, 2):
        stream[p]
    assert torch.equal(stream[5]["image"], again["image"]) and torch.equal(stream[5]["noise"], again["noise"])
    # a second construction reuses the cache: no simulation
    make_train_dataset(root, val_patients=["C"], seed=3, crop_size=32, **kwargs)
    assert len(calls) == 4
    # another dose is another cache entry
    half_dose = SimulatedCTNoised(settings=_settings(dose=0.5))
    make_train_dataset(
        root, val_patients=["C"], seed=3, crop_size=32, cache_dir=tmp_path / "cache", noise=half_dose
    )
    assert len(calls) == 8
    assert base.patients == ["A", "B"]
    # validation on the held-out patient's own simulated noise (one realisation), the same at every call
    val = make_val_dataset(root, ["C"], cache_dir=tmp_path / "cache", noise=SimulatedCTNoise(_settings()))
    assert len(calls) == 9 and len(val) == 2
    (c_noise,) = noise_cache.noise(root / "C.nii.gz", 1, name="C")
    item = val[1]
    np.testing.assert_allclose(item["image"][0] - item["label"][0], c_noise[1], atol=1e-6)
    np.testing.assert_array_equal(item["image"], val[1]["image"])
    assert float(np.abs(c_noise[1]).max()) > 0


def test_simulated_noise_level_follows_dose(tmp_path):
    """Quarter vs half dose: the added noise std scales as sqrt(1/d - 1) (electronic noise negligible), and
    its level matches the calibration of DEFAULT_PHOTONS (20 HU added at quarter dose in a 300 mm water
    cylinder at 0.7 mm pixels) scaled to this cylinder: std ~ sqrt(exp(mu D)) * pixel^-1.5."""
    path = save_nifti(
        make_water_cylinder(64, 2, diameter_mm=40, spacing=(0.8, 0.8, 3.0)), tmp_path / "W.nii.gz"
    )
    std = {}
    for dose in (0.25, 0.5):
        settings = SimulationSettings(dose=dose, n_views=90, workers=1, progress=False)
        cache = SimulatedNoiseCache(tmp_path / "cache", settings)
        noise = np.concatenate(cache.noise(path, 2, name="W"))  # model units, (Z, H, W)
        std[dose] = measure_noise_std(np.transpose(noise, (1, 2, 0)) * 4096.0, radius=8)  # HU, flat water
    assert std[0.25] / std[0.5] == pytest.approx(np.sqrt(3.0), rel=0.1)
    expected = 20.0 * np.sqrt(np.exp(MU_WATER_PER_MM * (40 - 300))) * (0.8 / 0.7) ** -1.5
    assert std[0.25] == pytest.approx(expected, rel=0.25)
    # the thickness comes from the volume (3 mm here) unless given: 4x thicker, half the noise
    thick = SimulatedNoiseCache(
        tmp_path / "cache", SimulationSettings(n_views=90, slice_thickness=12.0, workers=1, progress=False)
    )
    noise = np.concatenate(thick.noise(path, 2, name="W"))
    assert measure_noise_std(np.transpose(noise, (1, 2, 0)) * 4096.0, radius=8) == pytest.approx(
        std[0.25] / 2, rel=0.1
    )


def _noise_std_hu(noise: np.ndarray) -> float:
    """Noise std (HU) in the flat centre of a water cylinder, of a (Z, H, W) model-unit noise stack."""
    return measure_noise_std(np.transpose(noise, (1, 2, 0)) * 4096.0, radius=8)


def _high_frequency_fraction(noise: np.ndarray) -> float:
    """Share of a (Z, H, W) noise stack's power above half the Nyquist frequency (radially)."""
    power = (np.abs(np.fft.fft2(noise - noise.mean(axis=(1, 2), keepdims=True))) ** 2).sum(axis=0)
    fy, fx = np.meshgrid(np.fft.fftfreq(noise.shape[1]), np.fft.fftfreq(noise.shape[2]), indexing="ij")
    return float(power[np.hypot(fy, fx) > 0.25].sum() / power.sum())


def test_simulated_noise_mixture_of_doses_filters_and_thicknesses(tmp_path, monkeypatch):
    """One settings object, one level per realisation: dose 0.1 adds sqrt((1 - 0.1) / 0.1) = 3 times the
    noise std of dose 0.5, the smooth (hann) kernel has less high-frequency power than the sharp (ramp)
    one, 4x thicker slices half the noise; every level is its own cache entry."""
    path = save_nifti(  # 8 slices: the std of each level known to ~2 %
        make_water_cylinder(64, 8, diameter_mm=40, spacing=(0.8, 0.8, 3.0)), tmp_path / "W.nii.gz"
    )
    settings = SimulationSettings(
        dose=[0.1, 0.5],
        filter_name=["ramp", "hann"],
        slice_thickness=[1.0, 4.0],
        realizations=8,
        n_views=90,
        workers=1,
        progress=False,
    )
    assert settings.is_mixture and len(settings.levels) == 8
    assert [(v.dose, v.filter_name, v.slice_thickness) for v in settings.levels[:3]] == [
        (0.1, "ramp", 1.0),
        (0.5, "ramp", 1.0),
        (0.1, "hann", 1.0),
    ]  # dose varies fastest
    calls = _count_simulations(monkeypatch)
    cache = SimulatedNoiseCache(tmp_path / "cache", settings)
    noises = cache.noise(path, name="W")
    assert len(calls) == 8 and len(set(calls)) == 8 and len(os.listdir(tmp_path / "cache")) == 8
    by_level = {settings.level(k, "W"): noise for k, noise in enumerate(noises)}
    assert set(by_level) == set(settings.levels)  # as many realisations as levels: each level once
    std = {level: _noise_std_hu(noise) for level, noise in by_level.items()}
    hf = {level: _high_frequency_fraction(np.asarray(noise)) for level, noise in by_level.items()}
    for level in settings.levels:
        if level.dose == 0.1:
            half = dataclasses.replace(level, dose=0.5)
            assert std[level] / std[half] == pytest.approx(3.0, rel=0.1)
        if level.filter_name == "ramp":
            smooth = dataclasses.replace(level, filter_name="hann")
            assert hf[smooth] < 0.6 * hf[level] and std[smooth] < 0.8 * std[level]
        if level.slice_thickness == 1.0:
            thick = dataclasses.replace(level, slice_thickness=4.0)
            assert std[level] / std[thick] == pytest.approx(2.0, rel=0.1)
    # read back from the cache; fewer realisations are the first levels of the same cycle
    assert len(cache.noise(path, 3, name="W")) == 3 and len(calls) == 8
    # a volume of another name starts its cycle elsewhere
    starts = {settings.level(0, name) for name in ("A", "B", "C", "D", "E", "F")}
    assert len(starts) > 1


def test_one_level_mixture_is_the_single_level(tmp_path, monkeypatch):
    """A list of one value is that value: same settings, same cache files (and the single-level keys have
    not changed: the ramp filter is implied)."""
    path = save_nifti(make_phantom(size=32, slices=1, seed=2), tmp_path / "P.nii.gz")
    assert SimulationSettings(dose=[0.3], filter_name=["ramp"], slice_thickness=[2]) == SimulationSettings(
        dose=0.3, slice_thickness=2.0
    )
    calls = _count_simulations(monkeypatch)
    first = SimulatedNoiseCache(tmp_path / "cache", _settings(dose=0.3)).noise(path, 1, name="P")
    again = SimulatedNoiseCache(tmp_path / "cache", _settings(dose=[0.3], filter_name="ramp"))
    np.testing.assert_array_equal(again.noise(path, 1, name="P")[0], first[0])
    assert len(calls) == 1
    SimulatedNoiseCache(tmp_path / "cache", _settings(dose=0.3, filter_name="hann")).noise(path, 1, name="P")
    assert len(calls) == 2  # the filter is part of the key


def test_simulated_noise_refuses_mayo_npy_and_bad_settings(tmp_path):
    root = phantom_mayo_npy(tmp_path / "mayo", patients=("P1", "P2"), size=32, slices=2)
    with pytest.raises(InputError, match="Mayo npy"):
        make_train_dataset(
            root,
            val_patients=["P2"],
            crop_size=16,
            cache_dir=tmp_path / "cache",
            noise=SimulatedCTNoised(settings=_settings()),
        )
    with pytest.raises(InputError, match="dose fraction"):
        SimulationSettings(dose=1.5)
    with pytest.raises(InputError, match="at least 1"):
        SimulationSettings(realizations=0)
    with pytest.raises(InputError, match="dose fraction"):
        SimulationSettings(dose=[0.1, 1.5])
    with pytest.raises(InputError, match="unknown"):
        SimulationSettings(filter_name=["ramp", "sharp"])
    with pytest.raises(InputError, match="above 0"):
        SimulationSettings(slice_thickness=[1.0, 0.0])
    with pytest.raises(InputError, match="at least one value"):
        SimulationSettings(dose=[])


def test_ct_noise_transforms_array_and_dictionary_twins():
    clean = np.full((1, 64, 64), 0.002, np.float32)  # just above the bottom of the model range
    noisy = CTGaussianNoise().set_random_state(3)(clean)
    assert isinstance(noisy, np.ndarray) and noisy.dtype == np.float32
    assert float((noisy - clean).std()) == pytest.approx(5 / 255, rel=0.05)
    assert float(noisy.min()) < 0  # the paper's noise is not clipped
    # validation seeds each slice with a numpy Generator: the same generator, the same noise
    again = CTGaussianNoise().set_random_state(state=np.random.default_rng([0, 4, 2]))(clean)
    expected = (clean + np.random.default_rng([0, 4, 2]).normal(0.0, 5 / 255, clean.shape)).astype(np.float32)
    np.testing.assert_array_equal(again, expected)
    # the dictionary twin: MONAI's RandGaussianNoised with probability 1 and a fixed std
    twin = CTGaussianNoised("image", std=0.1).set_random_state(7)
    draws = [twin({"image": torch.zeros(1, 32, 32)})["image"] for _ in range(2)]
    assert all(float(d.std()) == pytest.approx(0.1, rel=0.1) for d in draws) and not torch.equal(*draws)

    # simulated: one of the realisations, added unclipped; every realisation is drawn
    stack = np.stack([np.full((4, 4), float(k), np.float32) for k in range(3)])
    slice4 = np.full((1, 4, 4), 0.5, np.float32)
    array_twin = SimulatedCTNoise().set_random_state(5)
    picks = [float(array_twin(slice4, stack)[0, 0, 0]) - 0.5 for _ in range(60)]
    assert set(picks) == {0.0, 1.0, 2.0}
    # the dictionary twin draws the same realisations for the same seed, keeps the one drawn as "noise"
    dict_twin = SimulatedCTNoised(settings=SimulationSettings(dose=0.5)).set_random_state(5)
    assert dict_twin.settings.dose == 0.5
    for pick in picks[:10]:
        item = dict_twin({"label": slice4, "noise": stack})
        assert item["noise"].shape == (1, 4, 4) and float(item["noise"][0, 0, 0]) == pick
        np.testing.assert_array_equal(item["image"], slice4 + item["noise"])
