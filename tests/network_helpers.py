"""Shared helpers of the network tests: reference fixtures and small fake CLIP weight files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
TINY = {"layers": (1, 1, 1, 1), "width": 8}


def reference_fixture(kind: str) -> dict:
    """``reference_tiny_{ct,rgb}.pt``: the reference network's state dict, input and outputs."""
    return torch.load(REFERENCE_DIR / f"reference_tiny_{kind}.pt", map_location="cpu", weights_only=True)


def reference_manifest(kind: str) -> dict:
    """``{"config", "shapes"}`` of the reference network in the paper's CT/RGB configuration."""
    return json.loads((REFERENCE_DIR / f"reference_paper_{kind}_state_dict_shapes.json").read_text())


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.detach() - ref).norm() / ref.norm())


def random_visual(width: int = 8, layers=(1, 1, 1, 1), seed: int = 1) -> ModifiedResNet:
    """A tiny open_clip CLIP image tower with every tensor random (incl. BN statistics and layer4)."""
    torch.manual_seed(seed)
    visual = ModifiedResNet(list(layers), output_dim=16, heads=1, image_size=32, width=width)
    with torch.no_grad():
        for name, tensor in visual.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            else:
                tensor.normal_(0.0, 0.2)
    return visual.eval()


class FakeCLIP(nn.Module):
    """What OpenAI's RN50.pt holds, in small: an image tower under ``visual`` plus other CLIP tensors."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Only tracing needs a forward; the archive keeps every tensor of the module either way.
        return self.visual.conv1(image).mean() * self.logit_scale


def write_torchscript(visual: nn.Module, path: Path) -> Path:
    traced = torch.jit.trace(FakeCLIP(visual).eval(), torch.rand(1, 3, 32, 32))
    torch.jit.save(traced, str(path))
    return path


def write_hf_cache(cache_dir: Path, repo_id: str, filename: str, state_dict: dict) -> Path:
    """Lay out a Hugging Face hub cache entry (refs/main -> snapshot) holding ``filename``."""
    from safetensors.torch import save_file

    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    target = snapshot / filename
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(target))
    return target


def expected_encoder_state(visual: nn.Module) -> dict:
    return {k: v for k, v in visual.state_dict().items() if not k.startswith(("layer4.", "attnpool."))}
