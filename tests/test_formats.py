"""The format registry (issue 15's redesign): every installed format takes a tiny model through
export, metadata round trip, its runner and verification; the export stage's format options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.formats import FORMATS, Variant, enabled_formats
from edgekd.formats.base import ConvertJob, ExportJob, Format
from edgekd.onnx_export import metadata
from edgekd.quant.plan import PATTERN
from edgekd.stages.export import ExportConfig

INSTALLED = [n for n in FORMATS.names() if FORMATS.get(n).available() is None]
# formats with a quantizer of their own; OpenVINO ships the quantize stage's file (formats.openvino)
QUANTIZERS = [n for n in INSTALLED if FORMATS.get(n).own_int8 and n != "openvino"]


def test_the_registry_lists_onnx_executorch_and_litert_and_onnx_is_primary():
    assert {"onnx", "executorch", "litert"} <= set(FORMATS.names())
    assert [n for n in FORMATS.names() if FORMATS.get(n).primary] == ["onnx"]


@pytest.mark.parametrize("name", INSTALLED)
def test_a_tiny_model_through_every_installed_format(tiny, tmp_path, name):
    model, data = tiny
    fmt = FORMATS.get(name)()
    job = ExportJob(data, 48, 0.5, ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:16]).numpy()))
    v = Variant("student_fp32", model, max_abs=1e-3, min_agreement=0.99)
    path = fmt.export(v, tmp_path / f"m{fmt.suffix}", job.convert)
    fmt.write_metadata(path, metadata(data, v.name))
    fmt.write_metadata(path, {"edgekd.temperature": "1.5"})  # merges, as calibration adds its key later
    meta = fmt.read_metadata(path)
    assert meta["edgekd.classes"] == '["a", "b", "c", "d"]' and meta["edgekd.temperature"] == "1.5"
    x = data.normalize(data.test.images[:8]).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(fmt.runner(path)(x) - ref).max() < 1e-3
    check = fmt.verify(path, v, job)
    assert check["max_abs_diff"] < 1e-3 and check["top1_agreement"] == 1.0


def test_unknown_format_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown format 'tflit'.*known: executorch, litert, onnx"):
        ExportConfig(formats=["tflit"])


def test_a_format_list_always_includes_onnx_the_reference_format():
    assert ExportConfig(formats=["executorch"]).formats == ["onnx", "executorch"]
    assert ExportConfig().formats == "auto"


def test_executorch_switch_still_decides_under_auto():
    got, _ = enabled_formats("auto", "off")
    assert [f.key for f in got][0] == "onnx" and "pte" not in [f.key for f in got]
    if FORMATS.get("executorch").available() is None:
        got, _ = enabled_formats("auto", "auto")
        assert [f.key for f in got][0] == "onnx" and "pte" in [f.key for f in got]  # the primary format first


def test_a_listed_format_that_is_not_installed_is_an_error(monkeypatch):
    monkeypatch.setattr(FORMATS.get("executorch"), "available", classmethod(lambda cls: "not installed (hint)"))
    with pytest.raises(EdgekdError, match=r"export.formats: executorch is not installed \(hint\)"):
        enabled_formats(["onnx", "executorch"], "auto")
    got, skipped = enabled_formats("auto", "auto")
    assert "pte" not in [f.key for f in got] and skipped["executorch"] == "not installed (hint)"


def test_a_listed_format_that_is_not_installed_fails_validation_naming_the_extra(monkeypatch):
    monkeypatch.setattr(FORMATS.get("litert"), "available", classmethod(lambda cls: "not installed (pip install 'edgekd[litert]')"))
    with pytest.raises(ValueError, match=r"litert is not installed \(pip install 'edgekd\[litert\]'\)"):
        ExportConfig(formats=["litert"])


def test_format_options_are_validated_by_the_format():
    assert ExportConfig(options={"litert": {"integer_io": True}}).options["litert"].integer_io is True
    with pytest.raises(ValueError, match=r"litert.integer_iox: Extra inputs"):
        ExportConfig(options={"litert": {"integer_iox": True}})
    with pytest.raises(ValueError, match=r"onnx: this format takes no options"):
        ExportConfig(options={"onnx": {}})
    with pytest.raises(ValueError, match=r"unknown format 'litrt'.*did you mean 'litert'"):
        ExportConfig(options={"litrt": {}})


@pytest.mark.parametrize("name", QUANTIZERS)
def test_formats_that_quantize_themselves_write_a_verified_int8_file(tiny_trained, tmp_path, name):
    """ExecuTorch and LiteRT quantize the float student on the calibration images themselves."""
    model, data = tiny_trained
    fmt = FORMATS.get(name)()
    job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:32]).numpy()))
    v = Variant("int8_ptq", model, int8=True, min_agreement=0.8)
    path = fmt.export(v, tmp_path / f"int8{fmt.suffix}", job.convert)
    check = fmt.verify(path, v, job)
    assert check["decisive_images"] >= 10 and check["decisive_agreement"] >= 0.8


# ----------------------------------------------------------------------------- own int8, own plan


OWN_INT8 = [n for n in INSTALLED if FORMATS.get(n).own_int8]


@pytest.mark.parametrize("name", QUANTIZERS)
def test_modules_kept_fp32_by_a_plan_stay_float_in_the_formats_own_int8(tiny_trained, tmp_path, name):
    """The quantizer's per-module override: with every block kept fp32 (by module path, and by one
    of the user's keep_fp32 patterns) the int8 export is the float program (same outputs), with
    none it is not."""
    model, data = tiny_trained
    fmt = FORMATS.get(name)()
    job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:32]).numpy()))
    v = Variant("int8_ptq", model, int8=True, min_agreement=0.8)
    x = data.normalize(data.test.images[:16]).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    every = fmt.runner(fmt.export(v, tmp_path / f"all{fmt.suffix}", job.convert, keep_fp32=["features", PATTERN + "classifier*"]))(x)
    none = fmt.runner(fmt.export(v, tmp_path / f"int8{fmt.suffix}", job.convert))(x)
    rel = lambda out: np.abs(out - ref).max() / np.abs(ref).max()  # noqa: E731
    assert rel(every) < 1e-5 and rel(none) > 1e-3


def _timed(p50: dict):
    """time_interleaved's answer with fixed medians (the rule is under test, not this CPU)."""
    return lambda runners, x, warmup, runs, rounds: {n: {"p50_ms": p50.get(n, 1.0), "round_p50_ms": [p50.get(n, 1.0)] * 3}
                                                    for n in runners}


