"""export: every model variant (student fp32, the quantize stage's int8 files, the unpruned
student, the teacher) in every enabled file format (edgekd.formats: ONNX with onnxruntime's
int8, ExecuTorch/XNNPACK .pte and LiteRT .tflite each with its own int8, OpenVINO's int8 files
chosen on OpenVINO), each with runner metadata and verified against its PyTorch counterpart on
real test images.

With a validation split, each student file also gets a softmax temperature fit on it (as its
runtime runs it) and stored in its metadata (edgekd.calibration)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import shutil
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, PositiveInt, ValidationError, field_validator
from tqdm import tqdm

from ..errors import EdgekdError, did_you_mean
from ..schema import Strict, Switch
from ..formats import FORMATS, Variant, enabled_formats
from ..fileio import atomic_path, write_json
from ..formats.base import ConvertJob, ExportJob
from ..formats.int8_plan import choose_int8, int8_candidates, program, ship_untimed, untimed_program, unwritten_twins
from ..formats.workers import Conversion, NpyFile, conversion_pool, convert_all, worker_count
from ..onnx_export import metadata
from ..quant.plan import fastest_int8
from .base import Stage, StageResult, register

log = logging.getLogger("edgekd")


def _options_help() -> str:
    """`edgekd stages` text for export.options: each format's own options."""
    each = [f"{name}.{key}: {field.description}" for name, fmt in FORMATS.items() if fmt.Options
            for key, field in fmt.Options.model_fields.items()]
    return "per-format options, e.g. {litert: {integer_io: true}}; " + "; ".join(each)


class ExportConfig(Strict):
    opset: int = Field(17, ge=13, le=21)
    verify_images: int = Field(256, gt=0)
    fp32_max_abs_diff: float = Field(1e-3, gt=0, description="max |logit| difference ORT vs PyTorch (fp32)")
    # top-1 agreements count the images the reference decides clearly (onnx_export.verify)
    fp32_min_agreement: float = Field(0.99, gt=0, le=1)
    int8_min_agreement: float = Field(0.95, gt=0, le=1, description="int8 QAT file vs PyTorch fake-quant top-1 agreement")
    ptq_min_agreement: float = Field(0.90, gt=0, le=1, description="int8 PTQ vs fp32 top-1 agreement (also ExecuTorch int8)")
    include_teacher: bool = Field(True, description="also export the teacher (the benchmark's reference)")
    formats: Literal["auto"] | list[str] = Field(
        "auto", description="file formats to write: auto = every installed one, or a list (onnx, the reference format, "
                            "always included)")
    executorch: Switch = Field(
        "auto", description="also write ExecuTorch/XNNPACK .pte programs (int8 by ExecuTorch's own PT2E PTQ); "
                            "auto = when executorch is installed")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v):
        if v == "auto":
            return v
        unknown = [f for f in v if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format {unknown[0]!r}{did_you_mean(unknown[0], FORMATS.names())}; "
                             f"known: {', '.join(FORMATS.names())}")
        missing = [(f, why) for f in v if (why := FORMATS.get(f).available())]
        if missing:
            raise ValueError(f"{missing[0][0]} is {missing[0][1]}")
        return v if "onnx" in v else ["onnx", *v]

    options: dict[str, Any] = Field(default_factory=dict, description=_options_help())

    @field_validator("options")
    @classmethod
    def _format_options(cls, v):
        out = {}
        for name, opts in v.items():
            if name not in FORMATS:
                raise ValueError(f"unknown format {name!r}{did_you_mean(name, FORMATS.names())}; "
                                 f"known: {', '.join(FORMATS.names())}")
            model = FORMATS.get(name).Options
            if model is None:
                raise ValueError(f"{name}: this format takes no options")
            try:
                out[name] = model.model_validate(opts or {})
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"{'.'.join(map(str, (name, *err['loc'])))}: {err['msg']}") from None
        return out

    workers: Literal["auto"] | PositiveInt = Field(
        "auto", description="processes that write the files side by side: auto = one per core (as memory allows), "
                            "1 = one after another in this process")
    temperature_scaling: Switch = Field(
        "auto", description="fit a softmax temperature per student file on the validation split and store it in the "
                            "file's metadata; auto = when data.val_split > 0")

    def pipeline_problems(self, pipeline) -> list[tuple[str, str]]:
        if self.temperature_scaling == "on" and not pipeline.data.val_split:
            return [("temperature_scaling", "needs a validation split: set data.val_split (e.g. 0.1); the temperature "
                                            "is fit on images held out from training, never on the test split")]
        return []


