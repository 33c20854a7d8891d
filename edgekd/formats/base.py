"""The format interface and the variant a format writes (see the package docstring)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.nn as nn

from ..errors import EdgekdError
from ..registry import Registry, why_missing

FORMATS: Registry = Registry("format")
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Variant:
    """One model variant to write in every format: its PyTorch reference and tolerances.

    `qat_model` is the QAT-trained (fake-quantized) student: formats that quantize themselves
    start from its weights snapped to the int8 grid, as the int8 ONNX file was made from them.
    `onnx_int8` is the quantize stage's int8 ONNX file, which the ONNX format ships as is."""

    name: str
    reference: nn.Module
    int8: bool = False
    max_abs: float | None = None
    min_agreement: float = 0.99
    qat_model: nn.Module | None = None
    onnx_int8: Path | None = None
    most_images: int | None = None  # verified on at most this many of the stage's images (None: all of them)
    _logits: dict = field(default_factory=dict, repr=False, compare=False)

    def logits(self, int8_source: bool, data, n: int) -> np.ndarray:
        """The reference's (or the int8 source's) logits every format's file of this variant is
        verified against, computed once: a teacher's forward on the verification images takes
        seconds, and there is one file per format."""
        key = (int8_source, n)
        if key not in self._logits:
            from ..onnx_export import reference_logits

            self._logits[key] = reference_logits(self.int8_source if int8_source else self.reference, data, n)
        return self._logits[key]

    def verify_images(self, job: "ExportJob") -> int:
        """How many test images this variant's files are verified on."""
        return min(job.verify_images, self.most_images or job.verify_images)

    @cached_property
    def int8_source(self) -> nn.Module:
        """The float model a format's own int8 quantizer calibrates."""
        if self.qat_model is None:
            return self.reference
        from ..quant.qat import snap_weights

        return snap_weights(copy.deepcopy(self.qat_model).cpu())


class Format:
    """A file format. `key` prefixes its artifacts (`<key>.<variant>`) and its figures in the
    report (`<key>_verify`, `<key>_size_bytes`); the primary format (ONNX) has no prefix."""

    key: str = ""
    suffix: str = ""
    module: str = ""  # the package whose presence makes it available
    install_hint: str = ""
    what: str = ""  # how verification messages name it
    primary: bool = False
    runtime: str = ""  # the benchmark runtime (bench.runtimes) that runs its files
    Options: type | None = None  # its `export.options.<name>` model, if it has options

    @classmethod
    def available(cls) -> str | None:
        """None when usable, otherwise why not."""
        return why_missing(cls.module, cls.install_hint)

    def figure(self, name: str) -> str:
        return name if self.primary else f"{self.key}_{name}"

    own_int8: bool = False  # plans its own int8 files on its own runtime (formats.int8_plan)
    float_files: str | None = None  # writes int8 variants only; its runtime runs this format's fp32 files

    def int8_choices(self, kept: list[str], plan_name: str) -> dict[str, list[str] | None]:
        """The programs a format with its own int8 chooses each int8 file from (formats.int8_plan):
        name -> the modules left float (None: no int8 at all). `kept`: what the quantize stage's
        plan `plan_name` keeps fp32. A format with its own quantizer (PT2E) tries every op int8,
        the plan's modules left float, and none."""
        keep: dict[str, list[str] | None] = {"int8": []}
        if kept and plan_name != "fp32":
            keep[f"quantize plan ({plan_name})"] = kept
        keep["fp32"] = None
        return keep

    def writes(self, v: "Variant") -> bool:
        """Whether this format has its own file of `v` (see float_files)."""
        return v.int8 or self.float_files is None

    def export(self, v: Variant, path: Path, job: "ConvertJob", keep_fp32: list[str] = ()) -> Path:
        """Write `v` at `path`; a format with its own int8 leaves the modules in `keep_fp32` float."""
        raise NotImplementedError

    def write_metadata(self, path: Path, props: dict[str, str]) -> None:
        raise NotImplementedError

    def read_metadata(self, path: Path) -> dict[str, str]:
        raise NotImplementedError

    def runner(self, path: Path, threads: int = 1) -> Runner:
        raise NotImplementedError

    def op_profile(self, path: Path, x: np.ndarray) -> dict[str, dict] | None:
        """Microseconds per image by kind of op on this format's runtime (bench.runtimes.Runtime.
        op_profile), so that an int8 program can be set against its fp32 program op for op
        (formats.int8_plan); None where the runtime has no per-operator profiler."""
        from ..bench.runtimes import RUNTIMES

        return RUNTIMES.get(self.runtime)().op_profile(path, x) if self.runtime else None

    def verify(self, path: Path, v: Variant, job: "ExportJob") -> dict:
        """Outputs of the file vs its PyTorch reference on test images (onnx_export.verify), on every
        core this process may use: nothing is timed while the stage verifies."""
        from ..bench.machine import usable_cores
        from ..onnx_export import verify

        n = v.verify_images(job)
        return verify(path, v.logits(v.int8, job.data, n), job.data, n, run=self.runner(path, usable_cores()), what=self.what,
                      max_abs=None if v.int8 else v.max_abs,
                      min_agreement=job.int8_min_agreement if v.int8 else v.min_agreement)

    def details(self, path: Path) -> dict:
        """Extra per-file facts for the report (e.g. ONNX op counts)."""
        return {}

    def input_shape(self, path: Path) -> list[int]:
        """The file's declared input shape (for files without edgekd metadata); [] if unknown."""
        return []

    def verified_by(self) -> dict:
        """The runtime, its version and the ISA verification ran on, for the verify record."""
        from ..bench.machine import machine_info
        from ..bench.runtimes import RUNTIMES

        return {"runtime": self.runtime, "runtime_version": RUNTIMES.get(self.runtime).version(),
                "isa": machine_info()["isa"]}