class _Fake(Format):
    """A format whose programs are files naming their candidate and whose runner answers each
    candidate's fixed logits: the planning rule without real exports."""

    key, suffix, runtime, own_int8 = "fake", ".fake", "fakert", True
    logits: dict = {}
    # microseconds by kind of op per program (Format.op_profile): every int8 program's depthwise convs are slower
    profiles = {name: {"depthwise conv": {"nodes": 2, "us": dw}, "1x1 conv / dense": {"nodes": 3, "us": pw}}
                for name, dw, pw in (("fp32", 20.0, 40.0), ("int8", 30.0, 15.0), ("plan", 30.0, 20.0))}

    def op_profile(self, path, x):
        return self.profiles[path.read_text()]

    def export(self, v, path, job, keep_fp32=()):
        name = "fp32" if not v.int8 else ("int8" if not keep_fp32 else "plan")
        path.write_text(name)
        return path

    def runner(self, path, threads=1):
        name = path.read_text()
        return lambda x: self.logits[name][: len(x)]


def _plan_int8(fmt, v, path, job, plan, max_drop, plan_name):
    """The export stage's two steps for one int8 file: write the candidates, then choose."""
    from edgekd.formats.int8_plan import choose_int8, int8_candidates

    files = {}
    for name, (variant, keep, tmp) in int8_candidates(fmt, v, path, plan, plan_name).items():
        fmt.export(variant, tmp, job.convert, keep_fp32=keep or [])
        files[name] = (keep, tmp)
    return choose_int8(fmt, v, path, files, job, max_drop)


