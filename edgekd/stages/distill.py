"""distill: train the student against the teacher(s) with the shared loop and objective.

With `compare_baseline: true` the same student, from the same initial weights, is also
trained with plain cross-entropy for the same epochs, so the report shows what the
teacher bought: on a CPU where it pays, in a child process beside the distillation run
(edgekd/beside.py), else after it."""

from __future__ import annotations

import contextlib
import copy

import torch
from pydantic import Field

from ..beside import BaselineBeside, pays as beside_pays
from ..metrics import gain_over
from ..train import TrainConfig, fit
from .base import Stage, StageResult, register


class DistillConfig(TrainConfig):
    compare_baseline: bool = Field(False, description="also train a teacher-free (ce) student for comparison")

    def baseline(self) -> "DistillConfig":
        """The same run with cross-entropy alone (an objective's own ce options kept)."""
        ce = next((t for t in self.terms() if t.loss == "ce"), None)
        smoothing = ce.label_smoothing if ce is not None else self.label_smoothing
        return self.model_copy(update={"loss": "ce", "objective": None, "label_smoothing": smoothing})


@register("distill")
class Distill(Stage):
    Config = DistillConfig
    step = 0
    does = "trains the student"

    def run(self, ctx) -> StageResult:
        cfg: DistillConfig = self.config
        seed = ctx.cfg.seed
        baseline = None
        if cfg.compare_baseline and cfg.uses_teacher():
            baseline = copy.deepcopy(ctx.model)  # the same initial weights
        objective = ctx.objective(cfg)
        beside = None
        base_cfg, base_state, base_desc = cfg.baseline(), ctx.stage_dir / "baseline_state.pt", "baseline[ce]"
        if baseline is not None and beside_pays(ctx.device, objective, cfg, ctx.data):
            beside = BaselineBeside(baseline, ctx.data, base_cfg, seed, base_state, base_desc)
        with beside or contextlib.nullcontext():
            torch.manual_seed(seed)
            history = fit(ctx.model, ctx.data, cfg, ctx.device, seed=seed, objective=objective,
                          state_path=ctx.stage_dir / "train_state.pt", desc=f"distill[{cfg.describe()}]")
            base_hist = beside.result() if beside else None
        figs = ctx.measure(ctx.model)
        result = StageResult(metrics=figs, history=history, model_changed=True,
                             models={"student_distilled": {**figs, "label": f"student ({cfg.describe()})"}},
                             info={"loss": cfg.describe(), "epochs": cfg.epochs, "train_images": len(ctx.data.train)})
        if baseline is not None:
            if beside is None:
                torch.manual_seed(seed)
                base_hist = fit(baseline, ctx.data, base_cfg, ctx.device, seed=seed, state_path=base_state,
                                desc=base_desc)
            bfigs = ctx.measure(baseline)
            result.models["student_ce_baseline"] = {**bfigs, "label": "student (ce, no teacher)"}
            result.info["baseline_history"] = base_hist
            result.info["baseline_beside"] = beside is not None
            result.models["student_distilled"]["vs_ce_baseline"] = gain_over(bfigs["predictions"], figs["predictions"], ctx.data.test.labels.tolist())
        return result
