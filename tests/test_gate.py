"""The CI gate's statistics: speed timed interleaved in rounds (a burst of load hits every
model alike, ratios are per round) and accuracy compared image by image (exact McNemar)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgekd.bench.measure import round_ratio, time_interleaved
from edgekd.check import compare, run_check
from edgekd.metrics import mcnemar_p, paired


def test_mcnemar_p_matches_the_binomial_tail():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_p(3, 3) == pytest.approx(sum(__import__("math").comb(6, k) for k in range(3, 7)) / 64)
    assert mcnemar_p(12, 2) < 0.01 < mcnemar_p(8, 3)


def _report(top1: float) -> dict:
    return {"metrics": {"model.int8_qat.top1": top1}}


def _preds(n: int, wrong: set[int]) -> list[int]:
    return [1 if i in wrong else 0 for i in range(n)]  # label 0 everywhere: 1 is a miss


def test_gate_fails_a_significant_drop_and_passes_noise_of_the_same_size_in_points():
    labels = [0] * 500
    base_wrong = set(range(0, 50))  # 90 % on 500 images
    base = {"metrics": {"model.int8_qat.top1": {"value": 90.0, "tolerance": {"abs": 2.0}, "direction": "higher"}},
            "predictions": {"labels": labels, "models": {"int8_qat": _preds(500, base_wrong)}}}
    # 1.6 points down, but 20 images flipped each way and 8 more against: chance
    noisy = base_wrong - set(range(20)) | set(range(100, 128))
    rows, failed = compare(_report(100 - len(noisy) / 5), base, {"labels": labels, "models": {"int8_qat": _preds(500, noisy)}})
    assert not failed and rows[0]["verdict"] == "ok" and "McNemar" in rows[0]["tolerance"]
    # 1.6 points down, every flipped image against the new run: a real regression a 2-point tolerance misses
    drop = base_wrong | set(range(100, 108))
    rows, failed = compare(_report(100 - len(drop) / 5), base, {"labels": labels, "models": {"int8_qat": _preds(500, drop)}})
    assert failed and rows[0]["verdict"] == "REGRESSION" and "8 worse, 0 better" in rows[0]["tolerance"]
    # other images (another labels list): back to the fixed tolerance
    rows, failed = compare(_report(88.4), base, {"labels": [0] * 400, "models": {"int8_qat": _preds(400, set())}})
    assert not failed and rows[0]["tolerance"] == "±2"


def test_check_reads_predictions_beside_the_report_and_baselines_keep_them(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"metrics": {"model.int8_qat.top1": 90.0, "model.int8_qat.n": 10}}))
    (run / "predictions.json").write_text(json.dumps({"split": "k", "labels": [0] * 10,
                                                      "models": {"int8_qat": [0] * 9 + [1], "teacher": [0] * 10}}))
    baseline = tmp_path / "b.json"
    assert run_check(run, baseline, update=True) == 0
    stored = json.loads(baseline.read_text())
    assert set(stored["predictions"]["models"]) == {"int8_qat"}  # only the tracked variants
    assert run_check(run, baseline) == 0 and "McNemar p=1" in capsys.readouterr().out
    assert paired([0, 1, 0], [1, 0, 0], [0, 0, 0]) == {"worse": 1, "better": 1, "p_worse": 0.75, "p_better": 0.75}


class _Clock:
    """Runners whose cost is a fixed number of milliseconds, with a load burst between two
    wall-clock instants that doubles whatever runs then."""

    def __init__(self, burst_start: float, burst_len: float):
        self.t0 = time.perf_counter()
        self.burst = (burst_start, burst_start + burst_len)

    def runner(self, ms: float):
        def run(_x):
            now = time.perf_counter() - self.t0
            busy = self.burst[0] <= now < self.burst[1]
            time.sleep(ms / 1e3 * (3.0 if busy else 1.0))
        return run


def test_interleaved_rounds_keep_the_ratio_when_a_burst_of_load_hits_one_block():
    """Timed in blocks, a burst that lands on one model triples its figure; timed interleaved,
    the per-round ratio's median stays at the true 4x."""
    x = np.zeros(1, np.float32)
    clock = _Clock(burst_start=0.05, burst_len=0.25)
    blocked = {n: time_interleaved({n: clock.runner(ms)}, x, 0, 40, 1)[n] for n, ms in (("slow", 4.0), ("fast", 1.0))}
    clock = _Clock(burst_start=0.05, burst_len=0.25)
    rounds = time_interleaved({"slow": clock.runner(4.0), "fast": clock.runner(1.0)}, x, 0, 40, 10)
    assert rounds["slow"]["rounds"] == 10 and len(rounds["fast"]["round_p50_ms"]) == 10
    assert rounds["fast"]["p50_iqr_ms"][0] <= rounds["fast"]["p50_ms"] <= rounds["fast"]["p50_iqr_ms"][1]
    assert round_ratio(rounds["slow"], rounds["fast"]) == pytest.approx(4.0, rel=0.25)
    assert abs(round_ratio(blocked["slow"], blocked["fast"]) - 4.0) > 2.0  # the block timing's error


