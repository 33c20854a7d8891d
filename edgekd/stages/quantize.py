"""quantize: int8 by static PTQ (onnxruntime) and/or QAT with the teacher in the loop.

Accuracy of every variant is measured by onnxruntime on the exported files, not by
PyTorch's simulation. `target` says which CPUs the files are for (quant.targets): the
default, `portable`, gives the same numbers on every x86 and ARM CPU."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ..schema import Strict
from ..data import stratified_indices
from ..metrics import classification_metrics
from ..bench.machine import int8_class, machine_info
from ..fileio import write_json
from ..onnx_export import export_onnx, onnx_logits, run_onnx
from ..bn import bn_gap, logits_off
from ..errors import ConfigError, Diverged
from ..quant.plan import (MARGIN, PATTERN, WEIGHTED, Plan, blocks, choose, fastest_int8, float_cost, int8_losses,
                          kind_comparison, load_graph, module_path, profiles, recover_accuracy, rule_plan, search,
                          time_plans, unmatched_patterns)
from ..quant.ptq import quantize_onnx
from ..quant.qat_file import build_qat, qat_int8_file
from ..quant.targets import TARGET_NAMES, resolve_target
from ..train import TrainConfig, fit
from .base import Stage, StageResult, register

log = logging.getLogger("edgekd")
PLAN_MODES = ("auto", "int8")  # quantize.plan's words; anything else is the path of a plan to pin


class CalibrationConfig(Strict):
    samples: int = Field(500, gt=0, le=100_000, description="training images used to calibrate activation ranges")
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(99.999, gt=90, le=100)


class QATConfig(TrainConfig):
    epochs: int = Field(2, ge=0)
    lr: float = Field(0.002, gt=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"


class QuantizeConfig(Strict):
    method: Literal["ptq", "qat", "both"] = "both"
    target: Literal[TARGET_NAMES] = Field(  # type: ignore[valid-type]
        "portable", description="CPUs the int8 files are for: portable (7-bit weights, same numbers on every CPU) | "
                                "x86_vnni | arm (8-bit weights; AVX2-only x86 saturates them) | x86_avx2 | native "
                                "(this machine's)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    exclude_depthwise: bool = Field(False, description="keep depthwise convs in fp32 (slower on ORT; for debugging accuracy)")
    keep_first_conv_fp32: bool = Field(True, description="keep the stem conv (raw pixels in) in fp32, in PTQ and QAT alike")
    plan: str = Field(
        "auto", description="auto: time per-block int8/fp32 plans on plan_runtime (1 thread, batch 1) and keep the fastest "
                            "within max_drop_points of fp32 (quant_plan.json); int8: every op the quantizer knows is int8; "
                            "or the path of an earlier run's int8_plan.json (export; quant_plan.json: the ONNX plan only): "
                            "that plan and each format's program again, untimed, so a rerun or another machine ships the "
                            "same int8 structure")
    plan_runtime: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime", description="the runtime `plan: auto` times the ONNX files on (the one you deploy them with)")
    keep_fp32: list[str] = Field(default_factory=list, description="op types (HardSigmoid), module paths or ONNX node "
                                 "names (fnmatch patterns: features.1*, /classifier/*) that stay fp32 in every plan, and in "
                                 "ExecuTorch's and LiteRT's own int8")
    max_drop_points: float = Field(0.5, ge=0, description="top-1 points a plan may lose against fp32 (plan: auto)")
    qat: QATConfig = Field(default_factory=QATConfig)

    @field_validator("plan")
    @classmethod
    def _plan_mode_or_file(cls, v: str) -> str:
        """A pinned plan is read before any data is decoded: a wrong path fails here, not after training."""
        if v not in PLAN_MODES:
            pinned_plan(v)
        return v

    def pipeline_problems(self, pipeline) -> list[tuple[str, str]]:
        """Checked before any data is decoded: the runtime that times the plans must be installed."""
        from ..bench.runtimes import RUNTIMES

        why = RUNTIMES.get(self.plan_runtime).available() if self.plan == "auto" else None
        return [("plan_runtime", f"{self.plan_runtime} cannot time the plans here: {why}")] if why else []

    def teachers_used(self) -> list[tuple[str, str | None, bool, bool]]:
        return [(f"qat.{k}", *rest) for k, *rest in self.qat.teachers_used()] if self.method != "ptq" and self.qat.epochs else []


def pinned_plan(path: str) -> tuple[Plan, dict]:
    """The plan of an earlier run's plan file (`quantize.plan: <file>`) and the int8 program each
    of its formats shipped: the export stage's int8_plan.json has both (`programs`), the quantize
    stage's quant_plan.json the plan only."""
    f = Path(path).expanduser()
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
        programs = rec.get("programs", {})
        if not all(isinstance(p.get("fp32_modules"), list) or p.get("fp32_modules") == "all"
                   for per in programs.values() for p in per.values()):
            raise TypeError("a program's fp32_modules is neither a list of module paths nor 'all'")
        return Plan.from_json(rec["plan"]), programs
    except FileNotFoundError:
        raise ValueError("expected auto, int8 or the path of an earlier run's int8_plan.json (export) or "
                         "quant_plan.json (quantize), and no such file exists") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a plan file an edgekd run wrote (int8_plan.json, quant_plan.json: expected a 'plan' "
                         f"with fp32_blocks and fp32_modules; {type(e).__name__}: {e})") from None


