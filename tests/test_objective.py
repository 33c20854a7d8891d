"""The training objective as one object: terms validated in YAML with their key paths, named
teachers, feature taps by module path, and the same training run whether written with the
`loss:` shorthand or as explicit terms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from edgekd.config import validate
from edgekd.data import Data
from edgekd.distill import FeatureTaps, Objective, TeacherSource, resolve_module
from edgekd.errors import ConfigError
from edgekd.models import build
from edgekd.train import TrainConfig, fit
from test_compress import tiny_data

SPEC = {"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}


def config_error(pipeline: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate(pipeline)
    return str(info.value)


def with_distill(p: dict, **opts) -> dict:
    p = copy.deepcopy(p)
    p["stages"] = [{"distill": {"epochs": 1, **opts}}]
    return p


# ----------------------------------------------------------------------------- YAML


def test_an_objective_validates_each_term_with_its_own_options(minimal_pipeline):
    cfg = validate(with_distill(minimal_pipeline, objective=[{"loss": "kd", "weight": 0.8, "temperature": 2},
                                                              {"loss": "ce", "weight": 0.2, "label_smoothing": 0.1}]))
    terms = cfg.stage_entries()[0][1].terms()
    assert [(t.loss, t.weight) for t in terms] == [("kd", 0.8), ("ce", 0.2)]
    assert terms[0].temperature == 2 and terms[1].label_smoothing == 0.1
    assert cfg.stage_entries()[0][1].describe() == "kd+ce"


@pytest.mark.parametrize("objective,want", [
    ([{"loss": "kdd"}], r"stages[0].distill.objective[0].loss: unknown loss 'kdd' (did you mean 'kd' or 'dkd'?); known: at, ce, dist, dkd, fitnet, kd, mse_logits"),
    ([{"weight": 1}], "stages[0].distill.objective[0].loss: required key is missing (one of at, ce, dist, dkd, fitnet, kd, mse_logits)"),
    ([{"loss": "kd", "temperatur": 2}], "stages[0].distill.objective[0].temperatur: unknown key (did you mean 'temperature'?)"),
    ([{"loss": "ce"}, {"loss": "dkd", "beta": -1}], "stages[0].distill.objective[1].beta: Input should be greater than or equal to 0 (got -1)"),
    ([{"loss": "ce", "teacher": "teacher"}], "stages[0].distill.objective[0].teacher: unknown key"),
    ([{"loss": "kd", "teacher": "techer"}], "stages[0].distill.objective[0].teacher: unknown teacher 'techer' (did you mean 'teacher'?); the pipeline's teachers: teacher"),
    ([], "stages[0].distill.objective: List should have at least 1 item after validation, not 0"),
])
def test_a_wrong_term_names_its_key_path(minimal_pipeline, objective, want):
    assert config_error(with_distill(minimal_pipeline, objective=objective)) == want


def test_objective_and_shorthand_together_are_refused(minimal_pipeline):
    msg = config_error(with_distill(minimal_pipeline, objective=[{"loss": "kd"}], alpha=0.5))
    assert msg.startswith("stages[0].distill: set either objective or the shorthand alpha, not both")


def test_several_named_teachers(minimal_pipeline):
    p = copy.deepcopy(minimal_pipeline)
    t = p.pop("teacher")
    p["teachers"] = {"r18": t, "r18b": {**t}}
    cfg = validate(with_distill(p, objective=[{"loss": "kd", "teacher": "r18", "weight": 0.45},
                                              {"loss": "kd", "teacher": "r18b", "weight": 0.45}, {"loss": "ce", "weight": 0.1}]))
    assert list(cfg.teacher_configs()) == ["r18", "r18b"] and cfg.primary_teacher() == "r18"
    # the shorthand cannot pick one of two teachers
    assert config_error(with_distill(p, loss="kd")) == (
        "stages[0].distill.loss: the pipeline has 2 teachers (r18, r18b); name one per term "
        "(objective: [{loss: kd, teacher: NAME}, ...])")
    # a prune fine-tune term names the key path inside the stage
    p["stages"] = [{"prune": {"target_macs": 0.5, "finetune": {"objective": [{"loss": "kd", "teacher": "r50"}]}}}]
    assert config_error(p).startswith("stages[0].prune.finetune.objective[0].teacher: unknown teacher 'r50'")
    both = {**p, "teacher": t}
    assert "set teacher (one) or teachers (several by name), not both" in config_error(both)


def test_a_term_mixing_several_teachers_is_validated(minimal_pipeline):
    p = copy.deepcopy(minimal_pipeline)
    t = p.pop("teacher")
    p["teachers"] = {"r18": t, "r18b": {**t}}
    cfg = validate(with_distill(p, objective=[{"loss": "kd", "teacher": ["r18", "r18b"], "teacher_weights": [2, 1]},
                                              {"loss": "ce", "weight": 0.1}]))
    assert [n for _, n, *_ in cfg.stage_entries()[0][1].teachers_used()] == ["r18", "r18b"]
    cases = [
        ({"teacher": ["r18", "r18"]}, "stages[0].distill: objective[0].teacher: expected one or more different teacher "
                                      "names, got ['r18', 'r18']"),
        ({"teacher": ["r18", "r18b"], "teacher_weights": [1]},
         "stages[0].distill: objective[0].teacher_weights: expected 2 non-negative weights (one per teacher, not all "
         "zero), got [1.0]"),
        ({"teacher": ["r18", "r18c"]}, "stages[0].distill.objective[0].teacher: unknown teacher 'r18c' (did you mean "
                                       "'r18' or 'r18b'?); the pipeline's teachers: r18, r18b"),
        ({"teacher": ["r18", "r18b"], "teacher_weights": "val_acc"},
         "stages[0].distill.objective[0].teacher_weights: val_acc weighs each teacher by its top-1 on the validation "
         "split, but data.val_split is 0 (set e.g. data.val_split: 0.1, or give the weights)"),
        ({"teacher": ["r18", "r18b"], "teacher_weights": "best"}, "stages[0].distill.objective[0].teacher_weights"),
    ]
    for term, want in cases:
        assert config_error(with_distill(p, objective=[{"loss": "kd", **term}])).startswith(want)
    p["data"]["val_split"] = 0.25
    validate(with_distill(p, objective=[{"loss": "dist", "teacher": ["r18", "r18b"], "teacher_weights": "val_acc"}]))


def test_a_teacher_free_objective_needs_no_teacher(minimal_pipeline):
    p = with_distill(minimal_pipeline, objective=[{"loss": "ce"}])
    p.pop("teacher")
    assert validate(p).stage_entries()[0][1].uses_teacher() is False
    p["stages"][0]["distill"]["objective"].append({"loss": "kd"})
    assert config_error(p) == "teacher: required key is missing (stages distill use a distillation loss)"


# ----------------------------------------------------------------------------- taps


def test_a_wrong_module_path_is_one_line_naming_close_matches():
    model = build(SPEC)
    with pytest.raises(ConfigError) as info:
        resolve_module(model, "feature.13", "stages[0].distill.objective[0].student")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("stages[0].distill.objective[0].student: no module 'feature.13' in the MobileNetV2")
    assert "'features.13'" in msg
    with pytest.raises(ConfigError, match=r"^x: no module 'head\.fc' in the MobileNetV2 \(its top-level modules: features, classifier\)$"):
        resolve_module(model, "head.fc", "x")


def test_taps_capture_the_named_outputs_of_one_forward():
    model = build(SPEC).eval()
    taps = FeatureTaps(model, ["features.3", "features.13"], "student")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        feats = taps.take()
        taps.remove()
        ref = model.features[:4](x)
        model(x)
    assert set(feats) == {"features.3", "features.13"} and torch.equal(feats["features.3"], ref)
    with pytest.raises(RuntimeError, match="did not run"):  # hooks are gone: the last forward left nothing
        taps.take()


# ----------------------------------------------------------------------------- teachers


def test_a_teacher_with_taps_runs_live_instead_of_from_the_logit_cache(tmp_path):
    data = tiny_data(16)
    data = Data(data.train, data.test, None, data.mean, data.std, "flip", 32, 8)
    teacher = build(SPEC).eval()
    cached = TeacherSource(teacher, data, torch.device("cpu"), True, "key", tmp_path)
    live = TeacherSource(teacher, data, torch.device("cpu"), True, "key", tmp_path, features=["features.6"])
    assert cached.table is not None and cached.table.shape == (2, 16, 4) and live.table is None
    x = data.normalize(data.train.images[:4])
    idx, flip = torch.arange(4), torch.zeros(4, dtype=torch.bool)
    a, b = cached(x, idx, flip), live(x, idx, flip)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and a.features == {}
    assert b.features["features.6"].shape[0] == 4 and b.features["features.6"].ndim == 4


# ----------------------------------------------------------------------------- the loop


def _train(cfg: TrainConfig, objective_for) -> tuple[list[dict], dict]:
    data = tiny_data(32)
    torch.manual_seed(1)
    teacher = build(SPEC).eval()
    torch.manual_seed(0)
    model = build(SPEC)
    src = TeacherSource(teacher, data, torch.device("cpu"), False, None, None)
    hist = fit(model, data, cfg, torch.device("cpu"), seed=0, objective=objective_for(cfg, src))
    return hist, model.state_dict()


def _bound(cfg: TrainConfig, src) -> Objective:
    terms = [t.model_copy(update={"teacher": "teacher"}) if hasattr(t, "teacher") else t for t in cfg.terms()]
    return Objective(terms, lambda name, features: src)


def test_the_shorthand_and_its_explicit_objective_train_identically():
    """`loss: kd` and the objective it stands for give the same weights bit for bit: the
    redesign keeps every shipped pipeline's figures."""
    common = dict(epochs=2, lr=0.01, eval_every=0, bn_recalibration="off")
    h1, w1 = _train(TrainConfig(loss="kd", temperature=3.0, alpha=0.7, **common), _bound)
    h2, w2 = _train(TrainConfig(objective=[{"loss": "kd", "weight": 0.7, "temperature": 3.0},
                                           {"loss": "ce", "weight": 1 - 0.7}], **common), _bound)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [(r["loss"], r["kd"], r["ce"]) for r in h1] == [(r["loss"], r["kd"], r["ce"]) for r in h2]


