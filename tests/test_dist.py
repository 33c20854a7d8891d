"""Data-parallel training under torchrun (edgekd.dist), two CPU processes over gloo: rank 0 runs
the pipeline and writes every file, both ranks train each job on their shard of every batch,
the result follows a single-process run with the same global batch, and a rank that dies ends
the run with one line instead of a hang."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import _make_image_folder

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks in /proc")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    src = _make_image_folder(d / "ds", size=16, train_counts={"ant": 24, "moose": 24, "zebra": 16},
                             test_counts={"ant": 8, "moose": 8, "zebra": 8})
    pipe = {"name": "ddp", "seed": 0, "device": "cpu", "threads": 1, "output_dir": str(d / "runs"),
            "data": {"source": str(src), "image_size": 16, "augment": "none", "batch_size": 8, "eval_batch_size": 16},
            "teacher": {"arch": "resnet18", "cifar_stem": True},
            "student": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.25},
            "stages": [{"distill": {"epochs": 2, "loss": "kd", "lr": 0.02, "cache_teacher": False}},
                       {"prune": {"target_macs": 0.6, "importance": "l2", "iterative_steps": 1, "round_to": 4,
                                  "finetune": {"epochs": 1, "loss": "kd", "lr": 0.01}}},
                       {"quantize": {"method": "qat", "plan": "int8", "calibration": {"samples": 16},
                                     "qat": {"epochs": 1, "loss": "kd", "lr": 0.001}}}]}
    (d / "p.yaml").write_text(yaml.safe_dump(pipe))
    return d


def _env(work) -> dict:
    return {**os.environ, "EDGEKD_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}


def _torchrun(work, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_port()}", "-m", "edgekd", "run", str(work / "p.yaml"), *args]


def _histories(run: Path) -> list[list[float]]:
    report = json.loads((run / "report.json").read_text())
    return [[h["loss"] for h in s["history"]] for s in report["stages"] if s.get("history")]


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def test_two_ranks_train_like_one_process_with_the_same_global_batch_and_write_one_run(work):
    one = subprocess.run([sys.executable, "-m", "edgekd", "run", str(work / "p.yaml"), "--out", str(work / "runs/one")],
                         env=_env(work), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(_torchrun(work, "--out", str(work / "runs/two")), env=_env(work), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["one", "two"]  # rank 1 made no run of its own
    assert _files(work / "runs/two") == _files(work / "runs/one")
    assert json.loads((work / "runs/two/manifest.json").read_text())["ranks"] == 2
    a, b = _histories(work / "runs/one"), _histories(work / "runs/two")
    assert [len(h) for h in a] == [len(h) for h in b] == [2, 1, 1]  # distill, prune fine-tune, QAT
    for la, lb in zip(sum(a, []), sum(b, [])):  # each rank normalises with BatchNorm statistics of half the batch
        assert abs(la - lb) <= 0.1 * la, (a, b)
    assert two.stdout.count("report:") == 1 and "rank 1" not in two.stderr


@linux_only
def test_a_rank_that_dies_ends_the_run_with_one_line(work):
    proc = subprocess.Popen(_torchrun(work, "--out", str(work / "runs/killed"), "--set", "distill.epochs=400"),
                            env=_env(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rank1 = None
        deadline = time.time() + 300
        while rank1 is None and time.time() < deadline:
            time.sleep(1)
            # the first epoch's state is written: both ranks are inside training, not still setting up
            if (work / "runs/killed/00_distill/train_state.pt").exists():
                rank1 = _rank_pid(1)
        assert rank1 is not None, "rank 1 never finished an epoch"
        os.kill(rank1, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)  # a hang fails here
    finally:
        proc.kill()
    assert proc.returncode != 0
    # rank 0's collective notices the lost peer, or torchrun's SIGTERM to the survivors comes first
    line = r"rank 0/2: (lost another rank|stopped) while training distill"
    assert re.search(rf"edgekd: error: {line}", err), err[-3000:]
    manifest = json.loads((work / "runs/killed/manifest.json").read_text())
    assert manifest["status"] == "failed" and re.search(line, manifest["error"])


def test_torchruns_sigterm_ends_a_rank_with_one_line_naming_what_it_was_doing(monkeypatch):
    """The SIGTERM handler a rank installs in a group (dist._stopped), called as Python would
    call it inside a collective: the same one-line error as a lost peer, through the usual path."""
    from edgekd import dist
    from edgekd.errors import EdgekdError

    monkeypatch.setattr(dist, "world", lambda: dist.World(0, 2))

    def training():
        dist._stopped(signal.SIGTERM, None)

    before = signal.signal(signal.SIGTERM, dist._stopped)
    try:
        with pytest.raises(EdgekdError, match=r"^rank 0/2: stopped while training distill\[kd\]: torchrun ended the group"):
            dist.collective(training, "training distill[kd]")
        # torchrun's next SIGTERM must not cut short the recording of this failure (the manifest)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    assert dist._doing == []


def _rank_pid(rank: int) -> int | None:
    """The pid of the edgekd process torchrun started as `rank` under this test."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"edgekd" in cmd and b"torch.distributed.run" not in cmd:
            return int(p.name)
    return None


