"""Inference backends: each equals eager float32 with the shipped weights; lazy building; the choice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from network_helpers import TINY, rel_error

import ldct_clip.inference.backend_runners as backend_runners
import ldct_clip.inference.backends as backends
from ldct_clip.errors import InputError
from ldct_clip.inference import BACKENDS, available_backends, choose_backend, cpu_description, prepare_network
from ldct_clip.networks import CLIPDenoiser

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "lowdose_ct_denoising"
SHIPPED = BUNDLE / "models" / "model.pt"
CPU_BACKENDS = available_backends("cpu")
EAGER = ("eager", "eager_infer", "eager_nchw")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    # ONNX exports and remembered choices go to a fresh folder, never the user's ~/.cache
    monkeypatch.setenv("LDCT_CLIP_CACHE_DIR", str(tmp_path / "ldct-clip-cache"))


def shipped_network() -> CLIPDenoiser:
    model = CLIPDenoiser(encoder_weights=None).eval()
    model.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True)["model"])
    return model


@pytest.fixture(scope="module")
def shipped_case():
    """The shipped weights, two small batches (one of odd size) and their eager float32 outputs."""
    model = shipped_network()
    inputs = [torch.rand(2, 1, 64, 96), torch.rand(1, 1, 97, 131)]
    with torch.no_grad():
        return inputs, [model(x) for x in inputs]


def check_backend(name: str, network, inputs, expected) -> None:
    prepared = prepare_network(network, name, device="cpu")
    for x, y in zip(inputs, expected):
        got = prepared(x)
        assert prepared.chosen == name
        assert got.dtype == torch.float32 and got.shape == y.shape
        assert rel_error(got, y) < 1e-4, name


def test_eager_backends_equal_eager_float32():
    model = CLIPDenoiser(**TINY).eval()
    inputs = [torch.rand(2, 1, 32, 48), torch.rand(1, 1, 37, 41)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    for name in EAGER:
        check_backend(name, model, inputs, expected)


@pytest.mark.slow
def test_eager_backends_equal_eager_float32_with_shipped_weights(shipped_case):
    network = shipped_network()
    for name in EAGER:
        check_backend(name, network, *shipped_case)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inductor", "onnxruntime", "openvino"])
def test_compiled_backends_equal_eager_float32_with_shipped_weights(
    name, shipped_case, tmp_path_factory, monkeypatch
):
    if name not in CPU_BACKENDS:
        pytest.skip(f"{name} is not installed (optional extra)")
    # ONNX Runtime and OpenVINO share one ONNX export of the shipped weights
    monkeypatch.setenv("LDCT_CLIP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "shared-cache"))
    check_backend(name, shipped_network(), *shipped_case)


def test_network_is_built_lazily_after_the_weights_are_loaded():
    # as in the bundle: the network object exists first, a CheckpointLoader fills it when the run starts
    source = CLIPDenoiser(**TINY).eval()
    target = CLIPDenoiser(**TINY).eval()
    prepared = prepare_network(target, "eager_infer", device="cpu")
    assert prepared.chosen is None  # nothing built yet
    target.load_state_dict(source.state_dict())
    x = torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), source(x), rtol=1e-4, atol=1e-6)
    # weights written in place later (another checkpoint) are seen too
    with torch.no_grad():
        for param in target.parameters():
            param.mul_(0.5)
        torch.testing.assert_close(prepared(x), target(x), rtol=1e-4, atol=1e-6)


def test_fixed_batch_pads_short_batches_and_splits_long_ones():
    calls = []

    def runner(x):
        calls.append(x.shape[0])
        return x * 2

    fixed = backend_runners._FixedBatch(runner, batch=4)
    x = torch.arange(7.0).view(7, 1, 1, 1)
    torch.testing.assert_close(fixed(x), x * 2)
    assert calls == [4, 4]  # 4 + 3 padded to 4
    torch.testing.assert_close(fixed(x[:1]), x[:1] * 2)
    assert calls[-1] == 4


def test_unknown_or_unavailable_backends_are_input_errors():
    with pytest.raises(InputError, match="unknown backend 'tvm'"):
        prepare_network(CLIPDenoiser(**TINY), "tvm")
    prepared = prepare_network(CLIPDenoiser(**TINY), "cudagraphs", device="cpu")
    with pytest.raises(InputError, match="cannot run on cpu"):
        prepared(torch.rand(1, 1, 16, 16))
    bf16 = available_backends("cpu", amp_dtype=torch.bfloat16)
    # float32-only runtimes, and the plain forward (its bf16 output image costs 0.06-0.19 dB), are out
    assert "onnxruntime" not in bf16 and "eager" not in bf16 and "eager_infer" in bf16
    assert set(available_backends("cpu")) <= set(BACKENDS)


def test_choice_is_the_fastest_by_measurement_and_is_remembered(monkeypatch):
    model = CLIPDenoiser(**TINY).eval()
    measured = {"eager": 2.0, "eager_nchw": 1.0}
    probes = []

    def fake_probe(network, example, device, amp_dtype, channels_last, names, repeats):
        probes.append(tuple(example.shape))
        return {n: measured[n] for n in names}, {n: (lambda x: x) for n in names}, True

    monkeypatch.setattr(backends, "_probe", fake_probe)
    shape = (2, 1, 32, 48)
    assert choose_backend(model, shape, candidates=["eager", "eager_nchw"]) == "eager_nchw"
    assert probes == [shape]
    measured["eager"] = 0.1  # a later run on this machine does not measure again
    assert choose_backend(model, shape, candidates=["eager", "eager_nchw"]) == "eager_nchw"
    assert len(probes) == 1
    record = json.loads((backends.backend_cache_dir() / "backend_choice.json").read_text())
    (entry,) = record.values()
    assert entry["backend"] == "eager_nchw" and entry["seconds_per_batch"] == {
        "eager": 2.0,
        "eager_nchw": 1.0,
    }
    # another shape is another measurement; within the margin the simpler (earlier) backend wins
    measured.update(eager=1.02, eager_nchw=1.0)
    assert choose_backend(model, (1, 1, 32, 48), candidates=["eager", "eager_nchw"]) == "eager"
    assert len(probes) == 2
    assert choose_backend(model, shape, candidates=["eager", "eager_nchw"], use_cache=False) == "eager"
    # whole slices (512 wide and more) are probed on half their width: half the probe's memory
    assert choose_backend(model, (1, 1, 32, 512), candidates=["eager", "eager_nchw"]) == "eager"
    assert probes[-1] == (1, 1, 32, 256)


def test_probe_holds_one_candidate_besides_the_fastest(monkeypatch):
    """The probe builds, times and releases one backend at a time, keeping only the fastest so far: its
    memory is the largest backend's, not the sum of all of them."""
    model = CLIPDenoiser(**TINY).eval()
    real_build = backends.build_backend
    live, most = set(), []

    class Runner:
        def __init__(self, name, runner):
            self.name, self.runner = name, runner
            live.add(name)
            most.append(len(live))

        def __call__(self, x):
            return self.runner(x)

        def __del__(self):
            live.discard(self.name)

    def build(name, network, example, device, amp_dtype, channels_last):
        return Runner(name, real_build("eager", network, example, device, amp_dtype, channels_last))

    monkeypatch.setattr(backends, "build_backend", build)
    names = ["eager", "eager_infer", "eager_nchw"]
    seconds, kept, _ = backends._probe(
        model, torch.rand(1, 1, 32, 48), torch.device("cpu"), None, False, names, 2
    )
    assert set(seconds) == set(names) and max(most) <= 2
    assert list(kept) == [min(seconds, key=seconds.get)] and len(live) == 1