# The teacher's files are the benchmark's reference, never shipped: verified on fewer images, since
# ResNet-50-class forwards on every runtime, one image at a time, took most of the stage's verification.
TEACHER_VERIFY_IMAGES = 64
LABELS = {"student_unpruned_fp32": "unpruned student fp32", "teacher_fp32": "teacher fp32"}
STUDENT_FILES = ("student_fp32", "int8_ptq", "int8_qat", "student_unpruned_fp32")  # calibrated per file


@register("export")
class Export(Stage):
    Config = ExportConfig
    step = 2
    does = "writes the files of the student as it stands"

    def run(self, ctx) -> StageResult:
        cfg: ExportConfig = self.config
        data, d = ctx.data, ctx.stage_dir
        formats, skipped = enabled_formats(cfg.formats, cfg.executorch)
        info: dict = {fmt: f"skipped: {why}" for fmt, why in skipped.items()}
        for fmt, why in skipped.items():
            log.info("export: no %s files: %s %s", FORMATS.get(fmt).suffix, fmt, why)
        job = ExportJob(data, cfg.verify_images, cfg.ptq_min_agreement,
                        ConvertJob(data.image_size, cfg.opset, _calibration_set(ctx), cfg.options))
        quant_plan = _quant_plan(ctx)
        variants = list(self._variants(ctx, cfg))
        plans, todo = _conversions(variants, formats, d, quant_plan)
        calib_file = d / ".calibration.npy"
        try:  # every file (and int8 candidate of a format that plans its own) is written side by side, then verified
            workers = worker_count(cfg.workers, len(todo))
            if workers and any(v.int8 and fmt.own_int8 for fmt, v, _, _ in todo):
                with atomic_path(calib_file) as tmp, open(tmp, "wb") as f:
                    np.save(f, job.convert.calibration())
            # a worker reads the calibration images from that file (the stage's own loader holds the run's data)
            convert = dataclasses.replace(job.convert, calibration=NpyFile(calib_file)) if workers else job.convert
            chosen = _write_and_choose(d, variants, formats, plans, todo, convert, workers, job, quant_plan, info)
            models, artifacts = _verify_all(ctx, variants, formats, chosen, job, quant_plan, info)
        finally:  # no candidate or calibration file outlives the stage, finished or not
            calib_file.unlink(missing_ok=True)
            for cands in plans.values():
                for _, _, tmp in cands.values():
                    tmp.unlink(missing_ok=True)
        if cfg.temperature_scaling == "on" or (cfg.temperature_scaling == "auto" and data.val is not None):
            self._calibrate(ctx, formats, models, info)
        fp = info["student_fp32"]["verify"]
        return StageResult(metrics={"fp32_max_abs_diff": fp["max_abs_diff"], "fp32_top1_agreement": fp["top1_agreement"]},
                           models=models, artifacts=artifacts, info=info)

    @staticmethod
    def _variants(ctx, cfg: ExportConfig):
        """The variants of this run, in the order the report lists them."""
        float_model = ctx.float_model if ctx.float_model is not None else ctx.model
        fp32 = {"max_abs": cfg.fp32_max_abs_diff, "min_agreement": cfg.fp32_min_agreement}
        yield Variant("student_fp32", float_model, **fp32)
        if src := ctx.artifacts.get("onnx.int8_qat"):
            yield Variant("int8_qat", ctx.model, int8=True, min_agreement=cfg.int8_min_agreement, qat_model=ctx.model,
                          onnx_int8=ctx.run_dir / src)
        if src := ctx.artifacts.get("onnx.int8_ptq"):
            yield Variant("int8_ptq", float_model, int8=True, min_agreement=cfg.ptq_min_agreement, onnx_int8=ctx.run_dir / src)
        if unpruned := ctx.artifacts.get("model.unpruned"):
            import torch

            from ..models import rebuild

            yield Variant("student_unpruned_fp32", rebuild(torch.load(ctx.run_dir / unpruned, map_location="cpu",
                                                                      weights_only=True)), **fp32)
        if cfg.include_teacher and ctx.cfg.primary_teacher() is not None and not hasattr(ctx.teacher, "session"):
            yield Variant("teacher_fp32", copy.deepcopy(ctx.teacher).cpu(), **{**fp32, "max_abs": cfg.fp32_max_abs_diff * 10},
                          most_images=TEACHER_VERIFY_IMAGES)

    @staticmethod
    def _calibrate(ctx, formats, models: dict, info: dict) -> None:
        """A temperature per student file, fit on that file's own validation logits (each format's
        int8 is its own quantization, so each file gets its own temperature)."""
        from ..calibration import calibrate

        data = ctx.data
        if data.val is None:
            raise EdgekdError("export.temperature_scaling: on, but the data has no validation split (set data.val_split)")
        xv, yv = data.normalize(data.val.images[:]).numpy(), data.val.labels.numpy()
        xt, yt = data.normalize(data.test.images[:]).numpy(), data.test.labels.numpy()
        notes: dict[str, list[str]] = {}  # one warning per reason, naming the files it holds for
        for name in [n for n in STUDENT_FILES if n in models]:
            for fmt in (f for f in formats if f.key in models[name]):
                path = ctx.run_dir / models[name][fmt.key]
                run = fmt.runner(path)
                res = calibrate(run(xv), yv, run(xt), yt, data.classes)
                fmt.write_metadata(path, {"edgekd.temperature": repr(res["temperature"])})
                info[name][fmt.figure("calibration")] = {k: v for k, v in res.items() if not k.startswith("reliability")}
                if fmt.primary:
                    models[name].update({"calibration": res, "temperature": res["temperature"],
                                         "ece_calibrated": res["ece_after"]})
                    log.info("export: %s temperature %.3f, test ECE %.4f -> %.4f", name, res["temperature"],
                             res["ece_before"], res["ece_after"])
                    if "note" in res:
                        notes.setdefault(res["note"], []).append(name)
        for note, names in notes.items():
            log.warning("export: %s temperature %s", ", ".join(names), note)


