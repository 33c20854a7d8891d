"""The distill stage's teacher-free baseline trained in a child process beside the distillation
run on a CPU (edgekd/beside.py): the same weights as training it here on the same threads, only
where it pays, and a failure on either side is one line with no process left behind."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgekd.beside import BaselineBeside, pays
from edgekd.cli import main
from edgekd.errors import EdgekdError
from edgekd.inference import predict
from edgekd.train import TrainConfig, fit

CE = TrainConfig(epochs=2, loss="ce", lr=0.05, eval_every=1)


def _timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in ("seconds", "images_per_s")} for rec in history]


def test_the_baseline_trained_beside_is_the_one_trained_here_on_the_same_threads(tiny, tmp_path):
    model, data = tiny
    here, there = copy.deepcopy(model), copy.deepcopy(model)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    want = fit(here, data, CE, torch.device("cpu"), seed=0)

    torch.set_num_threads(2)
    beside = BaselineBeside(there, data, CE, 0, tmp_path / "baseline_state.pt", "baseline[ce]")
    with beside:
        assert torch.get_num_threads() == 1  # the other thread is the child's
        assert beside._conn.poll(300)  # the child is done ...
        assert torch.get_num_threads() == 1  # ... and this run keeps its thread count to its end, as it repeats itself
        got = beside.result()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    assert _timeless(got) == _timeless(want)
    for k, v in here.state_dict().items():
        assert torch.equal(v, there.state_dict()[k]), k
    assert (tmp_path / "baseline_state.pt").exists()  # its checkpoint, for --resume
    # its last evaluation came back with its weights: the stage measures them without a pass here
    passes = []
    there.register_forward_hook(lambda *a: passes.append(1))
    logits = predict(there, data, data.test, torch.device("cpu"))
    with torch.no_grad():
        direct = here.eval()(data.normalize(data.test.images)).numpy()
    assert not passes and np.allclose(logits, direct, atol=1e-4)


def test_the_baseline_goes_beside_only_where_it_pays(tiny, monkeypatch):
    _, data = tiny
    cached = SimpleNamespace(teachers={"teacher": SimpleNamespace(table=torch.zeros(2, 48, 4))})
    live = SimpleNamespace(teachers={"teacher": SimpleNamespace(table=None)})
    cfg, cpu = TrainConfig(), torch.device("cpu")
    torch.set_num_threads(2)
    assert pays(cpu, cached, cfg, data)
    assert not pays(cpu, live, cfg, data)  # a live teacher: the distillation step costs several baseline steps
    assert not pays(torch.device("cuda"), cached, cfg, data)
    assert not pays(cpu, cached, cfg.model_copy(update={"compile": "default"}), data)
    monkeypatch.setattr("edgekd.beside.SEND_AT_MOST", 48 * 3 * 16 * 16 - 1)  # the images, less one byte
    assert not pays(cpu, cached, cfg, data)
    monkeypatch.undo()
    monkeypatch.setattr("edgekd.dist.world", lambda: SimpleNamespace(size=2))  # torchrun: the ranks share the cores
    assert not pays(cpu, cached, cfg, data)
    monkeypatch.undo()
    torch.set_num_threads(1)
    assert not pays(cpu, cached, cfg, data)


def test_a_baseline_that_fails_there_is_one_line_here(tiny, tmp_path):
    model, data = tiny
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    torch.set_num_threads(2)
    with pytest.raises(EdgekdError) as info:
        with BaselineBeside(copy.deepcopy(model), data, CE, 0, blocked / "baseline_state.pt", "baseline[ce]") as b:
            b.result()
    assert "baseline_state.pt: cannot write it" in str(info.value)  # as the same run here would say it


def test_a_distillation_run_that_fails_here_stops_the_baseline_there(tiny, tmp_path):
    model, data = tiny
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="the distillation run failed"):
        with BaselineBeside(copy.deepcopy(model), data, CE.model_copy(update={"epochs": 500}), 0,
                            tmp_path / "baseline_state.pt", "baseline[ce]") as b:
            raise RuntimeError("the distillation run failed")
    assert not b._proc.is_alive() and b._proc.exitcode is not None
    assert torch.get_num_threads() == 2


def test_a_pipeline_gives_the_same_figures_with_the_baseline_beside_or_after(minimal_pipeline, write_pipeline, tmp_path):
    """On 2 threads the baseline trains beside the distillation run, one thread each; on 1 thread
    one after the other. The weights, and so every figure, are the same."""
    minimal_pipeline["data"].update(augment="flip", batch_size=4)  # flip: the teacher's logits are cached
    minimal_pipeline["stages"] = [{"distill": {"epochs": 2, "compare_baseline": True, "eval_every": 1}}]
    runs = {}
    for threads in (2, 1):
        out = tmp_path / f"t{threads}"
        assert main(["run", str(write_pipeline({**minimal_pipeline, "threads": threads})), "--out", str(out)]) == 0
        runs[threads] = json.loads((out / "report.json").read_text())
    stages = {t: r["stages"][0] for t, r in runs.items()}
    assert stages[2]["info"]["baseline_beside"] and not stages[1]["info"]["baseline_beside"]
    for t in (2, 1):
        assert len(stages[t]["info"]["baseline_history"]) == 2
    assert _timeless(stages[2]["info"]["baseline_history"]) == _timeless(stages[1]["info"]["baseline_history"])
    assert _timeless(stages[2]["history"]) == _timeless(stages[1]["history"])
    for name in ("student_distilled", "student_ce_baseline"):
        assert runs[2]["models"][name]["top1"] == runs[1]["models"][name]["top1"]


class Broken(torch.nn.Module):
    """A student whose forward fails with a two-line message in the child."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise ValueError("no forward here\nsecond line")


def test_an_unexpected_failure_there_is_one_line_naming_the_run(tiny, tmp_path):
    _, data = tiny
    torch.set_num_threads(2)
    with pytest.raises(EdgekdError) as info:
        with BaselineBeside(Broken(), data, CE, 0, tmp_path / "baseline_state.pt", "baseline[ce]") as b:
            b.result()
    assert str(info.value) == "baseline[ce]: ValueError: no forward here"


def test_a_memory_mapped_split_goes_to_the_child_as_its_file_not_its_pixels(tmp_path):
    import io

    import numpy as np

    from edgekd.beside import in_ram_bytes
    from edgekd.data import Data, MappedImages, Split

    pixels = tmp_path / "pixels.u8"
    np.random.default_rng(0).integers(0, 256, (64, 3, 16, 16), dtype=np.uint8).tofile(pixels)
    full = MappedImages.map(pixels, [64, 3, 16, 16])
    split = Split.at_size(full.select(torch.arange(0, 64, 2)), torch.zeros(32, dtype=torch.long), ["a"], "k", [], 12)
    data = Data(split, split, None, (0.5,) * 3, (0.5,) * 3, "flip", 8, 8)
    assert in_ram_bytes(data) == 0
    sent = io.BytesIO()
    torch.save(data, sent)
    assert sent.tell() < 64 * 3 * 16 * 16 // 4  # the rows and the path, not the pixels
    got = torch.load(io.BytesIO(sent.getvalue()), weights_only=False)
    assert got.train.images.path == pixels and torch.equal(got.train.images[:32], split.images[:32])
    assert torch.equal(got.train.full[5], split.full[5])