def test_choice_made_while_the_load_changed_is_not_remembered(monkeypatch):
    """Candidates are timed one after another: when the fastest one's time moves between its turn and a
    second timing after the others (another process started, say), the choice serves this run only."""
    model = CLIPDenoiser(**TINY).eval()
    calls, load_changes_at = [], [9]

    def build(name, network, example, device, amp_dtype, channels_last):
        def run(x):
            calls.append(name)
            # eager_nchw is the faster (0.02 s against 0.04 s a call) until the load changes: after the
            # others' turn (call 9: its warm-up and 3 timings, then eager's), it takes 0.06 s
            slow = len(calls) >= load_changes_at[0]
            time.sleep(0.04 if name == "eager" else 0.06 if slow else 0.02)
            return network(x)

        return run

    monkeypatch.setattr(backends, "build_backend", build)
    shape = (1, 1, 32, 48)
    assert choose_backend(model, shape, candidates=["eager_nchw", "eager"]) == "eager_nchw"
    assert not (backends.backend_cache_dir() / "backend_choice.json").exists()
    calls.clear()
    load_changes_at[0] = 10**6  # a steady machine: the same choice, remembered
    assert choose_backend(model, shape, candidates=["eager_nchw", "eager"]) == "eager_nchw"
    (entry,) = json.loads((backends.backend_cache_dir() / "backend_choice.json").read_text()).values()
    assert entry["backend"] == "eager_nchw"


def test_auto_probes_real_backends_and_runs_the_winner(monkeypatch):
    model = CLIPDenoiser(**TINY).eval()
    # millisecond calls of a tiny network on a busy test machine drift more than whole slices do
    monkeypatch.setattr(backends, "PROBE_DRIFT", float("inf"))
    # the compiled ones are slow; a batch this small is measured only when asked (probe_min_pixels)
    prepared = prepare_network(model, "auto", device="cpu", candidates=EAGER, probe_min_pixels=0)
    x = torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(prepared(x), expected, rtol=1e-4, atol=1e-6)
    assert prepared.chosen in EAGER
    (entry,) = json.loads((backends.backend_cache_dir() / "backend_choice.json").read_text()).values()
    assert set(entry["seconds_per_batch"]) == set(EAGER)  # each was measured