def _conversions(variants, formats, d, quant_plan) -> tuple[dict, list[tuple]]:
    """What to write: every variant in every format that writes it, and for a format that plans its
    own int8, each int8 variant's candidates (formats.int8_plan) when the quantize stage measured a plan,
    or the one program an untimed plan gives it (int8_plan.untimed_program).
    Returns ({(variant, format key): candidates}, [(format, variant, path, modules kept float)])."""
    plans: dict[tuple[str, str], dict] = {}
    todo: list[tuple] = []
    for v in variants:
        for fmt in (f for f in formats if f.writes(v)):
            path = d / f"{v.name}{fmt.suffix}"
            if v.int8 and fmt.own_int8 and quant_plan:  # timed on its own runtime, or the plan's program untimed
                plans[v.name, fmt.key] = cands = (
                    int8_candidates(fmt, v, path, quant_plan["plan"], quant_plan["chosen"]) if quant_plan.get("mode") == "auto"
                    else untimed_program(fmt, v, path, quant_plan))
                todo += [(type(fmt), variant, tmp, keep or []) for variant, keep, tmp in cands.values()
                         if not (keep is None and v.qat_model is None)]  # PTQ's float program: the student's file
            else:
                todo.append((type(fmt), v, path, []))
    return plans, todo


def _after_twins(variants, plans: dict, quant_plan) -> dict[tuple[str, str], str]:
    """(QAT variant, format key) -> the PTQ variant whose programs for that format are judged
    before the QAT file's int8 candidates are written (formats.int8_plan.unwritten_twins): where
    `plan: auto` times both files' candidates."""
    ptq = next((v.name for v in variants if v.int8 and v.qat_model is None), None)
    if ptq is None or not quant_plan or quant_plan.get("mode") != "auto":
        return {}
    qat = {v.name for v in variants if v.qat_model is not None}
    return {(name, key): ptq for name, key in plans if name in qat and (ptq, key) in plans}


