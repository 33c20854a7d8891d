"""assistant: train one of the pipeline's teachers inside the run, as a teacher assistant.

When the gap between a large teacher and a tiny student is wide, the student can learn more
from an intermediate model that itself learned from the teacher (Mirzadeh et al., AAAI 2020):
ResNet-50 -> ResNet-18 -> MobileNetV2. The assistant is declared under `teachers:` like any
teacher (an architecture, optionally a checkpoint to start from); this stage distils it with
the shared loop and objective, and from then on it is that teacher for every later stage that
names it, its logits cached under its trained weights. The report shows both steps: this
stage's curve and figures, then the student's distillation from the assistant."""

from __future__ import annotations

import torch
from pydantic import Field

from ..errors import did_you_mean
from ..fileio import sha256_file
from ..models import check_classes, load_model, save_checkpoint
from ..train import TrainConfig, fit
from .base import Stage, StageResult, register


class AssistantConfig(TrainConfig):
    name: str = Field(description="the teacher (a key under teachers:) this stage trains; later stages learn from it")

    def trains(self) -> str:
        return self.name

    def pipeline_problems(self, pipeline) -> list[tuple[str, str]]:
        teachers = list(pipeline.teacher_configs())
        if pipeline.teachers is None or self.name not in teachers:
            return [("name", f"unknown teacher {self.name!r}{did_you_mean(self.name, teachers)}: declare the assistant "
                             "under teachers: (e.g. teachers: {r50: {...}, ta: {arch: resnet18}}) beside the teacher it "
                             "learns from")]
        if self.name == pipeline.primary_teacher():
            return [("name", f"{self.name!r} is the first teacher, the reference of the report; declare the assistant "
                             "after the teacher it learns from")]
        if (pipeline.teachers[self.name].checkpoint or "").lower().endswith(".onnx"):
            return [("name", f"teachers.{self.name} is an ONNX file, which cannot be trained (give an architecture, "
                             "optionally a PyTorch checkpoint to start from)")]
        for key, teacher, *_ in self.teachers_used():
            if teacher == self.name:
                return [(key, f"the assistant {self.name!r} cannot learn from itself")]
        return []


@register("assistant")
class Assistant(Stage):
    Config = AssistantConfig

    def run(self, ctx) -> StageResult:
        cfg: AssistantConfig = self.config
        role = ctx.cfg.teacher_path(cfg.name)
        model, spec = load_model(ctx.cfg.teacher_configs()[cfg.name], ctx.data.num_classes, role)
        check_classes(model, role, ctx.data.num_classes, ctx.data.image_size)
        model = model.to(ctx.device)
        objective = ctx.objective(cfg)
        torch.manual_seed(ctx.cfg.seed)
        history = fit(model, ctx.data, cfg, ctx.device, seed=ctx.cfg.seed, objective=objective,
                      state_path=ctx.stage_dir / "train_state.pt", desc=f"assistant {cfg.name}[{cfg.describe()}]")
        path = ctx.stage_dir / f"{cfg.name}.pt"
        save_checkpoint(path, model, spec)
        ctx.set_teacher(cfg.name, model, sha256_file(path))
        figs = ctx.measure(model)
        sources = sorted(objective.teachers)
        label = f"assistant {cfg.name} ({cfg.describe()}" + (f" from {', '.join(sources)})" if sources else ")")
        return StageResult(metrics=figs, history=history, models={f"teacher_{cfg.name}": {**figs, "label": label}},
                           artifacts={f"teacher.{cfg.name}": ctx.rel(path)},
                           info={"assistant": cfg.name, "arch": spec["arch"], "loss": cfg.describe(),
                                 "learns_from": sources, "epochs": cfg.epochs, "train_images": len(ctx.data.train)})
