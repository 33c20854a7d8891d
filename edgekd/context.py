"""The run context handed from stage to stage: config, data, teachers, the current model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data import Data, cache_root, imbalance, load_data
from .distill import Objective, TeacherSource, teacher_names
from .fileio import sha256_file, sha256_json
from .inference import predict
from .metrics import classification_metrics, model_stats
from .models import check_classes, load_model, save_checkpoint
from .schema import PipelineConfig
from .train import TrainConfig

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
    _teachers: dict[str, tuple[nn.Module, str | None]] = field(default_factory=dict)  # name -> (model, cache key)
    _sources: dict[tuple, TeacherSource] = field(default_factory=dict)  # built once per run (a logit table is costly)

    # ------------------------------------------------------------------ lazy inputs
    @property
    def data(self) -> Data:
        if self._data is None:
            self._data = load_data(self.cfg.data, self.cfg.seed)
            log.info("data: %d train / %d test images, %d classes, %dx%d", len(self._data.train),
                     len(self._data.test), self._data.num_classes, self._data.image_size, self._data.image_size)
            if skew := imbalance(self._data):
                log.warning("data: %s", skew)
        return self._data

    @property
    def cache_dir(self) -> Path:
        return cache_root(self.cfg.data.cache_dir)

    def teacher_model(self, name: str) -> tuple[nn.Module, str | None]:
        """The named pipeline teacher (frozen, on the device) and the key its logits are cached under."""
        if name not in self._teachers:
            tcfg = self.cfg.teacher_configs().get(name)
            if tcfg is None:
                raise RuntimeError(f"pipeline has no teacher '{name}'")
            role = self.cfg.teacher_path(name)
            model, spec = load_model(tcfg, self.data.num_classes, role, allow_onnx=True)
            check_classes(model, role, self.data.num_classes, self.data.image_size)
            for p in model.parameters():
                p.requires_grad_(False)
            model = model.eval().to(self.device) if not hasattr(model, "session") else model.eval()
            self._teachers[name] = (model, sha256_json([spec, sha256_file(tcfg.checkpoint)]) if tcfg.checkpoint else None)
        return self._teachers[name]

    def set_teacher(self, name: str, model: nn.Module, key: str) -> None:
        """Make `model` the pipeline teacher `name` from here on (an assistant trained in the run):
        frozen, its logits cached under `key` (its weights' hash), no source of the old one kept."""
        for p in model.parameters():
            p.requires_grad_(False)
        self._teachers[name] = (model.eval().to(self.device), key)
        self._sources = {k: v for k, v in self._sources.items() if k[0] != name}

    @property
    def teacher(self) -> nn.Module:
        """The primary (first declared) teacher: the reference of the report and of export.include_teacher."""
        return self.teacher_model(self.cfg.primary_teacher())[0]

    def objective(self, cfg: TrainConfig) -> Objective:
        """`cfg`'s objective with its terms' teachers bound to this pipeline's (validation has
        checked every name; a term without one takes the only teacher)."""
        default = self.cfg.primary_teacher() if len(self.cfg.teacher_configs()) == 1 else None
        terms = [self._val_acc_weights(t.model_copy(update={"teacher": default}) if getattr(t, "teacher", "") is None else t)
                 for t in cfg.terms()]

        def source(name: str, features: list[str]) -> TeacherSource:
            k = (name, cfg.cache_teacher, tuple(features))
            if k not in self._sources:
                model, key = self.teacher_model(name)
                self._sources[k] = TeacherSource(model, self.data, self.device, cfg.cache_teacher, key, self.cache_dir,
                                                 features, name=self.cfg.teacher_path(name))
            return self._sources[k]

        return Objective(terms, source)

    def _val_acc_weights(self, term):
        """A term whose teacher mixture is weighted by validation accuracy, with the weights as numbers."""
        if getattr(term, "teacher_weights", None) != "val_acc":
            return term
        accs = []
        for n in teacher_names(term):
            model, key = self.teacher_model(n)
            accs.append(self.measure(model, self.data.val, key)["top1"])
        log.info("%s teacher weights from validation top-1: %s", term.loss,
                 ", ".join(f"{n} {a:.2f}%" for n, a in zip(teacher_names(term), accs)))
        return term.model_copy(update={"teacher_weights": accs})

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
        logits = predict(model, self.data, split, self.device, frozen=True)  # keyed on its weights: a teacher
        from .fileio import save_torch

        save_torch(path, torch.from_numpy(logits))
        return logits

    def teacher_figures(self, name: str) -> dict[str, Any]:
        model, key = self.teacher_model(name)
        return self.measure(model, logits_cache_key=key)

    def save_model(self, path: Path, model: nn.Module | None = None, transforms: list | None = None) -> Path:
        model = model if model is not None else self.model
        save_checkpoint(path, model, self.spec, self.pruning_history,
                        self.transforms if transforms is None else transforms, {"image_size": self.data.image_size})
        return path

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run_dir))