def _write_and_choose(d, variants, formats, plans: dict, todo: list[tuple], convert: ConvertJob, workers: int,
                      job: ExportJob, quant_plan, info: dict) -> dict[tuple[str, str], tuple]:
    """Write every file of `todo` (formats.workers) and choose each planned int8 program
    (formats.int8_plan). In two rounds, so that a CPU where int8 does not pay converts fewer
    programs: first everything but the QAT files' int8 candidates that have a PTQ twin
    (_after_twins); then their PTQ twins are judged (timed with the workers idle) and only the
    candidates whose twin was not slower than its fp32 program are written (unwritten_twins).
    Returns {(variant, format key): (path, record)}; the seconds per file go in info."""
    waiting, by_name = _after_twins(variants, plans, quant_plan), {v.name: v for v in variants}
    fmt_of = {f.key: f for f in formats}
    jobs = lambda picked: [Conversion(fmt, v, path, convert, keep) for fmt, v, path, keep in picked]  # noqa: E731
    held = {tmp for key in waiting for _, keep, tmp in plans[key].values() if keep is not None}
    chosen, unwritten, t0 = {}, {}, time.perf_counter()
    with conversion_pool(workers) as pool:
        took = convert_all(jobs(t for t in todo if t[2] not in held), pool)
        spent = time.perf_counter() - t0  # conversion time, not the timing between the rounds
        for key, twin in waiting.items():
            chosen[twin, key[1]] = _choose(d, by_name[twin], fmt_of[key[1]], plans[twin, key[1]], job, quant_plan)
            unwritten[key] = unwritten_twins(plans[key], twin, chosen[twin, key[1]][1])
        skipped_files = {plans[key][name][2] for key, rows in unwritten.items() for name in rows}
        if second := [t for t in todo if t[2] in held and t[2] not in skipped_files]:
            t0 = time.perf_counter()
            took |= convert_all(jobs(second), pool, "export: convert (QAT int8)")
            spent += time.perf_counter() - t0
    took = dict(sorted(took.items(), key=lambda kv: -kv[1]))
    # where export time goes (int8 candidates are the dot-files): the slowest files, in the log and the report
    log.info("export: %d files written in %.0f s on %s; slowest: %s%s", len(took), spent,
             f"{workers} worker processes" if workers else "this process",
             ", ".join(f"{name} {s:.0f} s" for name, s in list(took.items())[:3]),
             f"; {len(skipped_files)} QAT int8 candidates not written: their PTQ twins ran slower than fp32"
             if skipped_files else "")
    info["convert_seconds"] = took
    for (name, key), cands in plans.items():
        if (name, key) not in chosen:
            twin = (waiting[name, key], chosen[waiting[name, key], key][1]) if (name, key) in waiting else None
            chosen[name, key] = _choose(d, by_name[name], fmt_of[key], {n: c for n, c in cands.items()
                                                                        if c[2] not in skipped_files},
                                        job, quant_plan, unwritten.get((name, key)), twin)
    return chosen


def _choose(d, v: Variant, fmt, cands: dict, job: ExportJob, quant_plan, not_written: dict | None = None,
            twin: tuple[str, dict] | None = None) -> tuple:
    """Choose `v`'s int8 program for `fmt` among its written candidates `cands` (int8_candidates):
    timed where `plan: auto`, else the one the plan gives (ship_untimed). Returns (path, record)."""
    files = {n: (keep, tmp) for n, (_, keep, tmp) in cands.items()}
    if v.qat_model is None and "fp32" in files:  # PTQ: the student's float program is the same weights'
        own = FORMATS.get(fmt.float_files) if fmt.float_files else fmt
        shutil.copyfile(d / f"student_fp32{own.suffix}", files["fp32"][1])
    path = d / f"{v.name}{fmt.suffix}"
    if quant_plan.get("mode") == "auto":
        return choose_int8(fmt, v, path, files, job, quant_plan["max_drop_points"], not_written, twin)
    return ship_untimed(fmt, v, path, files, quant_plan)


