"""The one training loop shared by distillation, pruning fine-tune and QAT.

It minimises an `Objective` (edgekd/distill), so every stage that trains gets the
distillation objective by construction; the loop itself only owns the optimizer, schedule,
AMP, checkpoints and evaluation. It checkpoints every epoch (atomically) and resumes from the
last completed epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, Field, field_validator, model_validator
from tqdm import tqdm

from .bn import bn_gap, logits_off, recalibrate_bn
from . import dist
from .data import Data, iterate, to_device, train_batches
from .inference import channels_last, predict
from .distill import LOSSES, Objective, shorthand_terms, teacher_names, term_type
from .errors import Diverged, EdgekdError
from .fileio import save_torch, sha256_json
from .schema import Strict, Switch

log = logging.getLogger("edgekd")
POSTFIX_EVERY = 20  # steps between progress-bar loss readouts (each is a host-device sync)
BN_GAP_WARN = 5.0  # points of eval-mode top-1 below batch-statistics top-1 that earn a warning
BN_GAP_RECALIBRATE = 2.0  # ... and that make bn_recalibration "auto" re-estimate the statistics
BN_CHECK_IMAGES = 512


SHORTHAND = ("loss", "temperature", "alpha", "dkd_alpha", "dkd_beta", "dkd_warmup_epochs", "label_smoothing")


class TrainConfig(Strict):
    """Options of every training run (distill, prune fine-tune, QAT)."""

    epochs: int = Field(10, ge=0)
    objective: list[term_type()] | None = Field(  # type: ignore[valid-type]
        None, min_length=1, description="weighted loss terms, e.g. [{loss: kd, weight: 0.9, temperature: 4}, "
                                        "{loss: ce, weight: 0.1}] (see 'losses' below); or the shorthand loss: ...")
    loss: Literal["kd", "dkd", "mse_logits", "ce"] = Field(
        "kd", description="shorthand: kd = alpha*kd + (1-alpha)*ce, mse_logits likewise, dkd = ce + dkd, ce")
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
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile the student's training step and a live PyTorch teacher's forward with this "
                           "mode (reduce-overhead adds CUDA graphs); off by default: compiling takes a minute or more "
                           "per run and it did not pay on a CPU (benchmarks/README.md, 'torch.compile')")
    eval_every: int = Field(1, ge=0, description="evaluate every N epochs (0: only at the end)")
    bn_recalibration: Switch = Field(
        "auto", description="re-estimate BatchNorm statistics when the run ends; auto = when eval-mode top-1 on training "
                            "images is below batch-statistics top-1 (the running averages lag the weights)")
    bn_recalibration_images: int = Field(1024, gt=0, description="training images BatchNorm statistics are re-estimated on")

    @field_validator("compile")
    @classmethod
    def _compiler_present(cls, v):
        """torch.compile writes C++ (a CPU) or Triton kernels with C launchers (a GPU): without a
        compiler the run would fail at its first step, after the data and teacher work."""
        if v != "off" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
            raise ValueError(f"{v!r} needs a C++ compiler (g++ or clang++, or $CXX) on this machine and none was found; "
                             "install one or set compile: off")
        return v

    @model_validator(mode="after")
    def _objective_or_shorthand(self):
        both = sorted(set(SHORTHAND) & self.model_fields_set) if self.objective is not None else []
        if both:
            raise ValueError(f"set either objective or the shorthand {', '.join(both)}, not both (the objective's "
                             "terms carry their own options)")
        for i, t in enumerate(self.objective or []):
            names, w = teacher_names(t), getattr(t, "teacher_weights", "equal")
            if isinstance(getattr(t, "teacher", None), list) and (not names or len(set(names)) != len(names)):
                raise ValueError(f"objective[{i}].teacher: expected one or more different teacher names, got {names}")
            if isinstance(w, list) and (len(w) != len(names) or min(w) < 0 or sum(w) <= 0):
                raise ValueError(f"objective[{i}].teacher_weights: expected {len(names)} non-negative weights (one per "
                                 f"teacher, not all zero), got {w}")
        return self

    def terms(self) -> list[BaseModel]:
        """The objective's terms, the shorthand expanded; a term's teacher may still be None (the default one)."""
        if self.objective is not None:
            return list(self.objective)
        return shorthand_terms(self.loss, temperature=self.temperature, alpha=self.alpha, dkd_alpha=self.dkd_alpha,
                               dkd_beta=self.dkd_beta, dkd_warmup_epochs=self.dkd_warmup_epochs,
                               label_smoothing=self.label_smoothing)

    def teachers_used(self) -> list[tuple[str, str | None, bool, bool]]:
        """(key path, teacher name or None for the default, whether the term reads the teacher's
        features, whether its mixture weights come from validation accuracy) per teacher a term
        distils from, for validation."""
        if self.objective is None:
            return [("loss", None, False, False)] if any(LOSSES.get(t.loss).needs_teacher for t in self.terms()) else []
        return [(f"objective[{i}].teacher", name, bool(LOSSES.get(t.loss)(t).teacher_taps()),
                 getattr(t, "teacher_weights", None) == "val_acc")
                for i, t in enumerate(self.objective) for name in teacher_names(t)]

    def uses_teacher(self) -> bool:
        return bool(self.teachers_used())

    def describe(self) -> str:
        """`kd` for the shorthand, `kd+ce` style for an objective (progress bars, reports)."""
        return self.loss if self.objective is None else "+".join(t.loss for t in self.objective)


def _optimizer(modules: list[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in (p for m in modules for p in m.parameters()):
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
        objective: Objective | None = None, state_path: Path | None = None, desc: str = "train",
        on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place to minimise `objective` (default: cfg's terms, which then may
    not need a teacher); returns the per-epoch history. Resumes from `state_path`."""
    objective = objective if objective is not None else Objective(cfg.terms())
    w = dist.world()
    with dist.job():
        if w.size > 1 and w.main:  # the other ranks train the same job (dist.serve)
            if any(hasattr(src.teacher, "session") for src in objective.teachers.values()):
                raise EdgekdError(f"{desc}: an ONNX teacher cannot be sent to the other torchrun ranks; give its PyTorch "
                                  "checkpoint")
            dist.everywhere("fit", model=model, cfg_type=type(cfg), cfg=cfg.model_dump(exclude_unset=True),
                            terms=[t.model_dump() for t in objective.specs], teachers=objective.teachers, seed=seed,
                            state_path=state_path, desc=desc)
        objective.attach(model)
        try:
            model.to(device)
            objective.prepare(model, data.normalize(data.train.images[:2].to(device)))
            objective.to(device)
            if w.size > 1:  # parameters a term sized in prepare start from rank 0's draw everywhere
                for p in objective.parameters():
                    dist.collective(lambda: torch.distributed.broadcast(p.data, 0), f"starting {desc}")
            with channels_last(device, model, *(src.teacher for src in objective.teachers.values())), \
                    _activations_out_of_place(model), _compiling(objective, cfg, desc):
                return dist.collective(lambda: _fit(model, data, cfg, device, seed, objective, state_path, desc, on_epoch),
                                       f"training {desc}")
        finally:
            objective.detach()


