"""int8 targets: the weight grid each target writes, the rule that makes `portable` files
compute the same numbers on every CPU, QAT simulating the target, and verification that
names the CPU it ran on. Every assertion is a rule that holds on AVX2-only, AVX-512 and
VNNI/AMX machines alike; the AVX2 kernels themselves are exercised on an AVX2-only CPU made
from this one: under qemu where it is installed (.ci/run installs it), and natively with CPUID
masked where the CPU can fault CPUID (benchmarks/avx2)."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from edgekd.bench.machine import int8_class, machine_info
from edgekd.errors import EdgekdError
from edgekd.onnx_export import export_onnx, read_metadata, run_onnx, verify, verify_int8
from edgekd.quant.ptq import quantize_onnx
from edgekd.quant.plan import load_graph, rule_plan
from edgekd.quant.qat import QConv2d, activation_ranges, apply_transform, qat_transform, snap_weights
from edgekd.quant.targets import TARGETS, resolve_target, saturating_cpu

from test_compress import SPEC, tiny_data

AVX2 = ["sse4_2", "avx", "avx2", "fma", "f16c"]
VNNI = AVX2 + ["avx512f", "avx512bw", "avx512_vnni"]


def int8_weights(path: Path) -> list[np.ndarray]:
    """The integer weight tensors of a QDQ file (int8 initializers feeding a DequantizeLinear)."""
    m = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return [inits[n.input[0]] for n in m.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
            and inits[n.input[0]].ndim >= 2]


def test_cpu_classes_and_targets_follow_the_saturation_rule():
    assert saturating_cpu(AVX2, "x86_64") and saturating_cpu(AVX2 + ["avx512f", "avx512bw"], "x86_64")
    assert not saturating_cpu(VNNI, "x86_64") and not saturating_cpu(AVX2 + ["avx_vnni"], "x86_64")
    assert not saturating_cpu(["neon", "asimd"], "aarch64")
    for t in TARGETS.values():  # 7-bit weights are exact everywhere; 8-bit ones wherever no saturation
        assert t.exact_on(VNNI, "x86_64") and t.exact_on(["asimd"], "aarch64")
        assert t.exact_on(AVX2, "x86_64") == (t.weight_qmax * 255 * 2 <= 32767)
    assert resolve_target("native", AVX2, "x86_64").name == "x86_avx2"
    assert resolve_target("native", VNNI, "x86_64").name == "x86_vnni"
    assert resolve_target("native", ["asimd"], "aarch64").name == "arm"
    assert int8_class(AVX2, "x86_64") == "x86-64 AVX2 without VNNI"
    assert int8_class(VNNI + ["amx_int8"], "x86_64") == "x86-64 AMX-INT8"
    with pytest.raises(EdgekdError, match=r"quantize.target: unknown target 'avx3'.*portable"):
        resolve_target("avx3")


@pytest.mark.parametrize("target", ["portable", "x86_vnni"])
def test_each_target_writes_weights_on_its_grid_and_says_so(tmp_path, target):
    data = tiny_data()
    fp32 = export_onnx(_cnn(), tmp_path / "f.onnx", 32)
    q = quantize_onnx(fp32, tmp_path / "q.onnx", data.normalize(data.train.images[:32]).numpy(), target=TARGETS[target])
    qmax = TARGETS[target].weight_qmax
    ws = int8_weights(q)
    assert len(ws) >= 4
    assert max(int(np.abs(w).max()) for w in ws) == qmax  # the largest weight of a channel sits on the grid's edge
    assert read_metadata(q)["edgekd.int8_target"] == target and read_metadata(q)["edgekd.weight_qmax"] == str(qmax)


def _model() -> nn.Module:
    from edgekd.models import build

    return build(SPEC).eval()


def _cnn() -> nn.Module:
    """A plain conv-BN-ReLU CNN: at its default init its activations and logits have useful sizes
    (an untrained MobileNet's are ~1e-9, which makes onnxruntime widen weight scales to fit int32 biases)."""
    torch.manual_seed(0)
    block = lambda i, o, **kw: [nn.Conv2d(i, o, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
    return nn.Sequential(*block(3, 32), *block(32, 64, stride=2), *block(64, 64, groups=64), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()


def test_portable_file_computes_the_reference_math_with_this_cpus_int8_kernels(tmp_path):
    """The rule behind `portable`: no pair of u8*s7 products can saturate an int16, so the int8
    kernels of any CPU (this one whatever it is) give the reference Q/DQ arithmetic."""
    data = tiny_data()
    fp32 = export_onnx(_cnn(), tmp_path / "f.onnx", 32)
    calib = data.normalize(data.train.images[:32]).numpy()
    x = data.normalize(data.test.images).numpy()
    m = machine_info()
    for name in ("portable", "x86_vnni"):
        q = quantize_onnx(fp32, tmp_path / f"{name}.onnx", calib, target=TARGETS[name])
        kernels, reference = run_onnx(q, x), run_onnx(q, x, int8_kernels=False)
        spread = float(np.median(reference.std(1)))
        close = np.abs(kernels - reference).max() <= 0.05 * spread
        if TARGETS[name].exact_on(m["isa"], m["arch"]):
            assert close, (name, int8_class(m["isa"], m["arch"]), np.abs(kernels - reference).max(), spread)


def _saturating_model(path: Path) -> Path:
    """A 1x1 conv whose u8 inputs (255) meet large equal s8 weights: 8-bit pair sums overflow int16."""
    conv = nn.Conv2d(64, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    m = nn.Sequential(nn.ReLU(), conv).eval()
    torch.onnx.export(m, torch.ones(1, 64, 4, 4), str(path), dynamo=False, input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "b"}})
    return path


AVX2_CHECK = """
import sys, numpy as np
from edgekd.bench.machine import machine_info
from edgekd.onnx_export import run_onnx
m = machine_info()
assert "avx512f" not in m["isa"] and "avx2" in m["isa"], m
# the report names what the CPU has and CPUID hides (the kernel's /proc/cpuinfo is not masked),
# and claims no VNNI or AMX that only /proc/cpuinfo reports
host, hidden = set(open("/proc/cpuinfo").read().split()), set(m.get("hidden_isa", []))
assert host & {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"} <= hidden <= host, m
assert not hidden or not set(m["isa"]) & {"avx_vnni", "amx_int8", "amx_bf16"}, m
x = np.ones((1, 64, 4, 4), np.float32)
for p in sys.argv[1:]:
    k, r = run_onnx(p, x), run_onnx(p, x, int8_kernels=False)
    print(p, float(np.abs(k - r).max() / np.abs(r).max()))
"""


REPO = Path(__file__).resolve().parents[1]


# how the benchmarks run a program on an AVX2-only x86 (loaded from its file: benchmarks/ is no package)
_spec = importlib.util.spec_from_file_location("avx2_launch", REPO / "benchmarks/avx2/launch.py")
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

# the two ways to run Python on this x86 CPU seen as an AVX2-only one: emulated (slow, works anywhere
# qemu-user is installed) and native with CPUID masked (benchmarks/avx2, where the CPU can fault CPUID);
# the mask's library is built into tmp, so parallel test runs never share one
AVX2_CPUS = {
    "qemu": lambda tmp: launch.PREFIX["qemu"],
    "mask": lambda tmp: ["env", f"EDGEKD_CPUID_MASK={tmp / 'mask.so'}", *launch.PREFIX["mask"]],
}


@pytest.mark.parametrize("cpu", list(AVX2_CPUS))
def test_on_an_avx2_only_cpu_8bit_weights_saturate_and_portable_ones_do_not(tmp_path, cpu):
    why = "not an x86-64 CPU" if machine_info()["arch"] != "x86_64" else launch.missing(cpu)
    if why:
        pytest.skip(f"no {cpu} AVX2-only CPU here: {why}")
    prefix = AVX2_CPUS[cpu]
    f = _saturating_model(tmp_path / "sat.onnx")
    calib = np.ones((4, 64, 4, 4), np.float32)
    files = [quantize_onnx(f, tmp_path / f"{t}.onnx", calib, target=TARGETS[t]) for t in ("portable", "x86_vnni")]
    proc = subprocess.run([*prefix(tmp_path), str(Path(sys.executable).resolve()), "-c", AVX2_CHECK, *map(str, files)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rel = {Path(line.split()[0]).stem: float(line.split()[1]) for line in proc.stdout.splitlines() if line.strip()}
    assert rel["portable"] < 1e-3, rel  # the same numbers as the reference math
    assert rel["x86_vnni"] > 0.3, rel  # int16 saturation: about half the true sum


@pytest.mark.parametrize("target", ["portable", "x86_vnni"])
def test_qat_simulates_the_targets_grid_so_model_and_file_agree(tmp_path, target):
    from edgekd.train import TrainConfig, fit

    t = TARGETS[target]
    data = tiny_data()
    plan = rule_plan(load_graph(export_onnx(_cnn(), tmp_path / "fp32.onnx", 32)), True, [])
    wrap = qat_transform(t.weight_qmax, plan)
    q = apply_transform(apply_transform(_cnn(), "fold_bn"), wrap)
    fit(q, data, TrainConfig(epochs=1, loss="ce", lr=0.01, eval_every=0), torch.device("cpu"), seed=0)
    q.eval()
    snapped = snap_weights(copy.deepcopy(q))
    onnx_path = export_onnx(snapped, tmp_path / "snap.onnx", 32)
    ranges = activation_ranges(q)
    int8 = quantize_onnx(onnx_path, tmp_path / "q.onnx", data.normalize(data.train.images[:32]).numpy(), target=t,
                         plan=plan, activation_ranges=ranges)
    # the file quantizes each layer's input on the range QAT learned, not a re-calibrated one
    m = onnx.load(str(int8))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    feeding = {n.input[1]: n.input[0] for n in onnx.load(str(onnx_path)).graph.node if n.op_type in ("Conv", "Gemm")}
    for weight, (lo, hi) in ranges.items():
        q_node = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == feeding[weight])
        assert float(inits[q_node.input[1]]) == pytest.approx((hi - lo) / 255, rel=1e-5)
    # re-quantizing the snapped weights reproduces them: the file holds the trained int8 weights
    snapped_convs = [m.weight.detach() for m in snapped.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:]
    in_file = int8_weights(int8)
    assert len(in_file) == len(snapped_convs)
    for w in snapped_convs:
        scale = w.abs().flatten(1).amax(1) / t.weight_qmax
        grid = torch.round(w / scale.view(-1, *[1] * (w.ndim - 1))).numpy().astype(np.int8)
        assert any(f.shape == grid.shape and np.array_equal(f, grid) for f in in_file)
    res = verify(int8, q, data, n=64, max_abs=None, min_agreement=0.9, run=lambda x: run_onnx(int8, x, int8_kernels=False))
    assert res["top1_agreement"] >= 0.9
    # the recorded transform rebuilds the same simulation: stem fp32, the rest on the target's grid
    again = apply_transform(apply_transform(_cnn(), "fold_bn"), wrap)
    assert [type(m).__name__ for m in again.modules()] == [type(m).__name__ for m in q.modules()]
    assert {m.weight_qmax for m in again.modules() if isinstance(m, QConv2d)} == {t.weight_qmax}
    # a checkpoint from before plans (a string transform) still rebuilds
    legacy = apply_transform(apply_transform(_cnn(), "fold_bn"), "qat_fp32_stem_w7")
    assert [type(m).__name__ for m in legacy.modules()] == [type(m).__name__ for m in q.modules()]


def test_verification_on_a_cpu_that_is_not_the_targets_says_so_instead_of_failing(tmp_path, monkeypatch, caplog):
    import edgekd.bench.machine as machine

    data = tiny_data()
    model = _model()
    fp32 = export_onnx(copy.deepcopy(model), tmp_path / "f.onnx", 32)
    calib = data.normalize(data.train.images[:32]).numpy()
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calib, target=TARGETS["x86_vnni"])
    monkeypatch.setattr(machine, "machine_info", lambda: {"cpu": "test", "arch": "x86_64", "cores": 2, "isa": AVX2})
    res = verify_int8(q, model, data, 64, min_agreement=0.0)
    assert res["verified_on"] == "x86-64 AVX2 without VNNI" and res["target"] == "x86_vnni"
    assert res["arithmetic"].startswith("reference Q/DQ math") and "this_cpu_kernels" in res
    assert "saturate" in res["note"] and "x86_vnni" in caplog.text
    p = quantize_onnx(fp32, tmp_path / "p.onnx", calib, target=TARGETS["portable"])
    res = verify_int8(p, model, data, 64, min_agreement=0.0)
    assert res["arithmetic"] == "this CPU's int8 kernels" and "note" not in res
