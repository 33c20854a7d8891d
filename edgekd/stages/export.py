"""export: ONNX fp32 (and the int8 files of the quantize stage) with runner metadata,
each verified in onnxruntime against its PyTorch counterpart on real test images; and, when
ExecuTorch is installed, the same variants as XNNPACK .pte programs, verified likewise.

With a validation split, each student file also gets a softmax temperature fit on it (as its
runtime runs it) and stored in its metadata (edgekd.calibration)."""

from __future__ import annotations

import copy
import logging
import shutil

from pydantic import Field

from ..config import Strict, Switch
from ..errors import EdgekdError
from ..onnx_export import export_onnx, metadata, op_counts, set_metadata, verify, verify_int8
from .base import Stage, StageResult, register

log = logging.getLogger("edgekd")


class ExportConfig(Strict):
    opset: int = Field(17, ge=13, le=21)
    verify_images: int = Field(256, gt=0)
    fp32_max_abs_diff: float = Field(1e-3, gt=0, description="max |logit| difference ORT vs PyTorch (fp32)")
    # top-1 agreements count the images the reference decides clearly (onnx_export.verify)
    fp32_min_agreement: float = Field(0.99, gt=0, le=1)
    int8_min_agreement: float = Field(0.95, gt=0, le=1, description="int8 QAT file vs PyTorch fake-quant top-1 agreement")
    ptq_min_agreement: float = Field(0.90, gt=0, le=1, description="int8 PTQ vs fp32 top-1 agreement (also ExecuTorch int8)")
    include_teacher: bool = Field(True, description="also export the teacher (the benchmark's reference)")
    executorch: Switch = Field(
        "auto", description="also write ExecuTorch/XNNPACK .pte programs (int8 by ExecuTorch's own PT2E PTQ); "
                            "auto = when executorch is installed")

    temperature_scaling: Switch = Field(
        "auto", description="fit a softmax temperature per student file on the validation split and store it in the "
                            "file's metadata; auto = when data.val_split > 0")

    def pipeline_problems(self, pipeline) -> list[tuple[str, str]]:
        if self.temperature_scaling == "on" and not pipeline.data.val_split:
            return [("temperature_scaling", "needs a validation split: set data.val_split (e.g. 0.1); the temperature "
                                            "is fit on images held out from training, never on the test split")]
        return []


LABELS = {"student_unpruned_fp32": "unpruned student fp32", "teacher_fp32": "teacher fp32"}


