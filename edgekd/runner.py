"""The runner: owns stage order, the run directory, the manifest, resume and the reports.

Resume rule: a stage is skipped when the manifest records it completed with the same
chain hash (its own config plus everything before it) and its outputs still exist;
an interrupted stage continues from its last epoch checkpoint (see train.fit)."""

from __future__ import annotations

import logging
import platform
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__, dist
from .schema import PipelineConfig
from .context import Context
from .errors import EdgekdError, InputError
from .fileio import file_size, sha256_file, sha256_json, write_json, write_text
from .models import rebuild
from .rundir import RunDirLock, read_json, read_manifest, set_aside
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
    for name in ("torchvision", "onnx", "onnxruntime", "torch-pruning", "openvino", "executorch"):
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _guessing(cfg, name: str, figs: dict, data) -> dict:
    """{'near_chance': why} for a teacher that scores what guessing scores on the test split, said
    before hours of distilling from it; {} otherwise."""
    from .metrics import guessing_level

    level = guessing_level(figs)
    if level is None:
        return {}
    m, where = cfg.teacher_configs()[name], cfg.teacher_path(name)
    if not (m.checkpoint or m.pretrained):
        why = f"{where} has no checkpoint, so it is random weights: give {where}.checkpoint"
    else:
        shown = ", ".join(data.classes[:4]) + (", ..." if len(data.classes) > 4 else "")
        why = (f"check that it was trained on these {len(data.classes)} classes in this order ({shown}), at "
               f"data.image_size {data.image_size}, with data.mean / data.std as it was trained")
    text = (f"{figs['top1']:.1f} % top-1 on the {figs['n']} test images, no better than guessing ({level[0]:.1f} %, "
            f"within {level[1]:.1f} points)")
    log.warning("%s: %s; %s. Distilling from it teaches the student nothing.", where, text, why)
    return {"near_chance": text}