def test_the_model_timed_after_a_teacher_is_not_slower_than_its_identical_twin():
    """Each round's order rotates, but the model after the teacher in that order follows it in most
    rounds, and a big model evicts a small one's weights: its first calls after it run slow.
    Every model re-warmed for as long as the teacher's call takes, it is timed as fast as its twin."""
    state = {"last": None, "cold": 0}

    def runner(name, ms):
        def run(_x):
            if state["last"] != name:
                state["cold"] = 4 if state["last"] == "teacher" else 0  # its caches were evicted
                state["last"] = name
            slow, state["cold"] = state["cold"] > 0, max(0, state["cold"] - 1)
            time.sleep((2.0 if slow else ms) / 1e3)
        return run

    x = np.zeros(1, np.float32)
    models = {"fp32": 0.3, "twin": 0.3, "int8": 0.2, "unpruned": 0.5, "teacher": 5.0}  # a benchmark stage's order
    out = time_interleaved({n: runner(n, ms) for n, ms in models.items()}, x, 10, 50, 10)
    assert round_ratio(out["fp32"], out["twin"]) == pytest.approx(1.0, abs=0.25)


def test_a_slow_model_is_timed_fewer_times_in_the_same_rounds():
    """A teacher that takes tens of ms a call gets MIN_CALLS a round, not the students' share of
    `runs`, and keeps every round, so its ratios are still taken round by round."""
    from edgekd.bench import measure

    calls = {"teacher": 0, "student": 0}

    def runner(name, ms):
        def run(_x):
            calls[name] += 1
            time.sleep(ms / 1e3)
        return run

    x = np.zeros(1, np.float32)
    out = time_interleaved({"teacher": runner("teacher", 60.0), "student": runner("student", 0.2)}, x, 30, 100, 4)
    assert out["teacher"]["runs"] == 4 * measure.MIN_CALLS and out["student"]["runs"] == 100
    assert len(out["teacher"]["round_p50_ms"]) == len(out["student"]["round_p50_ms"]) == 4
    assert calls["teacher"] < 30 + 4 + out["teacher"]["runs"]  # warm-up stopped at WARMUP_MS, not 30 calls
    assert round_ratio(out["teacher"], out["student"]) > 50
    batch = measure.time_runner(runner("teacher", 400.0), x, 3, 5)  # a teacher's batch of 32: seconds a call
    assert batch["runs"] == measure.MIN_CALLS