def _verify_all(ctx, variants, formats, chosen: dict, job: ExportJob, quant_plan, info: dict) -> tuple[dict, dict]:
    """Once every file is written and each planned int8 program chosen (`chosen`:
    _write_and_choose): stamp the runner metadata and verify every file against its PyTorch
    reference. Returns (models, artifacts) for the stage result; per-file records go into `info`."""
    d, artifacts, models, programs = ctx.stage_dir, {}, {}, {}
    with tqdm(total=sum(f.writes(v) for v in variants for f in formats), desc="export: verify", unit="file",
              leave=False) as bar:
        for v in variants:
            rec, models[v.name] = info.setdefault(v.name, {}), {}
            if v.name in LABELS:
                models[v.name]["label"] = LABELS[v.name]
            for fmt in (f for f in formats if f.writes(v)):
                bar.set_postfix_str(f"{v.name}{fmt.suffix}", refresh=True)
                path, props = d / f"{v.name}{fmt.suffix}", metadata(ctx.data, v.name)
                if (v.name, fmt.key) in chosen:
                    path, planned = chosen[v.name, fmt.key]
                    rec[fmt.figure("int8_plan")], props["edgekd.int8_plan"] = planned, planned["chosen"]
                    programs.setdefault(fmt.key, {})[v.name] = program(planned)
                    if planned["chosen"] == "fp32" and "candidates" in planned:  # for the headline's NOTE on that runtime
                        models[v.name].setdefault("fp32_program_on", dict(ctx.variants.get(v.name, {}).get(
                            "fp32_program_on", {})))[fmt.runtime] = fastest_int8(planned["candidates"])["speedup_vs_fp32"]
                    if "int8_loses_time_on" in planned:  # and why int8 gains little there (its runtime's profiler)
                        models[v.name][f"{fmt.runtime}_int8_loses_time_on"] = planned["int8_loses_time_on"]
                fmt.write_metadata(path, props)
                rec[fmt.figure("verify")] = {**fmt.verify(path, v, job), **fmt.verified_by()}
                rec.update(fmt.details(path))
                artifacts[f"{fmt.key}.{v.name}"] = models[v.name][fmt.key] = ctx.rel(path)
                models[v.name][fmt.figure("size_bytes")] = path.stat().st_size
                bar.update(1)
    if programs:  # the run's int8 structure on every runtime, in one file a later run can pin (quantize.plan)
        write_json(d / "int8_plan.json", {**quant_plan, "programs": programs})
        artifacts["int8_plan"] = ctx.rel(d / "int8_plan.json")
    return models, artifacts


def _quant_plan(ctx) -> dict | None:
    """The quantize stage's plan record, if the pipeline has one. Where it measured the plan
    (`quantize.plan: auto`), formats with their own int8 measure theirs too (formats.int8_plan);
    otherwise (`int8`, or pinned to an earlier run's plan) they write one program untimed: the one
    the pinned run shipped (its `programs`), else the plan's, with the same modules float (the
    stem, unless keep_first_conv_fp32 is off), so reruns ship the same structure. Export writes
    the record with what each format shipped (`programs`) as int8_plan.json."""
    from ..rundir import read_json

    rel = ctx.artifacts.get("quant_plan")
    if not rel:
        return None
    return read_json(ctx.run_dir / rel, "quantization plan")


def _calibration_set(ctx):
    """The quantize stage's calibration images (its default if it has none), made once on demand."""

    @functools.cache
    def get():
        from .quantize import CalibrationConfig, calibration_images

        q = next((c for n, c in ctx.cfg.stage_entries() if n == "quantize"), None)
        return calibration_images(ctx.data, (q.calibration if q else CalibrationConfig()).samples, ctx.cfg.seed)

    return get
