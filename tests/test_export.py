"""Exports of the network (TorchScript, ONNX), ``ldct-clip export`` and the bundle's ``ckpt_export``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from network_helpers import TINY, rel_error

from ldct_clip.cli import main
from ldct_clip.errors import InputError, OutputError
from ldct_clip.networks import CLIPDenoiser
from ldct_clip.networks.export import export_network, export_torchscript

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "lowdose_ct_denoising"
SHIPPED = BUNDLE / "models" / "model.pt"
ODD_SHAPES = [(1, 1, 97, 131), (3, 1, 64, 200)]
HAS_ONNX = all(find_spec(p) is not None for p in ("onnx", "onnxscript", "onnxruntime"))


def jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def shipped_network() -> CLIPDenoiser:
    model = CLIPDenoiser(encoder_weights=None).eval()
    model.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True)["model"])
    return model


def assert_matches_eager(model, run, shapes=ODD_SHAPES, channels=1):
    for shape in shapes:
        x = torch.rand(shape[0], channels, *shape[2:])
        with torch.no_grad():
            expected = model(x)
            got = torch.as_tensor(run(x))
        assert got.shape == expected.shape, shape
        assert rel_error(got, expected) < 1e-4, shape


@pytest.mark.parametrize("channels", [1, 3])
def test_torch_jit_script_equals_eager(channels):
    model = CLIPDenoiser(in_channels=channels, out_channels=channels, **TINY).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    for shape in [*ODD_SHAPES, (2, 1, 1, 5), (1, 1, 32, 48)]:
        x = torch.rand(shape[0], channels, *shape[2:])
        # plain interpretation: the same graph without the profiling executor's per-shape optimisation
        with torch.no_grad(), torch.jit.optimized_execution(False):
            torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
    # training mode too: feature augmentation draws the same noise in the same order
    model.train()
    scripted.train()
    x = torch.rand(2, channels, 40, 33)
    torch.manual_seed(5)
    eager = model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(scripted(x), eager, rtol=0, atol=0)
    with pytest.raises(Exception, match=rf"expects a \(B, {channels}, H, W\) tensor"):
        scripted(torch.rand(1, 2, 16, 16))


def test_export_torchscript_round_trip(tmp_path):
    model = CLIPDenoiser(**TINY).eval()
    path = export_torchscript(model, tmp_path / "net.pt")
    assert_matches_eager(model, jit_load(path))
    with pytest.raises(OutputError, match="already exists"):
        export_torchscript(model, path, overwrite=False)
    with pytest.raises(OutputError, match="does not exist"):
        export_torchscript(model, tmp_path / "missing" / "net.pt")
    with pytest.raises(InputError, match="onnx, torchscript"):
        export_network(model, tmp_path / "x", "tflite")


@pytest.mark.slow
def test_cli_export_torchscript_of_the_shipped_weights(tmp_path, capsys):
    output = tmp_path / "model.ts"
    assert main(["export", "--format", "torchscript", str(output)]) == 0  # WEIGHTS: the bundle's
    assert "relative error" in capsys.readouterr().out
    assert_matches_eager(shipped_network(), jit_load(output))
    assert main(["export", "--format", "torchscript", str(SHIPPED), str(output)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are optional (ldct-clip[onnx])")
def test_cli_export_onnx_of_the_shipped_weights_has_dynamic_batch_height_width(tmp_path):
    # one export (torch.export's symbolic shapes make each cost half a minute on 2 cores) checks the command,
    # the graph's dynamic axes and the numbers with trained weights
    import onnx
    import onnxruntime as ort

    output = tmp_path / "model.onnx"
    assert main(["export", "--format", "onnx", str(SHIPPED), str(output)]) == 0
    graph = onnx.load(str(output)).graph
    for value in (graph.input[0], graph.output[0]):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", 1, "height", "width"], value.name
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"image": x.numpy()})[0]  # noqa: E731
    # other batch sizes and sizes that need no padding, one step of padding, or many (2 < 16)
    assert_matches_eager(shipped_network(), run, [*ODD_SHAPES, (2, 1, 32, 48), (1, 1, 2, 3)])
    assert main(["export", "--format", "onnx", str(SHIPPED), str(output)]) == 2  # exists: refused


@pytest.mark.slow
def test_bundle_ckpt_export_works_without_use_trace(tmp_path):
    output = tmp_path / "model.ts"
    configs = BUNDLE / "configs"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(output), "--ckpt_file", str(SHIPPED), "--key_in_ckpt", "model",
        "--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_matches_eager(shipped_network(), jit_load(output))


def test_cli_parser_does_not_import_torch_or_monai():
    # `ldct-clip --help` and usage errors answer fast because the parser needs neither
    code = (
        "import sys, ldct_clip.cli as cli; parser = cli.build_parser(); "
        "parser.parse_args(['export', '--format', 'onnx', 'out.onnx']); "
        "print(sorted(m for m in ('torch', 'monai', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