def test_speed_ratios_are_gated_per_cpu_class():
    from edgekd.check import baseline_from_report

    vnni = {"isa": ["avx2", "avx512f", "avx512bw", "avx512_vnni"], "arch": "x86_64"}
    avx2 = {"isa": ["avx2", "fma"], "arch": "x86_64"}
    key = "stage.benchmark.speedup.student_fp32/int8_qat@onnxruntime/1t"
    base = baseline_from_report({"machine": vnni, "metrics": {key: 1.7}})
    assert base["metrics"][key]["by_cpu"] == {"x86-64 AVX-512 VNNI": 1.7}
    base = baseline_from_report({"machine": avx2, "metrics": {key: 1.25}}, base)  # a second class joins
    assert base["metrics"][key]["by_cpu"] == {"x86-64 AVX-512 VNNI": 1.7, "x86-64 AVX2 without VNNI": 1.25}
    rows, failed = compare({"machine": avx2, "metrics": {key: 1.2}}, base)
    assert not failed and rows[0]["baseline"] == 1.25  # AVX2 is held to its own figure, not VNNI's
    rows, failed = compare({"machine": vnni, "metrics": {key: 1.1}}, base)
    assert failed and rows[0]["verdict"] == "REGRESSION"
    arm = {"isa": ["asimd"], "arch": "aarch64"}
    rows, failed = compare({"machine": arm, "metrics": {key: 1.05}}, base)
    assert not failed and "no aarch64" in rows[0]["tolerance"]
    assert compare({"machine": arm, "metrics": {key: 0.9}}, base)[1]  # slower than fp32 fails anywhere


def test_a_cpu_class_joins_a_baseline_without_moving_its_accuracy_reference(tmp_path, capsys):
    """--add-cpu-figures stores one class's speed ratios beside the others and leaves the stored
    figures, tolerances and predictions as they are; a stored ratio's tolerance never lets a
    speedup fall below 1x, the bound a class without a figure is held to."""
    from edgekd.check import baseline_from_report
    from edgekd.cli import main

    vnni = {"isa": ["avx2", "avx512f", "avx512bw", "avx512_vnni"], "arch": "x86_64"}
    amx = {"isa": ["avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"], "arch": "x86_64"}
    speed, top1 = "stage.benchmark.speedup.student_fp32/int8_qat@onnxruntime/1t", "model.int8_qat.top1"
    teacher = "stage.benchmark.speedup.teacher_fp32/int8_qat@onnxruntime/1t"
    base = baseline_from_report({"machine": vnni, "metrics": {speed: 1.7, teacher: 25.0, top1: 85.2}},
                                predictions={"split": "s", "labels": [0, 1], "models": {"int8_qat": [0, 1]}})
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(base))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"machine": amx, "metrics": {speed: 1.22, teacher: 22.8, top1: 83.0}}))
    assert main(["check", str(report), "--baseline", str(path), "--add-cpu-figures"]) == 0
    assert "2 speed ratios stored for x86-64 AMX-INT8" in capsys.readouterr().out
    new = json.loads(path.read_text())
    assert new["predictions"] == base["predictions"] and new["metrics"][top1] == base["metrics"][top1]
    assert new["metrics"][speed]["by_cpu"] == {"x86-64 AVX-512 VNNI": 1.7, "x86-64 AMX-INT8": 1.22}
    assert new["metrics"][speed]["value"] == 1.7 and new["metrics"][teacher]["by_cpu"]["x86-64 AMX-INT8"] == 22.8
    # AMX now holds the teacher ratio to its own figure (22.8x less 30 %), not only above 1x
    rows, failed = compare({"machine": amx, "metrics": {speed: 1.15, teacher: 14.0, top1: 85.2}}, new)
    assert failed and [r["verdict"] for r in rows if r["metric"] == teacher] == ["REGRESSION"]
    # 1.22x less 30 % would be 0.85x: the bound stays at 1x
    rows, failed = compare({"machine": amx, "metrics": {speed: 0.95, teacher: 22.0, top1: 85.2}}, new)
    assert failed and next(r for r in rows if r["metric"] == speed)["verdict"] == "REGRESSION"
    assert not compare({"machine": amx, "metrics": {speed: 1.02, teacher: 22.0, top1: 85.2}}, new)[1]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"machine": amx, "metrics": {top1: 80.0}}))
    assert main(["check", str(other), "--baseline", str(path), "--add-cpu-figures"]) == 2
    assert json.loads(path.read_text()) == new  # nothing written


