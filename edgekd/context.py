"""The run context handed from stage to stage: config, data, teacher, the current model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import PipelineConfig
from .data import Data, cache_root, load_data
from .fileio import sha256_file, sha256_json
from .metrics import classification_metrics, model_stats, predict
from .models import check_classes, load_model, save_checkpoint

log = logging.getLogger("edgekd")


@dataclass
class Context:
    cfg: PipelineConfig
    run_dir: Path
    device: torch.device
    model: nn.Module | None = None  # the current student
    spec: dict = field(default_factory=dict)  # how to rebuild the student's constructor
    pruning_history: list = field(default_factory=list)
    transforms: list = field(default_factory=list)
    float_model: nn.Module | None = None  # fp32 counterpart once a stage fake-quantizes `model`
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path relative to run_dir
    variants: dict[str, dict] = field(default_factory=dict)  # model variant -> figures, for the report
    stage_dir: Path | None = None
    _data: Data | None = None
    _teacher: nn.Module | None = None
    _teacher_key: str | None = None

    # ------------------------------------------------------------------ lazy inputs
    @property
    def data(self) -> Data:
        if self._data is None:
            self._data = load_data(self.cfg.data, self.cfg.seed)
            log.info("data: %d train / %d test images, %d classes, %dx%d", len(self._data.train),
                     len(self._data.test), self._data.num_classes, self._data.image_size, self._data.image_size)
        return self._data

    @property
    def cache_dir(self) -> Path:
        return cache_root(self.cfg.data.cache_dir)

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            tcfg = self.cfg.teacher
            if tcfg is None:
                raise RuntimeError("pipeline has no teacher")
            model, spec = load_model(tcfg, self.data.num_classes, "teacher", allow_onnx=True)
            check_classes(model, "teacher", self.data.num_classes, self.data.image_size)
            for p in model.parameters():
                p.requires_grad_(False)
            self._teacher = model.eval().to(self.device) if not hasattr(model, "session") else model.eval()
            self._teacher_key = sha256_json([spec, sha256_file(tcfg.checkpoint)]) if tcfg.checkpoint else None
        return self._teacher

    def teacher_logits(self, cache: bool = True):
        from .train import TeacherLogits

        teacher = self.teacher
        return TeacherLogits(teacher, self.data, self.device, cache, self._teacher_key, self.cache_dir)

    def load_student(self) -> None:
        model, spec = load_model(self.cfg.student, self.data.num_classes, "student")
        check_classes(model, "student", self.data.num_classes, self.data.image_size)
        self.model, self.spec = model.to(self.device), spec

    # ------------------------------------------------------------------ figures
    def measure(self, model: nn.Module, split=None, logits_cache_key: str | None = None) -> dict[str, Any]:
        """Accuracy/calibration on the test split plus params and MACs of `model`."""
        split = split or self.data.test
        logits = self._cached_logits(model, split, logits_cache_key)
        m = classification_metrics(logits, split.labels.numpy(), self.data.classes)
        if any(True for _ in model.parameters()):
            m.update(model_stats(model, self.data.image_size))
        return m

    def _cached_logits(self, model: nn.Module, split, key: str | None):
        if key is None:
            return predict(model, self.data, split, self.device)
        path = self.cache_dir / "eval_logits" / f"{sha256_json([key, split.key])[:32]}.pt"
        if path.exists():
            return torch.load(path, weights_only=True).numpy()
        logits = predict(model, self.data, split, self.device)
        from .fileio import save_torch

        save_torch(path, torch.from_numpy(logits))
        return logits

    def teacher_figures(self) -> dict[str, Any]:
        return self.measure(self.teacher, logits_cache_key=self._teacher_key)

    def save_model(self, path: Path, model: nn.Module | None = None, transforms: list | None = None) -> Path:
        model = model if model is not None else self.model
        save_checkpoint(path, model, self.spec, self.pruning_history,
                        self.transforms if transforms is None else transforms, {"image_size": self.data.image_size})
        return path

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run_dir))