def test_a_terms_parameters_are_trained_and_resumed(tmp_path, monkeypatch):
    """Parameters a term owns go into the optimizer and the checkpoint; resume restores them."""
    from edgekd.distill import losses as L

    class LearnedTemperature(L.Loss):
        """kd with a learned temperature (test only)."""

        Params = L.NoParams

        def __init__(self, term):
            super().__init__(term)
            self.log_t = nn.Parameter(torch.zeros(()))

        def forward(self, student, teacher, labels, epoch):
            t = self.log_t.exp() + 1.0
            return {"loss": L.kl_div(teacher.logits, student.logits, t) * t**2}

    monkeypatch.setattr(L.LOSSES, "_items", {**L.LOSSES._items})
    L.register_loss("learned_t")(LearnedTemperature)
    term = LearnedTemperature.Term(loss="learned_t", teacher="teacher")
    data = tiny_data(32)
    teacher = build(SPEC).eval()
    src = TeacherSource(teacher, data, torch.device("cpu"), False, None, None)
    cfg = TrainConfig(epochs=2, loss="ce", lr=0.05, eval_every=0, bn_recalibration="off")

    def run(state=None, stop=False):
        torch.manual_seed(0)
        model, obj = build(SPEC), Objective([term], lambda n, f: src)

        def halt(rec):
            if stop and rec["epoch"] == 1:
                raise KeyboardInterrupt

        try:
            fit(model, data, cfg, torch.device("cpu"), seed=0, objective=obj, state_path=state, on_epoch=halt)
        except KeyboardInterrupt:
            pass
        return model, obj

    ref_model, ref_obj = run()
    assert ref_obj.terms[0].log_t.item() != 0.0  # trained
    state = tmp_path / "state.pt"
    run(state, stop=True)
    model, obj = run(state)
    assert obj.terms[0].log_t.item() == pytest.approx(ref_obj.terms[0].log_t.item(), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))