@register("export")
class Export(Stage):
    Config = ExportConfig

    def run(self, ctx) -> StageResult:
        cfg: ExportConfig = self.config
        data, d = ctx.data, ctx.stage_dir
        float_model = ctx.float_model if ctx.float_model is not None else ctx.model
        artifacts, info, models = {}, {}, {}
        pte = self._pte_enabled(cfg, info)
        calib = None

        def finish(name: str, path, reference, pte_model=None, int8=False, **tol):
            """Stamp metadata on the ONNX file, verify it, and (if enabled) write and verify the .pte."""
            nonlocal calib
            set_metadata(path, metadata(data, name))
            check = (verify_int8(path, reference, data, cfg.verify_images, tol["min_agreement"]) if int8
                     else verify(path, reference, data, cfg.verify_images, **tol))
            info[name] = {"verify": check, "ops": op_counts(path)}
            artifacts[f"onnx.{name}"] = ctx.rel(path)
            models[name] = {"size_bytes": path.stat().st_size, "onnx": ctx.rel(path)}
            if name in LABELS:
                models[name]["label"] = LABELS[name]
            if not pte:
                return
            from ..pte_export import export_pte, pte_runner, write_sidecar
            from .quantize import CalibrationConfig, calibration_images

            if int8 and calib is None:  # the quantize stage's calibration set (its default if it has none)
                q = next((c for n, c in ctx.cfg.stage_entries() if n == "quantize"), None)
                calib = calibration_images(data, (q.calibration if q else CalibrationConfig()).samples, ctx.cfg.seed)
            src = pte_model if pte_model is not None else reference
            p = export_pte(copy.deepcopy(src), d / f"{name}.pte", data.image_size, calib if int8 else None)
            write_sidecar(p, metadata(data, name))
            info[name]["pte_verify"] = verify(p, src, data, cfg.verify_images, run=pte_runner(p, 1), what="ExecuTorch",
                                              max_abs=None if int8 else tol.get("max_abs"),
                                              min_agreement=cfg.ptq_min_agreement if int8 else tol["min_agreement"])
            artifacts[f"pte.{name}"] = ctx.rel(p)
            models[name]["pte_size_bytes"] = p.stat().st_size

        fp32 = export_onnx(copy.deepcopy(float_model), d / "student_fp32.onnx", data.image_size, cfg.opset)
        finish("student_fp32", fp32, float_model, max_abs=cfg.fp32_max_abs_diff, min_agreement=cfg.fp32_min_agreement)
        for name in ("int8_qat", "int8_ptq"):
            src = ctx.artifacts.get(f"onnx.{name}")
            if not src:
                continue
            dst = d / f"{name}.onnx"
            shutil.copyfile(ctx.run_dir / src, dst)
            if name == "int8_qat":
                from ..quant.qat import snap_weights

                # ExecuTorch quantizes the QAT-trained weights itself, as the int8 ONNX file was made
                snapped = snap_weights(copy.deepcopy(ctx.model).cpu()) if pte else None
                finish(name, dst, ctx.model, snapped, int8=True, min_agreement=cfg.int8_min_agreement)
            else:
                finish(name, dst, float_model, int8=True, min_agreement=cfg.ptq_min_agreement)
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
        if cfg.temperature_scaling == "on" or (cfg.temperature_scaling == "auto" and data.val is not None):
            self._calibrate(ctx, models, info)
        fp = info["student_fp32"]["verify"]
        return StageResult(metrics={"fp32_max_abs_diff": fp["max_abs_diff"], "fp32_top1_agreement": fp["top1_agreement"]},
                           models=models, artifacts=artifacts, info=info)

    @staticmethod
    def _calibrate(ctx, models: dict, info: dict) -> None:
        """A temperature per student file, fit on that file's own validation logits."""
        from ..calibration import calibrate
        from ..onnx_export import run_onnx

        data = ctx.data
        if data.val is None:
            raise EdgekdError("export.temperature_scaling: on, but the data has no validation split (set data.val_split)")
        xv, yv = data.normalize(data.val.images).numpy(), data.val.labels.numpy()
        xt, yt = data.normalize(data.test.images).numpy(), data.test.labels.numpy()
        for name in [n for n in ("student_fp32", "int8_ptq", "int8_qat", "student_unpruned_fp32") if n in models]:
            path = ctx.run_dir / models[name]["onnx"]
            res = calibrate(run_onnx(path, xv), yv, run_onnx(path, xt), yt, data.classes)
            set_metadata(path, {"edgekd.temperature": repr(res["temperature"])})
            info[name]["calibration"] = {k: v for k, v in res.items() if not k.startswith("reliability")}
            models[name].update({"calibration": res, "temperature": res["temperature"], "ece_calibrated": res["ece_after"]})
            if "pte_verify" in info[name]:  # the .pte program is its own quantization: its own temperature
                from ..pte_export import pte_runner, read_sidecar, write_sidecar

                pte = path.with_suffix(".pte")
                run = pte_runner(pte, 1)
                pres = calibrate(run(xv), yv, run(xt), yt, data.classes)
                write_sidecar(pte, {**read_sidecar(pte), "edgekd.temperature": repr(pres["temperature"])})
                info[name]["pte_calibration"] = {k: v for k, v in pres.items() if not k.startswith("reliability")}
            log.info("export: %s temperature %.3f, test ECE %.4f -> %.4f", name, res["temperature"], res["ece_before"],
                     res["ece_after"])

    @staticmethod
    def _pte_enabled(cfg: ExportConfig, info: dict) -> bool:
        if cfg.executorch == "off":
            return False
        from ..pte_export import available

        why = available()
        if why and cfg.executorch == "on":
            raise EdgekdError(f"export.executorch: on, but ExecuTorch is {why}")
        if why:
            log.info("export: no ExecuTorch .pte files: ExecuTorch %s", why)
            info["executorch"] = f"skipped: {why}"
        return why is None
