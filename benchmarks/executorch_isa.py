"""ExecuTorch/XNNPACK int8 off the build machine: the same .pte programs run natively and on an
AVX2-only x86 CPU (no AVX-512, no VNNI), on the same test images; top-1 of each and how far the
two runs agree (issue 13). XNNPACK picks its kernels by CPUID at run time, so the AVX2 run
executes the AVX2 int8 kernels whatever this CPU has: with CPUID masked where this CPU can fault
CPUID (native speed), else under qemu-x86_64 -cpu EPYC-Rome (avx2/launch.py).

    python benchmarks/executorch_isa.py OUT_DIR [--images N] [--avx2 auto|mask|qemu]

Needs edgekd[mobile], $EDGEKD_SHARED (the shared CIFAR-10 student and data) and the mask's C
compiler or qemu-user. Emulation is slow (about 100x), so --images defaults to the whole test
split with the mask and to 500 images under qemu."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from avx2.launch import avx2_prefix


def run_programs(files: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    from edgekd.pte_export import pte_runner

    return {Path(f).stem: pte_runner(Path(f), 1)(x) for f in files}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--images", type=int, help="test images (default: all with the mask, 500 under qemu)")
    ap.add_argument("--avx2", default="auto", choices=("auto", "mask", "qemu"), help="how to run the AVX2-only CPU")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)  # on the AVX2-only CPU: run these programs
    args = ap.parse_args()
    out = Path(args.out)
    if args.child is not None:
        x = np.load(out / "x.npy")
        for name, logits in run_programs(args.child, x).items():
            np.save(out / f"{name}.avx2.npy", logits)
        from edgekd.bench.machine import int8_class, machine_info

        m = machine_info()
        print(int8_class(m["isa"], m["arch"]))  # the CPU class this child saw, for the table's header
        return 0
    avx2 = avx2_prefix(args.avx2)
    if avx2 is None:
        print("no AVX2-only CPU here: no CPUID faulting or C compiler, and no qemu-x86_64 (apt install qemu-user)",
              file=sys.stderr)
        return 2
    way, prefix, how = avx2
    images = args.images or (10000 if way == "mask" else 500)
    import torch

    from edgekd.bench.machine import int8_class, machine_info
    from edgekd.data import load_data
    from edgekd.models import load_model
    from edgekd.pte_export import export_pte
    from edgekd.schema import DataConfig, ModelConfig

    shared = Path(os.environ.get("EDGEKD_SHARED", "../shared"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(DataConfig(source=str(shared / "data/cifar10-jpg.tar.gz"), test_subset=images if images < 10000 else None,
                                            subset=2000), 0)
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
    proc = subprocess.run([*prefix, str(Path(sys.executable).resolve()), __file__, str(out), "--child", *map(str, files)],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    me = machine_info()
    print(f"native: {int8_class(me['isa'], me['arch'])}; other: {proc.stdout.splitlines()[-1]}, {how}; "
          f"{len(y)} CIFAR-10 test images, shared MobileNetV2 (PyTorch top-1 {100 * (ref.argmax(1) == y).mean():.2f})")
    print("| program | top-1 native | top-1 AVX2-only | top-1 agreement | max abs logit diff |")
    print("|---|---|---|---|---|")
    for f in files:
        a, b = native[f.stem], np.load(out / f"{f.stem}.avx2.npy")
        print(f"| {f.name} | {100 * (a.argmax(1) == y).mean():.2f} | {100 * (b.argmax(1) == y).mean():.2f} | "
              f"{100 * (a.argmax(1) == b.argmax(1)).mean():.2f} | {np.abs(a - b).max():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
