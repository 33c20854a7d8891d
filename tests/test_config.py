"""Pipeline YAML loading: every error names the key path and what was expected."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgekd import cli
from edgekd.config import apply_override, interpolate, load_pipeline, validate
from edgekd.errors import ConfigError, EdgekdError
from edgekd.stages.distill import DistillConfig


def load_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, overrides)
    return str(info.value)


def stage_opts(p: dict) -> dict:
    return p["stages"][0]["distill"]


# ----------------------------------------------------------------------------- happy path


def test_minimal_pipeline_is_valid(write_pipeline, minimal_pipeline, image_folder):
    cfg, raw = load_pipeline(write_pipeline(minimal_pipeline))
    assert cfg.name == "unit"
    assert cfg.data.source == str(image_folder)
    assert cfg.student.arch == "mobilenet_v2" and cfg.student.width_mult == 0.25 and cfg.student.cifar_stem
    assert cfg.teacher is not None and cfg.teacher.arch == "resnet18"
    entries = cfg.stage_entries()
    assert [n for n, _ in entries] == ["distill"]
    assert isinstance(entries[0][1], DistillConfig)
    assert entries[0][1].epochs == 1
    assert entries[0][1].loss == "kd"  # default
    assert raw["stages"] == [{"distill": {"epochs": 1}}]


def test_stage_with_null_options_gets_defaults(write_pipeline, minimal_pipeline):
    minimal_pipeline["stages"] = [{"distill": None}]
    cfg, _ = load_pipeline(write_pipeline(minimal_pipeline))
    (name, opts), = cfg.stage_entries()
    assert name == "distill" and opts == DistillConfig()


def test_validated_stages_are_per_instance(minimal_pipeline):
    """Two validated pipelines must not share their validated stage table."""
    a = validate(minimal_pipeline)
    other = {**minimal_pipeline, "stages": [{"distill": {"epochs": 7}}, {"distill": {"epochs": 3, "loss": "ce"}}]}
    b = validate(other)
    assert [c.epochs for _, c in a.stage_entries()] == [1]
    assert [c.epochs for _, c in b.stage_entries()] == [7, 3]


# ----------------------------------------------------------------------------- bad files

# (description, mutation of the minimal pipeline mapping, regex the message must match)
BAD_PIPELINES = [
    ("unknown top-level key", lambda p: p.update(epochz=3), r"^epochz: unknown key$"),
    ("unknown key inside data", lambda p: p["data"].update(colour="red"), r"^data\.colour: unknown key$"),
    ("unknown key inside a stage", lambda p: stage_opts(p).update(lr_max=1), r"^stages\[0\]\.distill\.lr_max: unknown key$"),
    ("unknown stage name", lambda p: p.update(stages=[{"distil": {}}]),
     r"^stages\[0\]: unknown stage 'distil' \(did you mean 'distill'\?\); known: .*\bdistill\b"),
    ("unknown key close to a known one", lambda p: stage_opts(p).update(temprature=2),
     r"^stages\[0\]\.distill\.temprature: unknown key \(did you mean 'temperature'\?\)$"),
    ("unknown nested key close to a known one", lambda p: p["data"].update(val_splt=0.1),
     r"^data\.val_splt: unknown key \(did you mean 'val_split'\?\)$"),
    ("unknown architecture", lambda p: p["student"].update(arch="mobilenetv2"),
     r"^student\.arch: unknown architecture 'mobilenetv2' \(did you mean 'mobilenet_v2'.*\) \(expected a torchvision"),
    ("width_mult on an architecture without one", lambda p: p["student"].update(arch="efficientnet_b0", width_mult=0.5),
     r"^student\.width_mult: efficientnet_b0 takes no width_mult \(torchvision's mobilenet_v2 and mobilenet_v3_\* do\)"),
    ("width_mult on one built only with real tensors", lambda p: p["teacher"].update(arch="regnet_x_400mf", width_mult=0.5),
     r"^teacher\.width_mult: regnet_x_400mf takes no width_mult"),
    ("cifar_stem on an architecture without one", lambda p: p["student"].update(arch="shufflenet_v2_x0_5", cifar_stem=True, width_mult=None),
     r"^student\.cifar_stem: cifar_stem is not supported for arch 'shufflenet_v2_x0_5' \(supported: resnet\*"),
    ("missing data source", lambda p: p["data"].update(source=p["data"]["source"] + "x"),
     r"^data\.source: .*dsx does not exist \(did you mean 'ds'\?\)"),
    ("missing checkpoint", lambda p: p["teacher"].update(checkpoint="/nonexistent/teacher.pt"),
     r"^teacher\.checkpoint: /nonexistent/teacher\.pt does not exist$"),
    ("stage entry with two keys", lambda p: p.update(stages=[{"distill": {}, "extra": {}}]),
     r"^stages\[0\]: expected one stage name mapping to its options, got keys \['distill', 'extra'\]$"),
    ("stage options a list", lambda p: p.update(stages=[{"distill": [1, 2]}]),
     r"^stages\[0\]\.distill: expected a mapping of options, got list$"),
    ("stage options a string", lambda p: p.update(stages=[{"distill": "fast"}]),
     r"^stages\[0\]\.distill: expected a mapping of options, got str$"),
    ("stage entry not a mapping", lambda p: p.update(stages=["distill"]),
     r"^stages\[0\]: Input should be a valid dictionary.*\(got 'distill'\)$"),
    ("wrong type: epochs ten", lambda p: stage_opts(p).update(epochs="ten"),
     r"^stages\[0\]\.distill\.epochs: Input should be a valid integer.*\(got 'ten'\)$"),
    ("out of range: temperature 0", lambda p: stage_opts(p).update(temperature=0),
     r"^stages\[0\]\.distill\.temperature: Input should be greater than 0 \(got 0\)$"),
    ("out of range: val_split 1.5", lambda p: p["data"].update(val_split=1.5),
     r"^data\.val_split: Input should be less than 1 \(got 1\.5\)$"),
    ("out of range: negative width_mult", lambda p: p["student"].update(width_mult=-1),
     r"^student\.width_mult: Input should be greater than 0 \(got -1\)$"),
    ("bad literal: loss foo", lambda p: stage_opts(p).update(loss="foo"),
     r"^stages\[0\]\.distill\.loss: Input should be 'kd', 'dkd', 'mse_logits' or 'ce' \(got 'foo'\)$"),
    ("bad literal: augment", lambda p: p["data"].update(augment="rotate"),
     r"^data\.augment: Input should be 'crop_flip', 'flip' or 'none' \(got 'rotate'\)$"),
    ("missing required key: student", lambda p: p.pop("student"), r"^student: required key is missing$"),
    ("missing required key: data.source", lambda p: p["data"].pop("source"), r"^data\.source: required key is missing$"),
    ("missing required key: arch", lambda p: p["teacher"].pop("arch"), r"^teacher\.arch: required key is missing$"),
    ("empty stage list", lambda p: p.update(stages=[]), r"^stages: List should have at least 1 item"),
    ("bad name pattern", lambda p: p.update(name="my run"), r"^name: String should match pattern .*\(got 'my run'\)$"),
    ("kd loss without a teacher", lambda p: p.pop("teacher"),
     r"^teacher: required key is missing \(stages distill use a distillation loss\)$"),
    ("dkd loss without a teacher", lambda p: (p.pop("teacher"), stage_opts(p).update(loss="dkd")),
     r"^teacher: required key is missing \(stages distill use a distillation loss\)$"),
    ("a student torch-pruning cannot trace, before any stage trains",
     lambda p: (p["student"].update(arch="shufflenet_v2_x0_5", cifar_stem=False, width_mult=None),
                p["stages"].append({"prune": {"target_macs": 0.5}})),
     r"^stages\[1\]\.prune: student\.arch shufflenet_v2_x0_5: torch-pruning cannot trace this model \(ZeroDivisionError: "
     r".*, in torch-pruning's update_reshape_index_mapping\); pick another student architecture or leave the prune stage out$"),
    ("prune.ignore naming no module", lambda p: p["stages"].append({"prune": {"target_macs": 0.5, "ignore": ["features.1.conv.9"]}}),
     r"^stages\[1\]\.prune\.ignore: no module named 'features\.1\.conv\.9' \(did you mean 'features\.1\.conv\.[0-2]'"),
    ("prune after quantize (its int8 files would be of the unpruned student)",
     lambda p: p["stages"].extend([{"quantize": {"method": "ptq"}}, {"prune": {"target_macs": 0.5}}]),
     r"^stages\[2\]\.prune: must come before stages\[1\]\.quantize \(prune removes channels from the student; "
     r"quantize makes the int8 files from the student as it stands\)$"),
    ("distill after export", lambda p: p["stages"].insert(0, {"export": {}}),
     r"^stages\[1\]\.distill: must come before stages\[0\]\.export \(distill trains the student; export writes"),
    ("benchmark with nothing written before it", lambda p: p["stages"].append({"benchmark": {}}),
     r"^stages\[1\]\.benchmark: no stage before it writes model files \(.*; add an export stage before it\)$"),
    ("env var without default not set", lambda p: p["data"].update(source="${EDGEKD_TEST_SURELY_UNSET}/x"),
     r"^data\.source: environment variable \$\{EDGEKD_TEST_SURELY_UNSET\} is not set and has no default$"),
    ("env var unset inside a stage", lambda p: stage_opts(p).update(lr="${EDGEKD_TEST_SURELY_UNSET}"),
     r"^stages\[0\]\.distill\.lr: environment variable \$\{EDGEKD_TEST_SURELY_UNSET\} is not set"),
]


@pytest.mark.parametrize("mutate,pattern", [b[1:] for b in BAD_PIPELINES], ids=[b[0] for b in BAD_PIPELINES])
def test_bad_pipeline_message_names_key_path(write_pipeline, minimal_pipeline, monkeypatch, mutate, pattern):
    monkeypatch.delenv("EDGEKD_TEST_SURELY_UNSET", raising=False)
    mutate(minimal_pipeline)
    msg = load_error(write_pipeline(minimal_pipeline))
    assert re.search(pattern, msg), msg
    assert "\n" not in msg


def test_prune_trace_follows_the_student_checkpoints_own_architecture(write_pipeline, minimal_pipeline, tmp_path):
    """An edgekd checkpoint's spec wins over student.arch (models.load_model), so validate traces that
    model: its module names are the ones prune.ignore may name."""
    from edgekd.models import build, save_checkpoint

    spec = {"arch": "mobilenet_v2", "num_classes": 3, "cifar_stem": True, "width_mult": 0.25}
    save_checkpoint(tmp_path / "student.pt", build(spec), spec)
    minimal_pipeline["student"] = {"arch": "resnet18", "checkpoint": str(tmp_path / "student.pt")}
    minimal_pipeline["stages"].append({"prune": {"target_macs": 0.5, "ignore": ["features.1"]}})
    load_pipeline(write_pipeline(minimal_pipeline))
    minimal_pipeline["stages"][-1]["prune"]["ignore"] = ["layer1"]
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.prune\.ignore: no module named 'layer1'"):
        load_pipeline(write_pipeline(minimal_pipeline))


def test_other_libraries_info_logs_stay_out_of_the_run_log():
    """onnxruntime's quantizer logs each bias input it copies at INFO on the root logger: a run shows
    edgekd's INFO lines and only other libraries' warnings."""
    code = ("import logging; from edgekd.cli import main; main(['stages']); logging.info('root info'); "
            "logging.getLogger('onnxruntime').info('library info'); logging.getLogger('x').warning('library warning'); "
            "logging.getLogger('edgekd').info('edgekd info')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stderr
    assert "edgekd info" in err and "library warning" in err
    assert "root info" not in err and "library info" not in err


def test_config_error_is_an_edgekd_error_with_exit_code_2():
    assert issubclass(ConfigError, EdgekdError)
    assert ConfigError.exit_code == 2 and EdgekdError.exit_code == 1


def test_empty_file(write_pipeline):
    path = write_pipeline("")
    assert load_error(path) == f"{path}: file is empty"


def test_comment_only_file_is_empty(write_pipeline):
    path = write_pipeline("# nothing here\n")
    assert load_error(path) == f"{path}: file is empty"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert load_error(path) == f"{path}: pipeline file not found"


def test_invalid_yaml_reports_line_and_column(write_pipeline):
    path = write_pipeline("name: t\ndata:\n  source: x\n   bad: 1\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: line 4, column 7 invalid YAML: "), msg
    assert "mapping values are not allowed here" in msg


def test_invalid_yaml_unclosed_bracket(write_pipeline):
    path = write_pipeline("name: t\nstages: [\n")
    msg = load_error(path)
    assert re.match(rf"^{re.escape(str(path))}: line 3, column 1 invalid YAML: ", msg), msg


def test_top_level_list_is_rejected(write_pipeline):
    msg = load_error(write_pipeline("- name: t\n- x\n"))
    assert msg == "<root>: expected a mapping of pipeline keys, got list"


def test_validate_rejects_non_mapping():
    with pytest.raises(ConfigError, match=r"^<root>: expected a mapping of pipeline keys, got str$"):
        validate("name: x")


def test_several_errors_are_joined_on_one_line(write_pipeline, minimal_pipeline):
    minimal_pipeline["data"]["val_split"] = 2
    minimal_pipeline["bogus"] = 1
    msg = load_error(write_pipeline(minimal_pipeline))
    assert "data.val_split: Input should be less than 1 (got 2)" in msg
    assert "bogus: unknown key" in msg
    assert "; " in msg and "\n" not in msg


# ----------------------------------------------------------------------------- interpolation


def test_env_default_used_when_unset(write_pipeline, minimal_pipeline, monkeypatch, image_folder):
    monkeypatch.delenv("EDGEKD_TEST_DATA", raising=False)
    monkeypatch.delenv("EDGEKD_TEST_EPOCHS", raising=False)
    minimal_pipeline["data"]["source"] = "${EDGEKD_TEST_DATA:-%s}" % image_folder
    stage_opts(minimal_pipeline)["epochs"] = "${EDGEKD_TEST_EPOCHS:-3}"
    cfg, raw = load_pipeline(write_pipeline(minimal_pipeline))
    assert cfg.data.source == str(image_folder)
    assert cfg.stage_entries()[0][1].epochs == 3  # "3" from the default, coerced to int
    assert raw["data"]["source"] == str(image_folder)  # the resolved tree is returned


def test_env_var_from_environment_overrides_default(write_pipeline, minimal_pipeline, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEKD_TEST_ROOT", str(tmp_path / "shared"))
    monkeypatch.setenv("EDGEKD_TEST_EPOCHS", "5")
    for f in ("data/set.tar.gz", "models/t.pt"):  # validation checks that the inputs exist (and opens checkpoints)
        (tmp_path / "shared" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shared" / f).write_bytes(b"")
    torch.save({}, tmp_path / "shared" / "models" / "t.pt")
    minimal_pipeline["data"]["source"] = "${EDGEKD_TEST_ROOT:-/nowhere}/data/set.tar.gz"
    minimal_pipeline["teacher"]["checkpoint"] = "${EDGEKD_TEST_ROOT}/models/t.pt"
    stage_opts(minimal_pipeline)["epochs"] = "${EDGEKD_TEST_EPOCHS}"
    cfg, _ = load_pipeline(write_pipeline(minimal_pipeline))
    assert cfg.data.source == f"{tmp_path}/shared/data/set.tar.gz"
    assert cfg.teacher.checkpoint == f"{tmp_path}/shared/models/t.pt"
    assert cfg.stage_entries()[0][1].epochs == 5


def test_env_empty_default(monkeypatch):
    monkeypatch.delenv("EDGEKD_TEST_X", raising=False)
    assert interpolate({"a": ["pre${EDGEKD_TEST_X:-}post", 3]}) == {"a": ["prepost", 3]}


def test_interpolate_leaves_non_strings_alone():
    tree = {"a": 1, "b": [True, None, 2.5], "c": {"d": "plain"}}
    assert interpolate(tree) == tree


# ----------------------------------------------------------------------------- --set overrides


def test_set_addresses_stage_by_name(write_pipeline, minimal_pipeline):
    cfg, raw = load_pipeline(write_pipeline(minimal_pipeline), ["distill.epochs=2"])
    assert cfg.stage_entries()[0][1].epochs == 2
    assert raw["stages"][0]["distill"]["epochs"] == 2


def test_set_data_subset(write_pipeline, minimal_pipeline):
    cfg, _ = load_pipeline(write_pipeline(minimal_pipeline), ["data.subset=100"])
    assert cfg.data.subset == 100 and isinstance(cfg.data.subset, int)


def test_set_by_stage_index(write_pipeline, minimal_pipeline):
    cfg, _ = load_pipeline(write_pipeline(minimal_pipeline), ["stages[0].distill.lr=0.1"])
    assert cfg.stage_entries()[0][1].lr == pytest.approx(0.1)


def test_set_changes_one_place_of_a_yaml_alias(write_pipeline, minimal_pipeline):
    """Two stages from one anchored recipe (`- distill: *recipe`): --set on one leaves the other
    as the file says (an alias loads as the anchor's very object)."""
    minimal_pipeline["stages"] = [{"distill": {"epochs": 1, "lr": 0.05}}] * 2  # dumped as an anchor and an alias
    path = write_pipeline(minimal_pipeline)
    assert "&" in path.read_text() and "*" in path.read_text()
    cfg, raw = load_pipeline(path, ["stages[0].distill.lr=0.01"])
    assert [s.lr for _, s in cfg.stage_entries()] == [pytest.approx(0.01), pytest.approx(0.05)]
    assert raw["stages"][1]["distill"]["lr"] == 0.05


def test_set_several_overrides_and_yaml_values(write_pipeline, minimal_pipeline):
    cfg, _ = load_pipeline(write_pipeline(minimal_pipeline), [
        "distill.loss=dkd", "student.cifar_stem=false", "data.mean=[0.5, 0.5, 0.5]", "seed=7", "name=renamed"])
    assert cfg.stage_entries()[0][1].loss == "dkd"
    assert cfg.student.cifar_stem is False
    assert cfg.data.mean == (0.5, 0.5, 0.5)
    assert cfg.seed == 7 and cfg.name == "renamed"


def test_set_into_null_stage_options(write_pipeline, minimal_pipeline):
    minimal_pipeline["stages"] = [{"distill": None}]
    cfg, _ = load_pipeline(write_pipeline(minimal_pipeline), ["distill.epochs=4"])
    assert cfg.stage_entries()[0][1].epochs == 4


def test_set_value_is_interpolated(write_pipeline, minimal_pipeline, monkeypatch):
    monkeypatch.setenv("EDGEKD_TEST_EPOCHS", "6")
    cfg, _ = load_pipeline(write_pipeline(minimal_pipeline), ["distill.epochs=${EDGEKD_TEST_EPOCHS}"])
    assert cfg.stage_entries()[0][1].epochs == 6


def test_set_does_not_touch_the_file(write_pipeline, minimal_pipeline):
    path = write_pipeline(minimal_pipeline)
    before = path.read_text()
    load_pipeline(path, ["distill.epochs=9"])
    assert path.read_text() == before
    cfg, _ = load_pipeline(path)
    assert cfg.stage_entries()[0][1].epochs == 1


def test_set_without_equals(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["distill.epochs"])
    assert msg == "--set distill.epochs: expected KEY=VALUE"


def test_set_unknown_top_level_path(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["trainer.epochs=2"])
    assert msg == "trainer: unknown key"


def test_set_unknown_nested_path(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["data.subsett=10"])
    assert msg == "data.subsett: unknown key (did you mean 'subset' or 'test_subset'?)"


def test_set_stage_index_out_of_range(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["stages[3].distill.lr=0.1"])
    assert msg == "--set stages[3].distill.lr: stages[3] does not exist"


def test_set_through_a_scalar(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["name.first=x"])
    assert msg == "--set name.first: name is not a mapping"


def test_set_index_into_mapping(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["data[0]=x"])
    assert msg == "--set data[0]: data[0] does not exist"


def test_set_empty_key(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["=3"])
    assert msg == "--set : cannot parse key"


def test_set_ambiguous_stage_name(write_pipeline, minimal_pipeline):
    minimal_pipeline["stages"] = [{"distill": {"epochs": 1}}, {"distill": {"epochs": 1}}]
    msg = load_error(write_pipeline(minimal_pipeline), ["distill.epochs=2"])
    assert msg == "--set distill.epochs: stage 'distill' appears 2 times; use stages[i].distill.epochs"


def test_set_value_is_validated_with_key_path(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["distill.temperature=-1"])
    assert msg == "stages[0].distill.temperature: Input should be greater than 0 (got -1)"


def test_apply_override_in_place():
    raw = {"data": {"source": "x"}, "stages": [{"distill": {"epochs": 1}}]}
    apply_override(raw, "distill.epochs=3")
    apply_override(raw, "data.subset=100")
    apply_override(raw, "stages[0].distill.lr=0.1")
    apply_override(raw, "data.source=")
    assert raw == {"data": {"source": "", "subset": 100}, "stages": [{"distill": {"epochs": 3, "lr": 0.1}}]}


def test_set_with_unparsable_yaml_value(write_pipeline, minimal_pipeline):
    msg = load_error(write_pipeline(minimal_pipeline), ["data.mean=[0.5, 0.5"])
    assert msg.startswith("--set data.mean=[0.5, 0.5: value is not valid YAML"), msg
    assert "\n" not in msg


def test_binary_pipeline_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfd")
    msg = load_error(path)
    assert msg.startswith(f"{path}: not a UTF-8 text file"), msg


# ----------------------------------------------------------------------------- CLI


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgekd: error: "), err
    return lines[0]


def test_cli_validate_ok(write_pipeline, minimal_pipeline, capsys):
    path = write_pipeline(minimal_pipeline)
    assert cli.main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{path}: OK (1 stage: distill)"
    assert "error" not in err


ROOT = Path(__file__).parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


AFTER_A_RUN = {"imagenette": "IMAGENETTE_TEACHER"}  # pipelines whose teacher an earlier pipeline trains


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_shipped_pipelines_validate(path, capsys, tmp_path, monkeypatch):
    """Every pipeline users are told to run must pass validation as written (YAML 1.1 quirks
    included); one that reads the model an earlier pipeline trains says so until it exists."""
    if path.stem in AFTER_A_RUN:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("EDGEKD_SHARED", str(Path(os.environ.get("EDGEKD_SHARED", ROOT.parent / "shared")).resolve()))
        assert cli.main(["validate", str(path)]) == 2
        assert "teacher.checkpoint: runs/" in capsys.readouterr().err
        import yaml
        from edgekd.models import build

        arch = yaml.safe_load(path.read_text())["teacher"]["arch"]
        torch.save(build({"arch": arch, "num_classes": 10}).state_dict(), tmp_path / "teacher.pt")
        monkeypatch.setenv(AFTER_A_RUN[path.stem], str(tmp_path / "teacher.pt"))
    assert cli.main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [("off", "off"), ("on", "on"), ("false", "off"), ("auto", "auto")])
