"""benchmark: latency p50/p90/p99, throughput, memory, size and accuracy of every exported
model on every available runtime, thread counts pinned; speed also as same-run ratios.

The models of one runtime and thread count are timed interleaved in rounds
(bench.measure.time_interleaved) and every ratio is the median of per-round ratios, so a
noisy, shared machine moves all models alike and the ratios the CI gate compares hold.

With `robustness` on, every ONNX variant (the int8 files as onnxruntime runs them) is also
scored on corrupted test images (edgekd.robustness)."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, field_validator

from ..bench.measure import bench_models, round_ratio
from ..bench.runtimes import RUNTIMES, resolve
from ..fileio import sha256_json
from ..schema import Strict
from ..robustness import CORRUPTIONS
from .base import Stage, StageResult, register

log = logging.getLogger("edgekd")
TEACHER = "teacher_fp32"  # the export stage's file of the primary teacher (ctx.variants["teacher"])
RATIOS = [("int8_qat", "student_fp32"), ("int8_ptq", "student_fp32"), ("student_fp32", "student_unpruned_fp32"),
          ("int8_qat", "student_unpruned_fp32"), ("int8_qat", "teacher_fp32"), ("int8_ptq", "teacher_fp32"),
          ("student_fp32", "teacher_fp32")]


class RobustnessConfig(Strict):
    enabled: bool = True
    corruptions: list[Literal[tuple(CORRUPTIONS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(CORRUPTIONS), min_length=1, description="CIFAR-10-C style corruptions")
    severities: list[Literal[1, 2, 3, 4, 5]] = Field(default_factory=lambda: [1, 2, 3, 4, 5], min_length=1)
    images: int | None = Field(1000, gt=0, description="test images corrupted, a stratified sample (default 1000; null: all)")


class BenchmarkConfig(Strict):
    runtimes: list[str] = Field(default_factory=lambda: ["onnxruntime", "openvino", "executorch", "litert"],
                                description="runtimes to try ('all' for every known one); those not installed are "
                                            "skipped with a notice")
    threads: list[int] = Field(default_factory=lambda: [1], min_length=1)
    batch: int = Field(1, gt=0)
    throughput_batch: int = Field(32, gt=0)
    warmup: int = Field(30, ge=0)
    runs: int = Field(200, gt=4, description="timed calls per model, spread over `rounds`; a model's calls "
                      "in a round stop near 100 ms (at least 3), so a teacher takes fewer")
    rounds: int = Field(10, ge=1, description="interleaved timing rounds (model order rotates each round)")
    eval_images: int | None = Field(None, gt=0, description="test images for per-runtime accuracy, a stratified sample (default: all)")
    teacher_accuracy: bool = Field(False, description="also measure the teacher files' top-1 on every runtime; off: their "
                                   "rows show the teacher's PyTorch top-1, which export verified each file against (a "
                                   "teacher's accuracy pass on 1 thread is most of this stage's time)")
    robustness: RobustnessConfig = Field(default_factory=lambda: RobustnessConfig(enabled=False),
                                         description="accuracy on corrupted test images (true | false | options)")

    @field_validator("robustness", mode="before")
    @classmethod
    def _switch(cls, v):
        return {"enabled": v} if isinstance(v, bool) else v


def _files(ctx, fmt: str) -> dict:
    """variant -> file of format `fmt`; the export stage's files (metadata, verified) win."""
    found = {k.split(".", 1)[1]: ctx.run_dir / v for k, v in ctx.artifacts.items() if k.startswith(f"{fmt}.")}
    return {k: p for k, p in found.items() if p.parent.name.endswith("export")} or found


