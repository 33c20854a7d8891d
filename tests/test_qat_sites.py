"""QAT rounds what the int8 file rounds (quant.sites): every tensor the file quantizes is found
in the PyTorch model, the int32 bias is on the file's grid, and the trained model and its file
then compute the same numbers. Q/DQ is run as float math (onnxruntime's int8 kernels off), so the
comparison is the simulation's, the same on every CPU."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from edgekd.models import build, rebuild, save_checkpoint
from edgekd.onnx_export import export_onnx, run_onnx
from edgekd.quant.plan import load_graph, rule_plan
from edgekd.quant.qat import ActFakeQuant, QConv2d, apply_transform, qat_transform, snap_weights
from edgekd.quant.qat_file import build_qat, qat_int8_file
from edgekd.quant.sites import SITES_ATTR, find_sites, quantized_tensors
from edgekd.quant.targets import TARGETS

SPEC = {"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}
QOPTS = {"target": TARGETS["portable"]}


def _model() -> torch.nn.Module:
    """A tiny MobileNetV2 with data-like BN statistics, two of whose channels have a near-zero
    running variance (as a short run leaves dead channels): folded, their weights are in the
    thousands and the file's int32 bias grid is coarser than their bias."""
    torch.manual_seed(0)
    m = build(SPEC).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(32, 3, 32, 32))
        m.features[4].conv[1][1].running_var[:2] = 1e-7
    return m.eval()


def _plan(model, tmp):
    return rule_plan(load_graph(export_onnx(copy.deepcopy(model), tmp / "fp32.onnx", 32)), True, [])


def _qat(model, calib, plan, sites: bool):
    """QAT as the quantize stage builds it, ranges set on `calib`; `sites=False`: conv inputs only."""
    built = build_qat(model, 32, calib, plan, QOPTS, sites=sites)
    built.model.eval()
    return built


def _rel(path, q, x) -> float:
    with torch.no_grad():
        ref = q(torch.from_numpy(x)).numpy()
    out = run_onnx(path, x, int8_kernels=False)
    return float(np.abs(out - ref).mean() / np.abs(ref).mean())


def test_qat_rounds_every_tensor_the_file_rounds_and_they_agree(tmp_path):
    model = _model()
    calib = np.random.RandomState(0).randn(64, 3, 32, 32).astype(np.float32)
    folded = apply_transform(copy.deepcopy(model), "fold_bn")
    plan = _plan(model, tmp_path)
    sites, missing = find_sites(folded, 32, calib, plan, QOPTS)
    assert missing == []
    # found where they are made: a residual block's output, the branch conv before its add
    by_path = {s.path: s for s in sites}
    assert any(t.endswith("/Add_output_0") for t in by_path["features.3"].tensors)
    assert by_path["features.3.conv.2"].kind == "out"
    # the pool's output and the flattened classifier input are one tensor to PyTorch, one site
    assert any(len(s.tensors) > 1 for s in sites)
    # every int8 layer takes a site's tensor: its bias follows that site's grid
    int8_layers = {p for p, m in apply_transform(copy.deepcopy(folded), qat_transform(64, plan)).named_modules()
                   if isinstance(m, QConv2d)}
    assert int8_layers <= {f for s in sites for f in s.feeds}
    # a layer whose input no site rounds keeps rounding it itself
    unfed = [dataclasses.replace(s, feeds=tuple(f for f in s.feeds if f != "features.3.conv.2")) for s in sites]
    q = apply_transform(copy.deepcopy(folded), qat_transform(64, plan, unfed))
    own = {p for p, m in q.named_modules() if isinstance(m, QConv2d) and isinstance(m.act_fq, ActFakeQuant)}
    assert own == {"features.3.conv.2"}

    built = _qat(model, calib, plan, sites=True)
    assert (built.simulated, built.not_simulated) == (sum(len(s.tensors) for s in sites), [])
    q_sites, q_legacy = built.model, _qat(model, calib, plan, sites=False).model
    f_sites = qat_int8_file(q_sites, tmp_path / "sites.onnx", 32, calib, plan, QOPTS)
    assert sorted(t for s in sites for t in s.tensors) == sorted(quantized_tensors(f_sites))
    f_legacy = qat_int8_file(q_legacy, tmp_path / "legacy.onnx", 32, calib, plan, QOPTS)
    x = np.random.RandomState(1).randn(64, 3, 32, 32).astype(np.float32)
    rel_sites, rel_legacy = _rel(f_sites, q_sites, x), _rel(f_legacy, q_legacy, x)
    # conv inputs alone leave the residual roundings and the coarse bias out of the simulation
    print(f"relative logit error: sites {rel_sites:.4f}, conv inputs only {rel_legacy:.4f}")
    assert rel_sites < 0.01 and rel_sites < rel_legacy / 3, (rel_sites, rel_legacy)


def test_sites_survive_a_checkpoint_and_a_deepcopy(tmp_path):
    model = _model()
    calib = np.random.RandomState(0).randn(32, 3, 32, 32).astype(np.float32)
    built = _qat(model, calib, _plan(model, tmp_path), sites=True)
    q = built.model
    x = torch.from_numpy(calib[:4])
    save_checkpoint(tmp_path / "q.pt", q, SPEC, [], ["fold_bn", built.transform], {"image_size": 32})
    again = rebuild(torch.load(tmp_path / "q.pt", weights_only=True)).eval()
    with torch.no_grad():
        assert torch.allclose(again(x), q(x), atol=1e-5)
        # a copy rounds through its own quantizers: narrowing the copy's ranges leaves the original alone
        before = q(x)
        twin = copy.deepcopy(q)
        for fq in getattr(twin, SITES_ATTR):
            fq.hi.mul_(0.1), fq.lo.mul_(0.1)
        assert not torch.allclose(twin(x), before)
        assert torch.equal(q(x), before)
        # the float model for export has no rounding left: the snapped layers compute plain float math
        snapped = snap_weights(copy.deepcopy(q))
        assert not hasattr(snapped, SITES_ATTR)
        assert not any(h for m in snapped.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


@pytest.mark.parametrize("matching", ["works", "fails"])
def test_the_quantize_stage_records_its_sites_and_survives_a_model_it_cannot_follow(
        matching, minimal_pipeline, write_pipeline, tmp_path, monkeypatch, caplog):
    import edgekd.quant.qat_file as qat_file
    from edgekd.cli import main

    if matching == "fails":
        def fail(*_a, **_k):
            raise RuntimeError("a model the matching cannot follow")
        monkeypatch.setattr(qat_file, "find_sites", fail)
    minimal_pipeline["stages"] = [{"quantize": {"method": "qat", "plan": "int8", "calibration": {"samples": 8},
                                                "qat": {"epochs": 1, "loss": "ce", "lr": 0.001}}}]
    out = tmp_path / "run"
    assert main(["run", str(write_pipeline(minimal_pipeline)), "--out", str(out)]) == 0
    result = json.loads((out / "00_quantize" / "result.json").read_text())
    rounded = result["info"]["qat_rounded_tensors"]
    if matching == "works":
        assert rounded["simulated"] > 10 and rounded["not_simulated"] == []
    else:  # QAT as before sites: each layer rounds its own input
        assert rounded["simulated"] == 0
        assert "could not find where the int8 file rounds" in caplog.text
    assert result["models"]["int8_qat"]["top1"] >= 0
