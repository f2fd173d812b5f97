"""Slice-wise volume inference: exactness against the per-slice forward, HU round trip, orientation, AMP."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from ldct_clip.errors import InputError
from ldct_clip.inference import (
    CPU_AMP_DEFAULT,
    SliceBatchInferer,
    SlicePredictor,
    cpu_bf16_is_faster,
    denoise_volume,
    make_inferer,
    resolve_amp,
)
from ldct_clip.networks import CLIPDenoiser


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIPDenoiser(layers=(1, 1, 1, 1), width=8).eval()


def per_slice_forward(volume: torch.Tensor, net) -> torch.Tensor:
    """The reference evaluation on each slice: reflect-pad bottom/right to 32, forward, crop."""
    out = []
    with torch.no_grad():
        for k in range(volume.shape[-1]):
            s = volume[..., k]
            h, w = s.shape[-2:]
            out.append(net(F.pad(s, (0, -w % 32, 0, -h % 32), mode="reflect"))[..., :h, :w])
    return torch.stack(out, dim=-1)


def test_streaming_whole_slices_equal_the_plain_forward(tiny):
    volume = torch.rand(1, 1, 40, 36, 5)
    with torch.no_grad():
        out = SliceBatchInferer(sw_batch_size=2)(volume, SlicePredictor(tiny))
    assert out.shape == volume.shape
    assert torch.allclose(out, per_slice_forward(volume, tiny), atol=1e-6, rtol=0)


def test_monai_slice_inferer_whole_roi_no_overlap_equals_the_plain_forward(tiny):
    volume = torch.rand(1, 1, 40, 36, 3)
    inferer = make_inferer(roi_size=(40, 36), sw_batch_size=2, overlap=0.0)
    assert isinstance(inferer, SliceInferer)
    with torch.no_grad():
        out = inferer(volume, SlicePredictor(tiny))
    assert torch.allclose(out, per_slice_forward(volume, tiny), atol=1e-6, rtol=0)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_overlapping_windows_blend_to_the_pointwise_result(blend):
    # a pointwise network gives every window the same value per voxel: any weighting must return it
    net = torch.nn.Conv2d(1, 1, kernel_size=1)
    volume = torch.rand(1, 1, 48, 40, 3)
    inferer = make_inferer(roi_size=(32, 32), overlap=0.5, blend=blend, sw_batch_size=3)
    with torch.no_grad():
        out = inferer(volume, SlicePredictor(net))
        expected = net(volume.movedim(-1, 0)[:, 0]).movedim(0, -1)[None]
    assert torch.allclose(out, expected, atol=1e-5)


def test_slices_along_other_axes():
    net = torch.nn.Conv2d(1, 2, kernel_size=3, padding=1)
    volume = torch.rand(1, 1, 6, 33, 35)
    with torch.no_grad():
        out = SliceBatchInferer(sw_batch_size=4, spatial_dim=0)(volume, SlicePredictor(net))
        expected = torch.stack([SlicePredictor(net)(volume[:, :, k]) for k in range(6)], dim=2)
    assert out.shape == (1, 2, 6, 33, 35)
    assert torch.allclose(out, expected, atol=1e-6)


#: (forward, inverse) of the symmetries of the square, written out independently of the predictor's table
SQUARE_SYMMETRIES = [
    (lambda t: t, lambda t: t),
    (lambda t: t.flip(-1), lambda t: t.flip(-1)),
    (lambda t: t.flip(-2), lambda t: t.flip(-2)),
    (lambda t: t.flip(-2, -1), lambda t: t.flip(-2, -1)),
    (lambda t: t.transpose(-2, -1), lambda t: t.transpose(-2, -1)),
    (lambda t: t.transpose(-2, -1).flip(-1), lambda t: t.flip(-1).transpose(-2, -1)),
    (lambda t: t.transpose(-2, -1).flip(-2), lambda t: t.flip(-2).transpose(-2, -1)),
    (lambda t: t.flip(-2, -1).transpose(-2, -1), lambda t: t.transpose(-2, -1).flip(-2, -1)),
]


class ShapeRecorder(torch.nn.Module):
    """A network that is not equivariant to rotations or mirroring (a random 3x3 kernel), and records the
    shapes it is called with."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self.conv(x) + x.roll(1, -1)