DEAD_LOGITS = 1e-5  # a logit that varies less than this (relative) over a split's images does not depend on them
COPYING_IN_PLACE = (nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU)  # ReLU6 is a Hardtanh; ReLU copies nothing


@contextlib.contextmanager
def _activations_out_of_place(model: nn.Module):
    """Train with the model's in-place activations (torchvision's ReLU6, Hardswish, ...) computed
    out of place, and put them back after the run. Under autograd an in-place activation whose
    backward needs its input (all of COPYING_IN_PLACE) first copies that input, then computes
    and writes its result back over it: passes over the tensor that out of place does not make.
    Values and gradients are the same to the bit; a MobileNetV2 step is about 4 % faster on a CPU
    (benchmarks/README.md, twenty-first session)."""
    flipped = [m for m in model.modules() if isinstance(m, COPYING_IN_PLACE) and getattr(m, "inplace", False)]
    for m in flipped:
        m.inplace = False
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True


def _compile_options(cfg: TrainConfig) -> dict:
    # one batch shape (a last, smaller batch compiles once more): no dynamic shapes, which CUDA graphs cannot take
    return {"mode": None if cfg.compile == "default" else cfg.compile, "dynamic": False}


@contextlib.contextmanager
def _compiling(objective: Objective, cfg: TrainConfig, desc: str):
    """With `compile` set, the live teachers' forwards compiled for the run; a compiler that fails
    (no C++ compiler, an op it cannot lower) named in one line instead of its traceback; and the
    compiled graphs dropped after the run, so the next run on a pruned or quantized model starts
    afresh instead of piling up guards until torch.compile gives up and runs eager."""
    if cfg.compile == "off":
        yield
        return
    import torch._dynamo  # a second's import: only for runs that compile

    with contextlib.ExitStack() as stack:
        stack.callback(torch._dynamo.reset)
        for src in objective.teachers.values():
            stack.enter_context(src.compiled(**_compile_options(cfg)))
        try:
            yield
        except torch._dynamo.exc.TorchDynamoException as e:
            inner = getattr(e, "inner_exception", None) or e  # the backend's own error, not dynamo's wrapper
            first = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
            reason = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
            raise EdgekdError(f"{desc}: torch.compile (compile: {cfg.compile}) failed: {reason[:300]}; set compile: off "
                              "to train without it") from None


