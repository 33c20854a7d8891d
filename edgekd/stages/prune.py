"""prune: structured channel pruning (torch-pruning) with KD fine-tuning after each step.

`target_macs` keeps that fraction of the input model's MACs (pruned in small increments
until reached); `ratio` removes that fraction of channels per layer. With
`iterative_steps: N` the target is approached in N prune -> fine-tune rounds."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..schema import Fraction, Strict
from ..data import iterate
from ..errors import EdgekdError
from ..models import rebuild, save_checkpoint
from ..pruning import IMPORTANCE, accumulate_taylor_grads, make_pruner, pruning_history, resolve_ignored
from .. import dist
from ..bn import recalibrate_bn
from ..train import TrainConfig, fit
from .base import Stage, StageResult, register

log = logging.getLogger("edgekd")


class FinetuneConfig(TrainConfig):
    epochs: int = Field(2, ge=0)
    lr: float = Field(0.01, gt=0)


class PruneConfig(Strict):
    target_macs: Fraction | None = Field(None, description="fraction of the input model's MACs to keep")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of channels to remove per layer")
    importance: Literal[tuple(IMPORTANCE)] = "l2"  # type: ignore[valid-type]
    global_pruning: bool = False
    iterative_steps: int = Field(1, ge=1, le=20)
    round_to: int | None = Field(8, ge=1, description="keep channel counts multiples of this (mobile kernels like 8/16)")
    ignore: list[str] = Field(default_factory=list, description="module names to keep whole")
    bn_recalibration_images: int = Field(1024, ge=0, description="re-estimate BatchNorm statistics on this many "
                                         "training images after each prune step (0: off)")
    macs_tolerance: float = Field(0.03, ge=0, le=0.5, description="accepted overshoot of target_macs")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @model_validator(mode="after")
    def _one_target(self):
        if (self.target_macs is None) == (self.ratio is None):
            raise ValueError("set exactly one of target_macs or ratio")
        return self

    def teachers_used(self) -> list[tuple[str, str | None, bool, bool]]:
        return [(f"finetune.{k}", *rest) for k, *rest in self.finetune.teachers_used()] if self.finetune.epochs else []


@register("prune")
class Prune(Stage):
    Config = PruneConfig
    step = 0
    does = "removes channels from the student"

    def run(self, ctx) -> StageResult:
        cfg: PruneConfig = self.config
        data, size = ctx.data, ctx.data.image_size
        model = ctx.model
        before = ctx.measure(model)
        unpruned = ctx.save_model(ctx.stage_dir / "unpruned.pt")
        steps_info, history = [], []
        base_history = list(ctx.pruning_history)
        internal = 1 if cfg.ratio is not None else 200
        pruner, after = None, None
        for step in range(1, cfg.iterative_steps + 1):
            done_path = ctx.stage_dir / f"step{step}_done.pt"
            pruned_path = ctx.stage_dir / f"step{step}_pruned.pt"
            if done_path.exists():  # resume: this step finished earlier
                ckpt = torch.load(done_path, map_location="cpu", weights_only=True)
                model = rebuild(ckpt).to(ctx.device)
                ctx.pruning_history = ckpt["pruning_history"]
                steps_info.append(ckpt["extra"]["step_info"])
                history += ckpt["extra"]["history"]
                pruner, after = None, None
                continue
            if pruned_path.exists():
                ckpt = torch.load(pruned_path, map_location="cpu", weights_only=True)
                model = rebuild(ckpt).to(ctx.device)
                ctx.pruning_history = ckpt["pruning_history"]
                info = ckpt["extra"]["step_info"]
            else:
                if pruner is None:
                    # A fresh pruner per resumed model: its history starts empty, so keep the base.
                    base_history = list(ctx.pruning_history)
                    ratio = cfg.ratio if cfg.ratio is not None else 0.95
                    steps = cfg.iterative_steps if cfg.ratio is not None else internal
                    ignored = resolve_ignored(model, cfg.ignore, data.num_classes)
                    pruner = make_pruner(model, size, cfg.importance, ratio, steps, cfg.global_pruning, cfg.round_to, ignored)
                info = self._prune_step(ctx, model, pruner, step, before["macs"])
                ctx.pruning_history = base_history + pruning_history(pruner)
                ctx.model = model
                save_checkpoint(pruned_path, model, ctx.spec, ctx.pruning_history, ctx.transforms,
                                {"image_size": size, "step_info": info})
            ft_hist = []
            if cfg.finetune.epochs:
                ft_hist = fit(model, data, cfg.finetune, ctx.device, seed=ctx.cfg.seed + step,
                              objective=ctx.objective(cfg.finetune), state_path=ctx.stage_dir / f"step{step}_train_state.pt",
                              desc=f"prune step {step}/{cfg.iterative_steps} finetune[{cfg.finetune.describe()}]")
                for r in ft_hist:
                    r["step"] = step
            after = ctx.measure(model)
            start = info.get("top1_after_bn_recalibration", info["top1_after_prune"])
            info.update({"top1_after_finetune": after["top1"], "recovered_points": round(after["top1"] - start, 3)})
            steps_info.append(info)
            history += ft_hist
            save_checkpoint(done_path, model, ctx.spec, ctx.pruning_history, ctx.transforms,
                            {"image_size": size, "step_info": info, "history": ft_hist})
        ctx.model = model
        if after is None:  # the last step was resumed, not measured in this run
            after = ctx.measure(model)
        summary = {
            "macs_before": before["macs"], "macs_after": after["macs"], "macs_kept": round(after["macs"] / before["macs"], 4),
            "params_before": before["params"], "params_after": after["params"],
            "params_kept": round(after["params"] / before["params"], 4),
            "top1_before": before["top1"], "top1_after": after["top1"], "importance": cfg.importance,
            "finetune_loss": cfg.finetune.describe(),
        }
        if cfg.target_macs is not None and after["macs"] > before["macs"] * (cfg.target_macs + cfg.macs_tolerance):
            raise EdgekdError(f"prune: could not reach target_macs {cfg.target_macs} (kept {summary['macs_kept']}); "
                              "loosen prune.ignore or raise the target")
        return StageResult(metrics=after, history=history, model_changed=True, info={**summary, "steps": steps_info},
                           artifacts={"model.unpruned": ctx.rel(unpruned)},
                           models={"student_pruned": {**after, "label": f"pruned ({summary['macs_kept']:.0%} MACs)"}})

    def _prune_step(self, ctx, model, pruner, step: int, macs0: int) -> dict:
        cfg: PruneConfig = self.config
        from ..metrics import count_macs

        size, data = ctx.data.image_size, ctx.data

        def taylor():
            if cfg.importance == "taylor":
                gen = torch.Generator().manual_seed(ctx.cfg.seed + step)
                batches = [(data.normalize(x.to(ctx.device)), y.to(ctx.device))
                           for (x, y, _, _), _ in zip(iterate(data.train, data.batch_size, True, "none", gen), range(4))]
                accumulate_taylor_grads(model, batches)

        if cfg.ratio is not None:
            taylor()
            pruner.step()
        else:
            target = 1 - (1 - cfg.target_macs) * step / cfg.iterative_steps
            n = 0
            while count_macs(model, size) > macs0 * target:
                if pruner.current_step >= pruner.iterative_steps:
                    break
                taylor()
                pruner.step()
                n += 1
        model.zero_grad(set_to_none=True)
        figs = ctx.measure(model)
        info = {"step": step, "macs": figs["macs"], "params": figs["params"], "macs_kept": round(figs["macs"] / macs0, 4),
                "top1_after_prune": figs["top1"]}
        if cfg.bn_recalibration_images:
            with dist.job():  # under torchrun every rank re-estimates its share
                dist.everywhere("recalibrate_bn", model=model, images=cfg.bn_recalibration_images, seed=ctx.cfg.seed + step)
                recalibrate_bn(model, data, ctx.device, cfg.bn_recalibration_images, ctx.cfg.seed + step, together=True)
            info["top1_after_bn_recalibration"] = ctx.measure(model)["top1"]
        log.info("prune step %d: MACs %.1f%% of input, top-1 %.2f after pruning%s", step, 100 * figs["macs"] / macs0,
                 figs["top1"], f", {info['top1_after_bn_recalibration']:.2f} after BN recalibration"
                 if cfg.bn_recalibration_images else "")
        return info
