"""The runner: owns stage order, the run directory, the manifest, resume and the reports.

Resume rule: a stage is skipped when the manifest records it completed with the same
chain hash (its own config plus everything before it) and its outputs still exist;
an interrupted stage continues from its last epoch checkpoint (see train.fit)."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .config import PipelineConfig
from .context import Context
from .errors import EdgekdError
from .fileio import file_size, sha256_json, write_json, write_text
from .models import rebuild
from .stages import STAGES, StageResult

log = logging.getLogger("edgekd")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgekdError("device: cuda requested but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def versions() -> dict:
    """Installed distribution versions (torch_pruning's own __version__ lags its release)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgekd": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("torchvision", "onnx", "onnxruntime", "torch-pruning", "openvino", "executorch"):
        try:
            out[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Runner:
    def __init__(self, cfg: PipelineConfig, raw: dict, run_dir: Path | None = None, resume: bool = False):
        self.cfg, self.raw = cfg, raw
        if resume:
            if run_dir is None or not (run_dir / "manifest.json").exists():
                raise EdgekdError(f"--resume {run_dir}: not a run directory (no manifest.json)")
        else:
            if run_dir is None:
                run_dir = Path(cfg.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
            if (run_dir / "manifest.json").exists():
                raise EdgekdError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        self.run_dir = run_dir
        self.manifest_path = run_dir / "manifest.json"
        self.manifest = json.loads(self.manifest_path.read_text()) if resume else {}

    def _global_hash(self) -> str:
        c = self.cfg
        return sha256_json([c.seed, c.data.model_dump(), c.student.model_dump(),
                            c.teacher.model_dump() if c.teacher else None])

    def _save_manifest(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def run(self) -> Path:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.raw, sort_keys=False))
        old_stages = {s["index"]: s for s in self.manifest.get("stages", [])}
        self.manifest = {
            "pipeline": cfg.name, "created": self.manifest.get("created", datetime.now().isoformat(timespec="seconds")),
            "seed": cfg.seed, "device": str(device), "threads": torch.get_num_threads(),
            "config_hash": sha256_json(self.raw), "versions": versions(), "status": "running",
            "stages": [],
        }
        ctx = Context(cfg, self.run_dir, device)
        ctx.load_student()
        input_figs = ctx.measure(ctx.model)
        ctx.variants["student_input"] = {**input_figs, "label": "student (input)"}
        teacher_figs = None
        if cfg.teacher is not None:
            teacher_figs = ctx.teacher_figures()
            ctx.variants["teacher"] = {**teacher_figs, "label": "teacher"}
        chain = self._global_hash()
        results: list[dict] = []
        for i, (name, scfg) in enumerate(cfg.stage_entries()):
            chain = sha256_json([chain, name, scfg.model_dump()])
            stage_dir = self.run_dir / f"{i:02d}_{name}"
            entry = {"index": i, "name": name, "chain_hash": chain, "status": "pending", "dir": stage_dir.name}
            self.manifest["stages"].append(entry)
            old = old_stages.get(i)
            if old and old.get("status") == "completed" and old.get("chain_hash") == chain and self._restore(ctx, stage_dir, old):
                log.info("stage %d %s: already completed with the same config; skipped", i, name)
                entry.update({k: old[k] for k in ("status", "seconds", "artifacts") if k in old})
                entry["resumed"] = True
                results.append(json.loads((stage_dir / "result.json").read_text()))
                self._save_manifest()
                continue
            if old and old.get("chain_hash") != chain:
                shutil.rmtree(stage_dir, ignore_errors=True)  # outputs of another config must not be resumed from
            entry["status"] = "running"
            self._save_manifest()
            ctx.stage_dir = stage_dir
            stage_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            log.info("stage %d/%d: %s", i + 1, len(cfg.stages), name)
            try:
                result: StageResult = STAGES.get(name)(scfg).run(ctx)
            except BaseException as e:
                entry.update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
                self.manifest["status"] = "failed"
                self._save_manifest()
                raise
            if result.model_changed:
                result.artifacts["model"] = ctx.rel(ctx.save_model(stage_dir / "model.pt"))
                if ctx.float_model is not None:
                    result.artifacts["float_model"] = ctx.rel(ctx.save_model(stage_dir / "float_model.pt", ctx.float_model, []))
            ctx.artifacts.update(result.artifacts)
            for k, v in result.models.items():
                ctx.variants[k] = {**ctx.variants.get(k, {}), **v}
            seconds = round(time.perf_counter() - t0, 2)
            rec = {"index": i, "name": name, "seconds": seconds, **result.to_json()}
            write_json(stage_dir / "result.json", rec)
            entry.update({"status": "completed", "seconds": seconds,
                          "artifacts": {k: {"path": v, "bytes": file_size(self.run_dir / v)} for k, v in result.artifacts.items()}})
            self._save_manifest()
            results.append(rec)
        self.manifest["status"] = "completed"
        self._save_manifest()
        from .report import write_reports

        write_reports(self.run_dir, cfg, self.manifest, results, ctx.variants, teacher_figs,
                      ctx.data.test.labels.tolist(), ctx.data.test.key)
        return self.run_dir

    def _restore(self, ctx: Context, stage_dir: Path, old: dict) -> bool:
        """Bring ctx to the state after a completed stage; False if its outputs are gone."""
        paths = {k: self.run_dir / v["path"] for k, v in old.get("artifacts", {}).items()}
        if not (stage_dir / "result.json").exists() or not all(p.exists() for p in paths.values()):
            return False
        res = json.loads((stage_dir / "result.json").read_text())
        if "model" in paths:
            ckpt = torch.load(paths["model"], map_location="cpu", weights_only=True)
            ctx.model = rebuild(ckpt).to(ctx.device)
            ctx.pruning_history, ctx.transforms = ckpt["pruning_history"], ckpt["transforms"]
            ctx.float_model = None
        if "float_model" in paths:
            ctx.float_model = rebuild(torch.load(paths["float_model"], map_location="cpu", weights_only=True)).to(ctx.device)
        ctx.artifacts.update(res.get("artifacts", {}))
        for k, v in res.get("models", {}).items():
            ctx.variants[k] = {**ctx.variants.get(k, {}), **v}
        return True
