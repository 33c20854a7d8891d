"""ExecuTorch/XNNPACK int8 off the build machine: the same .pte programs run natively and on an
emulated AVX2-only x86 CPU (qemu-x86_64 -cpu EPYC-Rome: no AVX-512, no VNNI), on the same test
images; top-1 of each and how far the two runs agree (issue 13). XNNPACK picks its kernels by
CPUID at run time, so the emulated run executes the AVX2 int8 kernels whatever this CPU has.

    python benchmarks/executorch_isa.py OUT_DIR [--images 500]

Needs edgekd[mobile], qemu-user and $EDGEKD_SHARED (the shared CIFAR-10 student and data).
Emulation is slow (about 100x): a few hundred 32 px images take a few minutes."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

EMULATED_CPU = "EPYC-Rome"  # Zen 2: AVX2 and FMA, no AVX-512, no VNNI


def run_programs(files: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    from edgekd.pte_export import pte_runner

    return {Path(f).stem: pte_runner(Path(f), 1)(x) for f in files}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)  # under qemu: run these programs
    args = ap.parse_args()
    out = Path(args.out)
    if args.child is not None:
        x = np.load(out / "x.npy")
        for name, logits in run_programs(args.child, x).items():
            np.save(out / f"{name}.emulated.npy", logits)
        return 0
    import torch

    from edgekd.bench.machine import machine_info
    from edgekd.data import load_data
    from edgekd.models import load_model
    from edgekd.pte_export import export_pte
    from edgekd.schema import DataConfig, ModelConfig

    shared = Path(os.environ.get("EDGEKD_SHARED", "../shared"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(DataConfig(source=str(shared / "data/cifar10-jpg.tar.gz"), test_subset=args.images, subset=2000), 0)
    model, _ = load_model(ModelConfig(arch="mobilenet_v2", cifar_stem=True,
                                      checkpoint=str(shared / "models/mobilenet_v2_cifar10.pt")), 10, "student")
    model.eval()
    x = data.normalize(data.test.images[:]).numpy()
    y = data.test.labels.numpy()
    np.save(out / "x.npy", x)
    calib = data.normalize(data.train.sample(256).images[:]).numpy()
    files = [export_pte(model, out / "fp32.pte", 32), export_pte(model, out / "int8.pte", 32, calib),
             export_pte(model, out / "int8_stem_fp32.pte", 32, calib, keep_fp32=["features.0"])]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    native = run_programs([str(f) for f in files], x)
    if not shutil.which("qemu-x86_64"):
        print("qemu-x86_64 not found (Debian: apt install qemu-user)", file=sys.stderr)
        return 2
    proc = subprocess.run(["qemu-x86_64", "-cpu", EMULATED_CPU, str(Path(sys.executable).resolve()), __file__, str(out),
                           "--child", *map(str, files)], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"native: {machine_info()['isa'][-4:]} ...; emulated: qemu {EMULATED_CPU} (AVX2, no AVX-512/VNNI); "
          f"{len(y)} CIFAR-10 test images, shared MobileNetV2 (PyTorch top-1 {100 * (ref.argmax(1) == y).mean():.2f})")
    print("| program | top-1 native | top-1 emulated AVX2 | top-1 agreement | max abs logit diff |")
    print("|---|---|---|---|---|")
    for f in files:
        a, b = native[f.stem], np.load(out / f"{f.stem}.emulated.npy")
        print(f"| {f.name} | {100 * (a.argmax(1) == y).mean():.2f} | {100 * (b.argmax(1) == y).mean():.2f} | "
              f"{100 * (a.argmax(1) == b.argmax(1)).mean():.2f} | {np.abs(a - b).max():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
