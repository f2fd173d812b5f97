"""The GPU route: backends on CUDA, pinned host transfers, bf16, TensorRT. Skips without a CUDA GPU.

Run with ``pytest -m gpu`` (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from network_helpers import rel_error

from ldct_clip.inference import available_backends, prepare_network
from ldct_clip.networks import CLIPDenoiser

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "lowdose_ct_denoising"
SHIPPED = BUNDLE / "models" / "model.pt"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LDCT_CLIP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shipped():
    model = CLIPDenoiser(encoder_weights=None).eval()
    model.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True)["model"])
    x = torch.rand(4, 1, 128, 160)
    with torch.no_grad():
        expected = model(x)  # float32 on the CPU
    return model, x, expected


@pytest.mark.parametrize("name", ["eager", "eager_infer", "eager_nchw", "inductor", "cudagraphs"])
def test_cuda_backends_equal_cpu_float32_with_shipped_weights(name, shipped):
    model, x, expected = shipped
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions are not float32
    torch.backends.cuda.matmul.allow_tf32 = False
    prepared = prepare_network(CLIPDenoiser(encoder_weights=None).eval(), name, device="cuda")
    prepared.network.load_state_dict(model.state_dict())
    got = prepared(x)  # host batch in: pinned, non-blocking transfers; host result out
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert rel_error(got, expected) < 1e-4, name
    got_device = prepared(x.cuda())  # a batch already on the GPU comes back on the GPU
    assert got_device.device.type == "cuda"
    assert rel_error(got_device.cpu(), expected) < 1e-4


def test_bf16_autocast_is_close_and_returns_float32(shipped):
    model, x, expected = shipped
    prepared = prepare_network(
        CLIPDenoiser(encoder_weights=None).eval(), "eager_infer", "cuda", torch.bfloat16
    )
    prepared.network.load_state_dict(model.state_dict())
    got = prepared(x)
    assert got.dtype == torch.float32
    assert rel_error(got, expected) < 2e-2  # bf16 has 8 bits of mantissa; PSNR cost: gpu_check.sh


def test_auto_chooses_a_cuda_backend():
    prepared = prepare_network(CLIPDenoiser(layers=(1, 1, 1, 1), width=8).eval(), "auto", device="cuda")
    prepared(torch.rand(2, 1, 64, 64))
    assert prepared.chosen in available_backends("cuda")
    assert "onnxruntime" not in available_backends("cuda")


@pytest.mark.skipif(find_spec("tensorrt") is None, reason="tensorrt is not installed")
def test_trt_overlay_builds_and_matches(shipped, tmp_path):
    from monai.bundle import ConfigParser

    model, x, expected = shipped
    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "inference_trt.json")]
    )
    parser.update({"device": "cuda", "batch_size": 4})
    network = parser.get_parsed_content("network")
    network.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = network(x.cuda()).float().cpu()
    assert rel_error(got, expected) < 1e-3  # TensorRT fp32 may use other convolution algorithms
