"""Structured channel pruning with torch-pruning, and rebuilding pruned models from history.

torch-pruning's dependency graph couples the channels that must go together (residual
adds, depthwise convolutions, the BN after a conv, the classifier's input), so the pruned
model is physically smaller. A pruned model no longer matches its constructor, so edgekd
saves the pruning history and replays it on a freshly built model (no pickled code)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import EdgekdError, did_you_mean

IMPORTANCE = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "fpgm": lambda: tp.importance.FPGMImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(),
}


def _example(image_size: int, device) -> torch.Tensor:
    return torch.zeros(1, 3, image_size, image_size, device=device)


def _clean_history(history: Iterable) -> list:
    return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in history]


def replay_history(model: nn.Module, history: list, example_input: torch.Tensor | None = None, image_size: int = 32) -> nn.Module:
    """Re-apply a recorded pruning history to a freshly built (unpruned) model, in place."""
    example = example_input if example_input is not None else _example(image_size, "cpu")
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    try:
        dg.load_pruning_history([tuple(h) for h in history])
    except (AttributeError, IndexError, RuntimeError) as e:
        raise EdgekdError(f"pruning history does not fit this architecture ({e})") from None
    return model


def resolve_ignored(model: nn.Module, names: list[str], num_classes: int) -> list[nn.Module]:
    """The classifier (outputs = classes) plus user-named modules, which keep all channels."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        near = did_you_mean(missing[0], [n for n in modules if n])
        sample = ", ".join(n for n in list(modules)[1:8])
        raise EdgekdError(f"prune.ignore: no module named {missing[0]!r}{near or f' (module names look like: {sample}, ...)'}")
    ignored = [modules[n] for n in names]
    ignored += [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    ignored += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
    return ignored


def make_pruner(model: nn.Module, image_size: int, importance: str, ratio: float, steps: int,
                global_pruning: bool, round_to: int | None, ignored: list[nn.Module]) -> tp.pruner.BasePruner:
    device = next(model.parameters()).device
    try:
        return tp.pruner.MetaPruner(
            model, _example(image_size, device), importance=IMPORTANCE[importance](), pruning_ratio=ratio,
            iterative_steps=steps, global_pruning=global_pruning, round_to=round_to, ignored_layers=ignored,
            max_pruning_ratio=0.95,
        )
    except Exception as e:
        raise EdgekdError(f"torch-pruning cannot trace this model ({_where(e)})") from None


def _where(e: Exception) -> str:
    """The exception and the torch-pruning function it came from: `ZeroDivisionError` alone does not
    say that a reshape of the channels (ShuffleNet's channel shuffle) is what it cannot follow."""
    what = getattr(e, "module_name", None) or (str(e).splitlines() or [""])[0]
    tb, frame = e.__traceback__, None
    while tb is not None:
        if "torch_pruning" in tb.tb_frame.f_code.co_filename:
            frame = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    return f"{type(e).__name__}: {what}" + (f", in torch-pruning's {frame}" if frame else "")


def check_prunable(model: nn.Module, image_size: int, ignore: list[str], num_classes: int, importance: str) -> None:
    """Trace `model` as the prune stage will (its dependency graph at `image_size`), so an
    architecture torch-pruning cannot follow, or an `ignore` entry that names no module, fails
    before the stages ahead of the prune stage have trained for hours."""
    make_pruner(model.eval(), image_size, importance, 0.5, 1, False, None, resolve_ignored(model, ignore, num_classes))


def accumulate_taylor_grads(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Taylor importance needs d(loss)/d(weight): accumulate CE gradients on a few batches."""
    model.zero_grad(set_to_none=True)
    model.eval()
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()


def pruning_history(pruner: tp.pruner.BasePruner) -> list:
    return _clean_history(pruner.pruning_history())