@pytest.mark.parametrize("p50,correct,max_drop,want", [
    ({"fp32": 1.0, "int8": 0.5, "quantize plan (p)": 0.7}, {"int8": 40, "plan": 40}, 0.5, "int8"),  # fastest within budget
    ({"fp32": 1.0, "int8": 0.5, "quantize plan (p)": 0.7}, {"int8": 30, "plan": 40}, 0.5, "quantize plan (p)"),  # accuracy
    ({"fp32": 1.0, "int8": 0.99, "quantize plan (p)": 0.7}, {"int8": 40, "plan": 40}, 0.5, "quantize plan (p)"),  # margin
    ({"fp32": 1.0, "int8": 1.4, "quantize plan (p)": 1.2}, {"int8": 40, "plan": 40}, 0.5, "fp32"),  # nothing pays
    ({"fp32": 1.0, "int8": 0.5, "quantize plan (p)": 0.7}, {"int8": 34, "plan": 38}, 0.5, "quantize plan (p)"),  # none
    # within the budget: the most accurate int8 that pays; below, both would fail verification (agreement 79 % < 80 %)
    ({"fp32": 1.0, "int8": 0.5, "quantize plan (p)": 0.7}, {"int8": 30, "plan": 30}, 20.0, "fp32"),
])
def test_the_int8_candidate_a_format_ships_follows_the_rule(tiny, tmp_path, monkeypatch, p50, correct, max_drop, want):
    from edgekd.bench import measure

    model, data = tiny
    y = data.test.labels.numpy()
    onehot = lambda k: np.eye(4, dtype=np.float32)[np.where(np.arange(len(y)) < k, y, (y + 1) % 4)]  # noqa: E731
    _Fake.logits = {"fp32": onehot(40), "int8": onehot(correct["int8"]), "plan": onehot(correct["plan"])}
    monkeypatch.setattr(measure, "time_interleaved", _timed(p50))
    job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:32]).numpy()))
    plan = {"fp32_blocks": {"features.1": "slow"}, "fp32_modules": {"features.0.0": "stem"}}
    path, rec = _plan_int8(_Fake(), Variant("int8_ptq", model, int8=True), tmp_path / "int8_ptq.fake", job, plan, max_drop, "p")
    assert rec["chosen"] == want and path.read_text() == {"quantize plan (p)": "plan"}.get(want, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8_ptq.fake"]  # the other candidates are gone
    assert [c["plan"] for c in rec["candidates"]] == ["int8", "quantize plan (p)", "fp32"]
    assert rec["candidates"][1]["fp32_modules"] == ["features.0.0", "features.1"]
    assert ("verdict" in rec) == (want == "fp32") and rec["runtime"] == "fakert"
    if want == "fp32" and max_drop > 1:  # fast and accurate enough, but verification would reject them: it says so
        assert "agrees with the fp32 program on only 79.2%" in rec["verdict"]
    assert rec["within_budget"] == ({"int8": correct["int8"], "quantize plan (p)": correct["plan"], "fp32": 40}[want] >= 40)
    # the shipped int8 program, or where none ships the fastest, against the fp32 program op by op
    fastest = max((c for c in rec["candidates"] if c["plan"] != "fp32"), key=lambda c: c["speedup_vs_fp32"])["plan"]
    assert rec["by_op_program"] == (want if want != "fp32" else fastest)
    assert rec["int8_loses_time_on"] == "depthwise conv 0.67x (30 vs 20 us)"
    assert {r["ops"]: r["int8_speedup"] for r in rec["int8_vs_fp32_by_op"]}["1x1 conv / dense"] == (
        2.67 if rec["by_op_program"] == "int8" else 2.0)
    if want == "fp32" and max_drop < 1:  # int8 is slower here: the verdict says where it loses the time
        assert "quantize plan (p) loses time on depthwise conv 0.67x (30 vs 20 us), so int8_ptq.fake" in rec["verdict"]


def test_a_profiler_that_fails_costs_the_op_table_not_the_export(tiny, tmp_path, monkeypatch, caplog):
    from edgekd.bench import measure

    model, data = tiny
    y = data.test.labels.numpy()
    _Fake.logits = {k: np.eye(4, dtype=np.float32)[y] for k in ("fp32", "int8", "plan")}
    monkeypatch.setattr(measure, "time_interleaved", _timed({"fp32": 1.0, "int8": 1.5, "quantize plan (p)": 1.2}))
    monkeypatch.setattr(_Fake, "op_profile", lambda self, path, x: 1 / 0)
    job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:32]).numpy()))
    plan = {"fp32_blocks": {"features.1": "slow"}, "fp32_modules": {}}
    path, rec = _plan_int8(_Fake(), Variant("int8_ptq", model, int8=True), tmp_path / "int8_ptq.fake", job, plan, 0.5, "p")
    assert rec["chosen"] == "fp32" and path.read_text() == "fp32" and "does not pay" in rec["verdict"]
    assert "int8_vs_fp32_by_op" not in rec and "loses time" not in rec["verdict"]
    assert "fakert's per-operator profile failed (ZeroDivisionError" in caplog.text


