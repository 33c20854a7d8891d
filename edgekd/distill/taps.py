"""Intermediate features by module path (`features.13`, `layer3`): forward hooks that keep the
output of the named modules for the current forward pass, so feature losses read them without
the model's code being changed."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError, did_you_mean, first_few


def resolve_module(model: nn.Module, path: str, what: str) -> nn.Module:
    """The submodule at `path`; an unknown path is a one-line error naming the closest paths."""
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    names = [n for n in modules if n]
    near = did_you_mean(path, names)
    if not near:  # nothing close: where to start looking
        near = f" (its top-level modules: {first_few([n for n, _ in model.named_children()], 6)})"
    raise ConfigError(f"{what}: no module '{path}' in the {type(model).__name__}{near}")


class FeatureTaps:
    """Forward hooks on `paths` of `model`; `take()` returns (and forgets) the captured outputs.

    A hook that fires twice in one forward (a module reused) keeps the last output."""

    def __init__(self, model: nn.Module, paths: list[str], what: str):
        self.paths = list(dict.fromkeys(paths))
        self._out: dict[str, torch.Tensor] = {}
        self._handles = [resolve_module(model, p, what).register_forward_hook(self._hook(p)) for p in self.paths]

    def _hook(self, path: str):
        def keep(module, inputs, output):
            self._out[path] = output

        return keep

    def take(self) -> dict[str, torch.Tensor]:
        out, self._out = self._out, {}
        missing = [p for p in self.paths if p not in out]
        if missing:
            raise RuntimeError(f"feature taps {missing} did not run in this forward pass")
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
