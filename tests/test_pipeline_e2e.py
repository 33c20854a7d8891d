"""End-to-end `edgekd run` on a tiny subset of the shared CIFAR-10 with the shared models:
every stage, the reports, resume after an interruption, and the regression gate."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from edgekd.bench.summary import headline_parts
from edgekd.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEKD_SHARED", REPO.parent / "shared"))
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not (SHARED / "data" / "cifar10-jpg.tar.gz").exists(),
                                                  reason=f"shared data not found under {SHARED}")]


def pipeline(target_macs: float = 0.7) -> dict:
    return {
        "name": "e2e", "seed": 0, "device": "cpu",
        "data": {"source": str(SHARED / "data/cifar10-jpg.tar.gz"), "num_classes": 10, "subset": 250,
                 "test_subset": 200, "val_split": 0.2, "augment": "flip", "batch_size": 50},
        "teacher": {"arch": "resnet50", "cifar_stem": True, "checkpoint": str(SHARED / "models/resnet50_cifar10.pt")},
        "student": {"arch": "mobilenet_v2", "cifar_stem": True, "checkpoint": str(SHARED / "models/mobilenet_v2_cifar10.pt")},
        "stages": [
            {"distill": {"epochs": 1, "loss": "kd", "lr": 0.001, "schedule": "constant"}},
            {"prune": {"target_macs": target_macs, "finetune": {"epochs": 1, "loss": "kd", "lr": 0.001}}},
            {"quantize": {"method": "both", "calibration": {"samples": 100}, "qat": {"epochs": 1, "lr": 0.0005}}},
            {"export": {"include_teacher": False, "verify_images": 100}},
            {"benchmark": {"runtimes": ["onnxruntime", "openvino", "executorch", "litert"], "runs": 10, "warmup": 2,
                           "throughput_batch": 8, "rounds": 5,
                           "robustness": {"corruptions": ["gaussian_noise", "jpeg", "occlusion"], "severities": [1, 4],
                                          "images": 100}}},
        ],
    }


def write(tmp: Path, cfg: dict, name: str = "p.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "run"
    assert main(["run", str(write(tmp, pipeline())), "--out", str(out)]) == 0
    return out


def _ships_fp32(export: dict, fmt: str) -> bool:
    """Whether a format's own int8 plan (formats.int8_plan) shipped the fp32 program, saying why."""
    plan = export["info"]["int8_qat"][f"{fmt}_int8_plan"]
    assert plan["runtime"] and plan["candidates"] and (plan["chosen"] == "fp32") == ("verdict" in plan)
    return plan["chosen"] == "fp32"


def _int8_or_said_why(models: dict, key: str, ships_fp32: bool) -> None:
    """The int8 QAT file is int8 (under 1/2.5 of the fp32 file), unless its plan found that int8
    does not pay on this CPU and shipped float weights instead (the rule, not this machine)."""
    ratio = models["int8_qat"][key] / models["student_fp32"][key]
    assert ratio > 0.5 if ships_fp32 else ratio < 1 / 2.5, (key, ratio)


