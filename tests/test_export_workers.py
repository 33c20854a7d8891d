"""The export stage's conversions side by side in worker processes (formats.workers): how many
workers, the same files as one by one in this process, and failures that stay one line."""

from __future__ import annotations

import os
from dataclasses import replace
import signal

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.formats import FORMATS, Variant
from edgekd.formats.base import ConvertJob, Format
from edgekd.formats import workers
from edgekd.formats.workers import Conversion, NpyFile, conversion_pool, convert_all, worker_count


def _convert(todo, workers):
    with conversion_pool(workers) as pool:
        return convert_all(todo, pool)


def test_worker_count_follows_cores_memory_and_the_setting(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(workers, "_available_memory", lambda: 100 * workers.WORKER_MEMORY)
    assert worker_count("auto", 16) == 4  # a core each
    assert worker_count("auto", workers.FEW) == 0  # too few to repay starting workers: here
    assert worker_count(1, 16) == 0 and worker_count(8, 5) == 5  # by hand: never more than conversions
    monkeypatch.setattr(workers, "_available_memory", lambda: 2 * workers.WORKER_MEMORY + 1)
    assert worker_count("auto", 16) == 2  # as many as memory holds
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert worker_count("auto", 16) == 0  # one core: nothing to gain


def test_workers_write_the_files_this_process_writes(tiny_trained, tmp_path):
    """fp32 ONNX and every installed own-int8 format's int8 program, calibration read from a
    file, in two spawned workers: the same outputs as converted here, on however many threads
    this process has (a conversion keeps to one, as in a worker, and gives them back)."""
    model, data = tiny_trained
    job = ConvertJob(data.image_size, 17, lambda: data.normalize(data.train.images[:32]).numpy())
    np.save(tmp_path / "calib.npy", job.calibration())
    own = [FORMATS.get(n) for n in FORMATS.names() if FORMATS.get(n).own_int8 and FORMATS.get(n).available() is None
           and n != "openvino"]  # its int8 file is the quantize stage's (formats.openvino)
    todo = [(FORMATS.get("onnx"), Variant("student_fp32", model))] + [(f, Variant("int8_ptq", model, int8=True)) for f in own]
    for d, n, conv in (("here", 0, job), ("workers", 2, replace(job, calibration=NpyFile(tmp_path / "calib.npy")))):
        (tmp_path / d).mkdir()
        threads = torch.get_num_threads()
        took = _convert([Conversion(f, v, tmp_path / d / f"{v.name}{f.suffix}", conv) for f, v in todo]
                        + [Conversion(FORMATS.get("onnx"), Variant("again", model), tmp_path / d / "again.onnx",
                                      conv)] * 3, n)  # enough work for the workers
        # seconds per file written, slowest first (the export stage's log line and report.json)
        assert set(took) == {f"{v.name}{f.suffix}" for f, v in todo} | {"again.onnx"}
        assert list(took.values()) == sorted(took.values(), reverse=True) and min(took.values()) >= 0
        assert torch.get_num_threads() == threads
    x = data.normalize(data.test.images[:16]).numpy()
    for f, v in todo:
        here, there = (f().runner(tmp_path / d / f"{v.name}{f.suffix}")(x) for d in ("here", "workers"))
        assert np.abs(here - there).max() <= 1e-5 * np.abs(here).max(), f.suffix


class _Broken(Format):
    """A format whose conversion fails as a format does: with a one-line EdgekdError, or by
    killing its process (out of memory)."""

    key, suffix = "broken", ".broken"

    def export(self, v, path, job, keep_fp32=()):
        if v.name == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        if v.name == "bad":
            raise EdgekdError(f"{path.name}: this model has an op the format cannot write")
        path.write_text(v.name)
        return path


@pytest.mark.parametrize("n", [0, 2])
def test_a_failing_conversion_is_its_own_one_line_error_here_and_in_a_worker(tiny, tmp_path, n):
    model, data = tiny
    job = ConvertJob(data.image_size, 17, NpyFile(tmp_path / "unused.npy"))
    todo = [Conversion(_Broken, Variant(name, model), tmp_path / f"{name}.broken", job) for name in ("a", "bad", "c", "d")]
    with pytest.raises(EdgekdError, match=r"^bad\.broken: this model has an op the format cannot write$"):
        _convert(todo, n)


def test_a_worker_that_dies_stops_the_stage_with_one_line_naming_the_files(tiny, tmp_path):
    model, data = tiny
    job = ConvertJob(data.image_size, 17, NpyFile(tmp_path / "unused.npy"))
    todo = [Conversion(_Broken, Variant(name, model), tmp_path / f"{name}.broken", job) for name in ("a", "killed", "c", "d")]
    with pytest.raises(EdgekdError, match=r"worker process died.*killed\.broken.*export\.workers: 1"):
        _convert(todo, 2)


def test_a_model_a_worker_cannot_take_is_written_here(tiny, tmp_path):
    """A user's model holding a lambda cannot be pickled: that file is written in this process."""
    model, data = tiny
    job = ConvertJob(data.image_size, 17, NpyFile(tmp_path / "unused.npy"))
    odd = Variant("odd", model)
    odd.reference = type("Odd", (), {"f": staticmethod(lambda: 0)})  # a local class: not picklable
    todo = [Conversion(_Broken, v, tmp_path / f"{v.name}.broken", job) for v in (Variant("a", model), odd,
                                                                                Variant("c", model), Variant("d", model))]
    _convert(todo, 2)
    assert sorted(p.read_text() for p in tmp_path.glob("*.broken")) == ["a", "c", "d", "odd"]