def format_for(path: Path) -> type[Format]:
    """The format of a file, by its suffix (the longest that matches: `.openvino.onnx` before `.onnx`)."""
    for fmt in sorted((f for _, f in FORMATS.items()), key=lambda f: -len(f.suffix)):
        if path.name.lower().endswith(fmt.suffix):
            return fmt
    raise EdgekdError(f"{path}: unknown model file type '{path.suffix}'; known: "
                      f"{', '.join(f.suffix for _, f in FORMATS.items())}")


@dataclass(frozen=True)
class ConvertJob:
    """What writing one file needs (Format.export): small and picklable, so that a worker
    process can take it (formats.workers)."""

    image_size: int
    opset: int
    calibration: Callable[[], np.ndarray]  # the quantize stage's calibration images, for int8 variants
    options: dict = field(default_factory=dict)  # format name -> its validated Options

    def options_for(self, name: str, model: type):
        return self.options.get(name) or model()


@dataclass
class ExportJob:
    """What every format's export and verification of one run share: the conversion (ConvertJob)
    and what verifying a written file needs."""

    data: Any
    verify_images: int
    int8_min_agreement: float  # a format's own int8 vs its float source
    convert: ConvertJob


def enabled_formats(formats: str | list[str], executorch: str) -> tuple[list[Format], dict[str, str]]:
    """(the formats to write, primary first; {format: why skipped}). `formats: auto` = every
    installed one (ExecuTorch per `export.executorch`), or the listed ones, each of which must
    be installed."""
    names = FORMATS.names() if formats == "auto" else list(formats)
    if executorch == "off":
        names = [n for n in names if n != "executorch"]
    elif executorch == "on" and "executorch" not in names:
        names.append("executorch")
    out, skipped = [], {}
    for n in names:
        why = FORMATS.get(n).available()
        if why and (formats != "auto" or (n == "executorch" and executorch == "on")):
            raise EdgekdError(f"export.formats: {n} is {why}")
        if why:
            skipped[n] = why
        else:
            out.append(FORMATS.get(n)())
    return sorted(out, key=lambda f: (not f.primary, f.key)), skipped
