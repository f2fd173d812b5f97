#!/usr/bin/env bash
# The GPU route of ldct-clip, measured on one GPU in under 8 minutes (issue 13, scope 4). One script:
# it installs what it needs with pip where it can (and goes on without what it cannot get) and uses
# nothing outside the repository. Prints:
#   1. the GPU tests (pytest -m gpu);
#   2. slices/s at 512x512 for eager fp32 (TF32 off), eager bf16, compiled (inductor, bf16) and TensorRT
#      (MONAI trt_compile, if tensorrt is installed) at batch 16/32/64, with the peak GPU memory of each;
#   3. the bf16 PSNR cost with the shipped weights on a simulated quarter-dose phantom (made on the fly),
#      under the "paper" and "redcnn" protocols;
#   4. a 512x512x300 series end to end through `ldct-clip denoise` (wall time, peak host RSS).
#
#   bash benchmarks/gpu_check.sh            # everything, ~6-8 min on an H100/H200-class GPU
#   BATCHES="16 32" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
DEADLINE=${DEADLINE:-450}  # seconds: later sections shrink or skip to finish within 8 minutes
export BATCHES=${BATCHES:-"16 32 64"} DEADLINE START_EPOCH=$(date +%s)
export LDCT_CLIP_CACHE_DIR=${LDCT_CLIP_CACHE_DIR:-$(mktemp -d)/ldct-clip-cache}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
section() { echo; echo "== $1 (t = $((SECONDS - START)) s)"; }

section "setup"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! $PY -c "import ldct_clip, torch, monai, pytest" 2>/dev/null; then
    $PY -m pip install -q -e ".[test]" || echo "pip install of ldct-clip failed: going on with what is installed"
fi
$PY -c "import tensorrt, polygraphy" 2>/dev/null || timeout 120 $PY -m pip install -q tensorrt polygraphy onnx onnxscript \
    || echo "tensorrt/polygraphy not installable here: the TensorRT rows are skipped"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
$PY - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA GPU: nothing to measure")
print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
[ $? -eq 0 ] || exit 1

section "GPU tests: pytest -m gpu"
timeout 200 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15

section "throughput at 512x512 (slices/s), peak GPU memory"
timeout 300 $PY - <<'EOF'
import os, time
import torch
from ldct_clip.inference import prepare_network
from ldct_clip.networks import CLIPDenoiser

deadline = int(os.environ["START_EPOCH"]) + int(os.environ["DEADLINE"]) - 150  # leave time for PSNR and e2e
state = torch.load("bundles/lowdose_ct_denoising/models/model.pt", map_location="cpu", weights_only=True)["model"]
torch.backends.cudnn.benchmark = True

def network():
    model = CLIPDenoiser().eval()
    model.load_state_dict(state)
    return model.cuda()

def trt_network(batch, precision):
    from monai.networks import trt_compile
    base = os.path.join(os.environ["LDCT_CLIP_CACHE_DIR"], f"trt_{precision}_{batch}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    args = {"precision": precision, "dynamic_batchsize": [1, batch, batch],
            "build_args": {"builder_optimization_level": 3, "precision_constraints": "obey"}}
    return trt_compile(network(), base, args=args)

configs = [("eager fp32 (TF32 off)", "eager", None), ("eager bf16 (output conv fp32)", "eager_infer", torch.bfloat16),
           ("compiled (inductor) bf16", "inductor", torch.bfloat16), ("TensorRT fp32", "trt", "fp32"),
           ("TensorRT bf16", "trt", "bf16")]
try:
    import tensorrt  # noqa: F401
    import polygraphy  # noqa: F401
except ImportError:
    configs = [c for c in configs if c[1] != "trt"]
    print("(tensorrt/polygraphy not installed: no TensorRT rows)")
