"""The trained network as a file other runtimes load: ONNX (dynamic batch, height and width), TorchScript.

Both start from the module in eval mode and are checked by the tests against its eager output on sizes
that are not multiples of 16 (the network reflect-pads inside; see
:func:`ldct_clip.networks.denoiser.pad_to_multiple`, written so that the padding exports with dynamic
sizes).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ldct_clip.errors import InputError, OutputError

__all__ = ["DEFAULT_OPSET", "EXPORT_FORMATS", "export_network", "export_onnx", "export_torchscript"]

#: ONNX opset of :func:`export_onnx` (Resize with ``align_corners`` and every op used exist since 11; 18 is
#: the lowest the dynamo exporter writes without converting).
DEFAULT_OPSET = 18
EXPORT_FORMATS = ("onnx", "torchscript")
#: Names of the ONNX graph's input and output (what ONNX Runtime and TensorRT bind to).
ONNX_INPUT, ONNX_OUTPUT = "image", "denoised"


def _example_input(model: nn.Module, batch: int = 2, size: tuple[int, int] = (64, 80)) -> torch.Tensor:
    param = next(model.parameters(), None)
    channels = int(getattr(model, "in_channels", 1))
    device = param.device if param is not None else torch.device("cpu")
    return torch.rand(batch, channels, *size, device=device)


def _writable(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another output or allow overwriting (--overwrite)")
    if not path.parent.is_dir():
        raise OutputError(f"folder {path.parent} does not exist; create it or choose another output")
    return path


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    example: torch.Tensor | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (eval mode) as an ONNX graph with dynamic batch, height and width.

    Uses torch's ``torch.export``-based exporter (``dynamo=True``; needs the ``onnx`` and ``onnxscript``
    packages). The graph's input is ``image`` ``(batch, C, height, width)`` and its output ``denoised``
    of the same size; sizes from 2 pixels up are exact, any batch works.

    Args:
        model: the network; put in eval mode (and left so).
        path: the ``.onnx`` file to write.
        opset: ONNX opset version.
        example: an input to trace with (default: a random ``(2, C, 64, 80)`` batch); its sizes are
            generalised.
        overwrite: replace an existing file.

    Raises:
        InputError: the ONNX exporter's packages are not installed.
        OutputError: ``path`` exists (without ``overwrite``) or its folder does not.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise InputError(
            f"ONNX export needs the onnx and onnxscript packages ({error.name} is missing): "
            "pip install 'ldct-clip[onnx]'"
        ) from None
    from torch.export import Dim

    path = _writable(path, overwrite)
    model = model.eval()
    example = _example_input(model) if example is None else example
    dims = {
        0: Dim("batch", min=1, max=4096),
        2: Dim("height", min=2, max=16384),
        3: Dim("width", min=2, max=16384),
    }
    names = _forward_arg_names(model)
    name = names[0] if names else "x"
    # the exporter prints its progress and warns about tracing details: chatter for our users
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamic_shapes={name: dims},
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    _name_output_dims(path)
    return path


def _name_output_dims(path: Path) -> None:
    """Name the output's dynamic dims like the input's (the exporter writes the symbolic size
    expressions of the padding and crop there, which say the same less readably)."""
    import onnx

    proto = onnx.load(str(path))
    for index, name in ((0, "batch"), (2, "height"), (3, "width")):
        proto.graph.output[0].type.tensor_type.shape.dim[index].dim_param = name
    onnx.save(proto, str(path))


def _forward_arg_names(model: nn.Module) -> list[str]:
    return [p for p in inspect.signature(model.forward).parameters if p not in ("args", "kwargs")]


def export_torchscript(model: nn.Module, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``model`` (eval mode) as a scripted TorchScript module (``torch.jit.script``: any batch and
    size, the padding logic included; load with ``torch.jit.load``).

    Args:
        model: the network; put in eval mode (and left so).
        path: the ``.pt``/``.ts`` file to write.
        overwrite: replace an existing file.

    Raises:
        OutputError: ``path`` exists (without ``overwrite``) or its folder does not.
    """
    path = _writable(path, overwrite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        scripted = torch.jit.script(model.eval())
        torch.jit.save(scripted, str(path))
    return path


def export_network(model: nn.Module, path: str | os.PathLike, fmt: str, **kwargs) -> Path:
    """:func:`export_onnx` or :func:`export_torchscript` by name (``"onnx"`` / ``"torchscript"``).

    Raises:
        InputError: an unknown format.
    """
    if fmt == "onnx":
        return export_onnx(model, path, **kwargs)
    if fmt == "torchscript":
        return export_torchscript(model, path, **kwargs)
    raise InputError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
