"""Do the int8 files compute the same thing on every x86 CPU? The shared student quantized
with each target (and with the stem conv int8 or fp32), PTQ and a short QAT, each file's
top-1 on the test split and its top-1 agreement with the reference Q/DQ math (what the
fake-quant model computes), run by onnxruntime's int8 kernels on this CPU and, under
qemu-x86_64 emulating an AVX2-only EPYC (Rome), on AVX2's kernels.

    python benchmarks/portable_int8.py [--test-images 10000] [--emulated-images 1000] [--qat-images 5000]

Needs ../shared (EDGEKD_SHARED) and, for the AVX2 column, Debian's qemu-user. Emulation is
about 100x slower than native (TCG), so the AVX2 column runs on the first
`--emulated-images` test images, with the reference math on the same images beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = """
import sys, json, numpy as np
sys.path.insert(0, {repo!r})
from edgekd.bench.machine import int8_class, machine_info
from edgekd.onnx_export import run_onnx
x = np.load({x!r}, mmap_mode="r")
m = machine_info()
out = {{"cpu": int8_class(m["isa"], m["arch"])}}
for p in {files!r}:
    np.save(p + ".{tag}.npy", run_onnx(p, np.ascontiguousarray(x), batch=500, threads=1))
print(json.dumps(out))
"""


def run_files(files: list[str], x_path: str, tag: str, emulate: bool) -> str:
    """Logits of every file (saved beside it as <file>.<tag>.npy), natively or on an emulated AVX2 CPU."""
    repo = str(Path(__file__).resolve().parents[1])
    code = CHILD.format(repo=repo, x=x_path, files=files, tag=tag)
    cmd = [str(Path(sys.executable).resolve()), "-c", code]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", "EPYC-Rome"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["cpu"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--emulated-images", type=int, default=1000)
    ap.add_argument("--qat-images", type=int, default=5000)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/portable_int8"))
    args = ap.parse_args()

    import torch

    from edgekd.schema import DataConfig, ModelConfig
    from edgekd.data import load_data
    from edgekd.models import load_model
    from edgekd.onnx_export import export_onnx, run_onnx
    from edgekd.quant.ptq import quantize_onnx
    from edgekd.quant.plan import load_graph, rule_plan
    from edgekd.quant.qat import apply_transform, qat_transform, snap_weights
    from edgekd.quant.targets import TARGETS
    from edgekd.stages.quantize import calibration_images
    from edgekd.train import TrainConfig, fit

    shared = Path(os.environ.get("EDGEKD_SHARED", "../shared"))
    torch.set_num_threads(2)
    data = load_data(DataConfig(source=str(shared / "data/cifar10-jpg.tar.gz"), subset=args.qat_images,
                                test_subset=args.test_images if args.test_images < 10000 else None,
                                augment="flip", batch_size=128), seed=0)
    model, _ = load_model(ModelConfig(arch="mobilenet_v2", cifar_stem=True,
                                      checkpoint=str(shared / "models/mobilenet_v2_cifar10.pt")), 10, "student")
    model.eval()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    x = data.normalize(data.test.images).numpy()
    y = data.test.labels.numpy()
    np.save(out / "x.npy", x)
    ne = min(args.emulated_images, len(y))
    np.save(out / "x_emulated.npy", x[:ne])
    calib = calibration_images(data, 500, 0)
    fp32 = export_onnx(copy.deepcopy(model), out / "fp32.onnx", 32)
    files, fake_quant = {}, {}
    stem_fp32 = rule_plan(load_graph(fp32), True, [])
    for target in ("portable", "x86_vnni"):
        t = TARGETS[target]
        for stem in ("fp32", "int8"):
            files[f"ptq {target} stem-{stem}"] = quantize_onnx(fp32, out / f"ptq_{target}_stem{stem}.onnx", calib,
                                                                target=t, keep_first_conv_fp32=stem == "fp32")
        q = apply_transform(apply_transform(copy.deepcopy(model), "fold_bn"), qat_transform(t.weight_qmax, stem_fp32))
        with torch.no_grad():
            q.train()
            for i in range(0, len(calib), 64):
                q(torch.from_numpy(calib[i : i + 64]))
        fit(q, data, TrainConfig(epochs=args.qat_epochs, loss="ce", lr=0.0005, schedule="cosine", eval_every=0),
            torch.device("cpu"), seed=0, desc=f"qat[{target}]")
        q.eval()
        with torch.no_grad():
            fake_quant[f"qat {target} stem-fp32"] = np.concatenate([q(torch.from_numpy(x[i : i + 500])).numpy()
                                                                     for i in range(0, len(x), 500)])
        snapped = export_onnx(snap_weights(copy.deepcopy(q)), out / f"qat_{target}_float.onnx", 32)
        files[f"qat {target} stem-fp32"] = quantize_onnx(snapped, out / f"qat_{target}_stemfp32.onnx", calib, target=t,
                                                          keep_first_conv_fp32=True)
    paths = [str(p) for p in files.values()]
    native = run_files(paths, str(out / "x.npy"), "native", emulate=False)
    emulated = None
    if shutil.which("qemu-x86_64"):
        print("running the int8 files on an emulated AVX2-only CPU (qemu; minutes per file) ...", flush=True)
        emulated = run_files(paths, str(out / "x_emulated.npy"), "avx2", emulate=True)
    fp32_top1 = 100 * float((run_onnx(fp32, x).argmax(1) == y).mean())
    rows = []
    for name, p in files.items():
        ref = run_onnx(p, x, int8_kernels=False)  # reference Q/DQ math: what the fake-quant model computes
        row = {"file": name, "reference_top1": 100 * float((ref.argmax(1) == y).mean())}
        if name in fake_quant:
            row["torch_fake_quant_top1"] = 100 * float((fake_quant[name].argmax(1) == y).mean())
        row["reference_top1_emulated_images"] = 100 * float((ref[:ne].argmax(1) == y[:ne]).mean())
        for tag in ("native", "avx2"):
            f = Path(f"{p}.{tag}.npy")
            if f.exists():
                z = np.load(f)
                k = len(z)
                row[f"{tag}_top1"] = 100 * float((z.argmax(1) == y[:k]).mean())
                row[f"{tag}_agreement"] = 100 * float((z.argmax(1) == ref[:k].argmax(1)).mean())
                row[f"{tag}_max_abs_diff"] = float(np.abs(z - ref[:k]).max())
        rows.append(row)
    result = {"fp32_top1": fp32_top1, "test_images": int(len(y)), "emulated_images": ne, "native_cpu": native,
              "emulated_cpu": emulated, "rows": rows}
    (out / "portable_int8.json").write_text(json.dumps(result, indent=2))
    lines = [f"fp32 student (onnxruntime): {fp32_top1:.2f} % on {len(y)} test images; top-1 % / top-1 agreement % with "
             f"the reference Q/DQ math", "",
             f"| file | reference math, {len(y)} images | {native}, {len(y)} | QAT fake-quant (torch) | reference math, "
             f"first {ne} | AVX2 without VNNI (qemu), first {ne} |", "|---|---|---|---|---|---|"]
    for r in rows:
        avx = f"{r['avx2_top1']:.2f} / {r['avx2_agreement']:.2f}" if "avx2_top1" in r else "–"
        fq = f"{r['torch_fake_quant_top1']:.2f}" if "torch_fake_quant_top1" in r else "–"
        lines.append(f"| {r['file']} | {r['reference_top1']:.2f} | {r['native_top1']:.2f} / {r['native_agreement']:.2f} | "
                     f"{fq} | {r['reference_top1_emulated_images']:.2f} | {avx} |")
    print("\n".join(lines))
    (out / "portable_int8.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