@pytest.mark.parametrize("p50,qat_written,qat_chosen", [
    ({"fp32": 1.0, "int8": 1.5, "quantize plan (p)": 0.8}, ["quantize plan (p)"], "quantize plan (p)"),
    ({"fp32": 1.0, "int8": 1.5, "quantize plan (p)": 1.2}, [], "fp32"),  # no int8 program of PTQ's pays
    ({"fp32": 1.0, "int8": 0.5, "quantize plan (p)": 0.99}, ["int8", "quantize plan (p)"], "int8"),  # 1.01x: not slower
])
def test_qat_int8_programs_are_written_only_where_their_ptq_twin_was_not_slower(tiny, tmp_path, monkeypatch, caplog, p50,
                                                                               qat_written, qat_chosen):
    """The export stage's two rounds (stages.export._write_and_choose): the PTQ file's programs are
    timed first; a QAT program whose PTQ twin (same name, same structure) ran slower than the fp32
    program is not converted, and the record lists it with the twin's speed-up."""
    from edgekd.bench import measure
    from edgekd.report import _format_plans_table
    from edgekd.stages.export import _conversions, _write_and_choose

    model, data = tiny
    y = data.test.labels.numpy()
    _Fake.logits = {k: np.eye(4, dtype=np.float32)[y] for k in ("fp32", "int8", "plan")}
    timed = []
    def time_interleaved(runners, *a):  # runs_within times the fp32 program alone first, as 'ref'
        timed.extend([sorted(runners)] if "fp32" in runners else [])
        return _timed(p50)(runners, *a)

    monkeypatch.setattr(measure, "time_interleaved", time_interleaved)
    job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:32]).numpy()))
    plan = {"mode": "auto", "chosen": "p", "max_drop_points": 0.5, "plan": {"fp32_blocks": {"features.1": "slow"}, "fp32_modules": {}}}
    variants = [Variant("student_fp32", model), Variant("int8_qat", model, int8=True, qat_model=model),
                Variant("int8_ptq", model, int8=True)]
    fmts = [_Fake()]
    plans, todo = _conversions(variants, fmts, tmp_path, plan)
    info = {}
    chosen = _write_and_choose(tmp_path, variants, fmts, plans, todo, job.convert, 0, job, plan, info)
    every = {".int8_qat.plan0.fake": "int8", ".int8_qat.plan1.fake": "quantize plan (p)"}
    assert sorted(n for f, n in every.items() if f in info["convert_seconds"]) == sorted(qat_written)
    assert ".int8_qat.plan2.fake" in info["convert_seconds"]  # QAT's fp32 program is always written
    path, rec = chosen["int8_qat", "fake"]
    assert rec["chosen"] == qat_chosen and path == tmp_path / "int8_qat.fake" and path.exists()
    assert [c["plan"] for c in rec["candidates"]] == ["int8", "quantize plan (p)", "fp32"]
    ptq = {c["plan"]: c["speedup_vs_fp32"] for c in chosen["int8_ptq", "fake"][1]["candidates"]}
    for c in rec["candidates"]:
        assert ("not_written" in c) == (c["plan"] != "fp32" and c["plan"] not in qat_written)
        if "not_written" in c:  # listed with its twin's speed-up, never shipped
            assert c["speedup_vs_fp32"] == ptq[c["plan"]] < 1.0 and c["p50_ms"] is None and "int8_ptq" in c["not_written"]
    # the PTQ file's candidates are timed; the QAT file's only where one of its int8 programs was written
    assert timed == [["fp32", "int8", "quantize plan (p)"]] + ([sorted(qat_written + ["fp32"])] if qat_written else [])
    if not qat_written:  # no int8 program of its own to profile: its PTQ twin's comparison stands for them
        assert "were not written" in rec["verdict"] and "int8_qat.fake is the fp32 program" in rec["verdict"]
        assert rec["by_op_program"] == "int8_ptq's quantize plan (p)"
        # the PTQ file's verdict (a warning) says what int8 loses time on; the QAT file's names it and points there
        ptq_verdict = chosen["int8_ptq", "fake"][1]["verdict"]
        assert "loses time on depthwise conv" in ptq_verdict and "loses time" not in rec["verdict"]
        assert "for int8_qat either: int8_ptq's program" in rec["verdict"]
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "does not pay" in r.getMessage()]
        assert warned == [f"export: {ptq_verdict}"]
    else:
        assert rec["by_op_program"] == qat_chosen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8_ptq.fake", "int8_qat.fake", "student_fp32.fake"]
    ptq_rec = chosen["int8_ptq", "fake"][1]
    table = "\n".join(_format_plans_table({"int8_qat": {"fake_int8_plan": rec}, "int8_ptq": {"fake_int8_plan": ptq_rec}}))
    assert table.count("(not written)") == 3 - len(qat_written) - 1 and "None" not in table
    # one op-by-op table per runtime: a QAT file's twin's comparison is the PTQ file's
    assert table.count("| depthwise conv | 20 (2) | 30 (2) | **0.67x** (slower) |") == 1