def test_self_ensemble_is_the_mean_over_the_eight_views_of_a_square_slice():
    net = ShapeRecorder()
    batch = torch.rand(2, 1, 40, 40)  # padded to 64 x 64
    padded = F.pad(batch, (0, 24, 0, 24), mode="reflect")
    with torch.no_grad():
        views = [inverse(net(forward(padded))) for forward, inverse in SQUARE_SYMMETRIES]
        expected = torch.stack(views).mean(0)[..., :40, :40]
        net.shapes.clear()
        out = SlicePredictor(net, self_ensemble=True)(batch)
        plain = SlicePredictor(net)(batch)
    assert len(net.shapes) == 9 and set(net.shapes) == {(2, 1, 64, 64)}  # 8 views, then the plain call
    assert torch.allclose(out, expected, atol=1e-6)
    assert (out - plain).abs().max() > 0.05  # the views do differ for this network
    assert torch.allclose(plain, views[0][..., :40, :40], atol=1e-6)


def test_self_ensemble_of_a_rectangular_slice_keeps_its_shape_in_four_views():
    net = ShapeRecorder()
    batch = torch.rand(1, 1, 40, 70)  # padded to 64 x 96: the transposing views would change the shape
    padded = F.pad(batch, (0, 26, 0, 24), mode="reflect")
    with torch.no_grad():
        expected = torch.stack([inv(net(fwd(padded))) for fwd, inv in SQUARE_SYMMETRIES[:4]]).mean(0)
        net.shapes.clear()
        out = SlicePredictor(net, self_ensemble=True)(batch)
    assert net.shapes == [(1, 1, 64, 96)] * 4
    assert torch.allclose(out, expected[..., :40, :70], atol=1e-6)


def test_self_ensemble_leaves_an_equivariant_network_unchanged(tiny):
    net = torch.nn.Conv2d(1, 1, kernel_size=1)  # pointwise: commutes with every rotation and mirroring
    volume = _ct(shape=(1, 48, 48, 3))
    with torch.no_grad():
        plain = denoise_volume(volume, net, device="cpu", amp="fp32", progress=False)
        ensemble = denoise_volume(volume, net, device="cpu", amp="fp32", progress=False, self_ensemble=True)
        other = denoise_volume(volume, tiny, device="cpu", amp="fp32", progress=False, self_ensemble=True)
    assert torch.allclose(plain.as_tensor(), ensemble.as_tensor(), atol=1e-3)
    tiny_plain = denoise_volume(volume, tiny, device="cpu", amp="fp32", progress=False)
    assert not torch.allclose(other.as_tensor(), tiny_plain.as_tensor(), atol=1e-3)


class ModelRangeIdentity(torch.nn.Module):
    """Returns its input: denoise_volume must then give back the input HU."""

    def forward(self, x):
        return x.clone()


def _ct(shape=(1, 40, 36, 4), affine=None) -> MetaTensor:
    hu = torch.rand(shape) * 2000 - 1000
    hu[..., :3, :, :] = -3024.0  # outside the field of view
    affine = (
        torch.diag(torch.tensor([-0.8, -0.8, 3.0, 1.0], dtype=torch.float64)) if affine is None else affine
    )
    return MetaTensor(hu, affine=affine, meta={"source_path": "/x", "source_kind": "nifti"})


def test_denoise_volume_is_hu_in_hu_out_with_meta_kept():
    volume = _ct()
    out = denoise_volume(volume, ModelRangeIdentity(), device="cpu", batch_size=3, progress=False)
    assert isinstance(out, MetaTensor) and out.shape == volume.shape and out.dtype == torch.float32
    assert torch.allclose(out.affine, volume.affine)
    assert out.meta["source_path"] == "/x"
    assert torch.allclose(out.as_tensor(), volume.as_tensor(), atol=1e-3)
    assert torch.equal(out[:, :3], volume[:, :3])  # padding restored exactly