def _timed_report(machine: dict, ratios: list[float]) -> dict:
    """A report whose benchmark stage timed the fp32 and int8 files in the same rounds, the fp32
    file at 1.7 ms and the int8 file at whatever gives each round's ratio."""
    key = "stage.benchmark.speedup.student_fp32/int8_qat@onnxruntime/1t"
    lat = lambda r: {"latency": {"onnxruntime/1t": {"round_p50_ms": r}}}  # noqa: E731
    return {"machine": machine, "metrics": {key: float(np.median(ratios))},
            "stages": [{"name": "benchmark", "models": {"student_fp32": lat([1.7] * len(ratios)),
                                                        "int8_qat": lat([1.7 / r for r in ratios])}}]}


def test_a_speed_ratio_fails_when_its_rounds_agree_not_on_a_noisy_moment():
    """The gate's figure is the median of per-round ratios; below its bound, it is a regression only
    where the rounds' upper quartile is below it too, as when an int8 file stops paying."""
    from edgekd.check import baseline_from_report, round_ratios

    vnni = {"isa": ["avx2", "avx512f", "avx512bw", "avx512_vnni"], "arch": "x86_64"}
    base = baseline_from_report(_timed_report(vnni, [1.7] * 10))  # 1.7x, bound 1.19x
    # another process shares the core: rounds scatter both ways and the median dips under the bound
    noisy = _timed_report(vnni, [0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.35, 1.5, 1.7, 1.8])
    assert round_ratios(noisy, next(iter(noisy["metrics"]))) == pytest.approx(
        [0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.35, 1.5, 1.7, 1.8])
    rows, failed = compare(noisy, base)
    assert not failed and rows[0]["now"] < 1.19 and "q75" in rows[0]["tolerance"]
    lost = _timed_report(vnni, [0.98, 1.0, 1.02, 1.05, 1.06, 1.08, 1.1, 1.12, 1.15, 1.25])  # int8 no longer pays
    rows, failed = compare(lost, base)
    assert failed and rows[0]["verdict"] == "REGRESSION"
    # a report without the rounds (an older one) is judged on its figure alone
    assert compare({"machine": vnni, "metrics": noisy["metrics"]}, base)[1]


def test_a_planned_int8_file_size_is_bounded_by_its_fp32_source_not_held_to_a_stored_figure():
    """`plan: auto` keeps fp32 the blocks where int8 does not pay (or costs accuracy) where it is
    timed, so the file's size moves with the CPU class and with timing noise: it must only be no
    larger than the fp32 file it was quantized from. A fixed plan's size keeps its stored figure."""
    from edgekd.check import baseline_from_report

    vnni = {"isa": ["avx2", "avx512f", "avx512bw", "avx512_vnni"], "arch": "x86_64"}
    key, fp32_key = "model.int8_ptq.size_bytes", "model.student_fp32.size_bytes"

    def report(int8_bytes, plan="auto"):
        return {"machine": vnni, "metrics": {key: int8_bytes, fp32_key: 4_640_000},
                "models": {"int8_ptq": {"plan": plan, "quantized_from": "student_fp32"}, "student_fp32": {}}}

    base = baseline_from_report(report(1_460_000))
    rows, failed = compare(report(1_940_000), base)  # the same machine's plan kept two more blocks fp32
    row = next(r for r in rows if r["metric"] == key)
    assert not failed and row["verdict"] == "ok" and row["baseline"] == 4_640_000 and "student_fp32" in row["tolerance"]
    assert next(r for r in compare(report(1_000_000), base)[0] if r["metric"] == key)["verdict"] == "ok"  # not "improved"
    rows, failed = compare(report(4_700_000), base)  # larger than the fp32 file it came from
    assert failed and next(r for r in rows if r["metric"] == key)["verdict"] == "REGRESSION"
    fixed = baseline_from_report(report(1_460_000, plan="int8"))
    assert compare(report(1_940_000, plan="int8"), fixed)[1]  # a fixed plan: ±5 % of its figure