@pytest.mark.parametrize("name", QUANTIZERS[:1])  # the rule is the format's; one real format shows the file is float
def test_a_format_that_finds_int8_slower_ships_its_float_program(tiny_trained, tmp_path, monkeypatch, name):
    from edgekd.bench import measure

    model, data = tiny_trained
    fmt = FORMATS.get(name)()
    monkeypatch.setattr(measure, "time_interleaved", _timed({"fp32": 1.0, "int8": 1.5, "quantize plan (p)": 1.2}))
    job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:32]).numpy()))
    plan = {"fp32_blocks": {"features.1": "slow"}, "fp32_modules": {}}
    path, rec = _plan_int8(fmt, Variant("int8_ptq", model, int8=True), tmp_path / f"int8_ptq{fmt.suffix}", job, plan, 0.5, "p")
    assert rec["chosen"] == "fp32" and "does not pay" in rec["verdict"]
    x = data.normalize(data.test.images[:8]).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(fmt.runner(path)(x) - ref).max() < 1e-5 * np.abs(ref).max()  # the float program of the same weights
    if name == "executorch":  # XNNPACK profiles its operators: the fastest int8 program against the fp32 one, op by op
        by_op = {r["ops"]: r for r in rec["int8_vs_fp32_by_op"]}
        assert rec["by_op_program"] == "quantize plan (p)" and isinstance(rec["int8_loses_time_on"], str)
        assert by_op["depthwise conv"]["fp32_nodes"] == by_op["depthwise conv"]["int8_nodes"] == 17


@pytest.mark.skipif("openvino" not in INSTALLED, reason="openvino is not installed")
def test_openvino_ships_the_quantize_stage_int8_file_where_it_pays_there_else_the_fp32_program(tiny_trained, tmp_path,
                                                                                               monkeypatch):
    """OpenVINO has no quantizer here: each int8 file is the quantize stage's ONNX int8 file (as
    planned for onnxruntime) where that pays on OpenVINO, else the fp32 program of the same weights;
    its runtime runs the ONNX format's fp32 files, so it writes none of its own."""
    import copy

    from edgekd.bench import measure
    from edgekd.formats import format_for
    from edgekd.onnx_export import export_onnx
    from edgekd.quant.ptq import quantize_onnx

    model, data = tiny_trained
    fmt = FORMATS.get("openvino")()
    calib = data.normalize(data.train.images[:32]).numpy()
    int8 = quantize_onnx(export_onnx(copy.deepcopy(model), tmp_path / "fp32.onnx", data.image_size), tmp_path / "q.onnx", calib)
    v = Variant("int8_ptq", model, int8=True, min_agreement=0.8, onnx_int8=int8)
    assert fmt.writes(v) and not fmt.writes(Variant("student_fp32", model))
    job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, lambda: calib))
    plan = {"fp32_blocks": {}, "fp32_modules": {"features.0.0": "stem"}}
    for p50, want in (({"fp32": 1.0, "quantize plan (p)": 0.5}, "quantize plan (p)"),
                      ({"fp32": 1.0, "quantize plan (p)": 1.5}, "fp32")):
        monkeypatch.setattr(measure, "time_interleaved", _timed(p50))
        path, rec = _plan_int8(fmt, v, tmp_path / "int8_ptq.openvino.onnx", job, plan, 0.5, "p")
        assert rec["chosen"] == want and [c["plan"] for c in rec["candidates"]] == ["quantize plan (p)", "fp32"]
        assert (path.read_bytes() == int8.read_bytes()) == (want != "fp32") and format_for(path) is type(fmt)
        assert fmt.verify(path, v, job)["decisive_agreement"] >= 0.8
        # OpenVINO's per-node counters: the int8 file against the fp32 file, op by op, the same convolutions in both
        by_op = {r["ops"]: r for r in rec["int8_vs_fp32_by_op"]}
        assert rec["by_op_program"] == "quantize plan (p)" and isinstance(rec["int8_loses_time_on"], str)
        assert by_op["depthwise conv"]["fp32_nodes"] == by_op["depthwise conv"]["int8_nodes"] == 17
        assert by_op["dense"]["fp32_nodes"] == by_op["dense"]["int8_nodes"] == 1