def calibration_images(data, samples: int, seed: int) -> np.ndarray:
    """The normalised, class-stratified training images every int8 conversion calibrates on."""
    idx = stratified_indices(data.train.labels.numpy(), samples, seed)
    return data.normalize(data.train.images[torch.as_tensor(idx)]).numpy()


def _unfit_bn(float_model, data, ctx) -> str:
    """Why QAT diverged, where the reason is the model rather than the learning rate: QAT trains the
    BatchNorm-folded model, which computes with the running statistics, and a network those do not
    hold (bn.bn_gap's logit scales) gives QAT logits of a size no loss survives. '' otherwise."""
    gap = bn_gap(float_model, data, ctx.device, 128, ctx.cfg.seed)
    if gap is None or not logits_off(gap):
        return ""
    return (f"the cause is likely not the learning rate: the student's eval-mode logits average "
            f"{gap['eval_mode_logit_scale']:.3g} in size against {gap['batch_stats_logit_scale']:.3g} with batch "
            f"statistics, so its BatchNorm running statistics do not hold the network and the BN-folded model QAT "
            f"trains is not the one that was trained; train the student further or with another recipe, or set "
            f"quantize.method: ptq")


def qat_below_ptq(models: dict, max_drop: float, classes: int) -> str | None:
    """Where QAT's file scores well below the PTQ file of the same plan (more than the drop budget,
    and at least a point): QAT's fine-tune cost more than int8 rounding did. The stage's own
    figures take the better file (best_int8); the user is told what to look at."""
    if "int8_qat" not in models or "int8_ptq" not in models:
        return None
    ptq, qat = models["int8_ptq"]["top1"], models["int8_qat"]["top1"]
    if ptq - qat <= max(1.0, max_drop):
        return None
    chance = " (chance)" if qat <= 100.0 / classes + 0.5 else ""
    return (f"QAT's int8 file scores {qat:g}%{chance}, {ptq - qat:.1f} points below the PTQ file's {ptq:g}%: its fine-tune "
            "lost more than int8 rounding did; the PTQ file is the best int8 file here (check quantize.qat: lr, epochs, loss)")


