"""Image files: exact 8/16-bit round trips (PNG, TIFF), JPEG, grey/RGB, folder listing, clear errors."""

import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from skimage import data

from ldct_clip.errors import InputError, OutputError
from ldct_clip.io.images import list_images, load_image, save_image


def _samples(bit_depth: int, channels: int) -> np.ndarray:
    rng = np.random.default_rng(bit_depth * 10 + channels)
    top = 255 if bit_depth == 8 else 65535
    values = rng.integers(0, top + 1, size=(channels, 21, 34))
    values[..., 0, 0], values[..., 0, 1] = 0, top  # both ends of the range
    return values


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_exact(tmp_path, suffix, bit_depth, channels):
    values = _samples(bit_depth, channels)
    top = 255 if bit_depth == 8 else 65535
    image = torch.from_numpy(values / top).float()
    path = save_image(image, tmp_path / f"img{suffix}", bit_depth=bit_depth)
    loaded = load_image(path)
    assert isinstance(loaded, MetaTensor) and loaded.dtype == torch.float32
    assert loaded.shape == (channels, 21, 34) and loaded.meta["bit_depth"] == bit_depth
    np.testing.assert_array_equal(np.rint(loaded.numpy() * top).astype(np.int64), values)
    # the remembered depth is what a plain save writes again: identical file content after reloading
    again = load_image(save_image(loaded, tmp_path / f"again{suffix}"))
    assert again.meta["bit_depth"] == bit_depth and torch.equal(again.as_tensor(), loaded.as_tensor())


def test_files_from_other_writers_load_correctly(tmp_path):
    astronaut = data.astronaut()[:40, :50]
    Image.fromarray(astronaut).save(tmp_path / "rgb.png")
    Image.fromarray(data.camera()[:40, :50]).save(tmp_path / "grey.png")
    Image.fromarray(astronaut).save(tmp_path / "photo.jpg", quality=98)
    Image.fromarray(astronaut).convert("P").save(tmp_path / "palette.png")
    rgb = load_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(np.rint(rgb.numpy() * 255), astronaut.transpose(2, 0, 1))
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (1, 40, 50) and grey.meta["bit_depth"] == 8
    assert load_image(tmp_path / "grey.png", channels=3).shape == (3, 40, 50)
    jpeg = load_image(tmp_path / "photo.jpg")
    assert jpeg.shape == (3, 40, 50) and np.abs(jpeg.numpy() * 255 - astronaut.transpose(2, 0, 1)).mean() < 3
    assert load_image(tmp_path / "palette.png").shape == (3, 40, 50)
    with pytest.raises(InputError, match="colour image"):
        load_image(tmp_path / "rgb.png", channels=1)


def test_save_rounds_clips_and_refuses_unsafe_writes(tmp_path):
    x = torch.tensor([[[0.5 / 255 + 1e-6, 1.49 / 255, -0.2, 1.7]]])
    path = save_image(x, tmp_path / "a.png")
    assert np.asarray(Image.open(path)).ravel().tolist() == [1, 1, 0, 255]
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not the temporary file's private mode
    with pytest.raises(OutputError, match="already exists"):
        save_image(x, path)
    save_image(torch.zeros(1, 1, 4), path, overwrite=True)
    assert np.asarray(Image.open(path)).max() == 0
    with pytest.raises(InputError, match="cannot hold 16-bit"):
        save_image(x, tmp_path / "b.jpg", bit_depth=16)
    sixteen = MetaTensor(torch.rand(3, 8, 8), meta={"bit_depth": 16})
    assert load_image(save_image(sixteen, tmp_path / "c.jpg")).meta["bit_depth"] == 8  # JPEG holds 8 bits
    with pytest.raises(InputError, match="expected \\(C, H, W\\)"):
        save_image(torch.zeros(2, 4, 4), tmp_path / "d.png")
    # no temporary files left; each image has its sidecar manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.png",
        "a.png.ldct-clip.json",
        "c.jpg",
        "c.jpg.ldct-clip.json",
    ]


def test_folder_listing_and_bad_files(tmp_path):
    for name in ("b.png", "a.TIF", "c.jpeg", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.TIF", "b.png", "c.jpeg"]
    assert list_images(tmp_path / "b.png") == [tmp_path / "b.png"]
    with pytest.raises(InputError, match="no image files"):
        list_images(tmp_path / "sub")
    with pytest.raises(InputError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(InputError, match="cannot read image .*broken.png") as info:
        load_image(tmp_path / "broken.png")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="not an image file"):
        load_image(tmp_path / "notes.txt")
