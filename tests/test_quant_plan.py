"""Quantization plans: blocks by module path, what a plan keeps fp32 in PTQ and QAT alike, the
measured search and the choice within the accuracy budget (tiny models; rules, not timings)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from edgekd.models import build
from edgekd.onnx_export import export_onnx
from edgekd.quant.plan import (Plan, block_of, blocks, choose, float_cost, kind_comparison, load_graph, module_path,
                               node_blocks, profiles, rule_plan, search, unmatched_patterns)
from edgekd.quant.ptq import quantize_onnx
from edgekd.quant.qat import QConv2d, apply_transform, qat_transform, snap_weights
from test_compress import _ort_optimized_ops, tiny_data

V2 = {"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}
V3 = {"arch": "mobilenet_v3_small", "num_classes": 4, "cifar_stem": True, "width_mult": 0.5}


def _export(spec, tmp_path, name="fp32.onnx"):
    model = build(spec).eval()
    return model, export_onnx(copy.deepcopy(model), tmp_path / name, 32)


def _calib():
    data = tiny_data()
    return data, data.normalize(data.train.images[:32]).numpy()


def test_block_of_a_module_path():
    assert block_of("features.3.block.0.0") == "features.3"
    assert block_of("layer1.0.conv1") == "layer1.0"
    assert block_of("blocks.2.1.conv_pw") == "blocks.2"
    assert block_of("classifier.3") == "classifier.3"
    assert block_of("fc") == "fc"
    assert block_of("trunk_output.block1.block1-0.f.a.0") == "trunk_output.block1.block1-0"  # torchvision RegNet
    assert block_of("features.denseblock1.denselayer2.conv1") == "features"  # no index: the first component


def test_every_weighted_node_maps_to_a_module_of_the_model(tmp_path):
    model, fp32 = _export(V3, tmp_path)
    graph = load_graph(fp32)
    modules = dict(model.named_modules())
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert weighted and all(isinstance(modules.get(module_path(n)), (nn.Conv2d, nn.Linear)) for n in weighted)
    assert blocks(graph) == [f"features.{i}" for i in range(13)] + ["classifier.0", "classifier.3"]
    # nodes outside any weighted module (the pool before the classifier, flatten) join the block before them
    nb = node_blocks(graph)
    assert all(nb[n.name] for n in graph.node if n.name)


def test_a_plan_keeps_exactly_its_blocks_and_patterns_fp32_in_the_int8_file(tmp_path):
    model, fp32 = _export(V2, tmp_path)
    _, calib = _calib()
    graph = load_graph(fp32)
    base = rule_plan(graph, True, ["classifier*"])
    plan = base.with_block("features.2", "test", "t")
    kept = plan.excluded_nodes(graph)
    convs_in_block = sum(1 for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and block_of(p) == "features.2")
    ops = _ort_optimized_ops(quantize_onnx(fp32, tmp_path / "q.onnx", calib, plan=plan), tmp_path)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(v for k, v in ops.items() if k in ("Conv", "FusedConv")) == convs_in_block + 1  # the block and the stem
    assert ops.get("QLinearConv", 0) == n_convs - convs_in_block - 1
    assert ops.get("Gemm", 0) + ops.get("FusedGemm", 0) == 1 and "QGemm" not in ops  # classifier* kept fp32
    assert any("classifier" in why for why in kept.values())
    assert all(plan.keeps_module(p) == (block_of(p) == "features.2" or p.startswith("classifier") or p == "features.0.0")
               for p, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_op_type_patterns_leave_those_ops_float_even_when_their_nodes_have_no_name(tmp_path):
    _, fp32 = _export(V3, tmp_path)
    _, calib = _calib()
    plan = rule_plan(load_graph(fp32), True, ["Mul"])
    ops = _ort_optimized_ops(quantize_onnx(fp32, tmp_path / "q.onnx", calib, plan=plan), tmp_path)
    assert "QLinearMul" not in ops and ops.get("Mul", 0) > 0
    default = _ort_optimized_ops(quantize_onnx(fp32, tmp_path / "d.onnx", calib), tmp_path)
    assert default.get("QLinearMul", 0) > 0  # hardswish and squeeze-excitation multiplies, int8 by default


def test_a_calibration_cache_gives_every_plan_the_file_a_fresh_calibration_gives(tmp_path):
    _, fp32 = _export(V3, tmp_path)
    _, calib = _calib()
    base = rule_plan(load_graph(fp32), True, [])
    plans = [base, base.with_block("features.2", "test", "t"), rule_plan(load_graph(fp32), True, ["Mul"])]
    cache = tmp_path / "ranges"
    for i, plan in enumerate(plans * 2):  # the second round reads every range from the cache
        fresh = quantize_onnx(fp32, tmp_path / f"fresh{i}.onnx", calib, plan=plan)
        cached = quantize_onnx(fp32, tmp_path / f"cached{i}.onnx", calib, plan=plan, calibration_cache=cache)
        assert cached.read_bytes() == fresh.read_bytes(), plan.name
    assert len(list(cache.iterdir())) == 2  # one range file per set of op types calibrated (Mul kept fp32: another)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_prints_nothing_between_the_progress_bars(tmp_path, capsys, method):
    _, fp32 = _export(V2, tmp_path)
    _, calib = _calib()
    assert quantize_onnx(fp32, tmp_path / "int8.onnx", calib[:8], method=method).is_file()
    assert capsys.readouterr().out == ""


def test_a_keep_fp32_pattern_that_matches_nothing_is_reported(tmp_path):
    _, fp32 = _export(V2, tmp_path)
    graph = load_graph(fp32)
    plan = rule_plan(graph, True, ["features.1*", "featurs.2*", "HardSwish", "Conv"])
    assert unmatched_patterns(plan, graph) == [(1, "featurs.2*"), (2, "HardSwish")]


@pytest.mark.parametrize("pattern", ["classifier*", "/features/features.1/*", "*fc1*", "HardSigmoid", "Mul", "Add",
                                     "/features/features.4/block/block.2/Mul"])
def test_keep_fp32_patterns_name_the_same_ops_in_the_pt2e_graph_as_in_the_onnx_graph(tmp_path, pattern):
    # ExecuTorch and LiteRT quantize a torch.export graph (PT2E): the user's keep_fp32 patterns must leave
    # the ops float there that they leave float in the ONNX files (same module, same op type)
    from collections import Counter

    from edgekd.quant.plan import PATTERN, _matches, in_modules, onnx_op_type

    model, fp32 = _export(V3, tmp_path)
    graph = load_graph(fp32)
    traced = torch.export.export(model, (torch.randn(1, 3, 32, 32),)).module().graph
    ops = {"Conv", "Gemm", "Mul", "Add", "HardSigmoid", "HardSwish", "Relu", "GlobalAveragePool"}
    in_onnx = Counter((module_path(n), n.op_type) for n in graph.node if n.op_type in ops and _matches(pattern, module_path(n), n))
    in_pt2e = Counter(([p for p, _ in n.meta["nn_module_stack"].values()][-1], onnx_op_type(n)) for n in traced.nodes
                      if n.op == "call_function" and onnx_op_type(n) in ops and in_modules(n, [PATTERN + pattern]))
    assert in_onnx and in_pt2e == in_onnx


def test_a_pinned_plan_and_its_formats_programs_must_fit_the_model(tmp_path):
    # quantize.plan: <quant_plan.json> repeats the plan and what each format shipped; a block or module
    # this model lacks (another architecture, another pruning) is refused, wherever the file names it
    import json

    from edgekd.errors import ConfigError
    from edgekd.stages.quantize import _pin, pinned_plan

    _, fp32 = _export(V2, tmp_path)
    graph = load_graph(fp32)
    base = rule_plan(graph, True, [])
    rec = {"plan": Plan("a", {"features.3": "slow"}).to_json(),
           "programs": {"pte": {"int8_qat": {"program": "quantize plan (a)", "fp32_modules": ["features.3"]}}}}
    (tmp_path / "q.json").write_text(json.dumps(rec))
    plan, programs = pinned_plan(str(tmp_path / "q.json"))
    pinned = _pin(plan, programs, base, graph, "q.json")
    assert pinned.fp32_blocks == {"features.3": "slow"} and set(pinned.fp32_modules) == set(base.fp32_modules)
    assert programs == rec["programs"]
    rec["programs"]["pte"]["int8_qat"]["fp32_modules"] = ["features.30"]
    with pytest.raises(ConfigError, match="keeps 'features.30' fp32, which this model does not have"):
        _pin(plan, rec["programs"], base, graph, "q.json")
    rec["programs"]["pte"]["int8_qat"] = {"program": "int8"}  # hand-edited: no fp32_modules
    (tmp_path / "q.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="not a plan file an edgekd run wrote"):
        pinned_plan(str(tmp_path / "q.json"))


def test_qat_follows_the_plan_so_its_int8_file_has_the_ptq_files_structure(tmp_path):
    model, fp32 = _export(V2, tmp_path)
    data, calib = _calib()
    plan = rule_plan(load_graph(fp32), True, []).with_block("features.3", "test", "t")
    q = apply_transform(apply_transform(copy.deepcopy(model), "fold_bn"), qat_transform(64, plan))
    wrapped = {p for p, m in q.named_modules() if isinstance(m, QConv2d)}
    convs = {p for p, m in q.named_modules() if isinstance(m, nn.Conv2d)}
    assert wrapped == {p for p in convs if block_of(p) != "features.3" and p != "features.0.0"}
    with torch.no_grad():
        q.train()
        q(torch.from_numpy(calib))
    q.eval()
    snapped = export_onnx(snap_weights(copy.deepcopy(q)), tmp_path / "snap.onnx", 32)
    qat_ops = _ort_optimized_ops(quantize_onnx(snapped, tmp_path / "qat.onnx", calib, plan=plan), tmp_path)
    ptq_ops = _ort_optimized_ops(quantize_onnx(fp32, tmp_path / "ptq.onnx", calib, plan=plan), tmp_path)
    assert qat_ops == ptq_ops


def test_choose_keeps_the_fastest_plan_within_the_budget_and_says_when_none_is():
    plans = [Plan(n) for n in ("int8", "int8 -1 block", "int8 -2 blocks")]
    cands = [{"plan": p, "p50_ms": t} for p, t in zip(plans, (1.0, 0.8, 0.9))]
    top1 = {"int8": 89.0, "int8 -1 block": 88.0, "int8 -2 blocks": 89.4}
    evaluated = []

    def evaluate(p):
        evaluated.append(p.name)
        return top1[p.name], None

    chosen = choose(cands, evaluate, 89.5, 0.5)
    assert chosen["plan"].name == "int8 -2 blocks" and chosen["within_budget"]
    assert evaluated == ["int8 -1 block", "int8 -2 blocks"]  # fastest first, stops at the first that holds
    chosen = choose([dict(c) for c in cands], evaluate, 95.0, 0.5)
    assert chosen["plan"].name == "int8 -2 blocks" and not chosen["within_budget"]  # the most accurate
    # timed in the same rounds, the per-round speed-up ranks them where p50s (medians of round medians) disagree
    noisy = [{"plan": Plan("int8 -7 blocks"), "p50_ms": 0.386, "speedup_vs_fp32": 0.872, "top1": 56.0},
             {"plan": Plan("fp32"), "p50_ms": 0.405, "speedup_vs_fp32": 0.994, "top1": 53.0}]
    assert choose(noisy, evaluate, 53.0, 0.5)["plan"].name == "fp32"


def test_search_times_real_files_and_returns_the_plans_it_kept(tmp_path):
    _, fp32 = _export(V2, tmp_path)
    _, calib = _calib()
    base = rule_plan(load_graph(fp32), True, [])
    res = search(fp32, tmp_path / "s", calib, base, lambda p, path: quantize_onnx(fp32, path, calib[:8], plan=p),
                 budget_ms=100, progress=False)
    assert res[0]["plan"] is base
    for r in res:
        assert r["file"].is_file() and r["p50_ms"] > 0 and r["speedup_vs_fp32"] > 0
        assert r["plan"] is base or r["plan"].fp32_blocks.keys() != base.fp32_blocks.keys()
    names = [r["plan"].name for r in res]
    assert len(names) == len(set(names))


def test_the_int8_files_time_splits_into_kernels_conversions_and_float_ops(tmp_path):
    _, fp32 = _export(V3, tmp_path)
    _, calib = _calib()
    cost = float_cost(profiles(quantize_onnx(fp32, tmp_path / "q.onnx", calib), calib[:1], runs=20)[0])
    assert cost["float_ops"].get("HardSigmoid", 0) > 0  # no int8 kernel for it in onnxruntime
    assert cost["int8_kernels_pct"] > 0 and cost["quantize_dequantize_pct"] > 0
    assert sum(cost[k] for k in ("int8_kernels_pct", "quantize_dequantize_pct", "float_ops_pct")) == pytest.approx(100, abs=0.5)


def test_the_int8_file_is_set_against_the_fp32_file_op_kind_by_op_kind(tmp_path):
    """The fp32 file's Conv (onnxruntime's NCHWc Conv after its fusions) and the int8 file's
    QLinearConv are the same kinds of op, so their times compare row by row; what only the int8
    file has (its adds, its quantize / dequantize) shows as such. The rule, not this CPU's speeds."""
    from edgekd.quant.plan import int8_losses

    model, fp32 = _export(V2, tmp_path)
    _, calib = _calib()
    int8 = quantize_onnx(fp32, tmp_path / "q.onnx", calib, plan=rule_plan(load_graph(fp32), False, []))
    (by_op, kinds), (_, fp32_kinds) = profiles(int8, calib[:1], runs=20), profiles(fp32, calib[:1], runs=20)
    assert sum(v["nodes"] for k, v in by_op.items() if k == "QLinearConv") == sum(
        kinds[k]["nodes"] for k in ("1x1 conv", "depthwise conv", "conv") if k in kinds)  # every int8 conv has a kind
    depthwise = sum(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
    pointwise = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    for k in (kinds, fp32_kinds):
        assert k["depthwise conv"]["nodes"] == depthwise and k["1x1 conv"]["nodes"] == pointwise
    rows = {r["ops"]: r for r in kind_comparison(fp32_kinds, kinds)}
    assert rows["depthwise conv"]["int8_speedup"] == round(rows["depthwise conv"]["fp32_us"] / rows["depthwise conv"]["int8_us"], 2)
    assert rows["add"]["fp32_us"] is None and rows["add"]["int8_nodes"] > 0  # fused into the fp32 convolutions
    assert rows["quantize / dequantize"]["fp32_nodes"] == 0
    line = int8_losses(list(rows.values()))
    floor = 0.01 * sum(r["fp32_us"] or 0 for r in rows.values())
    lost = sorted((r for r in rows.values() if (r["int8_us"] or 0) - (r["fp32_us"] or 0) >= floor),
                  key=lambda r: (r["fp32_us"] or 0) - (r["int8_us"] or 0))  # 1 % of the fp32 time or more, costliest first
    for r in rows.values():  # the three costliest such kinds are named, and only those
        named = f"{r['ops']} +" in line or f"{r['ops']} {r['int8_speedup']}x" in line
        assert named == (r in lost[:3]), (r, line)
    assert line.endswith(f" and {len(lost) - 3} more kinds") == (len(lost) > 3)
    row = lambda ops, fp32, int8: {"ops": ops, "fp32_us": fp32, "int8_us": int8, "fp32_nodes": 1, "int8_nodes": 1,  # noqa: E731
                                   "int8_speedup": round(fp32 / int8, 2) if fp32 else None}
    five = [row("1x1 conv", 500.0, 300.0), row("pool", 30.0, 40.0), row("multiply", 60.0, 160.0),
            row("quantize / dequantize", None, 200.0), row("hardsigmoid", 5.0, 80.0), row("add", None, 30.0)]
    assert int8_losses(five) == ("quantize / dequantize +200 us (no such kernel in the fp32 file), multiply 0.38x "
                                 "(160 vs 60 us), hardsigmoid 0.06x (80 vs 5 us) and 2 more kinds")
    assert int8_losses([{"ops": "conv", "fp32_us": 10.0, "int8_us": 5.0, "int8_speedup": 2.0, "fp32_nodes": 1,
                         "int8_nodes": 1}]) == "nothing"
    # a kind whose fp32 time is below the profiler's resolution has no speed-up, only what int8 adds
    tiny = kind_comparison({"conv": {"nodes": 1, "us": 90.0}, "add": {"nodes": 10, "us": 0.0}},
                           {"conv": {"nodes": 1, "us": 80.0}, "add": {"nodes": 10, "us": 2.0}})
    assert tiny[1]["int8_speedup"] is None and int8_losses(tiny) == "add +2 us"


def test_op_types_get_the_kind_names_every_runtime_profile_uses():
    """onnxruntime's fp32 op and its int8 kernel share a kind, named as XNNPACK's and OpenVINO's
    profiles name theirs (bench.runtimes), so tables of different runtimes read alike."""
    from edgekd.bench.runtimes import openvino_kind
    from edgekd.pte_export import xnnpack_kind
    from edgekd.quant.plan import type_kind

    assert type_kind("QLinearMul") == type_kind("Mul") == xnnpack_kind("Multiply (ND) #1") == "multiply"
    assert type_kind("QLinearGlobalAveragePool") == type_kind("GlobalAveragePool") == openvino_kind("ReduceMean", "x") == "pool"
    assert type_kind("HardSigmoid") == openvino_kind("HardSigmoid", "jit_avx2_f32") == "hardsigmoid"
    assert type_kind("QLinearLeakyRelu") == "leakyrelu" and type_kind("QGemm") == "dense"


def test_a_plan_with_every_layer_fp32_writes_the_fp32_graph_unchanged(tmp_path):
    import onnx

    _, fp32 = _export(V3, tmp_path)
    _, calib = _calib()
    graph = load_graph(fp32)
    plan = rule_plan(graph, True, [])
    for b in blocks(graph):
        plan = plan.with_block(b, "int8 did not pay", "fp32")
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calib, plan=plan)
    assert [n.op_type for n in onnx.load(str(q)).graph.node] == [n.op_type for n in graph.node]  # HardSwish kept whole
    props = {p.key: p.value for p in onnx.load(str(q)).metadata_props}
    assert props["edgekd.int8_layers"] == "0"


