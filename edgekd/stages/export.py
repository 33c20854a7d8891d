"""export: ONNX fp32 (and the int8 files of the quantize stage) with runner metadata,
each verified in onnxruntime against its PyTorch counterpart on real test images."""

from __future__ import annotations

import copy
import shutil

from pydantic import Field

from ..config import Strict
from ..onnx_export import export_onnx, metadata, op_counts, set_metadata, verify
from .base import Stage, StageResult, register


class ExportConfig(Strict):
    opset: int = Field(17, ge=13, le=21)
    verify_images: int = Field(256, gt=0)
    fp32_max_abs_diff: float = Field(1e-3, gt=0, description="max |logit| difference ORT vs PyTorch (fp32)")
    fp32_min_agreement: float = Field(0.99, gt=0, le=1)
    int8_min_agreement: float = Field(0.95, gt=0, le=1, description="int8 ORT vs PyTorch fake-quant top-1 agreement")
    ptq_min_agreement: float = Field(0.90, gt=0, le=1, description="int8 PTQ vs fp32 top-1 agreement")
    include_teacher: bool = Field(True, description="also export the teacher (the benchmark's reference)")


LABELS = {"student_unpruned_fp32": "unpruned student fp32", "teacher_fp32": "teacher fp32"}


@register("export")
class Export(Stage):
    Config = ExportConfig

    def run(self, ctx) -> StageResult:
        cfg: ExportConfig = self.config
        data, d = ctx.data, ctx.stage_dir
        float_model = ctx.float_model if ctx.float_model is not None else ctx.model
        artifacts, info, models = {}, {}, {}

        def finish(name: str, path, reference, **tol):
            set_metadata(path, metadata(data, name))
            info[name] = {"verify": verify(path, reference, data, cfg.verify_images, **tol), "ops": op_counts(path)}
            artifacts[f"onnx.{name}"] = ctx.rel(path)
            models[name] = {"size_bytes": path.stat().st_size, "onnx": ctx.rel(path)}
            if name in LABELS:
                models[name]["label"] = LABELS[name]

        fp32 = export_onnx(copy.deepcopy(float_model), d / "student_fp32.onnx", data.image_size, cfg.opset)
        finish("student_fp32", fp32, float_model, max_abs=cfg.fp32_max_abs_diff, min_agreement=cfg.fp32_min_agreement)
        for name in ("int8_qat", "int8_ptq"):
            src = ctx.artifacts.get(f"onnx.{name}")
            if not src:
                continue
            dst = d / f"{name}.onnx"
            shutil.copyfile(ctx.run_dir / src, dst)
            if name == "int8_qat":
                finish(name, dst, ctx.model, max_abs=None, min_agreement=cfg.int8_min_agreement)
            else:
                finish(name, dst, float_model, max_abs=None, min_agreement=cfg.ptq_min_agreement)
        unpruned = ctx.artifacts.get("model.unpruned")
        if unpruned:
            import torch

            from ..models import rebuild

            m = rebuild(torch.load(ctx.run_dir / unpruned, map_location="cpu", weights_only=True))
            p = export_onnx(copy.deepcopy(m), d / "student_unpruned_fp32.onnx", data.image_size, cfg.opset)
            finish("student_unpruned_fp32", p, m, max_abs=cfg.fp32_max_abs_diff, min_agreement=cfg.fp32_min_agreement)
        if cfg.include_teacher and ctx.cfg.teacher is not None and not hasattr(ctx.teacher, "session"):
            t = copy.deepcopy(ctx.teacher).cpu()
            p = export_onnx(t, d / "teacher_fp32.onnx", data.image_size, cfg.opset)
            finish("teacher_fp32", p, t, max_abs=cfg.fp32_max_abs_diff * 10, min_agreement=cfg.fp32_min_agreement)
        fp = info["student_fp32"]["verify"]
        return StageResult(metrics={"fp32_max_abs_diff": fp["max_abs_diff"], "fp32_top1_agreement": fp["top1_agreement"]},
                           models=models, artifacts=artifacts, info=info)