@register("quantize")
class Quantize(Stage):
    Config = QuantizeConfig
    step = 1
    does = "makes the int8 files from the student as it stands"

    def run(self, ctx) -> StageResult:
        cfg: QuantizeConfig = self.config
        data, d = ctx.data, ctx.stage_dir
        float_model = ctx.model.eval()
        calib = calibration_images(data, cfg.calibration.samples, ctx.cfg.seed)
        target = resolve_target(cfg.target)
        qopts = dict(method=cfg.calibration.method, per_channel=cfg.per_channel, activation_type=cfg.activation_type,
                     percentile=cfg.calibration.percentile, exclude_depthwise=cfg.exclude_depthwise, target=target)
        labels = data.test.labels.numpy()

        def ort_figs(path, label):
            m = classification_metrics(onnx_logits(path, data), labels, data.classes)
            return {**m, "size_bytes": path.stat().st_size, "label": label, "runtime_measured": "onnxruntime"}

        fp32 = export_onnx(copy.deepcopy(float_model), d / "student_fp32.onnx", data.image_size)
        models = {"student_fp32": {**ctx.measure(float_model), **ort_figs(fp32, "student fp32 (quantize input)")}}
        artifacts = {"onnx.student_fp32": ctx.rel(fp32)}
        plan, plan_file, record, planned = self._plan(ctx, fp32, calib, qopts)
        artifacts["quant_plan"] = ctx.rel(plan_file)
        info: dict = {"calibration": cfg.calibration.model_dump(), "per_channel": cfg.per_channel,
                      "activation_type": cfg.activation_type, "keep_first_conv_fp32": cfg.keep_first_conv_fp32,
                      "target": target.name, "weight_qmax": target.weight_qmax, "target_runs_on": target.runs_on,
                      **plan_summary(record)}
        history: list = []
        if cfg.method in ("ptq", "both"):
            models["int8_ptq"] = ort_figs(planned, "int8 PTQ")
            artifacts["onnx.int8_ptq"] = ctx.rel(planned)
        else:
            planned.unlink()
        if cfg.method in ("qat", "both"):
            objective = ctx.objective(cfg.qat) if cfg.qat.epochs else None
            built = build_qat(float_model, data.image_size, calib, plan, qopts, ctx.device)
            info["qat_rounded_tensors"] = {"simulated": built.simulated, "not_simulated": built.not_simulated}
            qmodel = built.model
            try:
                history = fit(qmodel, data, cfg.qat, ctx.device, seed=ctx.cfg.seed, objective=objective,
                              state_path=d / "qat_train_state.pt", desc=f"qat[{cfg.qat.describe()}]")
            except Diverged as e:
                if why := _unfit_bn(float_model, data, ctx):
                    raise Diverged(e.what, why) from None
                raise
            qmodel.eval()
            sim = ctx.measure(qmodel)
            qat = qat_int8_file(qmodel, d / "int8_qat.onnx", data.image_size, calib, plan, qopts)
            models["int8_qat"] = {**ort_figs(qat, "int8 QAT"), "torch_fake_quant_top1": sim["top1"],
                                  "params": sim.get("params"), "macs": sim.get("macs")}
            artifacts["onnx.int8_qat"] = ctx.rel(qat)
            ctx.float_model, ctx.model = float_model, qmodel
            ctx.transforms = ["fold_bn", built.transform]
        for k in ("int8_ptq", "int8_qat"):
            if k in models:
                models[k].update({"params": models["student_fp32"].get("params"), "macs": models["student_fp32"].get("macs"),
                                  "int8_layers": record["int8_layers"], "plan": cfg.plan, "plan_runtime": record["runtime"],
                                  "onnxruntime_int8_loses_time_on": record["int8_loses_time_on"],
                                  "quantized_from": "student_fp32"})
                if cfg.plan == "auto" and record["int8_layers"].startswith("0/"):  # for the headline's NOTE on that runtime
                    models[k]["fp32_program_on"] = {record["runtime"]: fastest_int8(record["candidates"])["speedup_vs_fp32"]}
                info[f"{k}_drop_points"] = round(models["student_fp32"]["top1"] - models[k]["top1"], 3)
        if why := qat_below_ptq(models, cfg.max_drop_points, len(data.classes)):
            log.warning("quantize: %s", why)
            info["qat_below_ptq"] = why
        best = max((k for k in models if k.startswith("int8")), key=lambda k: models[k]["top1"])
        metrics = {k: v for k, v in models[best].items() if k != "label"}
        info["best_int8"] = best
        return StageResult(metrics=metrics, models=models, artifacts=artifacts, history=history,
                           info=info, model_changed=cfg.method != "ptq")

    def _plan(self, ctx, fp32: Path, calib: np.ndarray, qopts: dict) -> tuple[Plan, Path, dict, Path]:
        """The quantization plan (quant.plan), its record (quant_plan.json) and the PTQ file of the
        plan (`int8_ptq.onnx`, fully calibrated: the file the plan was judged and profiled on):
        measured on plan_runtime for `plan: auto`, the fixed rules for `plan: int8`, an earlier run's
        plan for `plan: <quant_plan.json>` (with this config's rules added). Candidates are judged on
        the validation split where there is one, else on the test split."""
        cfg: QuantizeConfig = self.config
        d, data = ctx.stage_dir, ctx.data
        graph = load_graph(fp32)
        base = rule_plan(graph, cfg.keep_first_conv_fp32, cfg.keep_fp32)
        for i, p in unmatched_patterns(base, graph):
            raise ConfigError(f"quantize.keep_fp32[{i}]: {p!r} matches no op type, module path or node name of the "
                              f"model (its blocks: {', '.join(blocks(graph)[:12])}{' ...' if len(blocks(graph)) > 12 else ''})")
        m = machine_info()
        pinned = cfg.plan not in PLAN_MODES
        record: dict = {"mode": "pinned" if pinned else cfg.plan, "runtime": cfg.plan_runtime, "threads": 1, "batch": 1,
                        "machine": int8_class(m["isa"], m["arch"]), "max_drop_points": cfg.max_drop_points,
                        "executorch_litert": "their own PT2E quantizers; with plan: auto the export stage times their "
                                             "int8 candidates (every op, this plan's fp32 modules, none) on their own "
                                             "runtimes (export info <format>_int8_plan); otherwise they write the "
                                             "program a pinned run shipped, else this plan's (its fp32 modules float), "
                                             "untimed; export's int8_plan.json is this record with what each format shipped",
                        "onnx_files_run_by": "onnxruntime and OpenVINO: one ONNX file per variant, planned for plan_runtime",
                        "int8_file_time_on": "onnxruntime (its profiler)"}
        plan = base
        if pinned:
            earlier, programs = pinned_plan(cfg.plan)
            plan = _pin(earlier, programs, base, graph, cfg.plan)
            record["pinned_from"] = str(Path(cfg.plan).expanduser().resolve())
            record["programs"] = programs  # what its formats shipped: export writes the same programs, untimed
        if cfg.plan == "auto":
            split = data.val if data.val is not None else data.test
            x, y = data.normalize(split.images[:]).numpy(), split.labels.numpy()
            fp32_top1 = _top1(fp32, x, y)
            work = d / "plan_search"
            shutil.rmtree(work, ignore_errors=True)  # an interrupted search's files and ranges are not this one's
            # every candidate is the same fp32 file on the same images: onnxruntime calibrates once per image set
            candidates = search(fp32, work, calib, base, lambda p, path: quantize_onnx(
                fp32, path, calib[:32], plan=p, calibration_cache=work / "ranges_search", **qopts), runtime=cfg.plan_runtime)

            n = itertools.count()

            def evaluate(p: Plan):
                path = quantize_onnx(fp32, work / f"eval_{next(n)}.onnx", calib, plan=p, calibration_cache=work / "ranges",
                                     **qopts)
                return _top1(path, x, y), path

            chosen = choose(candidates, evaluate, fp32_top1, cfg.max_drop_points)
            if not chosen["within_budget"]:  # keep the blocks that cost the most accuracy fp32
                recovered = recover_accuracy(chosen["plan"], graph, evaluate, fp32_top1, cfg.max_drop_points)
                timed = time_plans(fp32, [(c["plan"], c["file"]) for c in recovered], calib[:1], 100, runtime=cfg.plan_runtime)
                candidates += [{**c, **t} for c, t in zip(recovered, timed)]
                chosen = choose(candidates, evaluate, fp32_top1, cfg.max_drop_points)
            plan = chosen["plan"]
            record.update({"judged_on": "val" if data.val is not None else "test", "fp32_top1": round(fp32_top1, 3),
                           "chosen": plan.name, "within_budget": chosen["within_budget"],
                           "candidates": [{"plan": c["plan"].name, "p50_ms": c["p50_ms"], "fp32_p50_ms": c["fp32_p50_ms"],
                                           "speedup_vs_fp32": c["speedup_vs_fp32"], "top1": c.get("top1"),
                                           "drop_points": c.get("drop_points"), "fp32_blocks": sorted(c["plan"].fp32_blocks)}
                                          for c in candidates]})
            planned = Path(shutil.move(chosen["final_file"], d / "int8_ptq.onnx"))
            shutil.rmtree(work, ignore_errors=True)
        else:
            planned = quantize_onnx(fp32, d / "int8_ptq.onnx", calib, plan=plan, **qopts)
            record["chosen"] = plan.name
        profile, kinds = profiles(planned, calib[:1])
        record["int8_vs_fp32_by_op"] = kind_comparison(profiles(fp32, calib[:1])[1], kinds)
        record["int8_loses_time_on"] = int8_losses(record["int8_vs_fp32_by_op"])
        fp32_nodes = plan.excluded_nodes(graph)
        layers = [n.name for n in graph.node if n.op_type in WEIGHTED]
        int8_layers = sum(n not in fp32_nodes for n in layers)
        record.update({"plan": plan.to_json(), "fp32_nodes": fp32_nodes, "int8_layers": f"{int8_layers}/{len(layers)}",
                       "int8_file_time": float_cost(profile), "int8_file_profile_us": profile})
        if cfg.plan == "auto" and not int8_layers:
            best = fastest_int8(record["candidates"])
            if best["speedup_vs_fp32"] >= 1 + MARGIN:  # faster, but kept out by the accuracy budget (plan.choose)
                lost = f", {best['drop_points']:.1f} points" if best.get("drop_points") is not None else ""
                why = (f"no int8 plan held quantize.max_drop_points ({cfg.max_drop_points}) on {cfg.plan_runtime} for this "
                       f"model: the fastest, {best['plan']} at {best['speedup_vs_fp32']}x the fp32 speed, lost top-1{lost}")
            else:
                why = (f"int8 does not pay on {cfg.plan_runtime} for this model on this CPU ({record['machine']}): the fastest "
                       f"int8 file ({best['plan']}) ran at {best['speedup_vs_fp32']}x the fp32 speed")
            record["verdict"] = (f"{why}, so the int8 ONNX files keep every layer fp32 (quantize.plan: int8 gives the "
                                 "smallest file instead)")
            log.warning("quantize: %s", record["verdict"])
        path = d / "quant_plan.json"
        write_json(path, record)
        return plan, path, record, planned


