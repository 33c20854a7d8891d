"""The one training loop shared by distillation, pruning fine-tune and QAT.

It takes an optional teacher and a loss from `losses.LOSSES`, so every stage that trains
gets the distillation objective by construction. It checkpoints every epoch (atomically)
and resumes from the last completed epoch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field
from tqdm import tqdm

from .config import Strict, Switch
from .bn import bn_gap, recalibrate_bn
from .data import Data, iterate
from .errors import EdgekdError
from .fileio import save_torch, sha256_json
from .losses import LOSSES, uses_teacher

log = logging.getLogger("edgekd")
POSTFIX_EVERY = 20  # steps between progress-bar loss readouts (each is a host-device sync)
BN_GAP_WARN = 5.0  # points of eval-mode top-1 below batch-statistics top-1 that earn a warning
BN_GAP_RECALIBRATE = 2.0  # ... and that make bn_recalibration "auto" re-estimate the statistics
BN_CHECK_IMAGES = 512


class TrainConfig(Strict):
    """Options of every training run (distill, prune fine-tune, QAT)."""

    epochs: int = Field(10, ge=0)
    loss: Literal["kd", "dkd", "mse_logits", "ce"] = "kd"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term (kd, mse_logits)")
    dkd_alpha: float = Field(1.0, ge=0)
    dkd_beta: float = Field(8.0, ge=0)
    dkd_warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    batch_size: int | None = Field(None, gt=0, description="defaults to data.batch_size")
    cache_teacher: bool = Field(True, description="cache teacher logits on disk when augment is 'flip' or 'none'")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    eval_every: int = Field(1, ge=0, description="evaluate every N epochs (0: only at the end)")
    bn_recalibration: Switch = Field(
        "auto", description="re-estimate BatchNorm statistics when the run ends; auto = when eval-mode top-1 on training "
                            "images is below batch-statistics top-1 (the running averages lag the weights)")
    bn_recalibration_images: int = Field(1024, gt=0, description="training images BatchNorm statistics are re-estimated on")

    def uses_teacher(self) -> bool:
        return uses_teacher(self.loss)


class TeacherLogits:
    """Teacher outputs for a batch: a forward pass, or a lookup in a logit cache.

    With flip-only or no augmentation the teacher sees at most two versions of each image,
    so their logits are computed once and cached on disk, keyed on the teacher's and the
    data's bytes."""

    def __init__(self, teacher: nn.Module, data: Data, device: torch.device, cache: bool,
                 teacher_key: str | None, cache_dir: Path | None):
        self.teacher, self.data, self.device = teacher.eval(), data, device
        self.table: torch.Tensor | None = None
        if cache and data.augment in ("none", "flip"):
            self.table = self._build_table(teacher_key, cache_dir)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x).float()

    def _build_table(self, teacher_key: str | None, cache_dir: Path | None) -> torch.Tensor:
        split = self.data.train
        key = sha256_json([teacher_key, split.key, self.data.mean, self.data.std])
        path = cache_dir / "teacher_logits" / f"{key[:32]}.pt" if cache_dir and teacher_key else None
        if path and path.exists():
            try:
                return torch.load(path, weights_only=True)
            except Exception:
                log.warning("teacher-logit cache %s unreadable; recomputing", path)
        views = 2 if self.data.augment == "flip" else 1
        table = torch.empty(views, len(split), self.data.num_classes)
        bar = tqdm(total=len(split) * views, desc="teacher logits", unit="img", leave=False)
        for v in range(views):
            for x, _, idx, _ in iterate(split, self.data.eval_batch_size):
                x = self.data.normalize(x.to(self.device))
                table[v, idx] = self._forward(x.flip(-1) if v else x).cpu()
                bar.update(len(idx))
        bar.close()
        if path:
            save_torch(path, table)
        return table

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return self._forward(x)
        view = flip.long() if self.table.shape[0] == 2 else torch.zeros_like(idx)
        return self.table[view, idx].to(x.device)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.15)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(total, 1), 1.0))))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def fit(model: nn.Module, data: Data, cfg: TrainConfig, device: torch.device, *, seed: int,
        teacher: TeacherLogits | None = None, state_path: Path | None = None, desc: str = "train",
        on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place; returns the per-epoch history. Resumes from `state_path`."""
    from .metrics import classification_metrics, predict

    if cfg.uses_teacher() and teacher is None:
        raise ValueError(f"loss '{cfg.loss}' needs a teacher")
    loss_fn = LOSSES.get(cfg.loss)
    bs = cfg.batch_size or data.batch_size
    steps_per_epoch = math.ceil(len(data.train) / bs)
    model.to(device)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    history: list[dict] = []
    start = 0
    fingerprint = sha256_json([cfg.model_dump(), data.train.key, seed])
    if state_path and state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
            if st.get("fingerprint") == fingerprint:
                model.load_state_dict(st["model"])
                opt.load_state_dict(st["optimizer"])
                sched.load_state_dict(st["scheduler"])
                history, start = st["history"], st["epoch"] + 1
                log.info("%s: resuming after epoch %d/%d", desc, start, cfg.epochs)
        except Exception as e:
            log.warning("%s: cannot resume from %s (%s); starting over", desc, state_path, e)
    use_amp = cfg.amp and device.type == "cuda"
    eval_split = data.val if data.val is not None else data.test
    eval_name = "val" if data.val is not None else "test"
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step whose loss was not finite
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start * steps_per_epoch, desc=desc, unit="step", dynamic_ncols=True)
    try:  # the bar is closed on any exit, so an error message starts its own line
        for epoch in range(start, cfg.epochs):
            model.train()
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            torch.manual_seed(seed * 100_003 + epoch)  # dropout etc.: an epoch replays identically after resume
            sums: dict[str, float] = {}
            n_seen, t0 = 0, time.perf_counter()
            warm = min(1.0, (epoch + 1) / cfg.dkd_warmup_epochs) if cfg.dkd_warmup_epochs else 1.0
            for x, y, idx, flip in iterate(data.train, bs, shuffle=True, augment=data.augment, gen=gen):
                x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
                t_logits = teacher(x, idx, flip) if teacher is not None and cfg.uses_teacher() else None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    s_logits = model(x)
                parts = loss_fn(s_logits.float(), y, t_logits, temperature=cfg.temperature, alpha=cfg.alpha,
                                dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta, warmup=warm, label_smoothing=cfg.label_smoothing)
                bad_step = _first_nonfinite(parts["loss"], bar.n, bad_step)
                if device.type == "cpu" or bar.n % POSTFIX_EVERY == 0:  # a GPU checks where it syncs anyway
                    _stop_if_diverged(bad_step, desc, steps_per_epoch, cfg.epochs)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                opt.step()
                sched.step()
                for k, v in parts.items():  # summed on the device: no host sync per step
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * len(y)
                n_seen += len(y)
                bar.update(1)
                if bar.n % POSTFIX_EVERY == 0:
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{float(sums['loss']) / n_seen:.3f}", refresh=False)
            _stop_if_diverged(bad_step, desc, steps_per_epoch, cfg.epochs)
            sums = {k: float(v) for k, v in sums.items()}
            secs = time.perf_counter() - t0
            rec = {"epoch": epoch + 1, **{k: round(v / n_seen, 5) for k, v in sums.items()},
                   "lr": round(sched.get_last_lr()[0], 6), "seconds": round(secs, 2), "images_per_s": round(n_seen / secs, 1)}
            last = epoch + 1 == cfg.epochs
            if last:
                _settle_bn(model, data, cfg, device, seed, rec, desc)
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last:
                m = classification_metrics(predict(model, data, eval_split, device), eval_split.labels.numpy(), data.classes)
                rec[f"{eval_name}_top1"] = m["top1"]
            history.append(rec)
            if state_path:
                save_torch(state_path, {"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history})
            if on_epoch:
                on_epoch(rec)
    finally:
        bar.close()
    return history


def _first_nonfinite(loss: torch.Tensor, step: int, bad_step: torch.Tensor) -> torch.Tensor:
    """Record the first non-finite loss on the device (no host sync)."""
    return torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)


def _stop_if_diverged(bad_step: torch.Tensor, desc: str, steps_per_epoch: int, epochs: int) -> None:
    if (step := int(bad_step)) >= 0:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        raise EdgekdError(f"{desc}: the training loss became NaN or infinite at epoch {epoch + 1}/{epochs}, step "
                          f"{in_epoch + 1}/{steps_per_epoch}; lower the learning rate (or check the data and teacher)")


def _settle_bn(model: nn.Module, data: Data, cfg: TrainConfig, device: torch.device, seed: int, rec: dict,
               desc: str) -> None:
    """End of a run: are the BN running statistics those of the final weights (bn.py)? Where they
    lag (or always, with "on"), re-estimate them; warn if eval mode is still far off.

    "auto" leaves statistics that fit alone: averaged over a long run they are better estimates
    than a re-estimate on a thousand images, and a well-converged model keeps its figures."""
    gap = bn_gap(model, data, device, BN_CHECK_IMAGES, seed + 1)
    if gap is None:
        return
    lag = gap["batch_stats_top1"] - gap["eval_mode_top1"]
    if cfg.bn_recalibration == "on" or (cfg.bn_recalibration == "auto" and lag > BN_GAP_RECALIBRATE):
        recalibrate_bn(model, data, device, cfg.bn_recalibration_images, seed)
        rec["bn_recalibrated_images"] = min(cfg.bn_recalibration_images, len(data.train))
        rec["train_eval_mode_top1_before_recalibration"] = gap["eval_mode_top1"]
        gap = bn_gap(model, data, device, BN_CHECK_IMAGES, seed + 1)
    rec.update({f"train_{k}": v for k, v in gap.items()})
    if gap["eval_mode_top1"] < gap["batch_stats_top1"] - BN_GAP_WARN:
        log.warning("%s: eval-mode top-1 %.1f %% is far below %.1f %% with batch statistics on the same training "
                    "images: BatchNorm running statistics do not fit the weights%s", desc, gap["eval_mode_top1"],
                    gap["batch_stats_top1"], " (set bn_recalibration: auto or on to re-estimate them)"
                    if cfg.bn_recalibration == "off" else "")