def test_yaml_on_off_switch(text, expected):
    """YAML reads a bare `off` as False; the export switch takes it as "off"."""
    import yaml
    from edgekd.stages.export import ExportConfig
    assert ExportConfig(**yaml.safe_load(f"executorch: {text}")).executorch == expected
    assert ExportConfig(**yaml.safe_load(f"temperature_scaling: {text}")).temperature_scaling == expected
    if expected != "auto":
        from edgekd.train import TrainConfig
        assert TrainConfig(**yaml.safe_load(f"bn_recalibration: {text}")).bn_recalibration == expected


def test_cli_validate_bad_file(write_pipeline, minimal_pipeline, capsys):
    stage_opts(minimal_pipeline)["temperature"] = 0
    assert cli.main(["validate", str(write_pipeline(minimal_pipeline))]) == 2
    line = _one_error_line(capsys)
    assert line == "edgekd: error: stages[0].distill.temperature: Input should be greater than 0 (got 0)"


@pytest.mark.parametrize("text", [
    "",
    "name: t\n  bad: 1\n",
    "- a\n",
    "name: t\nfoo: 1\n",
    "name: t\ndata: {source: x}\nstudent: {arch: resnet18}\nstages: [{distill: {}}]\n",
], ids=["empty", "yaml-syntax", "list-root", "unknown-and-missing", "no-teacher"])
def test_cli_validate_bad_files_one_line(write_pipeline, capsys, text):
    assert cli.main(["validate", str(write_pipeline(text))]) == 2
    _one_error_line(capsys)


