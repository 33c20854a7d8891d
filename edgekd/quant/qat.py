"""Quantization-aware training with fake quantization that mirrors onnxruntime's int8 kernels.

What ORT runs after static QDQ quantization (QDQ format, per-channel weights): int8
symmetric per-output-channel weights (on the target's grid: |q| <= 127, or <= 64 for the
7-bit weights of the `portable` target, see quant.targets), int32 biases on the grid of input
scale x weight scale, uint8 asymmetric per-tensor activations on every tensor an int8 op takes
or makes (a conv's input, a residual branch's output and its Add's, a pool's, the logits), BN
folded into the conv. The modules here simulate exactly that in fp32 with straight-through
gradients (torch.fake_quantize_* ops); where activations are rounded is read from the file
itself (quant.sites), so the KD fine-tune learns weights that survive it.

Why not torch.ao / PT2E: in torch 2.14 the eager torch.ao.quantization flow is deprecated
and PT2E QAT exports through torch.export with quantizer packages outside torch; our own
small modules train with the shared loop, and the int8 ONNX graph is produced by
onnxruntime's quantizer on the QAT weights (already on the int8 grid) with the same
weight scheme and the ranges QAT learned, so what is trained is what ORT runs (export
verifies top-1 agreement)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .sites import Site, install, uninstall


def _left_after_folding(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What remains of a BatchNorm once folded into its conv: nothing, or the dropout and
    activation that timm's BatchNormAct2d applies after normalising; None for a BatchNorm
    subclass that does something else (left unfolded)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if set(dict(bn.named_children())) == {"drop", "act"}:
        return nn.Sequential(bn.drop, bn.act)
    return None


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv (neighbouring children, as in
    Sequential and timm blocks, or convN/bnN pairs)."""
    model.eval()

    def fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
        a, b = getattr(parent, conv_name), getattr(parent, bn_name)
        left = _left_after_folding(b) if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) else None
        if left is not None:
            setattr(parent, conv_name, fuse_conv_bn_eval(a, b))
            setattr(parent, bn_name, left)

    for parent in list(model.modules()):
        names = [n for n, _ in parent.named_children()]
        for n1, n2 in zip(names, names[1:]):
            fold(parent, n1, n2)
        for name in names:
            if name.startswith("conv") and hasattr(parent, "bn" + name[4:]):
                fold(parent, name, "bn" + name[4:])
    return model


def _ensure_bias(m: nn.Module) -> None:
    if getattr(m, "bias", None) is None:
        m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], device=m.weight.device))


class ActFakeQuant(nn.Module):
    """Per-tensor uint8 asymmetric fake quant; range tracked as an EMA of batch min/max."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        # tensor ops only: no host sync per layer per step on a GPU; bf16 under autocast
        lo, hi = x.min().float().clamp(max=0.0), x.max().float().clamp(min=0.0)
        weight = torch.where(self.initialized, self.momentum, 1.0)  # the first batch sets the range
        self.lo.lerp_(lo, weight), self.hi.lerp_(hi, weight), self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not bool(self.initialized):
            self.observe(x)
        scale = self.scale()
        zp = (-self.lo / scale).round().clamp(0, 255).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)

    def scale(self) -> torch.Tensor:
        return ((self.hi - self.lo) / 255.0).clamp_min(1e-8)


def weight_scale(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-output-channel symmetric int8 scale on [-qmax, qmax] (ORT's QInt8 per-channel scheme:
    max|w| / 127, or max|w| / 64 with reduce_range)."""
    return (w.detach().abs().flatten(1).amax(1) / qmax).clamp_min(1e-8)


def fake_quant_weight(w: torch.Tensor, qmax: int, scale: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -qmax, qmax)