print("| path | batch | slices/s | s/slice | peak GPU memory GiB | build s |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for label, backend, precision in configs:
    for batch in [int(b) for b in os.environ["BATCHES"].split()]:
        if time.time() > deadline:
            print(f"| {label} | {batch} | skipped (time budget) | | | |")
            continue
        torch.backends.cudnn.allow_tf32 = not (backend == "eager" and precision is None)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        x = torch.rand(batch, 1, 512, 512, device="cuda")
        started = time.perf_counter()
        try:
            if backend == "trt":
                model = trt_network(batch, precision)
                run = lambda: model(x)  # noqa: E731
            else:
                model = prepare_network(network(), backend, device="cuda", amp_dtype=precision)
                run = lambda: model(x)  # noqa: E731
            with torch.no_grad():
                run()
                torch.cuda.synchronize()
                build = time.perf_counter() - started
                times = []
                for _ in range(5):
                    t = time.perf_counter(); run(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
        except Exception as error:  # noqa: BLE001 - report and go on
            print(f"| {label} | {batch} | failed: {type(error).__name__}: {str(error).splitlines()[0][:100]} | | | |")
            continue
        best = min(times)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"| {label} | {batch} | {batch / best:.1f} | {best / batch:.4f} | {peak:.1f} | {build:.0f} |", flush=True)
        del model, run
EOF

section "bf16 PSNR cost, shipped weights, simulated quarter dose (phantom made here)"
timeout 150 $PY - <<'EOF'
import os
import torch
from ldct_clip.data.phantom import make_phantom
from ldct_clip.evaluation.metrics import psnr
from ldct_clip.conventions import hu_to_model, model_to_hu
from ldct_clip.networks import CLIPDenoiser
from ldct_clip.simulation import simulate_low_dose

clean = make_phantom(size=512, slices=8, seed=3)
low = simulate_low_dose(clean, dose=0.25, seed=11, workers=min(8, os.cpu_count() or 1), progress=False)
clean_hu = torch.as_tensor(clean.as_tensor()[0]).permute(2, 0, 1)  # (slices, H, W)
low_hu = torch.as_tensor(torch.as_tensor(low)[0]).permute(2, 0, 1).float()
model = CLIPDenoiser().eval()
model.load_state_dict(torch.load("bundles/lowdose_ct_denoising/models/model.pt", map_location="cpu", weights_only=True)["model"])
model = model.cuda()
torch.backends.cudnn.allow_tf32 = False
x = hu_to_model(low_hu.clamp(min=-1024)).unsqueeze(1).cuda()
out = {}
with torch.no_grad():
    out["fp32"] = model_to_hu(model(x).float()).squeeze(1).cpu()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out["bf16 (infer: output conv fp32)"] = model_to_hu(model.infer(x).float()).squeeze(1).cpu()
        out["bf16 (plain forward)"] = model_to_hu(model(x).float()).squeeze(1).cpu()
print("| protocol | PSNR low dose | PSNR fp32 | path | PSNR bf16 | bf16 cost dB |")
print("| --- | ---: | ---: | --- | ---: | ---: |")
for protocol in ("paper", "redcnn"):
    p = {k: float(psnr(v, clean_hu, protocol).mean()) for k, v in out.items()}
    p_low = float(psnr(low_hu, clean_hu, protocol).mean())
    for k in [k for k in out if k != "fp32"]:
        print(f"| {protocol} | {p_low:.3f} | {p['fp32']:.3f} | {k} | {p[k]:.3f} | {p['fp32'] - p[k]:.3f} |")
EOF

section "512x512x300 series end to end: ldct-clip denoise --device cuda"
$PY - "$WORK" <<'EOF'
import sys
import nibabel as nib
import numpy as np
from ldct_clip.data.phantom import make_phantom
base = make_phantom(size=512, slices=30, seed=1).as_tensor()[0].numpy()
volume = np.concatenate([base] * 10, axis=-1)  # 300 slices
volume = volume + np.random.default_rng(0).normal(0, 20, volume.shape).astype(np.float32)
nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([-0.8, -0.8, 1.0, 1.0])), f"{sys.argv[1]}/series.nii.gz")
print(f"input: {volume.shape}, {volume.nbytes / 2**20:.0f} MB float32")
EOF
DENOISE=(timeout 240 $PY -m ldct_clip denoise "$WORK/series.nii.gz" "$WORK/out.nii.gz" --device cuda --no-progress)
if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$WORK/time.txt" "${DENOISE[@]}" 2>&1 | tail -5
    grep -E "Elapsed \(wall|Maximum resident" "$WORK/time.txt"
else
    T0=$SECONDS; "${DENOISE[@]}" 2>&1 | tail -5; echo "wall: $((SECONDS - T0)) s (no /usr/bin/time for the peak RSS)"
fi
section "done"