@register("benchmark")
class Benchmark(Stage):
    Config = BenchmarkConfig
    step = 3
    does = "measures the files written before it"

    def run(self, ctx) -> StageResult:
        cfg: BenchmarkConfig = self.config
        data = ctx.data
        test = data.test.sample(cfg.eval_images)
        n = len(test)
        x = data.normalize(test.images[:]).numpy()
        y = test.labels.numpy()
        skipped, models = {}, {}
        for rt in resolve(cfg.runtimes):
            runtime = RUNTIMES.get(rt)
            why = runtime.available()
            files = {k: p for fmt in (*reversed(runtime.also), runtime.fmt) for k, p in _files(ctx, fmt).items()}
            if not why and not files:
                why = f"no {' or '.join((runtime.fmt, *runtime.also))} files in this run (see the export stage's info)"
            if why:
                log.warning("benchmark: runtime %s skipped: %s", rt, why)
                skipped[rt] = why
                continue
            for threads in cfg.threads:
                key = f"{rt}/{threads}t"

                def failed(name, e, key=key):  # a runtime that cannot run one model must not sink the others
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    log.warning("benchmark: %s on %s failed: %s", name, key, msg)
                    skipped[f"{key}:{name}"] = msg

                results = bench_models(files, rt, threads, data.image_size, cfg.batch, cfg.throughput_batch, cfg.warmup,
                                       cfg.runs, cfg.rounds, x, y, {v: ctx.variants.get(v, {}).get("macs") for v in files},
                                       peak_memory=threads == cfg.threads[0], on_error=failed,
                                       eval_skip=() if cfg.teacher_accuracy else (TEACHER,))
                for name, res in results.items():
                    top1 = (f"top-1 {res['top1']:.2f}" if "top1" in res
                            else "top-1 not run here (benchmark.teacher_accuracy: false)")
                    log.info("benchmark %-24s %-18s p50 %.3f ms  %s", name, key, res["p50_ms"], top1)
                    entry = models.setdefault(name, {"latency": {}})
                    if runtime.fmt == "onnx":
                        entry["size_bytes"] = res["size_bytes"]
                    entry["latency"][key] = res
        ratios = {}
        for fast, slow in RATIOS:
            for key in (models.get(fast) or {}).get("latency", {}):
                s = (models.get(slow) or {}).get("latency", {}).get(key)
                if s:
                    ratios[f"{slow}/{fast}@{key}"] = round_ratio(s, models[fast]["latency"][key])
        if TEACHER in models and not cfg.teacher_accuracy and "top1" in ctx.variants.get("teacher", {}):
            models[TEACHER].update(top1=ctx.variants["teacher"]["top1"], top1_measured_by="PyTorch (export verified "
                                   "every teacher file against it)")
        for name, m in models.items():  # keep earlier figures (top1 by ORT etc.), add latency
            m["latency"] = {**(ctx.variants.get(name, {}).get("latency") or {}), **m["latency"]}
        metrics = {f"speedup.{k}": v for k, v in ratios.items()}
        info = {"ratios": ratios, "skipped": skipped, "eval_images": int(n), "threads": cfg.threads}
        if cfg.robustness.enabled:
            info["robustness"] = self._robustness(ctx, models)
        return StageResult(metrics=metrics, models=models, info=info)

    def _robustness(self, ctx, models: dict) -> dict:
        """Every ONNX variant on the same corrupted test images; drops relative to the teacher's."""
        from tqdm import tqdm

        from ..onnx_export import run_onnx
        from ..robustness import cached_robustness

        rc: RobustnessConfig = self.config.robustness
        data = ctx.data
        test = data.test.sample(rc.images)
        files = _files(ctx, "onnx")
        runtime = f"onnxruntime {RUNTIMES.get('onnxruntime').version()}"
        with tqdm(total=len(rc.corruptions) * len(rc.severities), desc="robustness", unit="corruption") as bar:
            res = cached_robustness(files, lambda p, x: run_onnx(p, x, batch=250), test.images[:], test.labels.numpy(),
                                    data.normalize, rc.corruptions, rc.severities, ctx.cfg.seed, ctx.cache_dir,
                                    sha256_json([test.key, data.mean, data.std]), runtime, bar.update)
        for r in res.values():
            r["drop_points"] = round(r["clean_top1"] - r["corruption_top1"], 3)
        teacher = res.get("teacher_fp32")
        for v, r in res.items():
            if teacher is not None:
                r["drop_vs_teacher_points"] = round(r["drop_points"] - teacher["drop_points"], 3) + 0.0  # no -0.0
            entry = models.setdefault(v, {"latency": {}})
            entry["robustness"] = r
            entry["corruption_top1"], entry["corruption_drop_points"] = r["corruption_top1"], r["drop_points"]
            log.info("robustness %-24s clean %.2f  corrupted %.2f  (drop %.2f points)%s", v, r["clean_top1"],
                     r["corruption_top1"], r["drop_points"], "  [an earlier run's figures: same file and images]"
                     if r.get("cached") else "")
        return {"corruptions": rc.corruptions, "severities": rc.severities, "images": len(test), "runtime": "onnxruntime"}
