"""``ldct-clip export``: the trained network as an ONNX graph or a TorchScript module."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ldct_clip.errors import InputError

FORMATS = ("onnx", "torchscript")  # ldct_clip.networks.export.EXPORT_FORMATS, without importing torch here
RTOL = 1e-4  # relative error allowed against the eager network on the check input


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write the trained network as ONNX (dynamic batch/height/width) or TorchScript",
        description=(
            "Load trained weights into the bundle's network and write it as an ONNX graph (input 'image', "
            "output 'denoised', dynamic batch, height and width; for ONNX Runtime, OpenVINO, TensorRT) or a "
            "scripted TorchScript module (torch.jit.load). The export is checked against the eager network "
            f"on an odd-sized batch (relative error < {RTOL:g}) before this command succeeds."
        ),
    )
    parser.add_argument("--format", choices=FORMATS, required=True, help="what to write")
    parser.add_argument(
        "weights",
        nargs="?",
        type=Path,
        help="trained weights (default: the bundle's shipped models/model.pt)",
    )
    parser.add_argument("output", type=Path, help="file to write (.onnx / .pt)")
    parser.add_argument("--bundle", default="lowdose_ct_denoising", help="bundle whose network_def to use")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ldct_clip.bundles import bundle_network_def, bundle_weights
    from ldct_clip.inference import load_denoiser
    from ldct_clip.networks.export import export_onnx, export_torchscript

    weights = args.weights or bundle_weights(args.bundle, hint="give the WEIGHTS to export")
    model = load_denoiser(weights, network_def=lambda: bundle_network_def(args.bundle), device="cpu")
    if args.format == "onnx":
        path = export_onnx(model, args.output, opset=args.opset, overwrite=args.overwrite)
    else:
        path = export_torchscript(model, args.output, overwrite=args.overwrite)

    # check on a batch whose sizes are not multiples of 16 (the padding inside the graph is exercised)
    channels = int(getattr(model, "in_channels", 1))
    x = torch.rand(2, channels, 97, 131, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        got = _run_export(path, args.format, x)
    error = float((got - expected).norm() / expected.norm())
    if not error < RTOL:
        path.unlink(missing_ok=True)
        raise InputError(
            f"the {args.format} export differs from the network by {error:.1e} (relative); not kept"
        )
    print(
        f"wrote {path} ({args.format}, from {weights}); checked on 2x{channels}x97x131: relative error {error:.1e}"
    )
    return 0


def _run_export(path: Path, fmt: str, x):
    import torch

    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # torch.jit is deprecated in favour of torch.export
            return torch.jit.load(str(path))(x)
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError(
            "checking the ONNX export needs onnxruntime: pip install 'ldct-clip[onnx]'"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
