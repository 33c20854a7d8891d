"""Training throughput of edgekd's distill loop vs a plain hand-written PyTorch KD loop.

Both train the same student on the same pre-decoded uint8 tensors with the same batch size,
augmentation (flip), optimizer and cached teacher logits, and evaluate once at the end;
only the loop differs (edgekd adds per-epoch atomic checkpoints, the progress bar, metrics).
Prints images/s of each (best of 2, alternated) and the ratio (framework overhead).

    python benchmarks/distill_throughput.py [--images 2048] [--epochs 2] [--width 0.5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from edgekd.schema import DataConfig
from edgekd.data import Data, Split, augment_batch
from edgekd.distill import Objective, Outputs
from edgekd.models import build
from edgekd.train import TrainConfig, fit


class Table:
    """Cached teacher logits for both flips, as edgekd's TeacherSource holds them."""

    def __init__(self, table):
        self.table = table
        self.teacher = None  # no live model behind a table (fit switches live teachers' layout)

    def __call__(self, x, idx, flip):
        return Outputs(self.table[flip.long(), idx])


def plain_loop(model, data, table, epochs, bs, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    model.train()
    n = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(data.train), generator=gen)
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            x, flip = augment_batch(data.train.images[idx], "flip", gen)
            x = (x.float() / 255 - mean) / std
            y = data.train.labels[idx]
            t = table[flip.long(), idx]
            out = model(x)
            kd = F.kl_div(F.log_softmax(out / 4, 1), F.log_softmax(t / 4, 1), reduction="batchmean", log_target=True) * 16
            loss = 0.9 * kd + 0.1 * F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(idx)
    model.eval()  # edgekd's fit evaluates once at the end (eval_every=0): do the same work here
    with torch.no_grad():
        for s in range(0, len(data.test), 256):
            model((data.test.images[s : s + 256].float() / 255 - mean) / std).argmax(1)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    cfg = DataConfig(source="synthetic")
    split = Split(images, labels, [str(i) for i in range(10)], "synthetic")
    data = Data(split, split, None, cfg.mean, cfg.std, "flip", args.batch, 256)
    table = torch.randn(2, args.images, 10, generator=g)
    student = build({"arch": "mobilenet_v2", "num_classes": 10, "cifar_stem": True, "width_mult": args.width})
    tcfg = TrainConfig(epochs=args.epochs, loss="kd", lr=0.05, schedule="constant", eval_every=0)
    results = {"edgekd": [], "plain": []}
    for _ in range(2):  # alternate to spread machine noise over both
        m = copy.deepcopy(student)
        t0 = time.perf_counter()
        terms = [t.model_copy(update={"teacher": "t"}) if hasattr(t, "teacher") else t for t in tcfg.terms()]
        fit(m, data, tcfg, torch.device("cpu"), seed=0, objective=Objective(terms, lambda name, features: Table(table)))
        results["edgekd"].append(args.images * args.epochs / (time.perf_counter() - t0))
        results["plain"].append(plain_loop(copy.deepcopy(student), data, table, args.epochs, args.batch, 0.05))
    e, p = max(results["edgekd"]), max(results["plain"])
    print(f"threads={torch.get_num_threads()} images={args.images} epochs={args.epochs} width={args.width} batch={args.batch}")
    print(f"edgekd distill loop: {e:.1f} img/s   plain loop: {p:.1f} img/s   ratio edgekd/plain = {e / p:.3f}")


if __name__ == "__main__":
    main()
