"""Distillation methods side by side: the same student (same initial weights, seed, data,
epochs and optimizer) trained by each objective edgekd ships, one `edgekd run` per method, and
a table of top-1, ECE and training time.

    python benchmarks/distill_methods.py [--subset 2000 --test-subset 1000 --epochs 10 --augment flip]
        [--out runs/distill_methods] [--methods ce,kd,...] [--width 0.5]

Methods: ce (no teacher), kd, dkd, dist, kd+ls (logit standardization), fitnet+kd, at+kd,
two-teacher kd (the ResNet-50 and an assistant trained by edgekd, their softened distributions
averaged), and the assistant chain (ResNet-50 -> assistant -> student, the assistant trained
in the same run). Each method's options are the ones its paper's public code uses on CIFAR;
nothing is tuned here. Runs resume if their folders exist, so an interrupted benchmark
continues; a method that fails (a diverged loss, say) is reported as such and the rest go on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SHARED = Path(os.environ.get("EDGEKD_SHARED", Path(__file__).resolve().parents[2] / "shared"))
KD = {"loss": "kd", "teacher": "r50", "weight": 0.9, "temperature": 4}
CE_SMALL = {"loss": "ce", "weight": 0.1}


def objectives(epochs: int) -> dict[str, list[dict]]:
    """Each method as objective terms (the chain and two-teacher runs are built in `pipelines`)."""
    return {
        "ce": [{"loss": "ce"}],
        "kd": [KD, CE_SMALL],
        # DKD (mdistiller): CE + DKD(alpha 1, beta 8, T 4), ramped in over the first ~10 % of training
        "dkd": [{"loss": "ce"}, {"loss": "dkd", "teacher": "r50", "temperature": 4, "alpha": 1, "beta": 8,
                                 "warmup_epochs": max(1, epochs // 10)}],
        # DIST (Huang et al. 2022, CIFAR): CE + 2 * DIST(T 4, beta 1, gamma 1)
        "dist": [{"loss": "ce"}, {"loss": "dist", "teacher": "r50", "weight": 2, "temperature": 4}],
        # logit standardization (Sun et al. 2024, its KD config): 0.1 CE + 9 * KD on z-scored logits at T 2
        "kd+ls": [{"loss": "kd", "teacher": "r50", "weight": 9, "temperature": 2, "standardize": True}, CE_SMALL],
        # FitNet hint (RepDistiller: weight 100) on the student's 8x8 map vs the teacher's, plus KD
        "fitnet+kd": [KD, CE_SMALL, {"loss": "fitnet", "teacher": "r50", "weight": 100,
                                     "student_layer": "features.13", "teacher_layer": "layer3"}],
        # attention transfer (weight 1000) at the three resolutions both networks share, plus KD
        "at+kd": [KD, CE_SMALL, {"loss": "at", "teacher": "r50", "weight": 1000,
                                 "layers": [["features.6", "layer2"], ["features.13", "layer3"], ["features.17", "layer4"]]}],
    }


METHODS = ["ce", "kd", "dkd", "dist", "kd+ls", "fitnet+kd", "at+kd", "assistant chain", "two-teacher kd"]


def base(args) -> dict:
    data = {"source": str(SHARED / "data/cifar10-jpg.tar.gz"), "num_classes": 10, "augment": args.augment,
            "batch_size": args.batch_size, "val_split": 0.1}
    if args.subset:
        data["subset"] = args.subset
    if args.test_subset:
        data["test_subset"] = args.test_subset
    return {"name": "distill_methods", "seed": args.seed, "device": args.device, "data": data,
            "teachers": {"r50": {"arch": "resnet50", "cifar_stem": True,
                                 "checkpoint": str(SHARED / "models/resnet50_cifar10.pt")}},
            "student": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": args.width}}


def train(args, objective: list[dict]) -> dict:
    return {"epochs": args.epochs, "lr": args.lr, "objective": objective, "eval_every": 0}


def pipeline(method: str, args, out: Path) -> dict:
    p = base(args)
    if method == "assistant chain":
        p["teachers"]["ta"] = {"arch": args.assistant_arch, "cifar_stem": True}
        p["stages"] = [{"assistant": {"name": "ta", **train(args, [KD, CE_SMALL]), "lr": args.assistant_lr}},
                       {"distill": train(args, [{**KD, "teacher": "ta"}, CE_SMALL])}]
    elif method == "two-teacher kd":  # the assistant the chain trained is the second teacher
        p["teachers"]["ta"] = {"arch": args.assistant_arch, "cifar_stem": True,
                               "checkpoint": str(out / "assistant_chain" / "00_assistant" / "ta.pt")}
        p["stages"] = [{"distill": train(args, [{**KD, "teacher": ["r50", "ta"]}, CE_SMALL])}]
    else:
        p["stages"] = [{"distill": train(args, objectives(args.epochs)[method])}]
    return p


def run(method: str, args, out: Path) -> dict:
    folder = out / method.replace(" ", "_").replace("+", "_")
    path = out / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(pipeline(method, args, out), sort_keys=False))
    resume = (folder / "manifest.json").exists()
    cmd = ["edgekd", "run", str(path), "--resume" if resume else "--out", str(folder)]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else {}
        return {"method": method, "error": manifest.get("error", "failed")}
    report = json.loads((folder / "report.json").read_text())
    student = report["models"]["student_distilled"]
    seconds = sum(e.get("seconds", 0) for s in report["stages"] for e in s.get("history") or [])
    row = {"method": method, "top1": student["top1"], "ece": student["ece"], "train_seconds": round(seconds, 1),
           "teacher_top1": report["models"]["teacher"]["top1"], "machine": report["machine"]}
    if "teacher_ta" in report["models"]:
        row["assistant_top1"] = report["models"]["teacher_ta"]["top1"]
    return row


def table(rows: list[dict]) -> str:
    ce = next((r["top1"] for r in rows if r["method"] == "ce" and "top1" in r), None)
    lines = ["| method | top-1 % | vs ce (points) | ECE | train s (all its training) |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | |")
            continue
        gain = f"{r['top1'] - ce:+.2f}" if ce is not None else "–"
        extra = f" (assistant {r['assistant_top1']:.2f})" if "assistant_top1" in r else ""
        lines.append(f"| {r['method']}{extra} | {r['top1']:.2f} | {gain} | {r['ece']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/distill_methods"))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--subset", type=int, default=None, help="train images (stratified; default all 50k)")
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--augment", default="crop_flip", choices=["crop_flip", "flip", "none"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--assistant-lr", type=float, default=0.1)
    ap.add_argument("--width", type=float, default=1.0, help="student MobileNetV2 width multiplier")
    ap.add_argument("--assistant-arch", default="resnet18")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if "two-teacher kd" in methods and "assistant chain" in methods:  # the chain trains the second teacher
        methods.remove("two-teacher kd")
        methods.insert(methods.index("assistant chain") + 1, "two-teacher kd")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(m, args, args.out) for m in methods]
    machine = next((r["machine"] for r in rows if "machine" in r), {})
    teacher = next((r["teacher_top1"] for r in rows if "teacher_top1" in r), None)
    md = (f"# Distillation methods side by side\n\nstudent MobileNetV2 x{args.width} (CIFAR stem), teacher ResNet-50 "
          f"({teacher:.2f} %), assistant {args.assistant_arch}; {args.subset or 'all'} train / {args.test_subset or 'all'} "
          f"test images, {args.epochs} epochs, augment {args.augment}, batch {args.batch_size}, lr {args.lr}, seed {args.seed}; "
          f"{machine.get('cpu', '')} ({', '.join(machine.get('isa', []))})\n\n" + table(rows) + "\n")
    (args.out / "distill_methods.md").write_text(md)
    (args.out / "distill_methods.json").write_text(json.dumps(rows, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
