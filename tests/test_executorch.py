"""ExecuTorch (.pte, XNNPACK) export, verification and benchmarking on a tiny model; skipped
where the optional `edgekd[mobile]` extra is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from edgekd.bench.measure import bench_models  # noqa: E402
from edgekd.cli import main  # noqa: E402
from edgekd.errors import EdgekdError  # noqa: E402
from edgekd.models import build  # noqa: E402
from edgekd.pte_export import export_pte, pte_op_profile, pte_runner, read_sidecar, write_sidecar, xnnpack_kind  # noqa: E402,E501


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = build({"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25})
    x = torch.randn(24, 3, 32, 32)
    with torch.no_grad():  # BN statistics of the data and a classifier with O(1) logits
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = None
        m.train()(x)
        torch.nn.init.normal_(m.classifier[-1].weight, std=1.0)
    return m.eval(), x


@pytest.fixture(scope="module")
def programs(tiny, tmp_path_factory):
    m, x = tiny
    d = tmp_path_factory.mktemp("pte")
    fp32 = export_pte(m, d / "fp32.pte", 32)
    int8 = export_pte(m, d / "int8.pte", 32, calib=x.numpy())
    write_sidecar(fp32, {"edgekd.input_size": "[3, 32, 32]"})
    return fp32, int8


def test_fp32_program_matches_pytorch_and_int8_is_smaller(tiny, programs):
    m, x = tiny
    fp32, int8 = programs
    with torch.no_grad():
        ref = m(x).numpy()
    got = pte_runner(fp32, threads=1)(x.numpy())  # a batch of 24 runs image by image
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-5 * np.abs(ref).max() * 10
    q = pte_runner(int8, threads=1)(x.numpy())
    assert np.abs(q - ref).max() < 0.5 * np.abs(ref).max()  # int8 error, not garbage
    assert int8.stat().st_size < fp32.stat().st_size / 2
    assert read_sidecar(fp32) == {"edgekd.input_size": "[3, 32, 32]"} and read_sidecar(int8) == {}


def test_xnnpack_events_are_named_by_what_they_compute():
    assert xnnpack_kind("Convolution (NHWC, QC8) DWConv #3") == xnnpack_kind("Convolution (NHWC, F32) DWConv #1") == "depthwise conv"
    assert xnnpack_kind("Convolution (NHWC, F32) IGEMM #1") == "conv"
    assert xnnpack_kind("Convolution (NHWC, F32) GEMM #2") == xnnpack_kind("Fully Connected (NC, QS8, QC8W) GEMM #9") \
        == "1x1 conv / dense"
    assert xnnpack_kind("Add (ND) #10") == "add" and xnnpack_kind("Convert (NC) #1") == "quantize / dequantize"
    assert xnnpack_kind("Transpose (ND, X8) #1") == "layout change" and xnnpack_kind("HardSwish (NC, F32) #4") == "hardswish"
    assert xnnpack_kind("native_call__to_dim_order_copy.out", delegated=False) == "outside XNNPACK: _to_dim_order_copy"


def test_programs_are_profiled_op_by_op_with_the_same_kinds_in_fp32_and_int8(tiny, programs):
    """XNNPACK's own per-operator events (ETDump): every depthwise convolution of the model in both
    programs, the 1x1 convolutions and the classifier as fully connected operators, and the int8
    program's conversions at its ends (the rule, not this CPU's timings)."""
    m, x = tiny
    fp32, int8 = (pte_op_profile(p, x.numpy(), runs=5) for p in programs)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    depthwise = sum(c.groups > 1 for c in convs)
    pointwise = sum(c.groups == 1 and c.kernel_size == (1, 1) for c in convs) + 1  # and the classifier
    for prof in (fp32, int8):
        assert prof["depthwise conv"]["nodes"] == depthwise and prof["1x1 conv / dense"]["nodes"] == pointwise
        assert prof["conv"]["nodes"] == 1 and all(v["us"] >= 0 for v in prof.values())
        assert prof["1x1 conv / dense"]["us"] > 0 and not any(k.startswith("outside XNNPACK") for k in prof)
    assert "quantize / dequantize" in int8 and "quantize / dequantize" not in fp32


def test_bench_runs_pte_with_peak_memory(programs, tmp_path):
    fp32, _ = programs
    r = bench_models({"m": fp32}, "executorch", 1, 32, batch=1, throughput_batch=4, warmup=2, runs=10)["m"]
    assert r["format"] == "pte" and r["batched_inference"] is False and r["p50_ms"] > 0
    assert r["model_peak_mb"] >= 0 and r["peak_rss_mb"] >= r["runtime_rss_mb"]
    out = tmp_path / "b.json"  # the CLI reads the input size from the sidecar and skips ONNX-only runtimes
    assert main(["bench", str(fp32), "--runtime", "all", "--runs", "5", "--warmup", "1", "--no-peak-memory",
                 "--json", str(out)]) == 0
    assert [r["runtime"] for r in json.loads(out.read_text())["results"]] == ["executorch"]


def test_broken_pte_is_a_clear_error(programs, tmp_path, capsys):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    with pytest.raises(EdgekdError, match="not an ExecuTorch program"):
        pte_runner(bad, 1)
    truncated = tmp_path / "truncated.pte"  # right header, cut short
    truncated.write_bytes(programs[0].read_bytes()[:4096])
    with pytest.raises(EdgekdError, match="not a loadable ExecuTorch program"):
        pte_runner(truncated, 1)
    assert main(["bench", str(bad), "--runtime", "executorch", "--image-size", "32", "--no-peak-memory"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pte" in err[0]
