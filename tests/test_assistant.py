"""The teacher-assistant chain: an `assistant` stage trains one of the pipeline's teachers in the
run, later stages learn from the trained model (never the untrained one), a resumed run gets it
back from its checkpoint, and every misuse is one validation line naming its key path."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from edgekd.cli import main
from edgekd.config import validate
from edgekd.errors import ConfigError
from edgekd.stages.distill import Distill


def chain(image_folder) -> dict:
    return {
        "name": "chain", "seed": 0, "device": "cpu",
        "data": {"source": str(image_folder), "image_size": 16, "val_split": 0.25, "augment": "flip", "batch_size": 4},
        "teachers": {"big": {"arch": "resnet18", "cifar_stem": True},
                     "ta": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.5}},
        "student": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.25},
        "stages": [
            {"assistant": {"name": "ta", "epochs": 1, "objective": [{"loss": "kd", "teacher": "big", "weight": 0.9},
                                                                     {"loss": "ce", "weight": 0.1}]}},
            {"distill": {"epochs": 1, "objective": [{"loss": "kd", "teacher": "ta", "weight": 0.5},
                                                    {"loss": "dist", "teacher": ["big", "ta"], "teacher_weights": "val_acc"},
                                                    {"loss": "ce", "weight": 0.1}]}},
        ],
    }


def error(p: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate(p)
    return str(info.value)


def test_the_chain_validates_and_each_misuse_names_its_key_path(image_folder):
    p = chain(image_folder)
    assert validate(p).trained_teachers() == {"ta": 0}
    cases = [
        (lambda q: q["stages"][0]["assistant"].update(name="tta"),
         "stages[0].assistant.name: unknown teacher 'tta' (did you mean 'ta'?): declare the assistant under teachers:"),
        (lambda q: q["stages"][0]["assistant"].update(name="big"),
         "stages[0].assistant.name: 'big' is the first teacher, the reference of the report"),
        (lambda q: q["stages"][0]["assistant"]["objective"][0].update(teacher="ta"),
         "stages[0].assistant.objective[0].teacher: the assistant 'ta' cannot learn from itself"),
        (lambda q: q["stages"].reverse(),
         "stages[0].distill.objective[0].teacher: teacher 'ta' is trained by stages[1], which runs later"),
        (lambda q: q["stages"].insert(1, copy.deepcopy(q["stages"][0])),
         "stages[1].assistant.name: 'ta' is trained by stages[0] already"),
        (lambda q: q["teachers"]["ta"].update(checkpoint="ta.onnx"),
         "stages[0].assistant.name: teachers.ta is an ONNX file, which cannot be trained"),
        (lambda q: q["stages"][0]["assistant"].pop("name"), "stages[0].assistant.name: required key is missing"),
    ]
    for damage, want in cases:
        q = copy.deepcopy(p)
        damage(q)
        assert error(q).startswith(want), error(q)


def test_the_student_learns_from_the_trained_assistant_and_a_resume_restores_it(image_folder, tmp_path, monkeypatch, write_pipeline):
    path, out = write_pipeline(chain(image_folder)), tmp_path / "run"
    seen: list[dict] = []

    def interrupted(self, ctx):
        seen.append({k: v.clone() for k, v in ctx.teacher_model("ta")[0].state_dict().items()})
        raise KeyboardInterrupt

    monkeypatch.setattr(Distill, "run", interrupted)
    assert main(["run", str(path), "--out", str(out)]) == 130
    trained = torch.load(out / "00_assistant" / "ta.pt", weights_only=True)["state_dict"]
    monkeypatch.undo()
    run = Distill.run

    def recording(self, ctx):
        seen.append({k: v.clone() for k, v in ctx.teacher_model("ta")[0].state_dict().items()})
        return run(self, ctx)

    monkeypatch.setattr(Distill, "run", recording)
    assert main(["run", str(path), "--resume", str(out)]) == 0
    for state in seen:  # the distill stage saw the trained assistant, in the first run and after the resume
        assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["name"], s["status"], s.get("resumed", False)) for s in manifest["stages"]] == [
        ("assistant", "completed", True), ("distill", "completed", False)]
    report = json.loads((out / "report.json").read_text())
    ta = report["models"]["teacher_ta"]
    assert ta["label"] == "assistant ta (kd+ce from big)" and 0 <= ta["top1"] <= 100
    assert report["stages"][0]["info"]["learns_from"] == ["big"] and report["stages"][0]["history"]
    assert "distill" in report["stages"][1]["name"] and set(report["stages"][1]["history"][-1]) >= {"kd", "inter", "intra", "ce"}
    assert "assistant ta" in (out / "report.md").read_text()