# ----------------------------------------------------------------------------- feature terms


def _feature_objective(terms: list[dict], teacher: nn.Module, data: Data) -> Objective:
    cfg = TrainConfig(objective=terms)
    src = {}

    def source(name, features):
        src.setdefault(name, TeacherSource(teacher, data, torch.device("cpu"), True, None, None, features))
        return src[name]

    return Objective([t.model_copy(update={"teacher": "t"}) if hasattr(t, "teacher") else t for t in cfg.terms()], source)


def test_fitnet_and_at_match_independent_computations():
    torch.manual_seed(0)
    s = torch.randn(3, 8, 8, 8)
    t = torch.randn(3, 16, 4, 4)
    from edgekd.distill import LOSSES, Outputs

    fit_term = LOSSES.get("fitnet").Term(loss="fitnet", student_layer="a", teacher_layer="b")
    fitnet = LOSSES.get("fitnet")(fit_term)
    fitnet.build({"a": s}, {"b": t})
    conv, bn = fitnet.regressor
    assert conv.weight.shape == (16, 8, 1, 1)
    bn.eval()  # plain affine map, to compare against by hand
    got = fitnet(Outputs(torch.zeros(3, 2), {"a": s}), Outputs(torch.zeros(3, 2), {"b": t}), None, 0)["loss"]
    r = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], s)
    r = (r - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    r = r * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    pooled = r.reshape(3, 16, 4, 2, 4, 2).mean((3, 5))  # 8x8 -> 4x4 by 2x2 means
    assert got.item() == pytest.approx(((pooled - t) ** 2).mean().item(), rel=1e-5)

    at_term = LOSSES.get("at").Term(loss="at", layers=[("a", "b")])
    got = LOSSES.get("at")(at_term)(Outputs(None, {"a": s}), Outputs(None, {"b": t}), None, 0)["loss"]
    sp = s.reshape(3, 8, 4, 2, 4, 2).mean((3, 5))

    def att(f):
        q = (f**2).mean(1).reshape(3, -1)
        return q / q.norm(dim=1, keepdim=True)

    assert got.item() == pytest.approx(((att(sp) - att(t)) ** 2).mean().item(), rel=1e-5)


def test_a_fitnet_regressor_is_trained_and_a_resumed_run_continues_identically(tmp_path):
    data = tiny_data(16)
    torch.manual_seed(1)
    teacher = build({**SPEC, "width_mult": 0.5}).eval()
    cfg = TrainConfig(epochs=2, lr=0.02, eval_every=0, bn_recalibration="off",
                      objective=[{"loss": "fitnet", "student_layer": "features.13", "teacher_layer": "features.13"},
                                 {"loss": "kd", "weight": 0.5}, {"loss": "ce", "weight": 0.5}])

    def run(state=None, stop=False):
        torch.manual_seed(0)
        model, obj = build(SPEC), _feature_objective([t.model_dump() for t in cfg.objective], teacher, data)

        def halt(rec):
            if stop and rec["epoch"] == 1:
                raise KeyboardInterrupt

        try:
            hist = fit(model, data, cfg, torch.device("cpu"), seed=0, objective=obj, state_path=state, on_epoch=halt)
        except KeyboardInterrupt:
            hist = None
        return model, obj, hist

    ref_model, ref_obj, ref_hist = run()
    assert set(ref_hist[0]) >= {"fitnet", "kd", "ce"} and ref_hist[-1]["fitnet"] < ref_hist[0]["fitnet"] * 1.5
    torch.manual_seed(0)
    fresh = build(SPEC)  # the regressor is not part of the student: its state dict is unchanged in keys
    assert set(ref_model.state_dict()) == set(fresh.state_dict())
    state = tmp_path / "state.pt"
    run(state, stop=True)
    model, obj, hist = run(state)
    assert [r["epoch"] for r in hist] == [1, 2] and hist[-1]["loss"] == pytest.approx(ref_hist[-1]["loss"], rel=1e-5)
    w_ref = ref_obj.terms[0].regressor[0].weight
    assert torch.allclose(obj.terms[0].regressor[0].weight, w_ref, atol=1e-6)
    assert w_ref.grad is not None and w_ref.grad.abs().sum() > 0  # in the graph, so trained
    assert "terms.0.regressor.0.weight" in torch.load(state, weights_only=True)["objective"]  # and checkpointed


def test_a_feature_term_on_an_onnx_teacher_is_a_validation_error(minimal_pipeline, tmp_path):
    p = copy.deepcopy(minimal_pipeline)
    onnx = tmp_path / "teacher.onnx"
    onnx.write_bytes(b"not checked before the term")
    p["teacher"] = {"arch": "resnet18", "checkpoint": str(onnx)}
    p["stages"] = [{"distill": {"epochs": 1, "objective": [{"loss": "at", "layers": [["features.6", "layer2"]], "weight": 1000},
                                                            {"loss": "ce"}]}}]
    assert config_error(p) == ("stages[0].distill.objective[0].teacher: this term reads the teacher's features, but an "
                               "ONNX teacher gives logits only (use a PyTorch checkpoint of it, or a logit loss)")


def test_a_wrong_feature_path_stops_training_with_one_line():
    data = tiny_data(8)
    teacher = build(SPEC).eval()
    obj = _feature_objective([{"loss": "fitnet", "student_layer": "feature.13", "teacher_layer": "features.13"}], teacher, data)
    with pytest.raises(ConfigError, match=r"^student: no module 'feature\.13' in the MobileNetV2 \(did you mean 'features\.13'"):
        fit(build(SPEC), data, TrainConfig(epochs=1, loss="ce"), torch.device("cpu"), seed=0, objective=obj)