FAMILIES = [
    {"arch": "mobilenet_v2", "width_mult": 0.25},
    {"arch": "mobilenet_v3_small", "width_mult": 0.25},
    {"arch": "mobilenet_v3_large", "width_mult": 0.25},
    {"arch": "efficientnet_b0", "width_mult": None},
    {"arch": "resnet18", "width_mult": None},
]


@pytest.mark.parametrize("family", FAMILIES, ids=[f["arch"] for f in FAMILIES])
def test_each_family_maps_to_blocks_and_quantizes_by_plan_in_ptq_and_qat(tmp_path, family):
    """Per architecture family: every weighted node belongs to a module of the model, a plan that
    keeps the second block fp32 leaves exactly that block's layers float in the int8 file, and the
    QAT wrapping skips exactly the same modules."""
    spec = {**family, "num_classes": 4, "cifar_stem": True}
    model, fp32 = _export(spec, tmp_path)
    _, calib = _calib()
    graph = load_graph(fp32)
    modules = dict(model.named_modules())
    assert all(module_path(n) in modules for n in graph.node if n.op_type in ("Conv", "Gemm"))
    bl = blocks(graph)
    assert len(bl) >= 4
    plan = rule_plan(graph, True, []).with_block(bl[1], "test", "t")
    layers = [p for p, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    kept = {p for p in layers if plan.keeps_module(p)}
    assert kept == {p for p in layers if block_of(p) == bl[1]} | {layers[0]}
    ops = _ort_optimized_ops(quantize_onnx(fp32, tmp_path / "q.onnx", calib, plan=plan), tmp_path)
    float_layers = sum(v for k, v in ops.items() if k in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"))
    int8_layers = sum(v for k, v in ops.items() if k in ("QLinearConv", "QGemm", "QLinearMatMul"))
    assert float_layers == len(kept) and int8_layers == len(layers) - len(kept), ops
    q = apply_transform(apply_transform(copy.deepcopy(model), "fold_bn"), qat_transform(64, plan))
    assert {p for p, m in q.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not hasattr(m, "act_fq")} == kept


def test_accuracy_recovery_keeps_the_costliest_blocks_fp32_until_the_budget_holds(tmp_path):
    from edgekd.quant.plan import recover_accuracy

    _, fp32 = _export(V2, tmp_path)
    graph = load_graph(fp32)
    start = rule_plan(graph, True, [])
    cost = {"features.5": 1.0, "features.2": 0.6, "features.9": 0.1}  # points each block's int8 costs

    def evaluate(p):
        return 88.5 + sum(cost.get(b, 0.0) for b in p.fp32_blocks), None

    tried = recover_accuracy(start, graph, evaluate, 90.0, 0.5)
    assert [sorted(t["plan"].fp32_blocks) for t in tried] == [["features.5"]]
    assert tried[0]["drop_points"] == pytest.approx(0.5)
    tried = recover_accuracy(start, graph, evaluate, 90.5, 0.0)  # never holds: stops after `limit` blocks
    assert [sorted(t["plan"].fp32_blocks) for t in tried] == [["features.5"], ["features.2", "features.5"],
                                                              ["features.2", "features.5", "features.9"]]
    assert "for accuracy" in tried[-1]["plan"].fp32_blocks["features.9"]


def test_plans_can_be_timed_on_openvino(tmp_path):
    pytest.importorskip("openvino")
    _, fp32 = _export(V2, tmp_path)
    _, calib = _calib()
    base = rule_plan(load_graph(fp32), True, [])
    res = search(fp32, tmp_path / "s", calib, base, lambda p, path: quantize_onnx(fp32, path, calib[:8], plan=p),
                 budget_ms=60, progress=False, runtime="openvino")
    assert res[0]["plan"] is base and all(r["p50_ms"] > 0 and r["speedup_vs_fp32"] > 0 for r in res)
    assert all("openvino" in why for r in res for why in r["plan"].fp32_blocks.values())


def test_a_plan_runtime_that_is_not_installed_is_refused_before_any_data_is_read(minimal_pipeline, monkeypatch):
    from edgekd.bench.runtimes import OpenVINO
    from edgekd.config import validate
    from edgekd.errors import ConfigError

    monkeypatch.setattr(OpenVINO, "available", classmethod(lambda cls: "not installed (pip install 'edgekd[mobile]')"))
    minimal_pipeline["stages"] = [{"quantize": {"method": "ptq", "plan_runtime": "openvino"}}]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.quantize\.plan_runtime: openvino cannot time the plans here"):
        validate(minimal_pipeline)
    minimal_pipeline["stages"] = [{"quantize": {"method": "ptq", "plan_runtime": "openvino", "plan": "int8"}}]
    validate(minimal_pipeline)  # nothing to time


def test_a_qat_file_well_below_its_ptq_twin_is_named_with_what_to_check():
    """QAT's fine-tune can cost more than int8 rounding (a timm MobileNetV4 at 32 px went to chance);
    the stage says so where the gap passes the drop budget and a point, and names chance."""
    from edgekd.stages.quantize import qat_below_ptq

    figs = lambda ptq, qat: {"int8_ptq": {"top1": ptq}, "int8_qat": {"top1": qat}}  # noqa: E731
    assert qat_below_ptq(figs(22.0, 10.0), 0.5, 10) == (
        "QAT's int8 file scores 10% (chance), 12.0 points below the PTQ file's 22%: its fine-tune lost more than int8 "
        "rounding did; the PTQ file is the best int8 file here (check quantize.qat: lr, epochs, loss)")
    assert "(chance)" not in qat_below_ptq(figs(60.0, 50.0), 0.5, 10)
    assert qat_below_ptq(figs(60.0, 59.2), 0.5, 10) is None  # within a point
    assert qat_below_ptq(figs(60.0, 58.5), 2.0, 10) is None  # within the budget
    assert qat_below_ptq(figs(60.0, 62.0), 0.5, 10) is None  # QAT better
    assert qat_below_ptq({"int8_ptq": {"top1": 60.0}}, 0.5, 10) is None  # PTQ only


def test_a_plan_that_keeps_every_layer_fp32_is_named_the_fp32_program_in_the_headline(minimal_pipeline, write_pipeline,
                                                                                      tmp_path, monkeypatch):
    # int8 timed slower than fp32 on this runtime (by rule here: each quantized tensor costs time): the int8
    # file is the fp32 program, and the headline never calls it faster in int8 when it times faster by chance
    import json

    import onnx

    from edgekd.bench import measure
    from edgekd.bench.runtimes import RUNTIMES
    from edgekd.cli import main

    ort_rt = RUNTIMES.get("onnxruntime")
    load = ort_rt.load

    def load_naming_its_file(self, path, threads):
        run = load(self, path, threads)
        run.quantized = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)
        return run

    def timed(runners, x, warmup, runs, rounds):  # 1 ms, and a hundredth more per quantized tensor
        ms = {n: 1.0 + 0.01 * getattr(r, "quantized", 0) for n, r in runners.items()}
        ms = {n: v * (0.8 if n == "int8_ptq" else 1.0) for n, v in ms.items()}  # the fp32 program by chance faster
        return {n: {"p50_ms": v, "round_p50_ms": [v] * rounds, "runs": runs, "rounds": rounds} for n, v in ms.items()}

    monkeypatch.setattr(ort_rt, "load", load_naming_its_file)
    monkeypatch.setattr(measure, "time_interleaved", timed)
    minimal_pipeline["stages"] = [{"quantize": {"method": "ptq", "calibration": {"samples": 8}}},
                                  {"benchmark": {"runtimes": ["onnxruntime"], "runs": 5, "rounds": 1}}]
    out = tmp_path / "run"
    assert main(["run", str(write_pipeline(minimal_pipeline)), "--out", str(out), "--set", "device=cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    ptq = report["models"]["int8_ptq"]
    assert ptq["int8_layers"].startswith("0/") and 0 < ptq["fp32_program_on"]["onnxruntime"] < 1
    assert "int8 is 1.25x the speed" not in report["headline"]
    assert "here (1.25x: its file is the fp32 program, int8 ran at" in report["headline"]
