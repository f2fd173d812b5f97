"""Training throughput: seconds per iteration of the full training step, per precision and memory format.

One iteration is what ``SupervisedTrainer`` does per iteration with a bundle's train config, built from
that config (``train#trainer`` with its mixup ``prepare_batch``, ``TrainingStepInferer``, L1 loss, AdamW,
gradient clipping at 0.01 and the per-iteration cosine LR step): the forward pass of CLIPDenoiser RN50
(random-init encoder: the cost is that of the CLIP weights; feature augmentation on, encoder BatchNorm in
train mode as in the paper), the loss, backward, clipping, the optimizer and LR steps. Not included: data
loading (one batch in memory, repeated; the training loader prepares batches in worker processes while
the step runs), validation, checkpoints and logging.

Rows, in one run: float32 NCHW (``contiguous``: the reference loop's way), float32 channels_last, bf16
(autocast) NCHW and channels_last (on CUDA: MONAI's amp in float16 and in bf16 too), then ``auto`` (the
configs' default): what ``TrainingStepInferer`` measures and picks at its first iteration, with the time
the measurement took.

    python benchmarks/training_speed.py                      # CPU, batch 16 of 128^2, 5 timed iterations
    python benchmarks/training_speed.py --rounds 2           # on a busy machine: each row's faster round
    python benchmarks/training_speed.py --device cuda --iterations 20
    python benchmarks/training_speed.py --set train#trainer#optim_set_to_none=false --rows fp32/contiguous
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from ldct_clip.bundles import resolve_bundle
from ldct_clip.cli.overrides import parse_set_options
from ldct_clip.training import TrainingStepInferer

CPU_ROWS = ("fp32/contiguous", "fp32/channels_last", "bf16/contiguous", "bf16/channels_last", "auto/auto")
CUDA_ROWS = (
    "fp32/contiguous",
    "fp32/channels_last",
    "fp16/contiguous",
    "fp16/channels_last",
    "bf16/contiguous",
    "bf16/channels_last",
    "auto/auto",
)
#: the train config's handlers that act in every step (the others act at round ends or log)
STEP_HANDLERS = ("ldct_clip.training.GradientClipHandler", "LrScheduleHandler")


def cpu_model() -> str:
    """The CPU's model name, family/model and the flags that decide bf16 speed, from /proc/cpuinfo."""
    fields: dict = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = [
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in fields.get("flags", "").split()
    ]
    return (
        f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} model "
        f"{fields.get('model', '?')}; {' '.join(flags) or 'no AVX2'}; {os.cpu_count()} cores)"
    )


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def build_trainer(config: str, overrides: dict, batch: dict, iterations: int):
    """The config's ``train#trainer`` over ``iterations`` copies of ``batch``, with only the handlers that
    act in every step."""
    parser = ConfigParser()
    parser.read_config(config)
    handlers = [h for h in parser["train"]["handlers"] if h.get("_target_") in STEP_HANDLERS]
    parser.update(
        {
            "encoder_weights": None,  # random init: the cost does not depend on the weights
            "resume": None,
            "iterations": iterations,
            "epoch_length": iterations,
            "train#handlers": handlers,
            "train#log_handlers": [],
            **overrides,
        }
    )
    parser["train#dataloader"] = [batch] * iterations
    return parser.get_parsed_content("train#trainer")


def measure(config: str, overrides: dict, batch: dict, iterations: int, warmup: int, device: torch.device):
    """Seconds per iteration after ``warmup`` iterations, the CPU seconds per iteration, the first
    iteration's seconds (with ``auto``: the measurement) and the step format used."""
    torch.manual_seed(0)
    trainer = build_trainer(config, overrides, batch, warmup + iterations)
    stamps: list[tuple[float, float]] = []

    def stamp(engine) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append((time.perf_counter(), time.process_time()))

    trainer.add_event_handler(Events.STARTED, stamp)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    trainer.run()
    (wall0, cpu0), (wall1, cpu1) = stamps[warmup], stamps[-1]
    inferer = trainer.inferer
    used = inferer.format if isinstance(inferer, TrainingStepInferer) else None
    return {
        "s_per_it": (wall1 - wall0) / iterations,
        "cpu_s_per_it": (cpu1 - cpu0) / iterations,
        "first_s": stamps[1][0] - stamps[0][0],
        "format": str(used) if used is not None else "?",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=str(resolve_bundle("lowdose_ct_denoising") / "configs" / "train.json"),
        help="bundle train config (default: the CT bundle's)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per row (auto: probe)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds over all rows; each row keeps its fastest round"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--rows", help="comma-separated precision/memory_format rows (default: all for the device)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as in ldct-clip train",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        machine = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        machine = f"{cpu_model()}, {torch.get_num_threads()} threads"
    in_channels = ConfigParser.load_config_file(args.config)["network_def"]["in_channels"]
    clean = torch.rand(args.batch, in_channels, args.crop, args.crop, device=device) * 0.5
    batch = {"image": clean + torch.randn_like(clean) * 5 / 255, "label": clean}
    rows = args.rows.split(",") if args.rows else CUDA_ROWS if device.type == "cuda" else CPU_ROWS
    extra = parse_set_options(args.set)

    print(f"machine: {machine}; torch {torch.__version__}")
    print(f"config: {args.config}; batch {args.batch} of {args.crop}^2; {extra or 'no overrides'}")
    print(f"load average before: {load_average()}")
    results: dict = {}
    for round_index in range(args.rounds):
        for row in rows:
            precision, memory_format = row.split("/")
            overrides = {"train_precision": precision, "train_memory_format": memory_format, **extra}
            result = measure(args.config, overrides, batch, args.iterations, args.warmup, device)
            print(f"  round {round_index + 1}, {row}: {result['s_per_it']:.3f} s/it", flush=True)
            if row not in results or result["s_per_it"] < results[row]["s_per_it"]:
                results[row] = result
    print(f"load average after: {load_average()}\n")
    reference = results.get(rows[0], {}).get("s_per_it")
    print("| step | s/iteration | iterations/s | vs " + rows[0] + " | CPU s/iteration | 40k iterations |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row, r in results.items():
        name = (
            f"auto (picked {r['format']}; first iteration {r['first_s']:.1f} s)"
            if row == "auto/auto"
            else row
        )
        ratio = f"{reference / r['s_per_it']:.2f}x" if reference else "-"
        print(
            f"| {name} | {r['s_per_it']:.3f} | {1 / r['s_per_it']:.3f} | {ratio} | {r['cpu_s_per_it']:.2f} "
            f"| {40000 * r['s_per_it'] / 3600:.1f} h |"
        )


if __name__ == "__main__":
    main()
