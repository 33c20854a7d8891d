"""Where a teacher's outputs for a training batch come from: a forward pass of the live model
(with feature taps where a term needs them), or a lookup in a logit cache.

With flip-only or no augmentation a teacher sees at most two versions of each image, so when
no term needs its features its logits are computed once and cached on disk, keyed on the
teacher's and the data's bytes."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .. import dist
from ..data import Data, iterate, to_device
from ..fileio import save_torch, sha256_json
from ..inference import channels_last, frozen_forward
from .losses import Outputs
from .taps import FeatureTaps

log = logging.getLogger("edgekd")


class TeacherSource:
    def __init__(self, teacher: nn.Module, data: Data, device: torch.device, cache: bool,
                 teacher_key: str | None, cache_dir: Path | None, features: list[str] | None = None,
                 name: str = "teacher"):  # `name`: the teacher's YAML key path, in messages and the progress bar
        self.teacher, self.data, self.device, self.name = teacher.eval(), data, device, name
        self.taps = FeatureTaps(teacher, features, name) if features else None
        self.table: torch.Tensor | None = None
        self._compiled: nn.Module | None = None  # set for a training run with `compile` (compiled)
        if cache and self.taps is None and data.augment in ("none", "flip"):
            self.table = self._build_table(teacher_key, cache_dir)

    def __getstate__(self) -> dict:
        """Sent to the other ranks of a torchrun group (dist) without the dataset: each has its own."""
        return {**self.__dict__, "data": None, "_compiled": None}

    @contextmanager
    def compiled(self, **options):
        """The live forward through torch.compile(**options) for the block (a training run's
        `compile`), where PyTorch runs it: not from a logit table, an ONNX teacher, or a CPU's
        onnxruntime runner (frozen_forward), which outruns both."""
        if self.table is None and not hasattr(self.teacher, "session") and (self.taps or self.device.type != "cpu"):
            self._compiled = torch.compile(self.teacher, **options)
        try:
            yield
        finally:
            self._compiled = None

    def bind(self, data: Data, device: torch.device) -> None:
        """Attach a received source to this rank's data and device."""
        self.data, self.device = data, device
        if not hasattr(self.teacher, "session"):
            self.teacher.to(device)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None:
            return self._compiled(x).float()
        if self.taps is not None:  # the features come from PyTorch's modules
            return self.teacher(x).float()
        return frozen_forward(self.teacher, self.device, x[:8])(x)

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
        with dist.job():
            dist.everywhere("teacher_logits", source=self, views=views)
            table = self.logit_table(views, together=True)
        if path:
            save_torch(path, table)
        return table

    def logit_table(self, views: int, together: bool = False) -> torch.Tensor:
        """The teacher's logits for every training image (and its mirror image with two views).
        `together`: every rank of a torchrun group makes this call (dist.everywhere); each
        computes every ranks-th image of each batch and the shares are summed."""
        share = dist.share(together)
        split = self.data.train
        table = torch.zeros(views, len(split), self.data.num_classes)
        bar = tqdm(total=len(split) * views, desc=f"{self.name} logits", unit="img", leave=False, disable=not dist.world().main)
        with channels_last(self.device, self.teacher):
            for v in range(views):
                for x, _, idx, _ in iterate(split, self.data.eval_batch_size, shard=share):
                    x = self.data.normalize(x.to(self.device))
                    table[v, idx] = self._forward(x.flip(-1) if v else x).cpu()
                    bar.update(len(idx) * share[1])
        bar.close()
        if share[1] > 1:  # the shares to every rank, one view at a time (NCCL reduces on the GPU)
            for v in range(views):
                table[v] = dist.all_sum(table[v].to(self.device), f"computing {self.name} logits").cpu()
        return table

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor) -> Outputs:
        if self.table is not None:
            view = flip.long() if self.table.shape[0] == 2 else torch.zeros_like(idx)
            return Outputs(to_device(self.table[view, idx], x.device))
        logits = self._forward(x)
        features = {k: v.float() for k, v in self.taps.take().items()} if self.taps else {}
        return Outputs(logits, features)