def _shared_work(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group (or, with port 0, a single process): BatchNorm
    re-estimation, its check, a teacher's logit table and an evaluation, each split over the ranks."""
    import torch

    from edgekd.bn import bn_gap, recalibrate_bn
    from edgekd.data import Data, Split
    from edgekd.distill.teachers import TeacherSource
    from edgekd.inference import predict
    from edgekd.models import build

    if port:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (150, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(150) % 3,
                  ["a", "b", "c"], "shares")
    data = Data(split, split, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "flip", 16, 32)  # 5 batches: 3 + 2
    torch.manual_seed(0)
    model = build({"arch": "mobilenet_v2", "num_classes": 3, "cifar_stem": True, "width_mult": 0.25})
    cpu = torch.device("cpu")
    recalibrate_bn(model, data, cpu, 150, 1, together=True)
    gap = bn_gap(model, data, cpu, 150, 2, together=True)
    teacher = build({"arch": "resnet18", "num_classes": 3, "cifar_stem": True}).eval()
    table = TeacherSource(teacher, data, cpu, False, None, None).logit_table(2, together=True)
    logits = predict(model, data, split, cpu, together=True)
    if rank == 0:
        stats = {k: v for k, v in model.state_dict().items() if "running" in k}
        torch.save({"stats": stats, "gap": gap, "table": table, "logits": torch.from_numpy(logits)}, out)
    if port:
        torch.distributed.destroy_process_group()


def test_ranks_split_bn_statistics_teacher_logits_and_evaluation_as_one_process_computes_them(tmp_path):
    """Each rank takes every other batch (or image) and the shares are summed: the result is
    the single-process one up to float rounding (different batch shapes in the kernels)."""
    import torch
    import torch.multiprocessing as mp

    _shared_work(0, 0, str(tmp_path / "one.pt"))
    mp.spawn(_shared_work, args=(_port(), str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["gap"].keys() == two["gap"].keys()
    for k, v in one["gap"].items():  # top-1 counts exactly; logit scales up to float rounding
        assert v == (two["gap"][k] if k.endswith("top1") else pytest.approx(two["gap"][k], rel=1e-4)), k
    assert one["stats"].keys() == two["stats"].keys()
    for k, v in one["stats"].items():
        assert torch.allclose(v.double(), two["stats"][k].double(), rtol=1e-4, atol=1e-5), k
    scale = float(one["table"].abs().max())
    assert one["table"].shape == (2, 150, 3) and (one["table"] != 0).all()
    assert torch.allclose(one["table"], two["table"], atol=1e-4 * scale, rtol=0)
    scale = float(one["logits"].abs().max())
    assert one["logits"].shape == (150, 3) and (one["logits"] != 0).all()  # rank 0 holds every image's
    assert torch.allclose(one["logits"], two["logits"], atol=1e-4 * scale, rtol=0)
