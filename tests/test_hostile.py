"""Hostile and broken input (issue 16): no code runs from a checkpoint unless the user says so,
no user file is lost, one writer per run directory and cache entry, budgets on YAML, archives
and images, meaningless runs refused, and every failure one line with exit 2 (bad input) or 1
(a failed run). Runs are tiny: 8x8 images, a MobileNetV2 x0.25, one epoch of cross-entropy."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_image
from edgekd import cli

REPO = Path(__file__).resolve().parents[1]


def tiny(source: Path, **data) -> dict:
    return {"name": "tiny", "device": "cpu", "threads": 1,
            "data": {"source": str(source), "image_size": 8, "batch_size": 4, **data},
            "student": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.25},
            "stages": [{"distill": {"epochs": 1, "loss": "ce", "bn_recalibration": "off"}}]}


def write(tmp: Path, cfg: dict | str, name: str = "p.yaml") -> Path:
    p = tmp / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = cli.main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgekd: error:")]
    return code, err


def one_error(capsys, *argv: str) -> tuple[int, str]:
    code, err = run_cli(capsys, *argv)
    assert len(err) == 1, err
    return code, err[0]


# ----------------------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this creates the marker file: a stand-in for any shell command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(kind: str, path: Path, marker: Path) -> None:
    if kind == "torch.save":
        torch.save(Payload(marker), path)
    elif kind == "inside-state_dict":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Payload(marker)}, path)
    elif kind == "legacy-torch.save":
        torch.save(Payload(marker), path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)


@pytest.mark.parametrize("role", ["student", "teacher"])
@pytest.mark.parametrize("kind", ["torch.save", "inside-state_dict", "legacy-torch.save", "plain-pickle"])
def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, image_folder, capsys, role, kind):
    marker, ckpt = tmp_path / "PWNED", tmp_path / "evil.pt"
    _evil(kind, ckpt, marker)
    cfg = tiny(image_folder)
    cfg[role] = {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.25, "checkpoint": str(ckpt)}
    cfg["stages"] = [{"distill": {"epochs": 1, "loss": "kd" if role == "teacher" else "ce"}}]
    for cmd in (["validate"], ["run", "--out", str(tmp_path / "run")]):
        code, msg = one_error(capsys, cmd[0], str(write(tmp_path, cfg)), *cmd[1:])
        assert code == 2
        assert f"{role}.checkpoint {ckpt}: refused" in msg and "posix.system" in msg
        assert f"set {role}.trust_pickle: true" in msg
        assert not marker.exists(), "the checkpoint ran its code"


def test_trust_pickle_is_the_opt_in(tmp_path, image_folder, capsys):
    ckpt = tmp_path / "whole_model.pt"
    from edgekd.models import build

    torch.save(build({"arch": "mobilenet_v2", "num_classes": 3, "cifar_stem": True, "width_mult": 0.25}), ckpt)
    cfg = tiny(image_folder)
    cfg["student"]["checkpoint"] = str(ckpt)
    code, msg = one_error(capsys, "validate", str(write(tmp_path, cfg)))
    assert code == 2 and "would unpickle torch.nn.modules." in msg
    cfg["student"]["trust_pickle"] = True
    assert cli.main(["run", str(write(tmp_path, cfg)), "--out", str(tmp_path / "run")]) == 0


def test_validate_opens_checkpoints_weights_only(tmp_path, image_folder, capsys):
    cfg = tiny(image_folder)
    ckpt = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    cfg["student"]["checkpoint"] = str(ckpt)
    code, msg = one_error(capsys, "validate", str(write(tmp_path, cfg)))
    assert code == 2 and "cut.pt: cannot read checkpoint" in msg


# ----------------------------------------------------------------------------- run directories


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_with_the_users_own_files_is_refused(tmp_path, image_folder, capsys):
    out = tmp_path / "mine"
    for rel, text in (("config.yaml", "my config"), ("report.json", "{}"), ("00_distill/model.pt", "my model")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    before = _tree(out)
    code, msg = one_error(capsys, "run", str(write(tmp_path, tiny(image_folder))), "--out", str(out))
    assert code == 2 and f"{out}: exists and holds files edgekd did not write (00_distill, config.yaml" in msg
    assert _tree(out) == before and not (out / ".edgekd.lock").exists()


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, image_folder, capsys):
    pipe = str(write(tmp_path, tiny(image_folder)))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, msg = one_error(capsys, "run", pipe, "--out", str(a_file))
    assert code == 2 and "notes.txt: is a file" in msg
    code, msg = one_error(capsys, "run", pipe, "--out", str(a_file / "run"))
    assert code == 2 and "cannot create it" in msg
    assert a_file.read_text() == "mine"


def test_resume_after_a_config_change_keeps_what_it_replaces(tmp_path, image_folder, capsys, caplog):
    two = tiny(image_folder)
    two["stages"] *= 2  # a second training run on the first's student: redone because the first was
    pipe, out = write(tmp_path, two), tmp_path / "run"
    assert cli.main(["run", str(pipe), "--out", str(out)]) == 0
    (out / "00_distill" / "my_notes.txt").write_text("keep me")
    old_model = (out / "00_distill" / "model.pt").read_bytes()
    old_config = (out / "config.yaml").read_text()
    assert cli.main(["run", str(pipe), "--resume", str(out), "--set", "stages[0].distill.lr=0.01"]) == 0
    moved = sorted((out / "replaced").iterdir())
    assert [m.name.split("-")[0] for m in moved] == ["00_distill", "01_distill", "config.yaml"]
    moved = [moved[0], moved[2]]
    assert (moved[0] / "my_notes.txt").read_text() == "keep me"
    assert (moved[0] / "model.pt").read_bytes() == old_model
    assert moved[1].read_text() == old_config  # how the replaced stage was made
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--resume: this pipeline differs from the run's config.yaml in stages[0].distill.lr; ")
               for m in messages)
    assert any("stage 0 distill: its config (or an earlier stage's) changed; redoing it" in m for m in messages)
    # one warning per cause: the stage after it is redone because it was, which the log says without a warning
    redone = [r for r in caplog.records if "redoing it" in r.getMessage()]
    assert [(r.levelname, r.getMessage().split(";")[0]) for r in redone] == [
        ("WARNING", "stage 0 distill: its config (or an earlier stage's) changed"),
        ("INFO", "stage 1 distill: an earlier stage was redone")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"][0]["replaced"] == f"replaced/{moved[0].name}"


def test_a_second_run_on_the_same_out_stops_at_once(tmp_path, image_folder, capsys):
    from edgekd.rundir import RunDirLock

    out = tmp_path / "run"
    holder = RunDirLock(out, resume=False)  # as a run in progress holds it
    try:
        t0 = time.perf_counter()
        code, msg = one_error(capsys, "run", str(write(tmp_path, tiny(image_folder))), "--out", str(out))
        assert code == 2 and f"{out}: in use by another edgekd run (pid {os.getpid()})" in msg
        assert time.perf_counter() - t0 < 10
    finally:
        holder.release()


def test_two_concurrent_runs_one_wins_the_other_exits_2(tmp_path, image_folder):
    pipe, out = write(tmp_path, tiny(image_folder)), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "edgekd.cli", "run", str(pipe), "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "in use by another edgekd run" in loser or "already holds a run" in loser
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["config_hash"]


def _extract(args):
    from edgekd.schema import ArchiveLimits
    from edgekd.archive import extract_archive

    archive, cache = args
    return str(extract_archive(Path(archive), Path(cache), ArchiveLimits()))


def test_concurrent_extractions_of_one_archive_share_one_folder(tmp_path, image_folder):
    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="set")
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(4) as pool:
        dests = pool.map(_extract, [(str(archive), str(cache))] * 8)
    assert len(set(dests)) == 1
    assert [p.name for p in (cache / "extracted").iterdir()] == [Path(dests[0]).name]  # no temporary folder left
    assert (Path(dests[0]) / "set" / "train" / "ant").is_dir()


@pytest.mark.parametrize("damage", ["truncated", "wrong-types", "not-an-object"])
def test_resume_of_a_corrupt_manifest_is_one_line(tmp_path, image_folder, capsys, damage):
    pipe, out = write(tmp_path, tiny(image_folder)), tmp_path / "run"
    assert cli.main(["run", str(pipe), "--out", str(out)]) == 0
    m = out / "manifest.json"
    text = m.read_text()
    m.write_text({"truncated": text[: len(text) // 2], "wrong-types": json.dumps({"stages": [{"index": "0"}]}),
                  "not-an-object": "[1, 2]"}[damage])
    code, msg = one_error(capsys, "run", str(pipe), "--resume", str(out))
    assert code == 2 and "manifest.json" in msg


def test_a_corrupt_stage_result_is_redone_and_kept_aside(tmp_path, image_folder, capsys):
    pipe, out = write(tmp_path, tiny(image_folder)), tmp_path / "run"
    assert cli.main(["run", str(pipe), "--out", str(out)]) == 0
    (out / "00_distill" / "result.json").write_text('{"index": 0, "artifacts": [')
    assert cli.main(["run", str(pipe), "--resume", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and not manifest["stages"][0].get("resumed")
    assert (out / manifest["stages"][0]["replaced"] / "result.json").read_text().endswith("[")


# ----------------------------------------------------------------------------- budgets


def _alias_bomb(levels: int = 9) -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]\n"
    return text


@pytest.mark.parametrize("case", ["alias-bomb", "deep", "huge"])
def test_yaml_bombs_fail_fast_and_small(tmp_path, capsys, case):
    text = {"alias-bomb": _alias_bomb(), "deep": "a: " + "[" * 5000 + "]" * 5000 + "\n",
            "huge": "name: x\n" + "# padding\n" * 200_000}[case]
    pipe = write(tmp_path, text)
    tracemalloc.start()
    t0 = time.perf_counter()
    code, msg = one_error(capsys, "validate", str(pipe))
    seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert code == 2 and str(pipe) in msg
    assert {"alias-bomb": "YAML bomb", "deep": "nested more than", "huge": "more than a pipeline file may hold"}[case] in msg
    assert seconds < 5 and peak < 64 << 20, (seconds, peak)


def test_a_set_value_is_held_to_the_same_budget(tmp_path, image_folder, capsys):
    code, msg = one_error(capsys, "validate", str(write(tmp_path, tiny(image_folder))),
                          "--set", "seed=" + _alias_bomb().replace("\n", ", ").join("{}"))
    assert code == 2 and "--set seed" in msg and "YAML bomb" in msg


def _zero_member(tar: tarfile.TarFile, name: str, size: int) -> None:
    class Zeros:
        def __init__(self):
            self.left = size

        def read(self, n=-1):
            n = self.left if n < 0 else min(n, self.left)
            self.left -= n
            return bytes(n)

    info = tarfile.TarInfo(name)
    info.size = size
    tar.addfile(info, Zeros())


def test_an_archive_bomb_is_refused_before_it_fills_the_disk(tmp_path, image_folder, capsys):
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(image_folder, arcname="set")
        _zero_member(tar, "set/train/ant/zeros.png", 256 << 20)
    assert archive.stat().st_size < 2 << 20  # 256 MiB in under 2 MB: ~100x+ over what images compress to
    cache = tmp_path / "cache"
    code, msg = one_error(capsys, "run", str(write(tmp_path, tiny(archive, cache_dir=str(cache)))), "--out", str(tmp_path / "r"))
    assert code == 2 and "bomb.tar.gz: unpacks to more than" in msg and "archive bomb" in msg
    assert not (cache / "extracted").exists() or not any((cache / "extracted").iterdir())  # nothing half-extracted
    code, msg = one_error(capsys, "run", str(write(tmp_path, tiny(archive, cache_dir=str(cache), archive={"max_files": 5}))),
                          "--out", str(tmp_path / "r2"))
    assert code == 2 and "more than data.archive.max_files (5) members" in msg


def test_an_image_over_the_pixel_limit_is_named_like_other_bad_images(tmp_path, make_image_folder, capsys):
    root = make_image_folder()
    write_image(root / "train" / "ant" / "big.png", np.zeros((120, 100, 3), np.uint8))
    code, msg = one_error(capsys, "run", str(write(tmp_path, tiny(root, max_image_pixels=10_000))), "--out", str(tmp_path / "r"))
    assert code == 2 and "big.png: unreadable image (100x120 pixels, over data.max_image_pixels (10,000))" in msg


# ----------------------------------------------------------------------------- meaningless runs


@pytest.mark.parametrize("case", ["one-class", "empty-test-class"])
def test_a_split_with_fewer_than_two_classes_is_refused(tmp_path, make_image_folder, capsys, case):
    if case == "one-class":
        root = make_image_folder(train_counts={"ant": 4}, test_counts={"ant": 2})
    else:
        root = make_image_folder(train_counts={"ant": 4, "moose": 4}, test_counts={"ant": 2})
        (root / "test" / "moose").mkdir()
    code, msg = one_error(capsys, "run", str(write(tmp_path, tiny(root))), "--out", str(tmp_path / "r"))
    assert code == 2 and "only 'ant' holds readable images; a classifier needs at least two classes" in msg


def test_a_diverging_loss_stops_at_once_naming_stage_epoch_and_step(tmp_path, image_folder, capsys):
    cfg = tiny(image_folder)
    cfg["stages"] = [{"distill": {"epochs": 2, "loss": "ce", "lr": 1e30, "schedule": "constant"}}]
    out = tmp_path / "r"
    code, msg = one_error(capsys, "run", str(write(tmp_path, cfg)), "--out", str(out))
    assert code == 1 and "distill" in msg and "loss became NaN or infinite at epoch" in msg and "step" in msg
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "NaN or infinite" in manifest["stages"][0]["error"]


@pytest.mark.parametrize("compile_mode", ["off", "default"])
def test_a_diverged_compiled_run_also_points_at_the_compile_cache(compile_mode):
    # a kernel cached by torch.compile for another CPU trained to NaN once; lowering the LR would not help
    from edgekd.errors import EdgekdError
    from edgekd.train import TrainConfig, _stop_if_diverged

    # unvalidated: the compile validator wants a C++ compiler, which this rule does not need
    cfg = TrainConfig.model_construct(**{**TrainConfig(epochs=3).model_dump(), "compile": compile_mode})
    _stop_if_diverged(torch.tensor(-1), "distill", 10, cfg)  # finite: nothing to say
    with pytest.raises(EdgekdError) as e:
        _stop_if_diverged(torch.tensor(23), "distill", 10, cfg)
    msg = str(e.value)
    assert "at epoch 3/3, step 4/10; lower the learning rate" in msg
    assert ("compile: off" in msg and "TORCHINDUCTOR_CACHE_DIR" in msg) == (compile_mode != "off")


def test_skipped_images_are_listed_on_every_run_cached_or_not(tmp_path, make_image_folder):
    root = make_image_folder()
    (root / "train" / "ant" / "broken.jpg").write_bytes(b"not a jpeg")
    pipe = write(tmp_path, tiny(root, skip_bad_images=True))
    for attempt in ("decoded", "cached"):
        out = tmp_path / attempt
        assert cli.main(["run", str(pipe), "--out", str(out)]) == 0
        for name in ("manifest.json", "report.json"):
            skipped = json.loads((out / name).read_text())["skipped_images"]
            assert skipped["count"] == 1 and skipped["files"][0]["file"].endswith("broken.jpg"), (attempt, name)
        assert "1 unreadable image was left out" in (out / "report.md").read_text()


def test_the_report_lists_every_warning_by_stage_and_a_resume_keeps_them(tmp_path, make_image_folder, monkeypatch):
    import logging

    from edgekd.stages.distill import Distill

    root = make_image_folder()
    (root / "train" / "ant" / "broken.jpg").write_bytes(b"not a jpeg")
    pipe = write(tmp_path, tiny(root, skip_bad_images=True))
    real = Distill.run

    def run(self, ctx):
        logging.getLogger("edgekd.test").warning("distill: something the user must read")
        return real(self, ctx)

    monkeypatch.setattr(Distill, "run", run)
    out = tmp_path / "r"
    assert cli.main(["run", str(pipe), "--out", str(out)]) == 0
    monkeypatch.setattr(Distill, "run", real)
    for attempt in ("run", "resumed"):  # the resumed run skips distill and keeps what it said
        said = json.loads((out / "report.json").read_text())["warnings"]
        assert {"stage": "distill", "message": "distill: something the user must read"} in said, attempt
        assert any(w["stage"] is None and "broken.jpg" in w["message"] for w in said), attempt
        md = (out / "report.md").read_text()
        assert "## Warnings" in md and "- **distill**: distill: something the user must read" in md
        assert "- **before the stages**: skipping unreadable image" in md
        assert cli.main(["run", str(pipe), "--resume", str(out)]) == 0


# ----------------------------------------------------------------------------- disk full


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a full disk), where this machine lets the tests mount one."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()[:100]})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_recorded_in_the_manifest_and_resumable(tmp_path, image_folder, capsys, small_tmpfs):
    pipe, out = write(tmp_path, tiny(image_folder)), small_tmpfs / "run"
    code, msg = one_error(capsys, "run", str(pipe), "--out", str(out))
    assert code == 1 and "cannot write it" in msg and "free space" in msg
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"][0]["status"] == "failed"
    assert not [p for p in out.rglob("*.tmp")]  # no half-written file left behind
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    assert cli.main(["run", str(pipe), "--resume", str(out)]) == 0


def test_a_read_only_out_is_one_line(tmp_path, image_folder, capsys, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    code, msg = one_error(capsys, "run", str(write(tmp_path, tiny(image_folder))), "--out", str(small_tmpfs / "run"))
    assert code == 2 and "Read-only file system" in msg


def test_compile_without_a_cpp_compiler_fails_validation_naming_the_key(tmp_path, image_folder, capsys, monkeypatch):
    """torch.compile needs a C++ compiler: without one, `validate` says so before any data is read."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = tiny(image_folder)
    cfg["stages"][0]["distill"]["compile"] = "default"
    code, msg = one_error(capsys, "validate", str(write(tmp_path, cfg)))
    assert code == 2 and "stages[0].distill.compile" in msg and "needs a C++ compiler" in msg
