"""distill: train the student against the teacher with the shared loop.

With `compare_baseline: true` the same student, from the same initial weights, is also
trained with plain cross-entropy for the same epochs, so the report shows what the
teacher bought."""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from ..train import TrainConfig, fit
from .base import Stage, StageResult, register


class DistillConfig(TrainConfig):
    compare_baseline: bool = Field(False, description="also train a teacher-free (ce) student for comparison")


@register("distill")
class Distill(Stage):
    Config = DistillConfig

    def run(self, ctx) -> StageResult:
        cfg: DistillConfig = self.config
        init_state = copy.deepcopy(ctx.model.state_dict())
        teacher = ctx.teacher_logits(cfg.cache_teacher) if cfg.uses_teacher() else None
        torch.manual_seed(ctx.cfg.seed)
        history = fit(ctx.model, ctx.data, cfg, ctx.device, seed=ctx.cfg.seed, teacher=teacher,
                      state_path=ctx.stage_dir / "train_state.pt", desc=f"distill[{cfg.loss}]")
        figs = ctx.measure(ctx.model)
        result = StageResult(metrics=figs, history=history, model_changed=True,
                             models={"student_distilled": {**figs, "label": f"student ({cfg.loss})"}},
                             info={"loss": cfg.loss, "epochs": cfg.epochs, "train_images": len(ctx.data.train)})
        if cfg.compare_baseline and cfg.loss != "ce":
            baseline = copy.deepcopy(ctx.model)
            baseline.load_state_dict(init_state)
            base_cfg = cfg.model_copy(update={"loss": "ce"})
            torch.manual_seed(ctx.cfg.seed)
            base_hist = fit(baseline, ctx.data, base_cfg, ctx.device, seed=ctx.cfg.seed,
                            state_path=ctx.stage_dir / "baseline_state.pt", desc="baseline[ce]")
            bfigs = ctx.measure(baseline)
            result.models["student_ce_baseline"] = {**bfigs, "label": "student (ce, no teacher)"}
            result.info["baseline_history"] = base_hist
            result.info["kd_gain_points"] = round(figs["top1"] - bfigs["top1"], 3)
        return result
