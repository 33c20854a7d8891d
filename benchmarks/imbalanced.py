"""A train split whose classes differ in size, trained uniformly and with data.sampling: balanced.

Builds CIFAR-10-LT (Cao et al. 2019's long tail: class i keeps n_max * ratio^(-i/9) images, so the
largest class has `ratio` times the smallest) from the shared CIFAR-10 archive as an ImageFolder,
with a class-balanced test folder, then runs the same distill stage (KD from the shared ResNet-50
teacher, with the CE baseline beside it) once per sampling. Prints and writes a markdown table of
top-1, macro-F1 and the recall of the three smallest classes, for KD and CE.

    python benchmarks/imbalanced.py [--out runs/imbalanced] [--n-max 500] [--ratio 10] [--epochs 10]

Needs $EDGEKD_SHARED (default ../shared). Runs resume if their folders exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tarfile
from pathlib import Path

from edgekd.metrics import gain_over

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def build(archive: Path, root: Path, n_max: int, ratio: float, test_per_class: int) -> dict[str, int]:
    """The long-tailed train folder and a balanced test folder under `root` (once; the first
    images of each class in the archive's order)."""
    keep = {"train": {c: round(n_max * ratio ** (-i / (len(CLASSES) - 1))) for i, c in enumerate(CLASSES)},
            "test": dict.fromkeys(CLASSES, test_per_class)}
    done = root / ".complete"
    if not done.exists():
        taken = {split: dict.fromkeys(CLASSES, 0) for split in keep}
        with tarfile.open(archive) as tar:
            for m in tar:
                parts = Path(m.name).parts  # cifar10/<split>/<class>/<file>
                if not m.isfile() or len(parts) != 4 or parts[1] not in keep or parts[2] not in CLASSES:
                    continue
                split, cls = parts[1], parts[2]
                if taken[split][cls] < keep[split][cls]:
                    dest = root / split / cls / parts[3]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tar.extractfile(m).read())
                    taken[split][cls] += 1
        done.touch()
    return keep["train"]


def pipeline(root: Path, epochs: int, shared: str) -> str:
    return f"""name: imbalanced
seed: 0
data: {{source: {root}, num_classes: 10, augment: flip, batch_size: 64}}
teacher: {{arch: resnet50, cifar_stem: true, checkpoint: {shared}/models/resnet50_cifar10.pt}}
student: {{arch: mobilenet_v2, cifar_stem: true, width_mult: 0.5}}
stages:
  - distill: {{epochs: {epochs}, loss: kd, temperature: 4.0, alpha: 0.9, lr: 0.05, compare_baseline: true}}
"""


def figures(m: dict, small: list[str]) -> tuple[float, float, float]:
    recall = [m["per_class"][c]["recall"] for c in small]
    return m["top1"], 100 * m["macro_f1"], 100 * sum(recall) / len(recall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/imbalanced")
    ap.add_argument("--n-max", type=int, default=500)
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    shared = os.environ.get("EDGEKD_SHARED", "../shared")
    out = Path(args.out).resolve()
    counts = build(Path(shared) / "data/cifar10-jpg.tar.gz", out / "data", args.n_max, args.ratio, args.test_per_class)
    small = sorted(counts, key=counts.get)[:3]
    yaml = out / "imbalanced.yaml"
    yaml.write_text(pipeline(out / "data", args.epochs, shared))
    reports, preds = {}, {}
    for sampling in ("uniform", "balanced"):
        run_dir = out / sampling
        resume = (run_dir / "manifest.json").exists()
        cmd = ["edgekd", "run", str(yaml), "--resume" if resume else "--out", str(run_dir), "--set", f"data.sampling={sampling}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        reports[sampling] = json.loads((run_dir / "report.json").read_text())["models"]
        preds[sampling] = json.loads((run_dir / "predictions.json").read_text())
    lines = [f"CIFAR-10-LT: {sum(counts.values())} train images, {max(counts.values())} to {min(counts.values())} a class "
             f"(ratio {args.ratio:g}); balanced test, {args.test_per_class} a class; {args.epochs} epochs", "",
             f"| student | sampling | top-1 % | macro-F1 x100 | recall of the 3 smallest classes ({', '.join(small)}) % "
             "| top-1 vs uniform (McNemar) |", "|---|---|---|---|---|---|"]
    for key, label in (("student_distilled", "kd"), ("student_ce_baseline", "ce")):
        for sampling, models in reports.items():
            top1, f1, rec = figures(models[key], small)
            g = gain_over(preds["uniform"]["models"][key], preds[sampling]["models"][key], preds[sampling]["labels"])
            vs = "" if sampling == "uniform" else f"{g['points']:+.1f} (p = {g['p']:.2g}: {g['better']} better, {g['worse']} worse)"
            lines.append(f"| {label} | {sampling} | {top1:.1f} | {f1:.1f} | {rec:.1f} | {vs} |")
    md = "\n".join(lines)
    print(md)
    (out / "imbalanced.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
