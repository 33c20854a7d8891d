"""Post-training int8 side by side on one fp32 file: onnxruntime's `quantize_static` with its
defaults, NNCF's `nncf.quantize` with its defaults, edgekd's every-op recipe (`plan: int8`) and
the file edgekd's measured plan (`plan: auto`) chose, all calibrated on the same images. Top-1 on
the run's test split and p50 latency (1 thread, batch 1, interleaved rounds) on onnxruntime and
OpenVINO.

    python benchmarks/ptq_peers.py RUN_DIR [--out runs/ptq_peers]

RUN_DIR is a finished `edgekd run` with a quantize stage (its student_fp32.onnx, int8_ptq.onnx,
config and data are used). Needs `pip install nncf` for the NNCF row (left out otherwise)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/ptq_peers"))
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()

    import yaml

    from edgekd.bench.machine import int8_class, machine_info
    from edgekd.bench.measure import round_ratio, time_interleaved
    from edgekd.bench.runtimes import RUNTIMES
    from edgekd.config import validate
    from edgekd.data import load_data
    from edgekd.onnx_export import run_onnx
    from edgekd.quant.plan import load_graph, rule_plan
    from edgekd.quant.ptq import _Reader, quantize_onnx
    from edgekd.quant.targets import resolve_target
    from edgekd.stages.quantize import calibration_images

    manifest = json.loads((args.run / "manifest.json").read_text())
    qdir = args.run / next(s["dir"] for s in manifest["stages"] if s["name"] == "quantize")
    cfg = validate(yaml.safe_load((args.run / "config.yaml").read_text()))
    qcfg = next(c for name, c in cfg._validated.values() if name == "quantize")
    data = load_data(cfg.data, cfg.seed)
    calib = calibration_images(data, qcfg.calibration.samples, cfg.seed)
    x, y = data.normalize(data.test.images[:]).numpy(), data.test.labels.numpy()
    fp32 = qdir / "student_fp32.onnx"
    args.out.mkdir(parents=True, exist_ok=True)
    plan_record = json.loads((qdir / "quant_plan.json").read_text())

    files = {"fp32": fp32}
    with tempfile.TemporaryDirectory() as td:
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(td) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        files["onnxruntime quantize_static defaults"] = args.out / "ort_defaults.onnx"
        quantize_static(str(pre), str(files["onnxruntime quantize_static defaults"]), _Reader(calib, "input"))
    try:
        import nncf
        import onnx

        batches = [calib[i : i + 1] for i in range(len(calib))]
        q = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset(batches, lambda b: {"input": b}), subset_size=len(batches))
        files["NNCF nncf.quantize defaults"] = args.out / "nncf_defaults.onnx"
        onnx.save(q, str(files["NNCF nncf.quantize defaults"]))
    except ImportError:
        print("nncf is not installed: its row is left out (pip install nncf)", file=sys.stderr)
    target = resolve_target(qcfg.target)
    files["edgekd plan: int8"] = quantize_onnx(fp32, args.out / "edgekd_int8.onnx", calib, target=target,
                                               plan=rule_plan(load_graph(fp32), qcfg.keep_first_conv_fp32, qcfg.keep_fp32))
    files[f"edgekd plan: auto ({plan_record['chosen']})"] = qdir / "int8_ptq.onnx"

    rows = {k: {"size_bytes": p.stat().st_size, "top1": round(100 * float((run_onnx(p, x).argmax(1) == y).mean()), 2)}
            for k, p in files.items()}
    x1 = calib[:1]
    for rt_name in ("onnxruntime", "openvino"):
        rt_cls = RUNTIMES.get(rt_name)
        if rt_cls.available():
            continue
        rt = rt_cls()
        timed = time_interleaved({k: rt.load(p, 1) for k, p in files.items()}, x1, 20, args.runs, 10)
        for k in files:
            rows[k][f"{rt_name}_p50_ms"] = timed[k]["p50_ms"]
            rows[k][f"{rt_name}_vs_fp32"] = round_ratio(timed["fp32"], timed[k])
    m = machine_info()
    out = {"run": str(args.run), "cpu": m.get("cpu"), "int8_class": int8_class(m["isa"], m["arch"]),
           "test_images": int(len(y)), "calibration_images": int(len(calib)), "rows": rows}
    (args.out / "ptq_peers.json").write_text(json.dumps(out, indent=1))
    cols = ["top1", "size_bytes", "onnxruntime_p50_ms", "onnxruntime_vs_fp32", "openvino_p50_ms", "openvino_vs_fp32"]
    print(f"{out['int8_class']} ({out['cpu']}), {out['test_images']} test images, 1 thread, batch 1")
    print("| file | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for k, r in rows.items():
        print(f"| {k} | " + " | ".join(str(r.get(c, "–")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