def fake_quant_bias(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bias on the int32 grid onnxruntime stores it on (input scale x weight scale, per
    channel), straight-through. Usually far finer than the output's grid, but BN folded from a
    channel with a tiny running variance gives weights in the thousands, a bias step larger than
    the bias, and a channel the file computes several output steps away from a float bias."""
    return b + (torch.round(b / scale) * scale - b).detach()


class _QLayer:
    """What the fake-quant conv and linear share: weights on the target's grid, and the bias on
    the grid of the quantizer that rounds the layer's input (its own `act_fq`, or, with sites,
    the site that rounds the tensor it takes: `in_fq`, held outside the module tree because the
    model already owns it)."""

    weight_qmax: int = 127

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_scale = weight_scale(self.weight, self.weight_qmax)
        fq = self.__dict__.get("in_fq", self.act_fq)
        b = self.bias
        if b is not None and isinstance(fq, ActFakeQuant):
            b = fake_quant_bias(b, fq.scale() * w_scale)
        return fake_quant_weight(self.weight, self.weight_qmax, w_scale), b


class QConv2d(_QLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_fq(x)  # first: in training it updates the range the bias grid follows
        return self._conv_forward(x, *self._weights())


class QLinear(_QLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_fq(x)
        return F.linear(x, *self._weights())


def wrap_qat(model: nn.Module, skip_first_conv: bool = False, weight_qmax: int = 127,
             keep_fp32: Callable[[str], bool] | None = None, sites: list | None = None) -> nn.Module:
    """Swap Conv2d/Linear for fake-quant versions (weights shared, an activation quantizer added).

    `skip_first_conv` leaves the stem conv in fp32, matching PTQ's `keep_first_conv_fp32`;
    `keep_fp32(module_path)` leaves the modules a quantization plan keeps fp32 (quant.plan), so
    QAT trains what the planned int8 file runs; `weight_qmax` is the target's weight grid
    (quant.targets). With `sites` (quant.sites: every tensor the int8 file rounds, found in this
    model) activations are rounded there instead of at each layer's input; a layer whose input
    no site rounds (a tensor made inside a module's forward: a channel shuffle, an activation
    decomposed by the exporter) keeps rounding its own input."""
    first = next((m for m in model.modules() if type(m) is nn.Conv2d), None) if skip_first_conv else None
    kept = {m for path, m in model.named_modules() if keep_fp32 is not None and keep_fp32(path)}
    feeding = {layer: i for i, s in enumerate(sites or []) for layer in s.feeds}  # layer path -> its input's site
    fed = {id(m) for path, m in model.named_modules() if path in feeding}
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m) in (nn.Conv2d, nn.Linear) and m is not first and m not in kept:
                _ensure_bias(m)
                m.__class__ = QConv2d if isinstance(m, nn.Conv2d) else QLinear
                m.weight_qmax = weight_qmax
                m.act_fq = nn.Identity() if id(m) in fed else ActFakeQuant().to(m.weight.device)
    if sites:
        device = next(model.parameters()).device
        modules = dict(model.named_modules())
        fqs = install(model, sites, lambda: ActFakeQuant().to(device))
        for path, i in feeding.items():
            if isinstance(modules.get(path), (QConv2d, QLinear)):
                modules[path].__dict__["in_fq"] = fqs[i]
    return model


@torch.no_grad()
def observe_ranges(model: nn.Module, images, device: torch.device | str = "cpu", batch: int = 64) -> nn.Module:
    """Set every activation range of a freshly wrapped model on calibration images (NCHW float
    array), as the quantize stage does before QAT trains."""
    model.train()
    for i in range(0, len(images), batch):
        model(torch.as_tensor(images[i : i + batch]).to(device))
    return model


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Each fake-quant layer's learned input range, keyed by its weight's name (the ONNX
    initializer name of the exported layer), for quant.ptq.quantize_onnx."""
    return {f"{name}.weight": (float(m.act_fq.lo), float(m.act_fq.hi)) for name, m in model.named_modules()
            if isinstance(m, (QConv2d, QLinear)) and isinstance(m.act_fq, ActFakeQuant) and bool(m.act_fq.initialized)}


def snap_weights(model: nn.Module) -> nn.Module:
    """Replace each fake-quant module by a plain one whose weights sit on the int8 grid, and drop
    the activation rounding (for export)."""
    uninstall(model)
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, m in list(parent.named_children()):
                if isinstance(m, (QConv2d, QLinear)):
                    w, b = m._weights()
                    m.weight.copy_(w)
                    if b is not None:
                        m.bias.copy_(b)
                    del m.act_fq, m.weight_qmax
                    m.__dict__.pop("in_fq", None)
                    m.__class__ = nn.Conv2d if isinstance(m, QConv2d) else nn.Linear
    return model


W7 = "_w7"  # transform-name suffix: 7-bit weights (reduce_range targets)


def qat_transform(weight_qmax: int, plan, sites: list[Site] | None = None) -> dict:
    """The record of a QAT wrapping (weight grid, quantization plan, and where activations are
    rounded), so a checkpoint rebuilds the same simulation."""
    record = {"weight_qmax": weight_qmax, "plan": plan.to_json()}
    if sites:
        record["sites"] = [s.to_json() for s in sites]
    return {"qat": record}


def transform_sites(transform: dict) -> list[Site]:
    """The activation sites a QAT transform record names (none in records from before sites)."""
    return [Site.from_json(v) for v in transform["qat"].get("sites", [])]


def apply_transform(model: nn.Module, name: str | dict) -> nn.Module:
    """Re-apply a recorded transform when rebuilding a checkpoint (see models.rebuild). Checkpoints
    from before quantization plans name their QAT wrapping as a string (`qat_fp32_stem_w7`)."""
    if isinstance(name, dict) and "qat" in name:
        from .plan import Plan

        plan = Plan.from_json(name["qat"]["plan"])
        return wrap_qat(model, weight_qmax=int(name["qat"]["weight_qmax"]), keep_fp32=plan.keeps_module,
                        sites=transform_sites(name))
    if name == "fold_bn":
        model = fold_bn(model)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _ensure_bias(m)
        return model
    base, qmax = (name[: -len(W7)], 64) if name.endswith(W7) else (name, 127)
    if base in ("qat", "qat_fp32_stem"):
        return wrap_qat(model, skip_first_conv=base == "qat_fp32_stem", weight_qmax=qmax)
    raise ValueError(f"unknown model transform '{name}'")
