"""`edgekd bench`, runtimes that are missing, broken model files, and the report helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgekd.bench.runtimes import RUNTIMES, Runtime
from edgekd.bench.summary import headline_sentence, pareto
from edgekd.report import render_markdown
from edgekd.cli import main
from edgekd.models import build
from edgekd.onnx_export import export_onnx


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.onnx"
    return export_onnx(build({"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}), path, 32)


def test_bench_measures_latency_and_writes_json(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(tiny_onnx), "--threads", "1", "--runs", "10", "--warmup", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    r = res["results"][0]
    assert r["runtime"] == "onnxruntime" and r["threads"] == 1 and r["batch"] == 1
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert r["throughput_ips"] > 0
    assert r["size_bytes"] == tiny_onnx.stat().st_size and r["format"] == "onnx"
    # peak memory comes from a child process that resets its high-water mark after the import
    assert r["peak_rss_mb"] >= r["runtime_rss_mb"] > 10 and r["model_peak_mb"] >= 0
    assert r["peak_rss_mb"] < 500  # the ONNX path imports no torch (which alone is ~700 MB)
    assert res["machine"]["cores"] >= 1 and isinstance(res["machine"]["isa"], list)
    assert "tiny.onnx" in capsys.readouterr().out


def test_bench_by_op_sets_every_file_against_the_first_on_each_profiling_runtime(tiny_onnx, tmp_path, capsys):
    """`--by-op`: each runtime's own profiler by kind of op, an int8 file against its fp32 file;
    a runtime without a per-operator profiler says so (the rule, not this CPU's kernels)."""
    import numpy as np

    from edgekd.quant.ptq import quantize_onnx

    calib = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    int8 = quantize_onnx(tiny_onnx, tmp_path / "tiny_int8.onnx", calib)
    out = tmp_path / "b.json"
    runtimes = ",".join(r for r in ("onnxruntime", "openvino") if RUNTIMES.get(r).available() is None)
    assert main(["bench", str(tiny_onnx), str(int8), "--runtime", runtimes, "--runs", "5", "--warmup", "1",
                 "--rounds", "2", "--no-peak-memory", "--by-op", "--json", str(out)]) == 0
    by_op = json.loads(out.read_text())["by_op"]
    assert set(by_op) == set(runtimes.split(","))
    for rt, profs in by_op.items():
        fp32, q = profs[str(tiny_onnx)], profs[str(int8)]
        assert fp32["depthwise conv"]["nodes"] == q["depthwise conv"]["nodes"] == 17, rt
        assert "quantize / dequantize" in q and "quantize / dequantize" not in fp32, rt
    printed = capsys.readouterr().out
    assert "# by kind of op on onnxruntime" in printed and "tiny_int8.onnx against tiny.onnx on onnxruntime:" in printed


def test_peak_memory_grows_with_the_model(tmp_path):
    from edgekd.bench.peak import measure_peak

    small = export_onnx(build({"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}),
                        tmp_path / "s.onnx", 32)
    big = export_onnx(build({"arch": "resnet50", "num_classes": 4, "cifar_stem": True}), tmp_path / "b.onnx", 32)
    a, b = (measure_peak("onnxruntime", p, 1, 32, 1, 8) for p in (small, big))
    assert b["model_peak_mb"] > a["model_peak_mb"] + 50  # ResNet-50 weights alone are ~90 MB
    assert "error" in next(iter(measure_peak("onnxruntime", tmp_path / "missing.onnx", 1, 32, 1, 8)))


def test_runtime_of_another_format_is_skipped(tiny_onnx, capsys):
    assert main(["bench", str(tiny_onnx), "--runtime", "onnxruntime,executorch", "--runs", "5", "--warmup", "1",
                 "--no-peak-memory"]) == 0
    out = capsys.readouterr().out
    assert "skip executorch:" in out and "Traceback" not in out


def test_missing_runtime_is_a_one_line_notice(tiny_onnx, monkeypatch, capsys):
    @RUNTIMES.register("not_installed_rt")
    class Missing(Runtime):
        module, install_hint = "no_such_module_xyz", "pip install no-such-runtime"

    try:
        assert main(["bench", str(tiny_onnx), "--runtime", "onnxruntime,not_installed_rt", "--runs", "5", "--warmup", "1"]) == 0
        out = capsys.readouterr().out
        assert "skip not_installed_rt: not installed (pip install no-such-runtime)" in out
        assert "Traceback" not in out
    finally:
        RUNTIMES._items.pop("not_installed_rt")


def test_unknown_runtime_and_broken_model_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["bench", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgekd: error:") and "broken.onnx" in err[0]
    assert main(["bench", str(bad), "--runtime", "tensorrt-ish"]) == 1
    assert "unknown runtime 'tensorrt-ish'" in capsys.readouterr().err


def test_headline_speed_is_the_gates_per_round_figure():
    """On a machine whose speed jumps between rounds (a shared VM), the p50s of all rounds can tie
    while int8 is faster in most rounds: the headline gives the median of per-round ratios, the
    figure the gate holds (stage.benchmark.speedup), not a ratio of p50s. Rounds of a real AVX2 EPYC run."""
    fp32 = [1.3123, 1.1524, 1.138, 0.5883, 1.3564, 1.1463, 0.5942, 0.6009, 0.6275, 0.9295]
    int8 = [1.0979, 1.0371, 1.0427, 0.5024, 1.1051, 1.028, 1.0359, 0.8045, 0.5522, 0.839]
    lat = lambda rounds, p50: {"onnxruntime/1t": {"p50_ms": p50, "round_p50_ms": rounds}}
    models = {"student_fp32": {"top1": 43.5, "size_bytes": 1_500_000, "latency": lat(fp32, 1.0337)},
              "int8_qat": {"top1": 45.0, "size_bytes": 600_000, "latency": lat(int8, 1.032), "label": "int8 QAT"}}
    h = headline_sentence(models)
    assert "int8 is 1.11x the speed of the fp32 student" in h and "NOTE" not in h, h
    models["int8_qat"]["latency"]["onnxruntime/1t"]["round_p50_ms"] = int8[:5]  # not timed in the same rounds: p50s
    assert "NOTE: int8 is not faster than the fp32 student here (1.00x)" in headline_sentence(models)


def test_headline_says_when_int8_is_not_faster():
    lat = lambda ms: {"onnxruntime/1t": {"p50_ms": ms}}
    models = {"teacher_fp32": {"top1": 92.0, "size_bytes": 94_000_000, "latency": lat(20.0)},
              "student_fp32": {"top1": 90.0, "size_bytes": 9_000_000, "latency": lat(1.0)},
              "int8_qat": {"top1": 89.5, "size_bytes": 2_500_000, "latency": lat(1.05), "label": "int8 QAT"}}
    h = headline_sentence(models)
    assert h.startswith("int8 QAT: 19.0x faster than teacher, 38x smaller, -2.5 points")
    assert "NOTE: int8 is not faster than the fp32 student here (0.95x)" in h and "quantization plan" not in h
    models["int8_qat"]["onnxruntime_int8_loses_time_on"] = "depthwise conv 0.7x (578 vs 406 us)"  # the quantize stage's profile
    assert headline_sentence(models).endswith("here (0.95x: int8 loses time on depthwise conv 0.7x (578 vs 406 us))")
    models["int8_qat"]["onnxruntime_int8_loses_time_on"] = "nothing"
    assert headline_sentence(models).endswith("here (0.95x)")
    del models["int8_qat"]["onnxruntime_int8_loses_time_on"]
    models["int8_qat"]["int8_layers"] = "0/52"  # the plan kept every layer fp32: the headline says why
    assert "the quantization plan keeps every ONNX layer fp32" in headline_sentence(models)
    del models["int8_qat"]["int8_layers"]
    models["int8_qat"]["latency"] = lat(0.4)
    assert "int8 is 2.50x the speed of the fp32 student" in headline_sentence(models)
    # several runtimes: the headline speaks for the fastest one, with its own accuracy and file size,
    # and still names a runtime where int8 does not pay
    for name, ms, top1, size in (("teacher_fp32", 30.0, 92.0, 90_000_000), ("student_fp32", 1.0, None, 8_000_000),
                                 ("int8_qat", 0.3, 89.0, 2_000_000)):
        models[name]["latency"]["executorch/1t"] = {"p50_ms": ms, "size_bytes": size, **({"top1": top1} if top1 else {})}
    models["student_fp32"]["latency"]["openvino/1t"] = {"p50_ms": 0.5}
    models["int8_qat"]["latency"]["openvino/1t"] = {"p50_ms": 0.55}
    h = headline_sentence(models)
    assert h.startswith("int8 QAT: 100.0x faster than teacher, 45x smaller, -3.0 points (executorch/1t)")
    assert "int8 is 3.33x the speed of the fp32 student on executorch/1t, 2.50x on onnxruntime/1t" in h
    assert h.endswith("NOTE: int8 is not faster than the fp32 student on openvino/1t (0.91x)")
    models["student_fp32"]["latency"]["litert/1t"] = {"p50_ms": 0.5}
    models["int8_qat"]["latency"]["litert/1t"] = {"p50_ms": 0.47}  # its int8 program, 6 % faster: not counted
    assert headline_sentence(models).endswith(
        "fp32 student on litert/1t (1.06x, less than the 1.1x counted as faster), openvino/1t (0.91x)")
    models["int8_qat"]["latency"]["litert/1t"] = {"p50_ms": 0.5}
    assert headline_sentence(models).endswith("fp32 student on litert/1t (1.00x), openvino/1t (0.91x)")
    # report.md: the result in bold, then a runtime per line
    report = {"pipeline": "p", "created": "now", "machine": {"cpu": "cpu", "isa": ["avx2"], "arch": "x86_64", "cores": 2},
              "device": "cpu", "threads": 2, "seed": 0, "stages": [], "models": models}
    md = render_markdown(report, {})
    assert "**int8 QAT: 100.0x faster than teacher, 45x smaller, -3.0 points (executorch/1t); int8 is 3.33x" in md
    assert "**NOTE: int8 is not faster than the fp32 student on:**\n\n- litert/1t (1.00x)\n- openvino/1t (0.91x)\n" in md
    for rt in ("student_fp32", "int8_qat"):
        del models[rt]["latency"]["litert/1t"]
    models["int8_qat"]["fp32_program_on"] = {"openvino": 0.55}  # its own plan shipped the fp32 program: it says why
    assert headline_sentence(models).endswith("on openvino/1t (0.91x: its file is the fp32 program, int8 ran at 0.55x "
                                              "there)")
    models["int8_qat"]["openvino_int8_loses_time_on"] = "depthwise conv 0.52x (218 vs 114 us)"  # where its runtime profiles ops
    assert headline_sentence(models).endswith("(0.91x: its file is the fp32 program, int8 ran at 0.55x there, losing time "
                                              "on depthwise conv 0.52x (218 vs 114 us))")
    del models["int8_qat"]["openvino_int8_loses_time_on"]
    models["int8_qat"]["latency"]["openvino/1t"]["p50_ms"] = 0.4  # the same fp32 program timed faster by chance (a shared VM)
    h = headline_sentence(models)
    assert "1.25x on openvino" not in h and h.endswith("on openvino/1t (1.25x: its file is the fp32 program, int8 ran at "
                                                       "0.55x there)")
    models["int8_qat"]["latency"]["openvino/1t"]["p50_ms"] = 0.55
    models["int8_qat"]["fp32_program_on"]["openvino"] = 1.2  # int8 was faster there, but outside the accuracy budget
    models["int8_qat"]["openvino_int8_loses_time_on"] = "depthwise conv 0.52x (218 vs 114 us)"
    assert headline_sentence(models).endswith("on openvino/1t (0.91x: its file is the fp32 program, as no int8 program "
                                              "held the accuracy budget (the fastest ran at 1.20x))")
    del models["int8_qat"]["openvino_int8_loses_time_on"]
    models["int8_qat"]["fp32_program_on"]["openvino"] = 0.55
    models["int8_qat"]["fp32_program_on"]["executorch"] = 0.9  # the fastest runtime's file is not int8: said up front
    assert headline_sentence(models).startswith("int8 QAT: 100.0x faster than teacher, 45x smaller, -3.0 points "
                                                "(executorch/1t, where its file is the fp32 program)")
    del models["int8_qat"]["fp32_program_on"]
    models["int8_qat"]["plan"] = "runs/a/03_export/int8_plan.json"  # pinned: no program was timed here
    assert headline_sentence(models).endswith("(0.91x: its program follows a pinned plan, untimed on this machine; "
                                              "plan: auto chooses per runtime)")
    del models["teacher_fp32"]["top1"]  # a teacher only the benchmark measured: its runtime's top-1
    assert headline_sentence(models).startswith("int8 QAT: 100.0x faster than teacher, 45x smaller, -3.0 points")
    for rt in ("onnxruntime/1t", "executorch/1t"):  # a teacher evaluated but not exported (export.include_teacher)
        del models["teacher_fp32"]["latency"][rt]
    models["teacher_fp32"]["top1"] = 92.0
    assert headline_sentence(models).startswith("int8 QAT: 47x smaller than teacher, top-1 89.00 % (-3.0 points vs "
                                                "teacher) (executorch/1t)")


def test_per_class_table_puts_the_classes_compression_cost_most_first(monkeypatch):
    from edgekd.bench import quality

    def pc(*recalls):
        return {"per_class": {f"c{i}": {"recall": r, "support": 10} for i, r in enumerate(recalls)}}

    models = {"student_input": {**pc(0.1, 0.1, 0.1), "label": "input"}, "teacher": {**pc(0.9, 0.8, 0.9), "label": "teacher"},
              "student_fp32": {**pc(0.8, 0.8, 0.5), "label": "fp32"}, "student_q": {**pc(0.8, 0.8, 0.5), "label": "same"},
              "int8_qat": {**pc(0.7, 0.9, 0.4), "label": "int8"}}
    rows = quality.per_class_markdown(models)
    assert rows[5] == "| class | images | teacher | fp32 | int8 | change |"  # the input and an unchanged hand-on left out
    assert rows[7:] == ["| c2 | 10 | 90.0 | 50.0 | 40.0 | -50.0 |", "| c0 | 10 | 90.0 | 80.0 | 70.0 | -20.0 |",
                        "| c1 | 10 | 80.0 | 80.0 | 90.0 | +10.0 |"]
    monkeypatch.setattr(quality, "PER_CLASS_ROWS", 2)
    rows = quality.per_class_markdown(models)
    assert "(2 of 3; report.json has every class)" in rows[3] and len(rows) == 9


def test_without_latency_the_headline_is_the_pipelines_last_model_not_the_best_scoring():
    """A short run can leave the trained student below its random input: the headline reports what
    the pipeline made, not the untrained input (nor a teacher or a baseline) for scoring higher."""
    models = {"student_input": {"top1": 41.7, "label": "student (input)"},
              "student_distilled": {"top1": 33.3, "label": "student (kd)"},
              "student_ce_baseline": {"top1": 35.0, "label": "student (ce, no teacher)"},
              "teacher": {"top1": 90.0, "label": "teacher"}}
    assert headline_sentence(models) == "student (kd): top-1 33.30 % (-56.70 points vs teacher); no latency measured"
    models["pruned_fp32"] = {"top1": 30.0, "label": "pruned"}
    assert headline_sentence(models).startswith("pruned: top-1 30.00 %")
    assert headline_sentence({"student_input": {"top1": 10.0, "label": "student (input)"}}).startswith("student (input)")


@pytest.mark.parametrize("support,top1,flagged", [
    ([100] * 10, 14.9, (10.0, 5.0)), ([100] * 10, 15.0, None),  # the 5-point floor on a large split
    ([10, 10], 80.0, (50.0, 33.5)), ([10, 10], 85.0, None),  # three standard deviations on a small one
    ([900, 50, 50], 90.0, (90.0, 5.0)),  # always naming the largest class scores its share
])
def test_guessing_level_is_chance_or_the_largest_class_within_a_margin(support, top1, flagged):
    from edgekd.metrics import guessing_level

    m = {"top1": top1, "per_class": {str(i): {"support": n} for i, n in enumerate(support)}}
    assert guessing_level(m) == flagged


def test_the_teachers_gain_is_called_noise_unless_the_paired_test_says_otherwise():
    """KD-over-CE on the same test images: the images the two students disagree on decide. 10 the
    distilled one gets right and the other wrong, against 2 the other way, is a gain (+8 points,
    p 0.04); 6 against 4 (+2 points) is noise."""
    from edgekd.bench.summary import gain_note, headline_parts
    from edgekd.metrics import gain_over

    labels = [0] * 100
    def model(wrong):  # predictions wrong on the given images
        return [1 if i in wrong else 0 for i in range(100)]

    ce = model(set(range(0, 20)))
    strong = gain_over(ce, model(set(range(10, 20)) | {50, 51}), labels)  # 10 fixed, 2 broken
    assert strong == {"points": 8.0, "images": 100, "better": 10, "worse": 2, "p": pytest.approx(0.0386, abs=1e-4)}
    assert gain_note(strong).startswith("the teacher bought +8.0 points over the same student trained without it "
                                        "(100 test images, McNemar p = 0.039: 10 better, 2 worse)")
    weak = gain_over(ce, model(set(range(6, 20)) | {50, 51, 52, 53}), labels)  # 6 fixed, 4 broken
    assert (weak["points"], weak["p"]) == (2.0, pytest.approx(0.7539, abs=1e-4))
    assert "within the test images' noise" in gain_note(weak)
    worse = gain_over(model(set(range(10, 20)) | {50, 51}), ce, labels)
    assert gain_note(worse).startswith("the student trained without the teacher scored 8.0 points higher")
    models = {"student_distilled": {"top1": 90.0, "vs_ce_baseline": weak}}
    assert gain_note(weak) in headline_parts(models)[2]
    models["teacher"] = {"top1": 10.0, "near_chance": "10.0 %, no better than guessing"}
    assert not any("noise" in n for n in headline_parts(models)[2])  # a guessing teacher's note says it all


def test_imbalanced_benchmark_builds_a_long_tail_and_a_balanced_test_folder(tmp_path):
    import importlib.util
    import io
    import tarfile

    spec = importlib.util.spec_from_file_location("imbalanced", Path(__file__).resolve().parents[1] / "benchmarks/imbalanced.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    archive = tmp_path / "c.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for c in mod.CLASSES:
                for i in range(8):
                    info = tarfile.TarInfo(f"cifar10/{split}/{c}/{i:04d}.jpg")
                    info.size = 3
                    tar.addfile(info, io.BytesIO(b"jpg"))
    counts = mod.build(archive, tmp_path / "lt", n_max=8, ratio=4.0, test_per_class=2)
    assert counts["airplane"] == 8 and counts["truck"] == 2 and list(counts.values()) == sorted(counts.values(), reverse=True)
    for c in mod.CLASSES:
        assert len(list((tmp_path / "lt/train" / c).iterdir())) == counts[c]
        assert len(list((tmp_path / "lt/test" / c).iterdir())) == 2


def test_pareto_front():
    assert pareto([(1.0, 80.0), (2.0, 90.0), (3.0, 85.0), (0.5, 70.0)]) == [0, 1, 3]


def test_kd_vs_ce_benchmark_tabulates_every_step(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kd_vs_ce", Path(__file__).resolve().parents[1] / "benchmarks/kd_vs_ce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def report(step1, qat, corrupted):
        return {"models": {"student_input": {"top1": 90.0},
                           "int8_qat": {"top1": qat, "corruption_top1": corrupted, "corruption_drop_points": qat - corrupted,
                                        "calibration": {"ece_before": 0.08, "ece_after": 0.02}}},
                "stages": [{"name": "prune", "info": {"steps": [{"step": 1, "macs_kept": 0.5, "top1_after_finetune": step1}]}}]}

    for run, wrong in (("kd", 0), ("ce", 3)):  # CE in the loop gets 3 of 4 images wrong where KD gets none
        (tmp_path / run).mkdir()
        (tmp_path / run / "predictions.json").write_text(json.dumps(
            {"split": "s", "labels": [1, 1, 1, 1, 0, 0], "models": {"int8_qat": [0] * wrong + [1] * (4 - wrong) + [0, 0]}}))
    assert mod.paired_lines(tmp_path / "kd", tmp_path / "ce") == [
        "- int8 QAT: KD +50.00 points over CE on the same 6 test images, McNemar p = 0.25 (3 better, 0 worse)"]
    md = mod.table(mod.rows(report(88.0, 87.5, 70.0)), mod.rows(report(87.0, 86.0, 67.0)), 92.0)
    assert "| prune step 1 (50% MACs), after fine-tune | 88.00 | 87.00 | +1.00 |" in md
    assert "| int8 QAT (onnxruntime) | 87.50 | 86.00 | +1.50 |" in md
    assert "| int8 QAT: mean top-1 on corrupted images | 70.00 | 67.00 | +3.00 |" in md
    assert "| int8 QAT: ECE x100 before / after temperature | 8.00 / 2.00 | 8.00 / 2.00 | |" in md
    assert mod.CE == ["prune.finetune.loss=ce", "quantize.qat.loss=ce"]
    rob = lambda clean, by: {"robustness": {"images": 4, "clean_top1": clean, "corruption_top1": 60.0,  # noqa: E731
                                            "drop_points": clean - 60.0, "by_severity": {"1": 65.0, "3": 55.0},
                                            "by_corruption": {"jpeg": by, "occlusion": {"1": 50.0, "3": 40.0}}}}
    kd = {"models": {"teacher_fp32": rob(90.0, {"1": 80.0, "3": 70.0}), "int8_qat": rob(85.0, {"1": 70.0, "3": 60.0})}}
    ce = {"models": {"int8_qat": rob(80.0, {"1": 60.0, "3": 50.0})}}
    md = mod.robustness_table(kd, ce)
    assert md.startswith("## Robustness") and "Top-1 % on 4 test images" in md and "severities 1, 3" in md
    assert "| teacher fp32 | 90.00 | 60.00 | 30.00 | – | 75.0 | 45.0 |" in md
    assert "| int8 QAT, KD in the loop | 85.00 | 60.00 | 25.00 | – | 65.0 | 45.0 |" in md
    assert "| int8 QAT, CE in the loop | 80.00 | 60.00 | 20.00 | – | 55.0 | 45.0 |" in md
    assert "unpruned" not in md and mod.robustness_table({"models": {}}, {"models": {}}) == ""


def test_teacher_rows_show_its_pytorch_top1_unless_asked_to_measure_it(minimal_pipeline, write_pipeline, tmp_path,
                                                                      monkeypatch):
    """A teacher on 1 thread is the slowest accuracy pass of the benchmark, and export verified its
    files against PyTorch (on fewer images than the students' files: it is the reference, never
    shipped): by default its rows carry the PyTorch top-1; `teacher_accuracy: true` measures it
    on each runtime like every other file."""
    from edgekd.stages import export

    monkeypatch.setattr(export, "TEACHER_VERIFY_IMAGES", 4)
    cfg = minimal_pipeline
    cfg["stages"] += [{"export": {"formats": ["onnx"], "verify_images": 6}},
                      {"benchmark": {"runtimes": ["onnxruntime"], "runs": 5, "warmup": 1, "rounds": 1, "throughput_batch": 2}}]
    out = tmp_path / "run"
    assert main(["run", str(write_pipeline(cfg)), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    verified = next(s for s in report["stages"] if s["name"] == "export")["info"]
    assert verified["teacher_fp32"]["verify"]["images"] == 4 and verified["student_fp32"]["verify"]["images"] == 6
    models = report["models"]
    teacher = models["teacher_fp32"]
    assert teacher["top1"] == models["teacher"]["top1"] and "PyTorch" in teacher["top1_measured_by"]
    assert "top1" not in teacher["latency"]["onnxruntime/1t"] and "top1" in models["student_fp32"]["latency"]["onnxruntime/1t"]
    # the unit pipeline's teacher has no checkpoint: random weights, which the headline says
    assert models["teacher"]["near_chance"].endswith("no better than guessing (33.3 %, within 57.7 points)")
    assert "the teacher scores" in report["headline"] and "taught nothing" in report["headline"]
    assert main(["run", str(write_pipeline(cfg)), "--resume", str(out), "--set", "benchmark.teacher_accuracy=true"]) == 0
    models = json.loads((out / "report.json").read_text())["models"]
    assert models["teacher_fp32"]["latency"]["onnxruntime/1t"]["eval_images"] == 6  # the 6 test images
    # `edgekd bench --data <the pipeline>` judges a file on the run's own test split, as the run did
    bench = tmp_path / "bench.json"
    assert main(["bench", str(out / "01_export" / "student_fp32.onnx"), "--runtime", "onnxruntime", "--runs", "5",
                 "--warmup", "1", "--rounds", "1", "--no-peak-memory", "--data", str(write_pipeline(cfg)),
                 "--json", str(bench)]) == 0
    assert json.loads(bench.read_text())["results"][0]["top1"] == models["student_fp32"]["latency"]["onnxruntime/1t"]["top1"]


def test_reports_name_the_kernels_pytorch_ran_where_they_are_capped_below_the_cpu():
    """ATEN_CPU_CAPABILITY holds PyTorch's own kernels below the CPU's best (an AVX2 stand-in on an
    AVX-512 machine): the machine record says so, so a figure is not quoted for the wrong ISA."""
    from edgekd.bench.machine import machine_info

    if "avx2" not in machine_info()["isa"]:
        pytest.skip("not an x86 CPU with AVX2")
    code = "import torch; from edgekd.bench.machine import machine_info; print(machine_info()['torch_kernels'])"

    def kernels(**env) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, **env}).stdout.strip()

    assert kernels() in ("AVX2", "AVX512") and kernels(ATEN_CPU_CAPABILITY="avx2") == "AVX2"


def test_report_names_the_images_that_judged_int8_plans():
    cand = {"plan": "int8", "fp32_blocks": [], "p50_ms": 0.4, "speedup_vs_fp32": 1.3, "top1": 50.0, "drop_points": 0.1}
    fmt = {"chosen": "int8", "runtime": "executorch", "candidates": [{**cand, "plan": "int8"}]}
    stage = {"index": 0, "name": "quantize", "seconds": 1.0, "metrics": {}, "info": {"plan": "int8", "plan_candidates": [cand]}}
    report = {"pipeline": "p", "created": "now", "machine": {"cpu": "cpu", "isa": ["avx2"], "arch": "x86_64", "cores": 2},
              "device": "cpu", "threads": 2, "seed": 0, "stages": [stage], "models": {}}
    for judged, said in (("val", "top-1 on the validation split (500 images)"),
                         ("test", "top-1 on the test split (500 images; no `data.val_split`, so these images also report")):
        stage["info"]["plan_judged_on"] = judged
        stage["info"]["int8_qat"] = {"pte_int8_plan": {**fmt, "judged_on": f"{judged} (500 images)"}}
        md = render_markdown(report, {})
        assert f"{said}" in md and "| int8_qat (pte) | executorch | **int8** | 0.4 | 1.3x | 50.0 |" in md
        assert ("top-1 on the validation split, –" if judged == "val" else "no `data.val_split`, so these images also "
                "report the result), –") in md
