"""How closely does a QAT model compute what its onnxruntime int8 file computes? For a run's
pruned student (the quantize stage's input, with its quantization plan), the QAT model is built
two ways and its file made as the quantize stage makes it, before any training (activation
ranges set on the calibration images):

- `conv inputs`: activations rounded at each conv / linear input only (the simulation before
  quant.sites), the bias on its int32 grid;
- `sites`: every tensor the file rounds (quant.sites), the bias on its int32 grid.

It prints, on the run's test split, each model's top-1, its file's, the mean |logit difference|
relative to the mean |logit| and their top-1 agreement, with onnxruntime's int8 kernels on
(this CPU's; the ISA is printed) and off (Q/DQ as float math: what the simulation models).

    python benchmarks/qat_agreement.py RUN_DIR [RUN_DIR ...]

A run of a timm student needs `edgekd[timm]`; the data come from the run's config.yaml
(EDGEKD_SHARED for the shared datasets).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgekd.bench.machine import machine_info
from edgekd.config import load_pipeline
from edgekd.data import load_data
from edgekd.models import rebuild
from edgekd.onnx_export import run_onnx
from edgekd.quant.plan import Plan
from edgekd.quant.qat_file import build_qat, qat_int8_file
from edgekd.quant.targets import resolve_target
from edgekd.stages.quantize import calibration_images


def measure(run: Path) -> list[dict]:
    cfg, _ = load_pipeline(run / "config.yaml")
    quant = next(s for kind, s in cfg.stage_entries() if kind == "quantize")
    data = load_data(cfg.data, cfg.seed)
    model = rebuild(torch.load(run / "01_prune" / "model.pt", weights_only=True, map_location="cpu")).eval()
    plan = Plan.from_json(json.loads((run / "02_quantize" / "quant_plan.json").read_text())["plan"])
    target = resolve_target(quant.target)
    qopts = dict(target=target, method=quant.calibration.method, per_channel=quant.per_channel,
                 activation_type=quant.activation_type, percentile=quant.calibration.percentile)
    calib = calibration_images(data, quant.calibration.samples, cfg.seed)
    x = data.normalize(data.test.images).float().numpy()
    y = data.test.labels.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for mode in ("conv inputs", "sites"):
            q = build_qat(model, data.image_size, calib, plan, qopts, sites=mode == "sites").model.eval()
            with torch.no_grad():
                ref = q(torch.from_numpy(x)).numpy()
            path = qat_int8_file(q, Path(td) / f"{mode.replace(' ', '_')}.onnx", data.image_size, calib, plan, qopts)
            for kernels in (True, False):
                out = run_onnx(path, x, int8_kernels=kernels)
                rows.append({"run": run.name, "simulation": mode, "int8 kernels": "on" if kernels else "off",
                             "torch top1": round(100 * float((ref.argmax(1) == y).mean()), 2),
                             "file top1": round(100 * float((out.argmax(1) == y).mean()), 2),
                             "rel logit diff": round(float(np.abs(out - ref).mean() / np.abs(ref).mean()), 5),
                             "agreement": round(100 * float((out.argmax(1) == ref.argmax(1)).mean()), 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    m = machine_info()
    print(f"# {m['cpu']}; ISA: {' '.join(m['isa'])}; {torch.get_num_threads()} threads", file=sys.stderr)
    rows = [r for run in args.runs for r in measure(run)]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