def test_run_leaves_manifest_reports_and_artifacts(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [s["name"] for s in manifest["stages"]] == ["distill", "prune", "quantize", "export", "benchmark"]
    assert all(s["status"] == "completed" for s in manifest["stages"])
    assert manifest["versions"]["torch"].startswith("2.14")
    for s in manifest["stages"]:
        for art in s.get("artifacts", {}).values():
            assert (run_dir / art["path"]).stat().st_size == art["bytes"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["schema_version"] == 1
    models = report["models"]
    assert models["teacher"]["top1"] > 85  # the shared teacher on 200 test images
    assert models["student_input"]["top1"] > 80
    prune = next(s for s in report["stages"] if s["name"] == "prune")
    assert 0.6 <= prune["info"]["macs_kept"] <= 0.7 + 0.03
    assert prune["info"]["params_after"] < prune["info"]["params_before"]
    step = prune["info"]["steps"][0]  # BN recalibration wins back what removing channels cost
    assert step["top1_after_bn_recalibration"] >= step["top1_after_prune"]
    for k in ("student_fp32", "int8_ptq", "int8_qat"):
        assert models[k]["top1"] > 25, (k, models[k]["top1"])  # measured by onnxruntime; chance is 10
        assert "onnxruntime/1t" in models[k]["latency"]
        assert models[k]["latency"]["onnxruntime/1t"]["p50_ms"] > 0
    all_fp32 = models["int8_qat"]["int8_layers"].startswith("0/")
    _int8_or_said_why(models, "size_bytes", all_fp32)
    # a plan that kept every ONNX layer fp32 is named too, with export's own runtimes beside it
    assert ("onnxruntime" in models["int8_qat"].get("fp32_program_on", {})) == all_fp32
    assert "openvino" in report["stages"][-1]["info"]["skipped"] or "openvino/1t" in models["int8_qat"]["latency"]
    for k in ("student_fp32", "int8_qat", "student_unpruned_fp32"):  # peak memory from a child process
        assert models[k]["latency"]["onnxruntime/1t"]["model_peak_mb"] > 0
    # report.json's latency entries hold exactly the keys the README documents
    readme = (REPO / "README.md").read_text()
    documented = set(re.search(r"`latency\.<runtime>/<threads>t`: `([^.]+)`\.", readme).group(1).replace("\n", " ").split(", "))
    assert set(models["int8_qat"]["latency"]["onnxruntime/1t"]) == {k.strip() for k in documented}
    export = next(s for s in report["stages"] if s["name"] == "export")
    md = (run_dir / "report.md").read_text()
    for plan in (export["info"]["int8_qat"].get(f"{f}_int8_plan") for f in ("pte", "tflite", "openvino")):
        if plan:  # a runtime whose file is the fp32 program is named, for the headline's NOTE
            assert (plan["runtime"] in models["int8_qat"].get("fp32_program_on", {})) == (plan["chosen"] == "fp32")
    if importlib.util.find_spec("openvino"):  # its int8 files planned on it; the fp32 ones are the ONNX format's
        for k in ("int8_ptq", "int8_qat"):
            plan = export["info"][k]["openvino_int8_plan"]
            assert plan["runtime"] == "openvino" and [c["plan"] for c in plan["candidates"]][-1] == "fp32"
            assert models[k]["latency"]["openvino/1t"]["file"] == f"{k}.openvino.onnx"
            assert export["info"][k]["openvino_verify"]["runtime"] == "openvino"
        assert models["student_fp32"]["latency"]["openvino/1t"]["file"] == "student_fp32.onnx"
        assert "openvino" not in models["student_fp32"]
    if importlib.util.find_spec("executorch"):
        for k in ("student_fp32", "int8_ptq", "int8_qat", "student_unpruned_fp32"):
            assert export["info"][k]["pte_verify"]["top1_agreement"] >= 0.9
            et = models[k]["latency"]["executorch/1t"]
            assert et["format"] == "pte" and et["top1"] > 25 and et["batched_inference"] is False
        _int8_or_said_why(models, "pte_size_bytes", _ships_fp32(export, "pte"))
        ptq_plan = export["info"]["int8_ptq"]["pte_int8_plan"]  # XNNPACK's profile: its int8 program against fp32, op by op
        by_op = {r["ops"]: r for r in ptq_plan["int8_vs_fp32_by_op"]}
        assert by_op["depthwise conv"]["fp32_nodes"] == by_op["depthwise conv"]["int8_nodes"] == 17
        assert md.count("program's time goes on executorch against the fp32 program's") == 1  # one table per runtime
        losses = models["int8_qat"].get("executorch_int8_loses_time_on", "nothing")
        if losses != "nothing" and "executorch/1t (" in report["headline"]:  # the NOTE on that runtime says why,
            # whether it ships the fp32 program ("losing time on") or an int8 one under 1.1x ("int8 loses time on")
            assert re.search(rf"executorch/1t \([0-9.]+x: .*(losing|loses) time on {re.escape(losses)}", report["headline"])
        assert any(k.startswith("stage.benchmark.speedup.student_fp32/int8_qat@executorch") for k in report["metrics"])
    else:
        assert export["info"]["executorch"].startswith("skipped: not installed")
        assert report["stages"][-1]["info"]["skipped"]["executorch"].startswith("not installed")
    if importlib.util.find_spec("litert_torch"):
        from edgekd.litert_export import read_metadata

        for k in ("student_fp32", "int8_ptq", "int8_qat", "student_unpruned_fp32"):
            v = export["info"][k]["tflite_verify"]
            assert v["top1_agreement"] >= 0.9 and v["runtime"] == "litert" and v["isa"]
            lt = models[k]["latency"]["litert/1t"]
            assert lt["format"] == "tflite" and lt["top1"] > 25 and lt["batched_inference"] is False
            meta = read_metadata(run_dir / models[k]["tflite"])
            assert meta["edgekd.variant"] == k and float(meta["edgekd.temperature"]) > 0
        assert export["info"]["student_fp32"]["tflite_verify"]["max_abs_diff"] < 1e-3
        _int8_or_said_why(models, "tflite_size_bytes", _ships_fp32(export, "tflite"))
    else:
        assert export["info"]["litert"].startswith("skipped: not installed")
    assert report["headline"].startswith("int8")
    assert any(k.startswith("stage.benchmark.speedup.student_fp32/int8_") for k in report["metrics"])
    assert f"**{headline_parts(report['models'])[0]}**" in md and "| model | top-1 %" in md
    assert "| step | MACs kept | params | top-1 pruned | after BN recal. | after fine-tune |" in md
    for png in ("accuracy.png", "training.png", "pareto.png", "size.png", "robustness.png", "reliability.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in md
    # int8 files verified on this CPU's kernels (the default target runs exactly everywhere)
    for k in ("int8_ptq", "int8_qat"):
        v = export["info"][k]["verify"]
        assert v["target"] == "portable" and v["arithmetic"] == "this CPU's int8 kernels" and v["verified_on"].startswith(("x86", "aarch", "arm"))
    # the quantization plan: measured on onnxruntime, judged on the validation split, in the run and the report
    quant = next(s for s in report["stages"] if s["name"] == "quantize")
    plan = json.loads((run_dir / quant["artifacts"]["quant_plan"]).read_text())
    assert plan["mode"] == "auto" and plan["judged_on"] == "val" and plan["candidates"][0]["plan"] == "int8"
    chosen = next(c for c in plan["candidates"] if c["plan"] == plan["chosen"])
    assert chosen["top1"] is not None and (chosen["drop_points"] <= 0.5) == plan["within_budget"]
    assert "features.0.0" in plan["plan"]["fp32_modules"] and any("stem" in why for why in plan["fp32_nodes"].values())
    assert quant["info"]["plan"] == plan["chosen"] and "Quantization plans timed on onnxruntime" in md
    # the int8 file's time against the fp32 file's by kind of op: the same 17 depthwise convs in both
    by_op = {r["ops"]: r for r in plan["int8_vs_fp32_by_op"]}
    assert by_op["depthwise conv"]["fp32_nodes"] == by_op["depthwise conv"]["int8_nodes"] == 17
    assert by_op["depthwise conv"]["int8_speedup"] > 0 and "Where the int8 ONNX file's time goes" in md
    assert quant["info"]["int8_loses_time_on"] == models["int8_qat"]["onnxruntime_int8_loses_time_on"]
    # robustness of every ONNX variant on the same corrupted images, and in the gate's metrics
    for k in ("student_fp32", "int8_ptq", "int8_qat", "student_unpruned_fp32"):
        r = models[k]["robustness"]
        assert r["images"] == 100 and set(r["by_corruption"]) == {"gaussian_noise", "jpeg", "occlusion"}
        assert r["corruption_top1"] <= r["clean_top1"] + 3 and f"model.{k}.corruption_top1" in report["metrics"]
    assert "## Robustness" in md and "## Calibration" in md
    # a temperature per student file, fit on the validation split, in the file and in the report
    import onnx

    for k in ("student_fp32", "int8_qat"):
        c = models[k]["calibration"]
        assert c["val_images"] == 50 and c["top1"] == c["top1_after"] and c["temperature"] > 0
        props = {p.key: p.value for p in onnx.load(str(run_dir / models[k]["onnx"])).metadata_props}
        assert float(props["edgekd.temperature"]) == pytest.approx(c["temperature"])
    # predictions for the paired accuracy test, kept out of report.json
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert len(preds["labels"]) == 200 and len(preds["models"]["int8_qat"]) == 200
    assert "predictions" not in json.dumps(report["models"])


def test_check_passes_on_itself_and_fails_on_a_degraded_run(run_dir, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert main(["check", str(run_dir / "report.json"), "--baseline", str(baseline), "--update-baseline"]) == 0
    assert main(["check", str(run_dir / "report.json"), "--baseline", str(baseline)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "McNemar p=1 (0 worse, 0 better)" in out
    # a real degraded run: prune far harder (15 % of MACs) with the same tiny fine-tune
    out = tmp_path / "degraded"
    degraded = pipeline(target_macs=0.15)
    # near chance, so PTQ rounding flips many of its answers (which export rejects below 90 % agreement
    # with fp32, per CPU's kernels): this test is the gate's, so the run must reach the benchmark
    degraded["stages"][3]["export"].update(formats=["onnx"], ptq_min_agreement=0.7)
    assert main(["run", str(write(tmp_path, degraded)), "--out", str(out)]) == 0
    assert main(["check", str(out / "report.json"), "--baseline", str(baseline)]) == 1
    table = capsys.readouterr().out
    assert "REGRESSION" in table and "model.int8_qat.top1" in table and "FAIL" in table
    assert next(line for line in table.splitlines() if line.startswith("model.int8_qat.top1 ")).split()[-1] == "REGRESSION"
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "baseline", "now", "delta", "tolerance", "verdict"]


def test_a_plan_pinned_from_an_earlier_run_is_reused_untimed_by_every_format(run_dir, tmp_path, capsys):
    # quantize.plan: <int8_plan.json>: a rerun (or another machine) ships the same int8 structure
    first = json.loads((run_dir / "03_export/int8_plan.json").read_text())
    assert {k: v for k, v in first.items() if k != "programs"} == json.loads((run_dir / "02_quantize/quant_plan.json").read_text())
    first_export = json.loads((run_dir / "report.json").read_text())["stages"][3]
    cfg = pipeline()
    cfg["stages"] = [{"quantize": {"method": "ptq", "calibration": {"samples": 100},
                                   "plan": str(run_dir / "03_export/int8_plan.json")}},
                     {"export": {"include_teacher": False, "verify_images": 100, "formats": ["onnx", "executorch"]}}]
    out = tmp_path / "pinned"
    assert main(["run", str(write(tmp_path, cfg)), "--out", str(out)]) == 0
    plan = json.loads((out / "00_quantize/quant_plan.json").read_text())
    assert plan["mode"] == "pinned" and "candidates" not in plan and plan["chosen"] == f"{first['chosen']} (pinned)"
    assert plan["plan"]["fp32_blocks"] == first["plan"]["fp32_blocks"]
    assert set(plan["plan"]["fp32_modules"]) == set(first["plan"]["fp32_modules"])
    export = json.loads((out / "report.json").read_text())["stages"][1]
    if importlib.util.find_spec("executorch"):  # the program the first run's ExecuTorch shipped, written once, untimed
        shipped = first["programs"]["pte"]["int8_ptq"]
        assert shipped["timed"] and shipped["program"] == first_export["info"]["int8_ptq"]["pte_int8_plan"]["chosen"]
        again = export["info"]["int8_ptq"]["pte_int8_plan"]
        assert again["timed"] is False and again["chosen"] == shipped["program"] and (out / "01_export/int8_ptq.pte").exists()
        assert again["fp32_modules"] == shipped["fp32_modules"] and "pinned: " in again["source"]
        assert json.loads((out / "01_export/int8_plan.json").read_text())["programs"]["pte"]["int8_ptq"]["program"] == \
            shipped["program"]  # and a run pinned to this one's file ships it again
    # a plan of another model, or a file that is no plan, is named with the key that points at it
    first["plan"]["fp32_blocks"] = {"features.99": "measured elsewhere"}
    (tmp_path / "other.json").write_text(json.dumps(first))
    cfg["stages"][0]["quantize"]["plan"] = str(tmp_path / "other.json")
    capsys.readouterr()
    assert main(["run", str(write(tmp_path, cfg)), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "quantize.plan: " in err and "'features.99' fp32, which this model does not have" in err
    cfg["stages"][0]["quantize"]["plan"] = str(tmp_path / "p.yaml")
    assert main(["validate", str(write(tmp_path, cfg, "q.yaml"))]) == 2
    assert "stages[0].quantize.plan" in capsys.readouterr().err


def test_resume_after_an_interrupted_stage(tmp_path, monkeypatch, capsys):
    from edgekd.stages.quantize import Quantize

    cfg = pipeline()
    cfg["stages"] = cfg["stages"][:3]
    cfg["stages"][2]["quantize"] = {"method": "ptq", "calibration": {"samples": 50}}
    path, out = write(tmp_path, cfg), tmp_path / "run"

    def interrupted(self, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(Quantize, "run", interrupted)
    assert main(["run", str(path), "--out", str(out)]) == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["completed", "completed", "failed"]
    digest = hashlib.sha256((out / "01_prune" / "model.pt").read_bytes()).hexdigest()
    monkeypatch.undo()
    assert main(["run", str(path), "--resume", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["completed"] * 3
    assert [s.get("resumed", False) for s in manifest["stages"]] == [True, True, False]
    assert hashlib.sha256((out / "01_prune" / "model.pt").read_bytes()).hexdigest() == digest
    assert (out / "report.json").exists()
    # a changed stage config re-runs that stage and everything after it
    assert main(["run", str(path), "--resume", str(out), "--set", "prune.target_macs=0.8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s.get("resumed", False) for s in manifest["stages"]] == [True, False, False]