def _fit(model: nn.Module, data: Data, cfg: TrainConfig, device: torch.device, seed: int, objective: Objective,
         state_path: Path | None, desc: str, on_epoch: Callable[[dict], None] | None) -> list[dict]:
    from .metrics import classification_metrics

    bs = cfg.batch_size or data.batch_size
    w = dist.world()
    steps_per_epoch = train_batches(len(data.train), bs, w.size)
    if w.size > 1 and (bs % w.size or not steps_per_epoch):
        raise EdgekdError(f"{desc}: the batch of {bs} images is split over {w.size} torchrun ranks: it must be a multiple "
                          f"of {w.size} and at most the {len(data.train)} training images")
    train_model = model
    if w.size > 1:  # gradients averaged over the ranks; BatchNorm buffers follow rank 0
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile != "off":  # the model itself stays eager: evaluation, BatchNorm statistics and checkpoints use it
        train_model = torch.compile(train_model, **_compile_options(cfg))
    opt = _optimizer([model, objective], cfg)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    history: list[dict] = []
    start = 0
    fingerprint = sha256_json([cfg.model_dump(), data.train.key, seed, *([w.size] if w.size > 1 else [])])
    st = None
    if w.main and state_path and state_path.exists():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            log.warning("%s: cannot resume from %s (%s); starting over", desc, state_path, e)
    if w.size > 1:  # rank 0's checkpoint, wherever the others' files are
        st = dist.broadcast(st)
    if st is not None:
        try:
            if st.get("fingerprint") == fingerprint:
                model.load_state_dict(st["model"])
                objective.load_state_dict(st["objective"])
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
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start * steps_per_epoch, desc=desc, unit="step", dynamic_ncols=True,
               disable=not w.main)
    try:  # the bar is closed on any exit, so an error message starts its own line
        for epoch in range(start, cfg.epochs):
            model.train()
            objective.train()
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            torch.manual_seed(seed * 100_003 + epoch)  # dropout etc.: an epoch replays identically after resume
            sums: dict[str, float] = {}
            n_seen, t0 = 0, time.perf_counter()
            # reading ahead pays while a GPU computes; on a CPU the thread takes cores from the step (20 % slower on 2)
            for x, y, idx, flip in iterate(data.train, bs, shuffle=True, augment=data.augment, gen=gen, device=device,
                                           prefetch=device.type == "cuda", shard=(w.rank, w.size), sampling=data.sampling):
                x, y = data.normalize(x), to_device(y, device)
                # the live teacher under the student's bf16 autocast too (a GPU's tensor cores; its logits come back float)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    teachers = objective.teacher_outputs(x, idx, flip)
                    logits = train_model(x)
                parts = objective(objective.student_outputs(logits), teachers, y, epoch)
                bad_step = _first_nonfinite(parts["loss"], bar.n, bad_step)
                if device.type == "cpu" or bar.n % POSTFIX_EVERY == 0:  # a GPU checks where it syncs anyway
                    _stop_if_diverged(bad_step, desc, steps_per_epoch, cfg)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                if w.size > 1:  # DDP averages the student's gradients; a term's own parameters likewise
                    for p in objective.parameters():
                        if p.grad is not None:
                            dist.all_sum(p.grad, f"training {desc}").div_(w.size)
                opt.step()
                sched.step()
                for k, v in parts.items():  # summed on the device: no host sync per step
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * len(y)
                n_seen += len(y)
                bar.update(1)
                if bar.n % POSTFIX_EVERY == 0:
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{float(sums['loss']) / n_seen:.3f}", refresh=False)
            _stop_if_diverged(bad_step, desc, steps_per_epoch, cfg)
            if w.size > 1:  # the epoch's figures over every rank's shard
                keys = sorted(sums)
                total = dist.all_sum(torch.stack([torch.as_tensor(sums[k], device=device, dtype=torch.float32) for k in keys]
                                                 + [torch.tensor(float(n_seen), device=device)]), f"training {desc}")
                sums, n_seen = dict(zip(keys, total[:-1])), int(total[-1])
            sums = {k: float(v) for k, v in sums.items()}
            secs = time.perf_counter() - t0
            rec = {"epoch": epoch + 1, **{k: round(v / n_seen, 5) for k, v in sums.items()},
                   "lr": round(sched.get_last_lr()[0], 6), "seconds": round(secs, 2), "images_per_s": round(n_seen / secs, 1)}
            last = epoch + 1 == cfg.epochs
            history.append(rec)
            if last:  # every rank checks (and re-estimates) its share of the BatchNorm statistics
                _settle_bn(model, data, cfg, device, seed, rec, desc)
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0) or last:  # every rank its share
                if w.size > 1:  # of rank 0's model: its BatchNorm buffers, which DDP gives every rank's next step
                    for b in model.buffers():
                        dist.collective(lambda b=b: torch.distributed.broadcast(b, 0), f"training {desc}")
                logits = predict(model, data, eval_split, device, together=True, what=f"training {desc}")
                rec[f"{eval_name}_top1"] = classification_metrics(logits, eval_split.labels.numpy(), data.classes)["top1"]
                if last and w.main:
                    _warn_if_dead(logits, rec[f"{eval_name}_top1"], desc, eval_name, cfg.lr)
            if not w.main:  # rank 0 checkpoints and reports; this rank's model is discarded
                continue
            if state_path:
                save_torch(state_path, {"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                                        "objective": objective.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history})
            if on_epoch:
                on_epoch(rec)
    finally:
        bar.close()
    return history


def _warn_if_dead(logits, top1: float, desc: str, split: str, lr: float) -> None:
    """Say so where a run ends with logits that are the same for every image: its activations died
    (SqueezeNet, which has no BatchNorm, does at a learning rate MobileNets train well at), and
    every later stage would compress a model that answers one class, whatever the image."""
    scale = max(1.0, float(abs(logits).max())) if logits.size else 1.0
    if len(logits) < 2 or float(logits.std(0).max()) > DEAD_LOGITS * scale:
        return
    log.warning("%s: the logits are the same for every image (top-1 %.1f %% on the %d %s images): the network's "
                "activations died; lower the learning rate (lr %g) or warm it up", desc, top1, len(logits), split, lr)


def _first_nonfinite(loss: torch.Tensor, step: int, bad_step: torch.Tensor) -> torch.Tensor:
    """Record the first non-finite loss on the device (no host sync)."""
    return torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)


def _stop_if_diverged(bad_step: torch.Tensor, desc: str, steps_per_epoch: int, cfg: TrainConfig) -> None:
    if (step := int(bad_step)) >= 0:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        # a compiled step can be wrong rather than the recipe: torch.compile reuses kernels cached on
        # disk, and a graph cached on a CPU with other vector instructions trained to NaN (torch 2.14.1)
        hint = ("; or, since it ran compiled, try compile: off or an empty $TORCHINDUCTOR_CACHE_DIR (a kernel cached "
                "for another CPU can compute wrongly)" if cfg.compile != "off" else "")
        raise Diverged(f"{desc}: the training loss became NaN or infinite at epoch {epoch + 1}/{cfg.epochs}, step "
                       f"{in_epoch + 1}/{steps_per_epoch}", "lower the learning rate (or check the data and teacher)" + hint)


def _settle_bn(model: nn.Module, data: Data, cfg: TrainConfig, device: torch.device, seed: int, rec: dict,
               desc: str) -> None:
    """End of a run: are the BN running statistics those of the final weights (bn.py)? Where they
    lag (or always, with "on"), re-estimate them; warn if eval mode is still far off. Under
    torchrun every rank runs this, on its share of the images.

    "auto" leaves statistics that fit alone: averaged over a long run they are better estimates
    than a re-estimate on a thousand images, and a well-converged model keeps its figures."""
    gap = bn_gap(model, data, device, BN_CHECK_IMAGES, seed + 1, together=True)
    if gap is None:
        return
    lag = gap["batch_stats_top1"] - gap["eval_mode_top1"]
    off = lag > BN_GAP_RECALIBRATE or logits_off(gap)
    if cfg.bn_recalibration == "on" or (cfg.bn_recalibration == "auto" and off):
        recalibrate_bn(model, data, device, cfg.bn_recalibration_images, seed, together=True)
        rec["bn_recalibrated_images"] = min(cfg.bn_recalibration_images, len(data.train))
        rec["train_eval_mode_top1_before_recalibration"] = gap["eval_mode_top1"]
        rec["train_eval_mode_logit_scale_before_recalibration"] = _finite(gap["eval_mode_logit_scale"])
        gap = bn_gap(model, data, device, BN_CHECK_IMAGES, seed + 1, together=True)
    rec.update({f"train_{k}": _finite(v) for k, v in gap.items()})
    if not dist.world().main:
        return
    hint = " (set bn_recalibration: auto or on to re-estimate them)" if cfg.bn_recalibration == "off" else ""
    if gap["eval_mode_top1"] < gap["batch_stats_top1"] - BN_GAP_WARN:
        log.warning("%s: eval-mode top-1 %.1f %% is far below %.1f %% with batch statistics on the same training "
                    "images: BatchNorm running statistics do not fit the weights%s", desc, gap["eval_mode_top1"],
                    gap["batch_stats_top1"], hint)
    elif logits_off(gap):
        log.warning("%s: eval-mode logits average %.3g in size against %.3g with batch statistics on the same "
                    "training images: BatchNorm running statistics do not fit the weights%s", desc,
                    gap["eval_mode_logit_scale"], gap["batch_stats_logit_scale"], hint)


def _finite(v: float) -> float | None:
    """A figure for the history (JSON): None where it is not finite."""
    return v if math.isfinite(v) else None