def test_denoise_volume_matches_the_per_slice_forward_in_the_model_range(tiny):
    volume = _ct()
    out = denoise_volume(volume, tiny, device="cpu", batch_size=2, amp="fp32", progress=False)
    hu = volume.as_tensor().clone()
    hu[hu < -1500] = -1024.0  # the network sees air outside the field of view
    expected = per_slice_forward((hu[None] + 1024) / 4096, tiny)[0] * 4096 - 1024
    inside = slice(3, None)  # the field of view (padding is restored, not predicted)
    assert torch.allclose(out[:, inside].as_tensor(), expected[:, inside], atol=1e-3)
    assert torch.equal(out[:, :3], volume[:, :3])


def test_denoise_volume_sees_slices_in_lps_and_returns_the_input_orientation():
    net = torch.nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=False)  # not flip-invariant
    torch.nn.init.normal_(net.weight)
    ras = torch.diag(torch.tensor([0.8, 0.8, 3.0, 1.0], dtype=torch.float64))
    volume = _ct(affine=ras)
    volume[:, :3] = 0.0  # no padding here: every voxel is predicted
    out = denoise_volume(volume, net, device="cpu", batch_size=4, amp="fp32", progress=False)
    # by hand: RAS -> LPS flips x and y, denoise each slice, flip back
    x = (volume.as_tensor().flip(1, 2)[None] + 1024) / 4096
    expected = (per_slice_forward(x, net)[0] * 4096 - 1024).flip(1, 2)
    assert torch.allclose(out.affine, ras)
    assert torch.allclose(out.as_tensor(), expected, atol=1e-3)
    unoriented = denoise_volume(volume, net, device="cpu", amp="fp32", axcodes=None, progress=False)
    assert not torch.allclose(unoriented.as_tensor(), expected, atol=1)


def test_denoise_volume_with_permuted_axes_equals_the_lps_volume():
    net = torch.nn.Conv2d(1, 1, kernel_size=3, padding=1, bias=False)
    torch.nn.init.normal_(net.weight)
    lps = _ct(shape=(1, 40, 36, 3))
    # the same data stored with x and y swapped (a transposed in-plane layout)
    swapped = torch.tensor(
        [[0, -0.8, 0, 0], [-0.8, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]], dtype=torch.float64
    )
    permuted = MetaTensor(lps.as_tensor().transpose(1, 2).contiguous(), affine=swapped)
    expected = denoise_volume(lps, net, device="cpu", amp="fp32", progress=False)
    out = denoise_volume(permuted, net, device="cpu", amp="fp32", progress=False)
    assert torch.allclose(out.affine, swapped)
    assert torch.allclose(out.as_tensor(), expected.as_tensor().transpose(1, 2), atol=1e-3)


def test_inplace_writes_over_the_input_and_gives_the_same_result(tiny):
    volume = _ct()
    expected = denoise_volume(volume, tiny, device="cpu", batch_size=3, progress=False)
    pointer = volume.data_ptr()
    out = denoise_volume(volume, tiny, device="cpu", batch_size=3, inplace=True, progress=False)
    assert out.data_ptr() == pointer  # no second volume was allocated
    assert torch.equal(out.as_tensor(), expected.as_tensor())
    assert torch.equal(volume.as_tensor(), expected.as_tensor())


def test_progress_bar_counts_slices(capsys, tiny):
    denoise_volume(_ct(shape=(1, 32, 32, 5)), tiny, device="cpu", batch_size=2, progress=True)
    assert "5/5" in capsys.readouterr().err


def test_bf16_autocast_stays_close_to_fp32(tiny):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no bf16 on this CPU")
    volume = _ct(shape=(1, 64, 64, 2))
    fp32 = denoise_volume(volume, tiny, device="cpu", amp="fp32", progress=False).numpy()
    bf16 = denoise_volume(volume, tiny, device="cpu", amp="bf16", progress=False).numpy()
    # bf16 has 8 mantissa bits: relative error ~ 2**-8 of the model-range values
    assert np.abs(fp32 - bf16).max() / 4096 < 2e-2
    assert not np.array_equal(fp32, bf16)


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert resolve_amp(None, cpu) is (CPU_AMP_DEFAULT if cpu_bf16_is_faster() else None)
    assert resolve_amp("auto", cpu) is resolve_amp(None, cpu)
    assert resolve_amp("fp32", cpu) is None
    assert resolve_amp(False, cpu) is None
    assert resolve_amp(torch.float32, cpu) is None
    assert resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(InputError, match="mixed precision"):
        resolve_amp("int8", cpu)


