"""quantize: int8 by static PTQ (onnxruntime) and/or QAT with the teacher in the loop.

Accuracy of every variant is measured by onnxruntime on the exported files, not by
PyTorch's simulation. `target` says which CPUs the files are for (quant.targets): the
default, `portable`, gives the same numbers on every x86 and ARM CPU."""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..schema import Strict
from ..data import stratified_indices
from ..metrics import classification_metrics
from ..onnx_export import export_onnx, onnx_logits
from ..quant.ptq import quantize_onnx
from ..quant.qat import activation_ranges, apply_transform, qat_transform, snap_weights
from ..quant.targets import TARGET_NAMES, resolve_target
from ..train import TrainConfig, fit
from .base import Stage, StageResult, register


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
    qat: QATConfig = Field(default_factory=QATConfig)

    def teachers_used(self) -> list[tuple[str, str | None, bool, bool]]:
        return [(f"qat.{k}", *rest) for k, *rest in self.qat.teachers_used()] if self.method != "ptq" and self.qat.epochs else []


def calibration_images(data, samples: int, seed: int) -> np.ndarray:
    """The normalised, class-stratified training images every int8 conversion calibrates on."""
    idx = stratified_indices(data.train.labels.numpy(), samples, seed)
    return data.normalize(data.train.images[torch.as_tensor(idx)]).numpy()


@register("quantize")
class Quantize(Stage):
    Config = QuantizeConfig

    def run(self, ctx) -> StageResult:
        cfg: QuantizeConfig = self.config
        data, d = ctx.data, ctx.stage_dir
        float_model = ctx.model.eval()
        calib = calibration_images(data, cfg.calibration.samples, ctx.cfg.seed)
        target = resolve_target(cfg.target)
        qopts = dict(method=cfg.calibration.method, per_channel=cfg.per_channel, activation_type=cfg.activation_type,
                     percentile=cfg.calibration.percentile, exclude_depthwise=cfg.exclude_depthwise,
                     keep_first_conv_fp32=cfg.keep_first_conv_fp32, target=target)
        labels = data.test.labels.numpy()

        def ort_figs(path, label):
            m = classification_metrics(onnx_logits(path, data), labels, data.classes)
            return {**m, "size_bytes": path.stat().st_size, "label": label, "runtime_measured": "onnxruntime"}

        fp32 = export_onnx(copy.deepcopy(float_model), d / "student_fp32.onnx", data.image_size)
        models = {"student_fp32": {**ctx.measure(float_model), **ort_figs(fp32, "student fp32 (quantize input)")}}
        artifacts = {"onnx.student_fp32": ctx.rel(fp32)}
        info: dict = {"calibration": cfg.calibration.model_dump(), "per_channel": cfg.per_channel,
                      "activation_type": cfg.activation_type, "keep_first_conv_fp32": cfg.keep_first_conv_fp32,
                      "target": target.name, "weight_qmax": target.weight_qmax, "target_runs_on": target.runs_on}
        history: list = []
        if cfg.method in ("ptq", "both"):
            ptq = quantize_onnx(fp32, d / "int8_ptq.onnx", calib, **qopts)
            models["int8_ptq"] = ort_figs(ptq, "int8 PTQ")
            artifacts["onnx.int8_ptq"] = ctx.rel(ptq)
        if cfg.method in ("qat", "both"):
            wrap = qat_transform(cfg.keep_first_conv_fp32, target.weight_qmax)
            qmodel = apply_transform(apply_transform(copy.deepcopy(float_model).cpu(), "fold_bn"), wrap).to(ctx.device)
            objective = ctx.objective(cfg.qat) if cfg.qat.epochs else None
            with torch.no_grad():  # initialise activation ranges on calibration images
                qmodel.train()
                for i in range(0, len(calib), 64):
                    qmodel(torch.from_numpy(calib[i : i + 64]).to(ctx.device))
            history = fit(qmodel, data, cfg.qat, ctx.device, seed=ctx.cfg.seed, objective=objective,
                          state_path=d / "qat_train_state.pt", desc=f"qat[{cfg.qat.describe()}]")
            qmodel.eval()
            sim = ctx.measure(qmodel)
            snapped = export_onnx(snap_weights(copy.deepcopy(qmodel).cpu()), d / "qat_float.onnx", data.image_size)
            qat = quantize_onnx(snapped, d / "int8_qat.onnx", calib, activation_ranges=activation_ranges(qmodel), **qopts)
            snapped.unlink()
            models["int8_qat"] = {**ort_figs(qat, "int8 QAT"), "torch_fake_quant_top1": sim["top1"],
                                  "params": sim.get("params"), "macs": sim.get("macs")}
            artifacts["onnx.int8_qat"] = ctx.rel(qat)
            ctx.float_model, ctx.model = float_model, qmodel
            ctx.transforms = ["fold_bn", wrap]
        for k in ("int8_ptq", "int8_qat"):
            if k in models:
                models[k].update({"params": models["student_fp32"].get("params"), "macs": models["student_fp32"].get("macs")})
                info[f"{k}_drop_points"] = round(models["student_fp32"]["top1"] - models[k]["top1"], 3)
        best = max((k for k in models if k.startswith("int8")), key=lambda k: models[k]["top1"])
        metrics = {k: v for k, v in models[best].items() if k != "label"}
        info["best_int8"] = best
        return StageResult(metrics=metrics, models=models, artifacts=artifacts, history=history,
                           info=info, model_changed=cfg.method != "ptq")
