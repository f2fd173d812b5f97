"""Training speed of the paper's CT configuration: iterations per second of one full training step.

One step is what ``SupervisedTrainer`` does per iteration with the bundle's train config: a batch of
noisy/clean 128^2 crops, mixup (p = 0.5, so half the steps mix), the forward pass of CLIPDenoiser RN50
(random-init encoder: the cost is that of the CLIP weights; feature augmentation on, encoder BatchNorm
in train mode as in the paper), L1 loss, backward, gradient-norm clipping at 0.01 on the trainable
parameters, an AdamW step and a cosine LR step. Data loading is not included (the training loader
prepares batches in worker processes, in parallel with the step).

    python benchmarks/training_speed.py                        # batch 16, 128^2, 10 timed iterations
    python benchmarks/training_speed.py --device cuda --amp    # on a GPU with mixed precision
"""

from __future__ import annotations

import argparse
import time

import torch

from ldct_clip.networks import CLIPDenoiser
from ldct_clip.training import Mixup, constant_then_cosine, trainable_parameters


def measure(
    batch: int, crop: int, iterations: int, warmup: int, device: str, amp: bool, threads: int | None
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device_ = torch.device(device)
    model = CLIPDenoiser(clip_model="RN50").to(device_).train()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4, betas=(0.9, 0.999))
    scheduler = constant_then_cosine(optimizer, 40000, constant_iterations=0)
    mixup = Mixup(0.5, 1.2)
    loss_fn = torch.nn.L1Loss()
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device_.type == "cuda")
    clean = torch.rand(batch, 1, crop, crop, device=device_) * 0.5
    noisy = clean + torch.randn_like(clean) * 5 / 255

    def step() -> float:
        image, label = mixup({"image": noisy, "label": clean}, device_)
        optimizer.zero_grad()
        with torch.autocast(device_.type, enabled=amp and device_.type == "cuda"):
            loss = loss_fn(model(image), label)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 0.01)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device_.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        step()
    if device_.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iterations
    # CPU seconds (all threads) per step: on a shared machine the wall time depends on the other load
    cpu_seconds = (time.process_time() - cpu_start) / iterations
    return {
        "device": torch.cuda.get_device_name(device_)
        if device_.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch": batch,
        "crop": crop,
        "amp": amp and device_.type == "cuda",
        "s_per_it": seconds,
        "cpu_s_per_it": cpu_seconds,
        "it_per_s": 1.0 / seconds,
        "hours_40k": 40000 * seconds / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    r = measure(args.batch, args.crop, args.iterations, args.warmup, args.device, args.amp, args.threads)
    print("| device | batch | crop | AMP | s/iteration | iterations/s | 40k iterations | CPU s/iteration |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {r['device']} | {r['batch']} | {r['crop']}^2 | {'yes' if r['amp'] else 'no'} | {r['s_per_it']:.3f} "
        f"| {r['it_per_s']:.3f} | {r['hours_40k']:.1f} h | {r['cpu_s_per_it']:.2f} |"
    )


if __name__ == "__main__":
    main()