@pytest.mark.parametrize("wrong", [float("inf"), float("nan"), 1e-3])
def test_auto_never_chooses_a_backend_whose_output_is_wrong(monkeypatch, wrong):
    """A fast backend that computes something else (a miscompiled kernel, a broken runtime) is left out of
    the choice: its warm-up output is held to the float32 forward."""
    model = CLIPDenoiser(**TINY).eval()
    real_build = backends.build_backend

    def build(name, network, example, device, amp_dtype, channels_last):
        runner = real_build("eager", network, example, device, amp_dtype, channels_last)
        if name == "eager":
            return lambda x: (time.sleep(0.05), runner(x))[1]  # right, and slower
        return lambda x: runner(x) * (1 + wrong) if wrong < 1 else runner(x) + wrong

    monkeypatch.setattr(backends, "build_backend", build)
    shape = (1, 1, 32, 48)
    assert choose_backend(model, shape, candidates=["eager", "eager_nchw"], use_cache=False) == "eager"
    with pytest.raises(InputError, match="could run"):
        choose_backend(model, shape, candidates=["eager_nchw"], use_cache=False)


def test_cpu_description_names_the_cpu():
    cpu = cpu_description()
    assert cpu["model_name"] and cpu["cores"] >= 1


@pytest.mark.parametrize("overlay", ["inference_trt.json", "inference_onnx.json"])
def test_bundle_overlays_parse(overlay):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / overlay)])
    parser.update({"device": "cpu"})
    assert parser.get_parsed_content("amp") == "fp32"  # the runtime decides the precision, not autocast
    backend = parser.get_parsed_content("backend")
    assert backend in BACKENDS
    if overlay == "inference_trt.json":
        args = parser.get_parsed_content("trt_args")
        assert args["precision"] == "fp32" and args["dynamic_batchsize"][0] == 1 and args["fallback"]
        # without TensorRT and a GPU, MONAI's trt_compile leaves the network as it is
        assert isinstance(parser.get_parsed_content("network"), torch.nn.Module)
    else:
        assert backend == "onnxruntime"


@pytest.mark.slow
@pytest.mark.skipif("onnxruntime" not in CPU_BACKENDS, reason="onnxruntime is optional (ldct-clip[onnx])")
def test_onnx_overlay_runs_on_cpu(shipped_case, tmp_path_factory, monkeypatch):
    from monai.bundle import ConfigParser

    # the ONNX export of the shipped weights made by the backend test above, where it ran
    monkeypatch.setenv("LDCT_CLIP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "shared-cache"))

    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "inference_onnx.json")]
    )
    parser.update({"device": "cpu"})
    network = parser.get_parsed_content("network")
    network.load_state_dict(shipped_network().state_dict())  # what the bundle's checkpoint loader does
    # the predictor runs prepare_network(network, backend=@backend); where it is not wired yet, do it here
    predictor = parser.get_parsed_content("predictor")
    prepared = getattr(predictor, "network", None)
    if not isinstance(prepared, backends.PreparedNetwork):
        prepared = prepare_network(network, parser.get_parsed_content("backend"), device="cpu")
    inputs, expected = shipped_case
    for x, y in zip(inputs, expected):
        assert rel_error(prepared(x), y) < 1e-4
    assert prepared.chosen == "onnxruntime"


@pytest.mark.slow
def test_bf16_keeps_the_output_conv_in_float32(shipped_case):
    # bf16 on the whole network rounds the image to 8 bits of mantissa (0.06-0.19 dB PSNR with the shipped
    # weights); CLIPDenoiser.infer keeps the output conv in float32 under autocast (< 0.015 dB)
    inputs, expected = shipped_case
    prepared = prepare_network(shipped_network(), "eager_infer", device="cpu", amp_dtype=torch.bfloat16)
    got = prepared(inputs[0])
    assert got.dtype == torch.float32
    assert not torch.equal(got, got.bfloat16().float())  # not a bf16 image cast back
    assert rel_error(got, expected[0]) < 1e-2


def test_auto_does_not_probe_batches_smaller_than_a_slice():
    model = CLIPDenoiser(**TINY).eval()
    prepared = prepare_network(model, "auto", device="cpu")
    with torch.no_grad():
        prepared(torch.rand(2, 1, 32, 48))
    assert prepared.chosen == "eager_infer"
    assert not (backends.backend_cache_dir() / "backend_choice.json").exists()


def _signal_stack() -> tuple[int, int, int]:
    import ctypes

    stack = backend_runners._SignalStackKept._Stack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    return stack.ss_sp or 0, stack.ss_flags, stack.ss_size


@pytest.mark.slow
@pytest.mark.skipif("openvino" not in CPU_BACKENDS, reason="openvino is not installed (optional extra)")
def test_openvino_leaves_the_signal_stack_as_it_was(shipped_case, tmp_path_factory, monkeypatch):
    """OpenVINO's compile installs its own alternate signal stack and frees it with the model: Ctrl-C then
    crashed the process (Python's handlers run on that stack) instead of removing the staged output."""
    import gc

    # the ONNX export of the shipped weights that the equality test above made
    monkeypatch.setenv("LDCT_CLIP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "shared-cache"))
    before = _signal_stack()
    prepared = prepare_network(shipped_network(), "openvino", device="cpu")
    prepared(shipped_case[0][1])
    assert _signal_stack() == before
    del prepared
    gc.collect()
    assert _signal_stack() == before
