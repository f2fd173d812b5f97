"""HU <-> model range (with FOV padding restored, also through MONAI's Invertd) and display windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
from monai.transforms import Compose, Invertd, Orientationd
from monai.utils import TraceKeys

from ldct_clip.conventions import WINDOWS, window_bounds
from ldct_clip.data.phantom import make_phantom
from ldct_clip.transforms import (
    HUToModelRange,
    HUToModelRanged,
    ModelRangeToHU,
    ModelRangeToHUd,
    WindowHU,
    WindowHUd,
)


@pytest.fixture
def phantom():
    # Standard axial DICOM orientation: LPS in RAS terms, so Orientationd("RAS") really flips two axes.
    return make_phantom(24, 3, seed=1, fov_padding=True)


def test_default_normalisation_values():
    hu = torch.tensor([[-1024.0, 0.0, 1024.0, 3072.0, 4000.0]])
    x = HUToModelRange()(hu)
    np.testing.assert_allclose(x.numpy(), [[0.0, 0.25, 0.5, 1.0, (4000 + 1024) / 4096]], rtol=1e-6)
    assert x.dtype == torch.float32


def test_padding_mapped_to_air_and_restored(phantom):
    transform = HUToModelRange()
    x = transform(phantom)
    padding = phantom == -3024
    assert int(padding.sum()) > 0
    assert float(x[padding].abs().max()) == 0.0  # padding -> air (-1024 HU) -> 0
    assert float(x.min()) >= 0.0
    extra = x.applied_operations[-1][TraceKeys.EXTRA_INFO]
    assert extra["padding_value"] == -3024.0 and (extra["hu_min"], extra["hu_max"]) == (-1024.0, 3072.0)
    assert extra["padding_mask"].dtype == np.uint8 and extra["padding_mask"].size == int(
        np.ceil(phantom.numel() / 8)
    )
    hu = transform.inverse(x)
    assert torch.equal(hu == -3024, padding)
    assert float((hu - phantom).abs().max()) < 1e-3
    assert len(hu.applied_operations) == 0


def test_inverse_of_a_changed_prediction_keeps_padding(phantom):
    transform = HUToModelRange()
    x = transform(phantom)
    hu = transform.inverse(x + 0.01)  # the network changed every value, padding included
    padding = phantom == -3024
    assert float(hu[padding].max()) == -3024.0
    np.testing.assert_allclose(hu[~padding].numpy(), phantom[~padding].numpy() + 40.96, atol=1e-2)


def test_custom_range_and_threshold():
    hu = MetaTensor(torch.tensor([[-2000.0, -1200.0, -1000.0, 0.0, 1000.0]]))
    transform = HUToModelRange(hu_min=-1000.0, hu_max=1000.0, padding_threshold=-1100.0, air_hu=-1000.0)
    x = transform(hu)
    np.testing.assert_allclose(x.numpy(), [[0.0, 0.0, 0.0, 0.5, 1.0]], atol=1e-6)
    back = transform.inverse(x)
    # Both values below the threshold were padding; the most frequent (ties: the lowest) one comes back.
    np.testing.assert_allclose(back.numpy(), [[-2000.0, -2000.0, -1000.0, 0.0, 1000.0]], atol=1e-4)
    no_padding = HUToModelRange(padding_threshold=None)(torch.tensor([[-3024.0]]))
    np.testing.assert_allclose(no_padding.numpy(), [[-2000.0 / 4096]], rtol=1e-6)


def test_numpy_in_numpy_out():
    out = HUToModelRange()(np.array([[-3024.0, 0.0]], dtype=np.float32))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [[0.0, 0.25]])


def test_invertd_through_orientation_restores_hu_padding_and_geometry(phantom):
    preprocessing = Compose([Orientationd(keys="image", axcodes="RAS"), HUToModelRanged(keys="image")])
    data = preprocessing({"image": phantom.clone()})
    assert not torch.allclose(data["image"].affine, phantom.affine)  # the orientation did change
    data["pred"] = MetaTensor(data["image"].as_tensor() * 1.0)  # identity "network"
    out = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert out.shape == phantom.shape
    np.testing.assert_allclose(out.affine.numpy(), phantom.affine.numpy())
    assert torch.equal(out == -3024, phantom == -3024)
    assert float((out - phantom).abs().max()) < 1e-3


def test_invertd_after_dataloader_batching(phantom):
    # One volume with FOV padding, one without: the recorded extra_info must survive collation either way.
    plain = make_phantom(24, 3, seed=1, fov_padding=False)
    preprocessing = Compose([Orientationd(keys="image", axcodes="RAS"), HUToModelRanged(keys="image")])
    dataset = Dataset([{"image": phantom.clone()}, {"image": plain.clone()}], transform=preprocessing)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    batch["pred"] = batch["image"] * 1.0
    inverter = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)
    items = [inverter(item) for item in decollate_batch(batch)]
    assert len(items) == 2
    for item, original in zip(items, (phantom, plain)):
        out = item["pred"]
        np.testing.assert_allclose(out.affine.numpy(), original.affine.numpy())
        assert float((out - original).abs().max()) < 1e-3


def test_model_range_to_hu():
    x = torch.tensor([[0.0, 0.25, 1.0]])
    np.testing.assert_allclose(ModelRangeToHU()(x).numpy(), [[-1024.0, 0.0, 3072.0]])
    d = ModelRangeToHUd(keys="x", hu_min=-1000.0, hu_max=1000.0)({"x": np.array([[0.5]], np.float32)})
    assert isinstance(d["x"], np.ndarray) and float(d["x"][0, 0]) == 0.0


def test_window_presets():
    assert window_bounds("abdomen") == (-160.0, 240.0)
    assert window_bounds("ldctbench_abdomen") == (-150.0, 250.0)
    assert window_bounds("chest") == (-1350.0, 150.0)
    assert window_bounds("head") == (0.0, 80.0)
    assert window_bounds("full") == (-1024.0, 3072.0)
    assert {"abdomen", "ldctbench_abdomen", "chest", "head", "full"} <= set(WINDOWS)
    with pytest.raises(ValueError, match="unknown window"):
        window_bounds("liver")
    with pytest.raises(ValueError, match="must exceed"):
        window_bounds((100, 100))


def test_window_values_and_dictionary_twin():
    hu = torch.tensor([[-500.0, -160.0, 40.0, 240.0, 1000.0]])
    np.testing.assert_allclose(WindowHU("abdomen")(hu).numpy(), [[0.0, 0.0, 0.5, 1.0, 1.0]])
    np.testing.assert_allclose(WindowHU((-160, 240), clip=False)(hu).numpy()[0, 0], -340 / 400)
    out = WindowHUd(keys=("a", "b"), window="head")({"a": hu, "b": np.array([40.0], np.float32)})
    assert float(out["a"][0, 2]) == 0.5 and isinstance(out["b"], np.ndarray) and float(out["b"][0]) == 0.5
