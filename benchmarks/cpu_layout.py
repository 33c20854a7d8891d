"""Forward and training speed on the CPU by memory layout and runtime (edgekd.inference).

A/B in one process, interleaved rounds (the order rotates each round), medians after warm-up,
threads pinned and printed with the ISA:

- the teacher's forward (ResNet-50, CIFAR stem, batch 256): PyTorch NCHW, PyTorch channels_last,
  onnxruntime (what edgekd.inference.frozen_forward runs for teacher tables and figures);
- a student training step (MobileNetV2 x0.5, CIFAR stem, batch 64, SGD) and its evaluation
  forward (batch 256): NCHW vs channels_last (what train.fit and predict use on a CPU);
- with --bf16, the same under bf16 autocast (channels_last): what a CPU with AMX-BF16 (Intel
  Sapphire Rapids and later) or AVX-512 BF16 would gain if the loop trained and the teacher ran
  in bf16 there, as it does on a GPU.

Random weights: speed only.

    python benchmarks/cpu_layout.py --size 32 --threads 2 [--bf16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast (channels_last)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from edgekd.bench.machine import machine_info
    from edgekd.inference import _ort_forward
    from edgekd.models import build

    cl = torch.channels_last
    s = args.size
    teacher = build({"arch": "resnet50", "num_classes": 10, "cifar_stem": True}).eval()
    student = build({"arch": "mobilenet_v2", "num_classes": 10, "cifar_stem": True, "width_mult": 0.5})
    xt = torch.randn(256, 3, s, s)
    ort = _ort_forward(teacher, xt[:8])
    assert ort is not None, "onnxruntime did not take the teacher"
    teacher_cl = copy.deepcopy(teacher).to(memory_format=cl)

    def infer(m, x, bf16=False):
        def f():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                m(x)
        return f

    def train_step(layout, bf16=False):
        m = copy.deepcopy(student).train().to(memory_format=layout)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(64, 3, s, s).contiguous(memory_format=layout), torch.randint(0, 10, (64,))

        def f():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
        return f

    cases = {
        "teacher forward, PyTorch NCHW": infer(teacher, xt),
        "teacher forward, PyTorch channels_last": infer(teacher_cl, xt),
        "teacher forward, onnxruntime": lambda: ort(xt),
        "student train step, NCHW": train_step(torch.contiguous_format),
        "student train step, channels_last": train_step(cl),
        "student eval forward, NCHW": infer(copy.deepcopy(student).eval(), xt),
        "student eval forward, channels_last": infer(copy.deepcopy(student).eval().to(memory_format=cl), xt),
    }
    if args.bf16:
        xt_cl = xt.contiguous(memory_format=cl)
        cases.update({
            "teacher forward, PyTorch channels_last, bf16 autocast": infer(teacher_cl, xt_cl, bf16=True),
            "student train step, channels_last, bf16 autocast": train_step(cl, bf16=True),
            "student eval forward, channels_last, bf16 autocast":
                infer(copy.deepcopy(student).eval().to(memory_format=cl), xt_cl, bf16=True),
        })
    batch = {k: (64 if "train" in k else 256) for k in cases}
    for f in cases.values():  # warm-up
        f()
        f()
    times = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t)
    info = machine_info()
    print(f"# {info.get('cpu')}, {info.get('isa')}, torch {torch.__version__}, {args.threads} threads, {s} px")
    print("| case | ms per batch (median) | images/s |")
    print("|---|---|---|")
    for k in names:
        med = statistics.median(times[k])
        print(f"| {k} | {1000 * med:.1f} | {batch[k] / med:.0f} |")


if __name__ == "__main__":
    main()
