"""ExecuTorch: XNNPACK-delegated .pte programs (pte_export), int8 by ExecuTorch's own PT2E
quantizer on the quantize stage's calibration images; metadata in a `.pte.json` sidecar,
since a program has no metadata table of its own."""

from __future__ import annotations

import copy
from pathlib import Path

from .base import FORMATS, ConvertJob, Format, Runner, Variant


@FORMATS.register("executorch")
class ExecuTorch(Format):
    key, suffix, module, install_hint, what = "pte", ".pte", "executorch", "pip install 'edgekd[mobile]'", "ExecuTorch"
    runtime, own_int8 = "executorch", True

    def export(self, v: Variant, path: Path, job: ConvertJob, keep_fp32: list[str] = ()) -> Path:
        from ..pte_export import export_pte

        src = v.int8_source if v.int8 else v.reference
        return export_pte(copy.deepcopy(src), path, job.image_size, job.calibration() if v.int8 else None,
                          keep_fp32=keep_fp32)

    def write_metadata(self, path: Path, props: dict[str, str]) -> None:
        from ..pte_export import read_sidecar, write_sidecar

        write_sidecar(path, {**read_sidecar(path), **props})

    def read_metadata(self, path: Path) -> dict[str, str]:
        from ..pte_export import read_sidecar

        return read_sidecar(path)

    def runner(self, path: Path, threads: int = 1) -> Runner:
        from ..pte_export import pte_runner

        return pte_runner(path, threads)
