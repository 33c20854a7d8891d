"""Model builders, checkpoint loading and edgekd's own checkpoint format.

An edgekd checkpoint stores *how to rebuild* the model (architecture spec, torch-pruning
history, applied transforms such as QAT wrapping) next to its weights, so a pruned model
reloads in a fresh process without pickling code objects.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .schema import TIMM, ModelConfig
from .errors import InputError
from .safeload import open_checkpoint

log = logging.getLogger("edgekd")
FORMAT_VERSION = 1


def arch_spec(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    return {"arch": cfg.arch, "num_classes": num_classes, "cifar_stem": cfg.cifar_stem, "width_mult": cfg.width_mult}


def _apply_cifar_stem(model: nn.Module, arch: str) -> None:
    """Adapt an ImageNet stem to 32x32 inputs (the recipe of ../shared/models/README.md)."""
    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif arch == "mobilenet_v2":
        model.features[0][0].stride = (1, 1)
        model.features[2].conv[1][0].stride = (1, 1)
    elif arch.startswith(("mobilenet_v3", "efficientnet", "mnasnet", "regnet")):
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    else:
        raise InputError(f"cifar_stem is not supported for arch '{arch}' (supported: resnet*, mobilenet_v2/v3, efficientnet*, mnasnet*, regnet*)")


def timm_models() -> list[str]:
    """timm's architecture names; InputError naming the extra when timm is not installed."""
    try:
        import timm
    except ImportError:
        raise InputError("timm is not installed: pip install 'edgekd[timm]' for arch: timm/<name>") from None
    return timm.list_models()


def _build_timm(spec: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    from .errors import did_you_mean

    name = spec["arch"][len(TIMM):]
    known = timm_models()
    if name not in known:
        raise InputError(f"unknown arch '{spec['arch']}'{did_you_mean(name, known)}: not a timm model "
                         "(see timm.list_models())")
    if spec.get("width_mult") is not None:
        raise InputError(f"arch '{spec['arch']}': width_mult is for torchvision models; pick a timm variant "
                         "of the width you want (e.g. mobilenetv3_small_050)")
    model = timm.create_model(name, pretrained=pretrained, num_classes=spec["num_classes"])
    if spec.get("cifar_stem"):  # the first conv no longer halves the input
        next(m for m in model.modules() if isinstance(m, nn.Conv2d)).stride = (1, 1)
    return model


AUX_HEADS = ("googlenet", "inception_v3")  # built without their auxiliary classifiers: every loss here reads one output


def build(spec: dict[str, Any], pretrained: bool = False) -> nn.Module:
    import torchvision

    arch = spec["arch"]
    if arch.startswith(TIMM):
        return _build_timm(spec, pretrained)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise InputError(f"unknown arch '{arch}': not a torchvision classification model")
    kwargs: dict[str, Any] = {}
    if arch in AUX_HEADS:  # their training-mode forward returns a tuple with the auxiliary heads' logits
        kwargs["aux_logits"] = False
        if not pretrained:
            kwargs["init_weights"] = True  # torchvision's default, said explicitly (it warns otherwise)
    if spec.get("width_mult") is not None:
        kwargs["width_mult"] = spec["width_mult"]
    try:
        if pretrained:
            model = torchvision.models.get_model(arch, weights="DEFAULT", **kwargs)
            _replace_head(model, spec["num_classes"])
        else:
            model = torchvision.models.get_model(arch, num_classes=spec["num_classes"], **kwargs)
    except TypeError as e:
        raise InputError(f"arch '{arch}' does not accept {kwargs}: {e}") from None
    if spec.get("cifar_stem"):
        _apply_cifar_stem(model, arch)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, model: nn.Module, spec: dict, history: list | None = None,
                    transforms: list | None = None, extra: dict | None = None) -> None:
    from .fileio import save_torch

    save_torch(path, {
        "edgekd_format": FORMAT_VERSION,
        "spec": spec,
        "pruning_history": history or [],
        "transforms": transforms or [],
        "state_dict": model.state_dict(),
        "extra": extra or {},
    })