def changed_keys(old, new, path: str = "") -> list[str]:
    """Key paths (stages[0].distill.epochs) where two pipeline mappings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in dict.fromkeys([*old, *new])
                for k in changed_keys(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in changed_keys(a, b, f"{path}[{i}]")]
    return [] if old == new else [path or "(the whole file)"]


class _Warnings(logging.Handler):
    """Every WARNING the run logs, by stage (None before the first), for the manifest and the
    report's Warnings section: a user reading report.md sees what went wrong without the log."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.stage: int | None = None  # the index of the stage running
        self.seen: dict[int | None, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.setdefault(self.stage, []).append(record.getMessage()[:2000])


class Runner:
    def __init__(self, cfg: PipelineConfig, raw: dict, run_dir: Path | None = None, resume: bool = False):
        self.cfg, self.raw = cfg, raw
        if run_dir is None:
            if resume:
                raise InputError("--resume needs the run directory to continue")
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
        self.lock = RunDirLock(run_dir, resume)  # refuses user folders and a second writer, exit 2
        self.run_dir = run_dir
        self.manifest_path = run_dir / "manifest.json"
        try:
            self.manifest = read_manifest(run_dir) if resume else {}
        except InputError:
            self.lock.release()
            raise

    def _global_hash(self) -> str:
        c = self.cfg
        return sha256_json([c.seed, c.data.model_dump(), c.student.model_dump(),
                            c.teacher.model_dump() if c.teacher else
                            {n: m.model_dump() for n, m in c.teachers.items()} if c.teachers else None])

    def _set_aside_changed_config(self) -> None:
        """A resume whose pipeline differs from the run's config.yaml (another file, --set
        overrides left out): say which keys differ, as the stages they reach are redone and set
        aside, and set the old config.yaml aside with them, the record of how they were made."""
        path = self.run_dir / "config.yaml"
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return  # none, or unreadable: nothing to compare with (the manifest's hashes still decide)
        changed = changed_keys(old, self.raw)
        if changed:
            moved = set_aside(self.run_dir, path)
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            log.warning("--resume: this pipeline differs from the run's config.yaml in %s%s; the stages they reach are "
                        "redone (its config.yaml moved to %s)", ", ".join(changed[:6]), more,
                        moved.relative_to(self.run_dir))

    def _save_manifest(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def run(self) -> Path:
        """Run every stage not already done; the manifest records the failure of any step."""
        self.warnings = _Warnings()
        log.addHandler(self.warnings)
        try:
            out = self._run()
            dist.release_ranks()
            return out
        except BaseException as e:
            dist.failing()
            dist.release_ranks(failed=True)
            self.manifest["status"] = "failed"
            self.manifest.setdefault("error", f"{type(e).__name__}: {e}"[:2000])
            try:
                self._save_manifest()
            except Exception:  # out of disk: the error itself still reaches the user
                log.debug("could not record the failure in %s", self.manifest_path, exc_info=True)
            raise
        finally:
            log.removeHandler(self.warnings)
            self.lock.release()

    def _run(self) -> Path:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = dist.init(resolve_device(cfg.device))
        seed_everything(cfg.seed)
        if self.manifest:
            self._set_aside_changed_config()
        write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.raw, sort_keys=False))
        old_stages = {s["index"]: s for s in self.manifest.get("stages", [])}
        self.manifest = {
            "pipeline": cfg.name, "created": self.manifest.get("created", datetime.now().isoformat(timespec="seconds")),
            "seed": cfg.seed, "device": str(device), "threads": torch.get_num_threads(), "ranks": dist.world().size,
            "config_hash": sha256_json(self.raw), "versions": versions(), "status": "running",
            "stages": list(old_stages.values()),  # the previous run's records stay until each stage is replaced
        }
        self._save_manifest()
        ctx = Context(cfg, self.run_dir, device)
        self.manifest["skipped_images"] = {"count": len(ctx.data.skipped), "files": ctx.data.skipped}
        ctx.load_student()
        input_figs = ctx.measure(ctx.model)
        ctx.variants["student_input"] = {**input_figs, "label": "student (input)"}
        teacher_figs = None
        trained = cfg.trained_teachers()
        for i, name in enumerate(cfg.teacher_configs()):  # the first teacher is the report's reference
            if name in trained:
                continue  # an assistant: its figures come from the stage that trains it
            figs = ctx.teacher_figures(name)
            key, label = ("teacher", "teacher") if cfg.teacher is not None else \
                ("teacher" if i == 0 else f"teacher_{name}", f"teacher {name}")
            ctx.variants[key] = {**figs, "label": label, **_guessing(cfg, name, figs, ctx.data)}
            teacher_figs = teacher_figs or figs
        chain = self._global_hash()
        results: list[dict] = []
        redone = False
        for i, (name, scfg) in enumerate(cfg.stage_entries()):
            self.warnings.stage = i
            chain = sha256_json([chain, name, scfg.model_dump()])
            stage_dir = self.run_dir / f"{i:02d}_{name}"
            entry = {"index": i, "name": name, "chain_hash": chain, "status": "pending", "dir": stage_dir.name}
            stages = self.manifest["stages"]
            stages[i:i + 1] = [entry]
            old = old_stages.get(i)
            same = bool(old) and old.get("chain_hash") == chain and not redone
            if same and old.get("status") == "completed":
                rec = self._restore(ctx, stage_dir, old)
                if rec is not None:
                    log.info("stage %d %s: already completed with the same config; skipped", i, name)
                    entry.update({k: old[k] for k in ("status", "seconds", "artifacts", "warnings") if k in old})
                    entry["resumed"] = True
                    results.append(rec)
                    self._save_manifest()
                    continue
            if stage_dir.exists() and not (same and old.get("status") in ("running", "failed")):
                # outputs of another config (or unreadable ones) must not be resumed from; nothing is deleted
                why = ("its saved outputs are unreadable" if same else "an earlier stage was redone" if redone
                       else "its config (or an earlier stage's) changed")
                moved = set_aside(self.run_dir, stage_dir)
                # the first stage redone warns; the ones after it follow from it (one warning per cause)
                log.log(logging.INFO if redone else logging.WARNING,
                        "stage %d %s: %s; redoing it (previous folder moved to %s)", i, name, why, ctx.rel(moved))
                entry["replaced"] = ctx.rel(moved)
            redone = True  # later stages were built on this one's old outputs
            entry["status"] = "running"
            self._save_manifest()
            ctx.stage_dir = stage_dir
            stage_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            log.info("stage %d/%d: %s", i + 1, len(cfg.stages), name)
            try:
                rec = self._run_stage(ctx, i, name, scfg, stage_dir, t0)
            except BaseException as e:
                entry.update({"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]})
                raise
            finally:
                if said := self.warnings.seen.pop(i, None):
                    entry["warnings"] = said
            entry.update({"status": "completed", "seconds": rec["seconds"],
                          "artifacts": {k: {"path": v, "bytes": file_size(self.run_dir / v)} for k, v in rec["artifacts"].items()}})
            self._save_manifest()
            results.append(rec)
        del self.manifest["stages"][len(cfg.stages):]
        self.manifest["status"] = "completed"
        if said := self.warnings.seen.get(None):
            self.manifest["warnings"] = said  # before the first stage: the data, the teachers
        self._save_manifest()
        from .report import write_reports

        write_reports(self.run_dir, cfg, self.manifest, results, ctx.variants, teacher_figs,
                      ctx.data.test.labels.tolist(), ctx.data.test.key)
        return self.run_dir

    def _run_stage(self, ctx: Context, i: int, name: str, scfg, stage_dir: Path, t0: float) -> dict:
        """One stage, its model saved and its result.json written (all inside the failure record)."""
        result: StageResult = STAGES.get(name)(scfg).run(ctx)
        if result.model_changed:
            result.artifacts["model"] = ctx.rel(ctx.save_model(stage_dir / "model.pt"))
            if ctx.float_model is not None:
                result.artifacts["float_model"] = ctx.rel(ctx.save_model(stage_dir / "float_model.pt", ctx.float_model, []))
        ctx.artifacts.update(result.artifacts)
        for k, v in result.models.items():
            ctx.variants[k] = {**ctx.variants.get(k, {}), **v}
        rec = {"index": i, "name": name, "seconds": round(time.perf_counter() - t0, 2), **result.to_json()}
        write_json(stage_dir / "result.json", rec)
        return rec

    def _restore(self, ctx: Context, stage_dir: Path, old: dict) -> dict | None:
        """Bring ctx to the state after a completed stage and return its result record; None
        (ctx untouched) where its outputs are gone, truncated or not edgekd's."""
        paths = {k: self.run_dir / v["path"] for k, v in old.get("artifacts", {}).items()}
        if not (stage_dir / "result.json").exists() or not all(p.exists() for p in paths.values()):
            return None
        try:
            res = read_json(stage_dir / "result.json", "stage result")
            if not all(isinstance(res.get(k, {}), dict) for k in ("artifacts", "models")):
                raise InputError(f"{stage_dir / 'result.json'}: not an edgekd stage result")
            ckpt = torch.load(paths["model"], map_location="cpu", weights_only=True) if "model" in paths else None
            model = rebuild(ckpt).to(ctx.device) if ckpt else None
            float_model = (rebuild(torch.load(paths["float_model"], map_location="cpu", weights_only=True)).to(ctx.device)
                           if "float_model" in paths else None)
            assistants = {k.split(".", 1)[1]: (rebuild(torch.load(p, map_location="cpu", weights_only=True)), sha256_file(p))
                          for k, p in paths.items() if k.startswith("teacher.")}
        except Exception as e:
            log.warning("%s: cannot resume from it (%s)", stage_dir.name, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return None
        for name, (teacher, key) in assistants.items():  # trained by the stage: the pipeline's teachers from here on
            ctx.set_teacher(name, teacher, key)
        if ckpt:
            ctx.model, ctx.float_model = model, None
            ctx.pruning_history, ctx.transforms = ckpt["pruning_history"], ckpt["transforms"]
        if float_model is not None:
            ctx.float_model = float_model
        ctx.artifacts.update(res.get("artifacts", {}))
        for k, v in res.get("models", {}).items():
            ctx.variants[k] = {**ctx.variants.get(k, {}), **v}
        return res