def test_cpu_precision_default_is_measured_per_machine(monkeypatch, tmp_path):
    """bf16 becomes the CPU default only where its convolutions measure faster, and the answer is kept
    per machine: an instruction-set cap is another machine."""
    from ldct_clip.inference import device as device_module

    monkeypatch.setenv("LDCT_CLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(device_module, "_cpu_supports_bf16", lambda: True)
    probes = []
    speeds = {torch.float32: 1.0, torch.bfloat16: 0.5}
    monkeypatch.setattr(device_module, "_time_convs", lambda dtype: probes.append(dtype) or speeds[dtype])
    assert resolve_amp("auto", torch.device("cpu")) is torch.bfloat16
    assert len(probes) == 2
    speeds[torch.bfloat16] = 2.0  # remembered: no new probe, same answer
    assert resolve_amp("auto", torch.device("cpu")) is torch.bfloat16 and len(probes) == 2
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a capped run probes again and keeps float32
    assert resolve_amp("auto", torch.device("cpu")) is None and len(probes) == 4
    speeds[torch.bfloat16] = 0.95  # within the margin: float32 stays
    assert not cpu_bf16_is_faster(use_cache=False)
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16  # asked for: no probe decides
    monkeypatch.setattr(device_module, "_cpu_supports_bf16", lambda: False)
    assert not cpu_bf16_is_faster(use_cache=False) and len(probes) == 6


@pytest.mark.skipif(
    not torch.cpu._is_avx512_bf16_supported(), reason="needs a CPU with bf16 in hardware to cap"
)
def test_bf16_cpu_capped_to_avx2_measures_float32_faster(tmp_path):
    """A bf16 CPU capped to AVX2 (how the benchmarks emulate the AVX2-only machine type) is not judged by its
    flags, which still say AVX512-BF16: oneDNN reports no bf16 there, or the probe measures it slower, and
    the default is float32."""
    import subprocess
    import sys

    env = dict(
        os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", LDCT_CLIP_CACHE_DIR=str(tmp_path)
    )
    code = "import torch; from ldct_clip.inference import resolve_amp; print(resolve_amp('auto', torch.device('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "None"
    record = tmp_path / "precision_choice.json"
    if record.exists():  # probed: the measurement says why
        (entry,) = json.loads(record.read_text()).values()
        assert entry["bf16"] is False and entry["seconds"]["bf16"] > entry["seconds"]["fp32"]


def test_bad_volume_shape_is_an_input_error(tiny):
    with pytest.raises(InputError, match=r"\(1, X, Y, Z\)"):
        denoise_volume(torch.zeros(2, 8, 8, 2), tiny, device="cpu")


def test_a_batch_larger_than_the_memory_budget_is_reduced_and_said(caplog):
    from ldct_clip.inference.memory import CPU_WORKING_BUDGET, bounded_batch_size, working_set_bytes

    with caplog.at_level("WARNING", logger="ldct_clip.inference.memory"):
        assert bounded_batch_size(2, 512, 512, "cpu") == 2  # the default fits: nothing said
        assert not caplog.records
        fits = bounded_batch_size(1_000_000, 512, 512, "cpu")
    # the largest batch whose working set stays within the budget (1.5 GB on top of the volume)
    assert working_set_bytes(fits, 512, 512) <= CPU_WORKING_BUDGET < working_set_bytes(fits + 1, 512, 512)
    assert 2 <= fits <= 8
    (record,) = caplog.records
    assert "batch of 1000000 slices reduced to" in record.getMessage()
    assert bounded_batch_size(1_000_000, 8, 8, "cpu") > 1000  # tiny slices: a big batch fits