def rebuild(ckpt: dict, example_input: torch.Tensor | None = None) -> nn.Module:
    """Rebuild an edgekd checkpoint: constructor -> pruning history -> transforms -> weights."""
    spec = ckpt["spec"]
    model = build(spec)
    if ckpt.get("pruning_history"):
        from .pruning import replay_history

        replay_history(model, ckpt["pruning_history"], example_input, ckpt.get("extra", {}).get("image_size", 32))
    for t in ckpt.get("transforms", []):
        from .quant.qat import apply_transform

        model = apply_transform(model, t)
    _load_state(model, ckpt["state_dict"], f"checkpoint for {spec['arch']}")
    return model


def _load_state(model: nn.Module, sd: dict, what: str) -> None:
    own = model.state_dict()
    # The modules' state-dict versions travel in `_metadata`, which a plain dict (an edgekd checkpoint's
    # copy, an unwrapped trainer checkpoint) has lost: MNASNet refuses weights without its version.
    # Where the file carries none, the weights are of this architecture as built here.
    meta = getattr(sd, "_metadata", None) or getattr(own, "_metadata", None)
    sd = OrderedDict((k, v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items())
    if meta is not None:
        sd._metadata = meta  # type: ignore[attr-defined]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches (e.g. {shape[0]})")
        raise InputError(f"{what} does not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(sd)


def _unwrap_state_dict(obj: Any) -> dict | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) for k in obj) and all(torch.is_tensor(v) for v in obj.values()):
            return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    return None


def load_model(cfg: ModelConfig, num_classes: int, role: str, allow_onnx: bool = False) -> tuple[nn.Module, dict]:
    """Build `cfg.arch` and load `cfg.checkpoint` if any. Returns (model, spec).

    Accepts: edgekd checkpoints, state_dicts (optionally nested / fp16 / DataParallel),
    TorchScript archives, (teachers only) ONNX files, and fully pickled models where the
    user allows unpickling (`trust_pickle`, see safeload.py)."""
    spec = arch_spec(cfg, cfg.num_classes or num_classes)
    if not cfg.checkpoint:
        return build(spec, cfg.pretrained), spec
    path = Path(cfg.checkpoint).expanduser()
    where = f"{role}.checkpoint {path}"
    if not path.is_file():
        raise InputError(f"{where}: file not found")
    if path.suffix.lower() == ".onnx":
        if not allow_onnx:
            raise InputError(f"{where}: an ONNX file can only serve as a teacher (a student needs gradients)")
        return OnnxModule(path), {**spec, "onnx": str(path)}
    kind, obj = open_checkpoint(path, where, cfg.trust_pickle, f"{role}.trust_pickle")
    if kind == "torchscript":
        try:
            return torch.jit.load(str(path), map_location="cpu"), {**spec, "torchscript": str(path)}
        except Exception as e:
            raise InputError(f"{where}: corrupt TorchScript archive ({str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and obj.get("edgekd_format"):
        return rebuild(obj), obj["spec"]
    if isinstance(obj, nn.Module):
        return obj, {**spec, "pickled": str(path)}
    sd = _unwrap_state_dict(obj)
    if sd is None:
        raise InputError(f"{where}: not a state_dict, edgekd checkpoint, TorchScript or pickled model")
    model = build(spec)
    _load_state(model, sd, where + f" (arch {cfg.arch}, cifar_stem={cfg.cifar_stem})")
    return model, spec


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime behind a torch Module interface (teachers only: no gradients)."""

    def __init__(self, path: str | Path):
        super().__init__()
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise InputError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # fixed batch (export without dynamic_axes)
        self.path = str(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().float().numpy()
        step = self.batch or len(arr)
        if len(arr) % step:
            raise InputError(f"{self.path}: its input batch is fixed to {step}; re-export with a dynamic batch axis")
        out = np.concatenate([self.session.run(None, {self.input_name: arr[i : i + step]})[0] for i in range(0, len(arr), step)])
        return torch.from_numpy(out).to(x.device)


def output_classes(model: nn.Module, image_size: int) -> int:
    model.eval()
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, image_size, image_size)).shape[-1])


def check_classes(model: nn.Module, role: str, num_classes: int, image_size: int) -> None:
    try:
        n = output_classes(model, image_size)
    except Exception as e:
        raise InputError(f"{role}: forward pass on a 3x{image_size}x{image_size} input failed ({str(e).splitlines()[0]})") from None
    if n != num_classes:
        raise InputError(f"{role} outputs {n} classes but the data has {num_classes}")


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
