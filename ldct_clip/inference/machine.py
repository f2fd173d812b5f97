"""The machine that measurements are made on, and where ldct-clip remembers them.

The inference choices made by measurement (the CPU precision in :mod:`ldct_clip.inference.device`, the
backend in :mod:`ldct_clip.inference.backends`) hold for one machine: they are remembered in JSON files
under :func:`backend_cache_dir`, keyed by :func:`machine_name` and what else they depend on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

import torch

__all__ = [
    "backend_cache_dir",
    "cpu_description",
    "instruction_set_caps",
    "machine_name",
    "read_measurements",
    "remember_measurement",
]


def backend_cache_dir(*parts: str) -> Path:
    """``$LDCT_CLIP_CACHE_DIR`` or ``$XDG_CACHE_HOME/ldct-clip`` or ``~/.cache/ldct-clip``, joined with
    ``parts`` (created)."""
    root = os.environ.get("LDCT_CLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldct-clip"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_description() -> dict:
    """The CPU as /proc/cpuinfo names it (model name, family/model/stepping, the vector and matrix
    flags that decide convolution speed), or what ``platform`` says elsewhere."""
    info: dict = {"model_name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    with contextlib.suppress(OSError):
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "avx_vnni")
        info.update(
            model_name=fields.get("model name", info["model_name"]),
            family=fields.get("cpu family"),
            model=fields.get("model"),
            stepping=fields.get("stepping"),
            flags=[f for f in wanted if f in fields.get("flags", "").split()],
        )
    return info


def instruction_set_caps() -> str:
    """Environment caps on the instruction sets (oneDNN's and ATen's): a capped run is another machine."""
    caps = [
        f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)
    ]
    return " ".join(caps)


def machine_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU's model (family, model) and any instruction-set caps."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_description()
    name = f"{cpu['model_name']} (family {cpu.get('family')} model {cpu.get('model')})"
    return " ".join(filter(None, [name, instruction_set_caps()]))


def read_measurements(file_name: str) -> dict:
    """What :func:`remember_measurement` recorded in ``file_name`` (empty if nothing or unreadable)."""
    try:
        return json.loads((backend_cache_dir() / file_name).read_text())
    except (OSError, ValueError):
        return {}


def remember_measurement(file_name: str, key: str, entry: dict) -> None:
    """Record ``entry`` under ``key`` in ``file_name``, replacing the file atomically (concurrent runs
    each write a whole file; the last one wins)."""
    path = backend_cache_dir() / file_name
    known = read_measurements(file_name)
    known[key] = entry
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(known, indent=1))
    os.replace(partial, path)