def test_openvino_nodes_are_named_by_what_they_compute():
    from edgekd.bench.runtimes import openvino_kind

    assert openvino_kind("Convolution", "jit_avx2_1x1_I8") == openvino_kind("Convolution", "brgconv_avx512_1x1_f32") == "1x1 conv"
    assert openvino_kind("Convolution", "brgconv_avx2_f32") == "conv"
    assert openvino_kind("GroupConvolution", "jit_avx2_I8") == "depthwise conv"
    assert openvino_kind("FullyConnectedQuantizedLegacy", "jit_gemm_I8") == openvino_kind("FullyConnected", "x") == "dense"
    assert openvino_kind("Reorder", "jit_uni_I8") == "layout change" and openvino_kind("Subtract", "jit_avx2_f32") == "subtract"


def test_untimed_plans_give_formats_that_quantize_themselves_the_plans_float_modules(tmp_path):
    # plan: int8 or a pinned plan: ExecuTorch and LiteRT write one program with the plan's fp32 modules
    # (the stem) float, as the ONNX files keep them, or the program a pinned run's format shipped;
    # plan: auto times their candidates instead
    from edgekd.formats.int8_plan import program, ship_untimed
    from edgekd.stages.export import _conversions

    v = Variant("int8_ptq", torch.nn.Conv2d(3, 4, 3), int8=True)
    fmts = [FORMATS.get(k)() for k in ("executorch", "litert")]
    rec = {"mode": "int8", "chosen": "int8", "max_drop_points": 0.5,
           "plan": {"name": "int8", "fp32_blocks": {"features.4": "slow"}, "fp32_modules": {"features.0.0": "stem"}}}
    # the user's keep_fp32 patterns stay fp32 in every program, timed or not
    with_user = {**rec, "plan": {**rec["plan"], "keep_fp32": ["classifier*"]}}
    for mode in ("int8", "auto"):
        plans, todo = _conversions([v], fmts, tmp_path, {**with_user, "mode": mode})
        assert all(t[3][-1] == PATTERN + "classifier*" for t in todo)
    for mode in ("int8", "pinned"):
        plans, todo = _conversions([v], fmts, tmp_path, {**rec, "mode": mode})
        assert [list(c) for c in plans.values()] == [["quantize plan (int8)"]] * 2
        assert [(t[2].name, t[3]) for t in todo] == [
            (".int8_ptq.plan0.pte", ["features.0.0", "features.4"]), (".int8_ptq.plan0.tflite", ["features.0.0", "features.4"])]
    # pinned to a run whose ExecuTorch file was all int8 and whose LiteRT file was the fp32 program
    shipped = {"pte": {"int8_ptq": {"program": "int8", "fp32_modules": []}},
               "tflite": {"int8_ptq": {"program": "fp32", "fp32_modules": "all"}}}
    plans, todo = _conversions([v], fmts, tmp_path, {**rec, "mode": "pinned", "programs": shipped})
    assert [list(c) for c in plans.values()] == [["int8"], ["fp32"]]
    assert [(t[2].name, t[3]) for t in todo] == [(".int8_ptq.plan0.pte", [])]  # PTQ's fp32 program: the student's file
    (tmp_path / ".int8_ptq.plan0.tflite").write_bytes(b"float")
    path, out = ship_untimed(fmts[1], v, tmp_path / "int8_ptq.tflite", {"fp32": (None, tmp_path / ".int8_ptq.plan0.tflite")},
                             {**rec, "mode": "pinned", "pinned_from": "/runs/a/quant_plan.json"})
    assert path.read_bytes() == b"float" and not (tmp_path / ".int8_ptq.plan0.tflite").exists()
    assert out["timed"] is False and "fp32 program" in out["verdict"] and "/runs/a/quant_plan.json" in out["source"]
    assert program(out) == {"program": "fp32", "fp32_modules": "all", "timed": False}  # pinned again, the same
    plans, todo = _conversions([v], fmts, tmp_path, {**rec, "mode": "auto"})
    assert set(plans) == {("int8_ptq", "pte"), ("int8_ptq", "tflite")}
    assert sorted(t[3] for t in todo if t[2].suffix == ".pte") == [[], ["features.0.0", "features.4"]]
    assert _conversions([v], fmts, tmp_path, None)[1][0][3] == []  # no quantize stage: every op int8