def test_cli_validate_with_set(write_pipeline, minimal_pipeline, capsys):
    path = str(write_pipeline(minimal_pipeline))
    assert cli.main(["validate", path, "--set", "distill.epochs=2", "--set", "data.subset=10"]) == 0
    capsys.readouterr()
    assert cli.main(["validate", path, "--set", "distill.epochs"]) == 2
    assert _one_error_line(capsys) == "edgekd: error: --set distill.epochs: expected KEY=VALUE"


def test_cli_validate_missing_file(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    assert cli.main(["validate", str(path)]) == 2
    assert _one_error_line(capsys) == f"edgekd: error: {path}: pipeline file not found"


def test_cli_set_with_unparsable_yaml_value(write_pipeline, minimal_pipeline, capsys):
    assert cli.main(["validate", str(write_pipeline(minimal_pipeline)), "--set", "data.mean=[1,"]) == 2
    assert _one_error_line(capsys).startswith("edgekd: error: --set data.mean=[1,: value is not valid YAML")


def test_temperature_scaling_without_a_validation_split_names_what_to_fix(write_pipeline, minimal_pipeline):
    minimal_pipeline["stages"].append({"export": {"temperature_scaling": "on"}})
    msg = load_error(write_pipeline(minimal_pipeline))
    assert msg.startswith("stages[1].export.temperature_scaling: needs a validation split: set data.val_split"), msg
    minimal_pipeline["data"]["val_split"] = 0.2
    load_pipeline(write_pipeline(minimal_pipeline))


@pytest.mark.parametrize("opts,pattern", [
    ({"corruptions": ["fog"]}, r"^stages\[1\]\.benchmark\.robustness\.corruptions\[0\]: Input should be 'gaussian_noise'"),
    ({"severities": [6]}, r"^stages\[1\]\.benchmark\.robustness\.severities\[0\]: Input should be 1, 2, 3, 4 or 5 \(got 6\)"),
    ({"corruption": ["jpeg"]}, r"^stages\[1\]\.benchmark\.robustness\.corruption: unknown key \(did you mean 'corruptions'\?\)"),
])
def test_bad_robustness_options_name_their_key(write_pipeline, minimal_pipeline, opts, pattern):
    minimal_pipeline["stages"].append({"benchmark": {"robustness": opts}})
    msg = load_error(write_pipeline(minimal_pipeline))
    assert re.search(pattern, msg), msg
