"""Name -> class registries: no silent overrides, helpful unknown-name errors."""

from __future__ import annotations

import pytest

from edgekd.distill import LOSSES
from edgekd.registry import Registry
from edgekd.stages import STAGES, Stage, StageResult, register
from edgekd.stages.distill import Distill, DistillConfig
from edgekd.train import TrainConfig


def test_register_and_get():
    reg: Registry = Registry("widget")
    obj = object()
    assert reg.register("b")(obj) is obj  # the decorator returns the object unchanged
    reg.register("a")(int)
    assert reg.get("b") is obj and reg.get("a") is int
    assert "a" in reg and "c" not in reg
    assert reg.names() == ["a", "b"]
    assert reg.items() == [("a", int), ("b", obj)]


def test_duplicate_registration_raises_and_keeps_first():
    reg: Registry = Registry("widget")
    reg.register("x")(int)
    with pytest.raises(ValueError, match=r"^widget 'x' is already registered$"):
        reg.register("x")(str)
    assert reg.get("x") is int


def test_unknown_name_lists_known_ones():
    reg: Registry = Registry("widget")
    for name in ("zeta", "alpha", "mid"):
        reg.register(name)(name)
    with pytest.raises(KeyError) as info:
        reg.get("gamma")
    assert info.value.args[0] == "unknown widget 'gamma'; known: alpha, mid, zeta"


def test_unknown_name_in_empty_registry():
    with pytest.raises(KeyError) as info:
        Registry("widget").get("a")
    assert info.value.args[0] == "unknown widget 'a'; known: "


def test_registries_are_independent():
    a, b = Registry("a"), Registry("b")
    a.register("same")(1)
    b.register("same")(2)
    assert a.get("same") == 1 and b.get("same") == 2


def test_stage_registry_contains_distill():
    assert "distill" in STAGES
    assert STAGES.get("distill") is Distill
    assert Distill.name == "distill"
    assert Distill.Config is DistillConfig and issubclass(DistillConfig, TrainConfig)
    assert issubclass(Distill, Stage)


def test_stage_registry_rejects_a_second_distill():
    class Impostor(Stage):
        Config = DistillConfig

        def run(self, ctx) -> StageResult:
            return StageResult()

    with pytest.raises(ValueError, match=r"stage 'distill' is already registered"):
        register("distill")(Impostor)
    assert STAGES.get("distill") is Distill


def test_unknown_stage_lists_known():
    with pytest.raises(KeyError) as info:
        STAGES.get("distil")
    msg = info.value.args[0]
    assert msg.startswith("unknown stage 'distil'; known: ") and "distill" in msg.split("known: ")[1].split(", ")


def test_loss_registry_contents():
    assert {"ce", "kd", "mse_logits", "dkd"} <= set(LOSSES.names())
    with pytest.raises(ValueError, match="loss 'kd' is already registered"):
        LOSSES.register("kd")(lambda *a, **k: None)


def test_stage_result_to_json():
    r = StageResult(metrics={"top1": 50.0}, model_changed=True)
    j = r.to_json()
    assert j["metrics"] == {"top1": 50.0} and j["model_changed"] is True
    assert set(j) == {"metrics", "models", "artifacts", "history", "info", "model_changed"}


def test_stages_command_lists_every_stage_with_readable_options(capsys):
    from edgekd.cli import main

    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    stages, losses = out.split("\nlosses (terms of a training objective")
    assert {line.split(":")[0] for line in stages.splitlines() if not line.startswith(" ")} == set(STAGES.names())
    assert {line.split(":")[0].strip() for line in losses.splitlines()[1:] if not line.startswith(" " * 8)} == set(LOSSES.names())
    assert "    dkd: Decoupled KD" in losses and "        beta: float (default 8.0)" in losses  # each loss's own options
    assert "loss: 'kd'|'dkd'|'mse_logits'|'ce' (default 'kd')" in out  # Literal values spelled out
    assert "target_macs: float | None (default None)" in out
    assert "    finetune:\n        epochs: int (default 2)" in out  # nested options expanded
    assert "PydanticUndefined" not in out and "Literal" not in out


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edgekd", "stages"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("assistant:") and "\nlosses (terms" in out.stdout
