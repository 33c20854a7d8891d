"""ONNX: the primary format. fp32 through the TorchScript exporter; int8 is the quantize
stage's onnxruntime QDQ file, verified for the CPU class it runs on (onnx_export.verify_int8).
Calibration, robustness and most runtimes of the benchmark read these files."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from .base import FORMATS, ConvertJob, ExportJob, Format, Runner, Variant


@FORMATS.register("onnx")
class Onnx(Format):
    key, suffix, module, install_hint, what, primary = "onnx", ".onnx", "onnxruntime", "pip install onnxruntime", "ONNX", True
    runtime = "onnxruntime"

    def export(self, v: Variant, path: Path, job: ConvertJob, keep_fp32: list[str] = ()) -> Path:
        if v.onnx_int8 is not None:
            shutil.copyfile(v.onnx_int8, path)
            return path
        from ..onnx_export import export_onnx

        return export_onnx(copy.deepcopy(v.reference), path, job.image_size, job.opset)

    def write_metadata(self, path: Path, props: dict[str, str]) -> None:
        from ..onnx_export import set_metadata

        set_metadata(path, props)

    def read_metadata(self, path: Path) -> dict[str, str]:
        from ..onnx_export import read_metadata

        return read_metadata(path)

    def runner(self, path: Path, threads: int = 0) -> Runner:
        from ..onnx_export import run_onnx

        return lambda x: run_onnx(path, x, threads=threads)

    def verify(self, path: Path, v: Variant, job: ExportJob) -> dict:
        from ..onnx_export import verify, verify_int8

        n = v.verify_images(job)
        ref = v.logits(False, job.data, n)
        if v.int8:
            return verify_int8(path, ref, job.data, n, v.min_agreement)
        return verify(path, ref, job.data, n, max_abs=v.max_abs, min_agreement=v.min_agreement)

    def input_shape(self, path: Path) -> list[int]:
        import onnx

        m = onnx.load(str(path), load_external_data=False)  # readable: read_metadata came first
        return [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]

    def details(self, path: Path) -> dict:
        from ..onnx_export import op_counts

        return {"ops": op_counts(path)}
