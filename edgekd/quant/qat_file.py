"""QAT built to simulate one int8 file, and the int8 file made from the trained QAT model.

One place for the sequence, because the quantize stage, the benchmarks that measure its QAT
(portable_int8.py, qat_agreement.py) and the tests must all build the same simulation: fold BN,
find where the file rounds (quant.sites), wrap the layers the plan makes int8, set every range on
calibration images; and after training, snap the weights, export, and quantize on the ranges QAT
learned. A copy of the sequence that drifts measures a QAT the stage does not ship."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import EdgekdError
from .qat import activation_ranges, apply_transform, observe_ranges, qat_transform, snap_weights
from .sites import find_sites, site_ranges

log = logging.getLogger("edgekd")


@dataclass
class QatBuild:
    """A QAT model ready to train, the transform record that rebuilds it from the float model
    (after `fold_bn`), and which of the file's rounded tensors it simulates."""

    model: nn.Module
    transform: dict
    simulated: int = 0
    not_simulated: list[str] = field(default_factory=list)


def build_qat(float_model: nn.Module, image_size: int, calib: np.ndarray, plan, qopts: dict,
              device: torch.device | str = "cpu", sites: bool = True) -> QatBuild:
    """The QAT model of `float_model` (left untouched) for the file `quantize_onnx(plan=plan,
    **qopts)` writes, its ranges set on `calib`. `sites=False` rounds each int8 layer's input only
    (the simulation before sites; benchmarks compare the two). A model whose sites cannot be
    found gets that simulation too, with a WARNING naming why."""
    folded = apply_transform(copy.deepcopy(float_model).cpu(), "fold_bn")
    found, unmatched = [], []
    if sites:
        try:
            found, unmatched = find_sites(folded, image_size, calib, plan, qopts)
        except EdgekdError:
            raise
        except Exception as e:  # a model the matching cannot follow still gets QAT, as before sites
            log.warning("quantize: could not find where the int8 file rounds in the model (%s: %s); QAT rounds "
                        "each layer's input only", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        if unmatched:
            log.warning("quantize: QAT does not simulate the rounding of %d of the int8 file's tensors (no module "
                        "makes or takes them): %s", len(unmatched), ", ".join(unmatched[:5]))
    transform = qat_transform(qopts["target"].weight_qmax, plan, found)
    model = observe_ranges(apply_transform(folded, transform).to(device), calib, device)
    return QatBuild(model, transform, sum(len(s.tensors) for s in found), unmatched)


def qat_int8_file(qmodel: nn.Module, path: Path, image_size: int, calib: np.ndarray, plan, qopts: dict) -> Path:
    """The int8 ONNX file of a trained QAT model: its weights snapped to their grid (a copy; the
    model keeps its fake quant), quantized with the plan on the ranges QAT learned (each site's
    tensors, each layer's input); calibration fills only what neither covers."""
    from ..onnx_export import export_onnx
    from .ptq import quantize_onnx

    path = Path(path)
    snapped = export_onnx(snap_weights(copy.deepcopy(qmodel).cpu()), path.with_name(path.stem + "_float.onnx"), image_size)
    try:
        return quantize_onnx(snapped, path, calib, activation_ranges=activation_ranges(qmodel), plan=plan,
                             tensor_ranges=site_ranges(qmodel), **qopts)
    finally:
        snapped.unlink(missing_ok=True)