def _pin(pinned: Plan, programs: dict, base: Plan, graph, source: str) -> Plan:
    """`pinned` with this config's rules (the stem, keep_fp32) added; every block and module it (or
    a program of its formats) keeps fp32 must be this model's, since a plan is measured on one
    architecture and pruning."""
    known = set(blocks(graph)) | {module_path(n) for n in graph.node} | {n.name for n in graph.node}
    shipped = [m for per in programs.values() for p in per.values() if p["fp32_modules"] != "all"
               for m in p["fp32_modules"] if not m.startswith(PATTERN)]  # patterns: the plan's keep_fp32, matched per graph
    for name in dict.fromkeys([*pinned.fp32_blocks, *pinned.fp32_modules, *shipped]):
        if name not in known:
            raise ConfigError(f"quantize.plan: {source} keeps {name!r} fp32, which this model does not have (its blocks: "
                              f"{', '.join(blocks(graph)[:12])}{' ...' if len(blocks(graph)) > 12 else ''}); a plan "
                              "fits the model it was measured on")
    return Plan(f"{pinned.name} (pinned)", dict(pinned.fp32_blocks), {**pinned.fp32_modules, **base.fp32_modules},
                list(dict.fromkeys([*pinned.fp32_patterns, *base.fp32_patterns])))


def _top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float((run_onnx(path, x).argmax(1) == y).mean())


def plan_summary(record: dict) -> dict:
    """A plan record's figures for the report: its stage line and the candidates table."""
    out = {"plan": record["chosen"], "plan_runtime": record["runtime"], "plan_int8_layers": record["int8_layers"],
           **({"plan_verdict": record["verdict"]} if "verdict" in record else {}),
           "int8_file_qdq_pct": record["int8_file_time"]["quantize_dequantize_pct"],
           "int8_file_float_ops_pct": record["int8_file_time"]["float_ops_pct"],
           "int8_file_float_ops": ", ".join(f"{k} x{v}" for k, v in record["int8_file_time"]["float_ops"].items()) or "none"}
    out["int8_vs_fp32_by_op"], out["int8_loses_time_on"] = record["int8_vs_fp32_by_op"], record["int8_loses_time_on"]
    chosen = next((c for c in record.get("candidates", []) if c["plan"] == record["chosen"]), None)
    if chosen:
        out["plan_speedup_vs_fp32"] = chosen["speedup_vs_fp32"]
        out["plan_candidates"] = record["candidates"]
        out["plan_judged_on"] = record["judged_on"]  # set with the candidates (plan: auto)
    return out
