"""What the teacher buys in the loop: the same compression pipeline run twice, once with the
distillation loss in the prune fine-tune and QAT (as configured) and once with plain CE,
same epochs, same seed, same data. Prints and writes a markdown table of accuracy at every
step (onnxruntime-measured for the int8 files).

    python benchmarks/kd_vs_ce.py [--pipeline pipelines/compress_shared_student.yaml]
        [--out runs/kd_vs_ce] [--set data.subset=10000 ...]

Both runs resume if their folders exist, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CE = ["prune.finetune.loss=ce", "quantize.qat.loss=ce"]
CE_ONLY = ["export.include_teacher=false"]  # the teacher's own figures come from the KD run


def run(pipeline: str, out: Path, sets: list[str]) -> dict:
    resume = (out / "manifest.json").exists()
    cmd = ["edgekd", "run", pipeline, "--resume" if resume else "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "report.json").read_text())


def rows(report: dict) -> dict[str, float]:
    """Accuracy at every step: the input, each prune step after fine-tune, fp32 export, PTQ, QAT."""
    out: dict[str, float] = {}
    models = report["models"]
    if "student_input" in models:
        out["input student (fp32)"] = models["student_input"]["top1"]
    for st in report["stages"]:
        if st["name"] == "prune":
            for s in st["info"].get("steps", []):
                out[f"prune step {s['step']} ({s['macs_kept']:.0%} MACs), after fine-tune"] = s["top1_after_finetune"]
    for key, label in (("student_fp32", "pruned fp32 (onnxruntime)"), ("int8_ptq", "int8 PTQ (onnxruntime)"),
                       ("int8_qat", "int8 QAT (onnxruntime)")):
        if key in models:
            out[label] = models[key]["top1"]
    # with benchmark.robustness / a validation split: corrupted-image accuracy and calibrated ECE (x100)
    for key, label in (("student_unpruned_fp32", "unpruned fp32"), ("student_fp32", "pruned fp32"),
                       ("int8_ptq", "int8 PTQ"), ("int8_qat", "int8 QAT")):
        m = models.get(key, {})
        if "corruption_top1" in m:
            out[f"{label}: mean top-1 on corrupted images"] = m["corruption_top1"]
            out[f"{label}: drop on corrupted images (points, lower is better)"] = m["corruption_drop_points"]
        if "calibration" in m:
            out[f"{label}: ECE x100 before / after temperature"] = (100 * m["calibration"]["ece_before"],
                                                                    100 * m["calibration"]["ece_after"])
    return out


def table(kd: dict[str, float], ce: dict[str, float], teacher: float | None) -> str:
    lines = ["| step | KD in the loop | CE only | KD - CE |", "|---|---|---|---|"]
    for k, v in kd.items():
        c = ce.get(k)
        if isinstance(v, tuple):  # (before, after) pairs: no difference column
            fmt = lambda t: " / ".join(f"{x:.2f}" for x in t)  # noqa: E731
            lines.append(f"| {k} | {fmt(v)} | {fmt(c) if c else '–'} | |")
            continue
        lines.append(f"| {k} | {v:.2f} | {c:.2f} | {v - c:+.2f} |" if c is not None else f"| {k} | {v:.2f} | – | – |")
    if teacher is not None:
        lines.append(f"\nteacher: {teacher:.2f} %")
    return "\n".join(lines)


def robustness_table(kd: dict, ce: dict) -> str:
    """The report's robustness table (edgekd.bench.quality) over both runs: the teacher and
    unpruned student once, the compressed files per run."""
    from edgekd.bench.quality import quality_markdown

    rows_ = [("teacher fp32", kd, "teacher_fp32"), ("unpruned student fp32", kd, "student_unpruned_fp32")]
    for tag, rep in (("KD", kd), ("CE", ce)):
        rows_ += [(f"{label}, {tag} in the loop", rep, key) for label, key in
                  (("pruned fp32", "student_fp32"), ("int8 PTQ", "int8_ptq"), ("int8 QAT", "int8_qat"))]
    models = {label: {"label": label, "robustness": rep["models"][key]["robustness"]} for label, rep, key in rows_
              if "robustness" in rep["models"].get(key, {})}
    return "\n".join(quality_markdown(models)).strip()


def paired_lines(kd_dir: Path, ce_dir: Path) -> list[str]:
    """KD against CE in the loop for the files both runs measured, image by image on the same test
    split (predictions.json): a point or two at int8 can be the test images' noise."""
    from edgekd.metrics import gain_over

    kd_p, ce_p = (json.loads((d / "predictions.json").read_text()) for d in (kd_dir, ce_dir))
    if kd_p["split"] != ce_p["split"]:
        return []
    lines = []
    for key, label in (("student_fp32", "pruned fp32"), ("int8_ptq", "int8 PTQ"), ("int8_qat", "int8 QAT")):
        if key in kd_p["models"] and key in ce_p["models"]:
            g = gain_over(ce_p["models"][key], kd_p["models"][key], kd_p["labels"])
            lines.append(f"- {label}: KD {g['points']:+.2f} points over CE on the same {g['images']} test images, "
                         f"McNemar p = {g['p']:.2g} ({g['better']} better, {g['worse']} worse)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="pipelines/compress_shared_student.yaml")
    ap.add_argument("--out", default="runs/kd_vs_ce", type=Path)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="override for both runs")
    args = ap.parse_args()
    kd = run(args.pipeline, args.out / "kd", args.sets)
    ce = run(args.pipeline, args.out / "ce", args.sets + CE + CE_ONLY)
    teacher = kd["models"].get("teacher", {}).get("top1")
    md = (f"# KD vs CE in the loop: {kd['pipeline']}\n\n"
          f"overrides: {' '.join(args.sets) or '(none)'}; seed {kd['seed']}; {kd['machine'].get('cpu', '')}\n\n"
          + table(rows(kd), rows(ce), teacher) + "\n")
    if paired := paired_lines(args.out / "kd", args.out / "ce"):
        md += "\n" + "\n".join(paired) + "\n"
    if rob := robustness_table(kd, ce):
        md += "\n" + rob + "\n"
    (args.out / "kd_vs_ce.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
