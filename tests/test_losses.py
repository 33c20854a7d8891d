"""Distillation losses against independent numpy computations, each through the objective
the training loop uses (the `loss:` shorthand and explicit terms alike)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.distill import LOSSES, Objective, Outputs
from edgekd.train import TrainConfig

B, C = 5, 4


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, (B, C))
    t = rng.normal(0, 2, (B, C))
    y = np.array([0, 3, 1, 2, 3])
    return s, t, y


def torch_args(s, t, y, requires_grad=False):
    st = torch.tensor(s, dtype=torch.float64, requires_grad=requires_grad)
    return st, torch.tensor(y, dtype=torch.long), torch.tensor(t, dtype=torch.float64)


# ---------------------------------------------------------------------------- numpy reference


def np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_ce(s, y, smoothing=0.0):
    logp = np.log(np_softmax(s))
    nll = -logp[np.arange(len(y)), y]
    smooth = -logp.mean(axis=1)
    return float(np.mean((1 - smoothing) * nll + smoothing * smooth))


def np_kd(s, t, y, T, alpha):
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    kl = np.sum(pt * (np.log(pt) - np.log(ps))) / len(s)  # batchmean
    kd = T**2 * kl
    return alpha * kd + (1 - alpha) * np_ce(s, y), kd


def np_dkd(s, t, y, T, a, b, ce_weight=1.0, warmup=1.0):
    """Zhao et al. 2022, written out per sample."""
    tckd = nckd = 0.0
    for i in range(len(s)):
        ps, pt = np_softmax(s[i:i + 1] / T)[0], np_softmax(t[i:i + 1] / T)[0]
        g = y[i]
        bs = np.array([ps[g], 1 - ps[g]])
        bt = np.array([pt[g], 1 - pt[g]])
        tckd += np.sum(bt * (np.log(bt) - np.log(bs)))
        mask = np.arange(len(ps)) != g
        qs = ps[mask] / ps[mask].sum()  # renormalised non-target distribution
        qt = pt[mask] / pt[mask].sum()
        nckd += np.sum(qt * (np.log(qt) - np.log(qs)))
    tckd = tckd / len(s) * T**2
    nckd = nckd / len(s) * T**2
    ce = np_ce(s, y)
    return ce_weight * ce + warmup * (a * tckd + b * nckd), tckd, nckd, ce


# ---------------------------------------------------------------------------- helpers


def objective(loss: str | None = None, terms: list[dict] | None = None, **shorthand) -> Objective:
    """The objective fit() would build, every distillation term bound to the one teacher 't'."""
    cfg = TrainConfig(objective=terms) if terms is not None else TrainConfig(loss=loss, **shorthand)
    specs = [t.model_copy(update={"teacher": "t"}) if hasattr(t, "teacher") else t for t in cfg.terms()]
    return Objective(specs, lambda name, features: None)


def run(obj: Objective, s, y, t, epoch: int = 0) -> dict:
    return obj(Outputs(s), {"t": Outputs(t)}, y, epoch)


def finite_difference(obj: Objective, s: torch.Tensor, y: torch.Tensor, t: torch.Tensor, at: tuple[int, int],
                      eps: float) -> float:
    """d loss / d s[at] by central differences (the reference an autograd gradient is checked against)."""
    with torch.no_grad():
        sp, sm = s.detach().clone(), s.detach().clone()
        sp[at] += eps
        sm[at] -= eps
        return ((run(obj, sp, y, t.detach())["loss"] - run(obj, sm, y, t.detach())["loss"]) / (2 * eps)).item()


def loss_of(name: str, s, y, t, **params) -> torch.Tensor:
    """One registered loss on its own (unweighted)."""
    term = LOSSES.get(name).Term(loss=name, **params)
    return LOSSES.get(name)(term)(Outputs(s), Outputs(t), y, 0)["loss"]


# ---------------------------------------------------------------------------- tests


def test_registry_has_all_losses():
    assert {"ce", "kd", "mse_logits", "dkd"} <= set(LOSSES.names())
    assert [LOSSES.get(n).needs_teacher for n in ("kd", "dkd", "mse_logits", "ce")] == [True, True, True, False]
    assert TrainConfig(loss="kd").uses_teacher() and not TrainConfig(loss="ce").uses_teacher()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_matches_numpy(batch, smoothing):
    s, t, y = batch
    out = run(objective("ce", label_smoothing=smoothing), *torch_args(s, t, y))
    assert out["loss"].item() == pytest.approx(np_ce(s, y, smoothing), rel=1e-9)
    assert out["ce"].item() == out["loss"].item()


def test_ce_needs_no_teacher(batch):
    s, t, y = batch
    st, yt, _ = torch_args(s, t, y)
    obj = Objective(TrainConfig(loss="ce").terms())  # no teacher factory at all
    assert obj(Outputs(st), {}, yt, 0)["loss"].item() == pytest.approx(np_ce(s, y), rel=1e-9)
    with pytest.raises(ValueError, match="loss 'kd' needs a teacher"):
        Objective(TrainConfig(loss="kd").terms())


@pytest.mark.parametrize("T,alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 1.0), (3.0, 0.0)])
def test_kd_matches_numpy(batch, T, alpha):
    s, t, y = batch
    out = run(objective("kd", temperature=T, alpha=alpha), *torch_args(s, t, y))
    want_loss, want_kd = np_kd(s, t, y, T, alpha)
    assert out["kd"].item() == pytest.approx(want_kd, rel=1e-9)
    assert out["ce"].item() == pytest.approx(np_ce(s, y), rel=1e-9)
    assert out["loss"].item() == pytest.approx(want_loss, rel=1e-9)


def test_shorthand_and_explicit_objective_are_the_same_sum(batch):
    """`loss: kd, alpha: 0.9` is exactly the objective [kd weight 0.9, ce weight 0.1]: bit for bit,
    so pipelines written with the shorthand keep their figures."""
    s, t, y = batch
    args = (torch.tensor(s, dtype=torch.float32), torch.tensor(y), torch.tensor(t, dtype=torch.float32))
    a = run(objective("kd", temperature=3.0, alpha=0.9), *args)["loss"]
    b = run(objective(terms=[{"loss": "kd", "weight": 0.9, "temperature": 3.0}, {"loss": "ce", "weight": 1 - 0.9}]), *args)["loss"]
    old = 0.9 * loss_of("kd", *args, temperature=3.0) + (1 - 0.9) * loss_of("ce", *args)  # edgekd 0.1's formula
    assert a.item() == b.item() == old.item()


def test_kd_zero_when_student_equals_teacher(batch):
    s, _, y = batch
    st, yt, _ = torch_args(s, s, y)
    out = run(objective("kd", temperature=4.0, alpha=0.7), st, yt, st.clone())
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["loss"].item() == pytest.approx(0.3 * np_ce(s, y), rel=1e-9)


def test_kd_is_invariant_to_logit_shift(batch):
    s, t, y = batch
    a = loss_of("kd", *torch_args(s, t, y)).item()
    b = loss_of("kd", *torch_args(s + 5.0, t - 3.0, y)).item()
    assert a == pytest.approx(b, rel=1e-9) and a > 0


@pytest.mark.parametrize("alpha", [0.9, 0.25])
def test_mse_logits_matches_numpy(batch, alpha):
    s, t, y = batch
    out = run(objective("mse_logits", alpha=alpha), *torch_args(s, t, y))
    mse = float(np.mean((s - t) ** 2))
    assert out["mse"].item() == pytest.approx(mse, rel=1e-9)
    assert out["loss"].item() == pytest.approx(alpha * mse + (1 - alpha) * np_ce(s, y), rel=1e-9)


@pytest.mark.parametrize("T,a,b,ce_w,warm_epochs,epoch", [(4.0, 1.0, 8.0, 1.0, 0, 0), (1.0, 2.0, 0.5, 0.5, 10, 2),
                                                          (2.0, 0.0, 1.0, 1.0, 4, 5)])
def test_dkd_matches_numpy(batch, T, a, b, ce_w, warm_epochs, epoch):
    s, t, y = batch
    obj = objective(terms=[{"loss": "ce", "weight": ce_w},
                           {"loss": "dkd", "temperature": T, "alpha": a, "beta": b, "warmup_epochs": warm_epochs}])
    out = run(obj, *torch_args(s, t, y), epoch=epoch)
    warm = min(1.0, (epoch + 1) / warm_epochs) if warm_epochs else 1.0
    want, tckd, nckd, ce = np_dkd(s, t, y, T, a, b, ce_w, warm)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-6)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-6)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_dkd_shorthand_is_ce_plus_dkd(batch):
    s, t, y = batch
    out = run(objective("dkd", temperature=2.0, dkd_alpha=0.5, dkd_beta=4.0, dkd_warmup_epochs=2), *torch_args(s, t, y))
    want, *_ = np_dkd(s, t, y, 2.0, 0.5, 4.0, 1.0, 0.5)  # epoch 0 of a 2-epoch warm-up
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_dkd_float32_matches_numpy(batch):
    s, t, y = batch
    out = run(objective("dkd"), torch.tensor(s, dtype=torch.float32), torch.tensor(y), torch.tensor(t, dtype=torch.float32))
    want, tckd, nckd, _ = np_dkd(s, t, y, 4.0, 1.0, 8.0)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-4, abs=1e-6)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-4, abs=1e-6)


def test_dkd_zero_distillation_when_identical(batch):
    s, _, y = batch
    st, yt, _ = torch_args(s, s, y)
    out = run(objective("dkd"), st, yt, st.clone())
    assert out["tckd"].item() == pytest.approx(0.0, abs=1e-9)
    assert out["nckd"].item() == pytest.approx(0.0, abs=1e-9)
    assert out["loss"].item() == pytest.approx(np_ce(s, y), rel=1e-9)


def test_dkd_nckd_ignores_target_logit(batch):
    """Changing only the target logits changes TCKD, never NCKD (non-target distribution is renormalised)."""
    s, t, y = batch
    s2 = s.copy()
    s2[np.arange(B), y] += 3.0
    a = run(objective("dkd"), *torch_args(s, t, y))
    b = run(objective("dkd"), *torch_args(s2, t, y))
    assert a["nckd"].item() == pytest.approx(b["nckd"].item(), rel=1e-6)
    assert a["tckd"].item() != pytest.approx(b["tckd"].item(), rel=1e-3)


@pytest.mark.parametrize("name", ["ce", "kd", "mse_logits", "dkd"])
def test_gradients_flow_to_student_only(batch, name):
    s, t, y = batch
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float32, requires_grad=True)
    obj = objective(name)
    run(obj, st, torch.tensor(y), tt)["loss"].backward()
    assert st.grad is not None and torch.isfinite(st.grad).all() and st.grad.abs().sum() > 0
    # gradient check against finite differences on the first element
    fd = finite_difference(obj, st, torch.tensor(y), tt, (0, 0), 1e-3)
    assert st.grad[0, 0].item() == pytest.approx(fd, rel=2e-2, abs=1e-3)


def test_kd_gradient_matches_closed_form(batch):
    """d(T^2 KL)/ds = T * (softmax(s/T) - softmax(t/T)) / B."""
    s, t, y = batch
    st, yt, tt = torch_args(s, t, y, requires_grad=True)
    T = 3.0
    loss_of("kd", st, yt, tt, temperature=T).backward()
    expected = T * (np_softmax(s / T) - np_softmax(t / T)) / B
    assert np.allclose(st.grad.numpy(), expected, atol=1e-10)


def test_losses_return_scalars(batch):
    s, t, y = batch
    for name in ("ce", "kd", "mse_logits", "dkd"):
        out = run(objective(name), *torch_args(s, t, y))
        assert "loss" in out
        for k, v in out.items():
            assert v.ndim == 0 and torch.isfinite(v), (name, k)


def test_two_terms_of_one_loss_are_logged_apart(batch):
    """Two kd terms from two teachers: summed with their weights, each logged under its teacher."""
    s, t, y = batch
    st, yt, tt = torch_args(s, t, y)
    cfg = TrainConfig(objective=[{"loss": "kd", "teacher": "a", "weight": 0.5}, {"loss": "kd", "teacher": "b", "weight": 0.5}])
    obj = Objective(cfg.terms(), lambda name, features: None)
    out = obj(Outputs(st), {"a": Outputs(tt), "b": Outputs(st.clone())}, yt, 0)
    _, kd_a = np_kd(s, t, y, 4.0, 1.0)
    assert out["kd_a"].item() == pytest.approx(kd_a, rel=1e-9) and out["kd_b"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["loss"].item() == pytest.approx(0.5 * kd_a, rel=1e-9)


# ---------------------------------------------------------------------------- DIST, logit standardization, several teachers


def np_dist(s, t, T, beta, gamma):
    """Huang et al. 2022, written from the paper: 1 - Pearson per image (inter-class) and per
    class over the batch (intra-class) of the softened distributions, times T^2."""
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    inter = (1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(len(s))])) * T**2
    intra = (1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(s.shape[1])])) * T**2
    return beta * inter + gamma * intra, inter, intra


def np_zscore(z):
    return (z - z.mean(1, keepdims=True)) / z.std(1, ddof=1, keepdims=True)


@pytest.mark.parametrize("T,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5), (2.0, 0.0, 1.0)])
def test_dist_matches_numpy(batch, T, beta, gamma):
    s, t, y = batch
    out = run(objective(terms=[{"loss": "dist", "temperature": T, "beta": beta, "gamma": gamma}]), *torch_args(s, t, y))
    want, inter, intra = np_dist(s, t, T, beta, gamma)
    assert out["inter"].item() == pytest.approx(inter, rel=1e-6)
    assert out["intra"].item() == pytest.approx(intra, rel=1e-6)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_dist_is_zero_only_when_the_relations_match(batch):
    s, t, y = batch
    st, yt, tt = torch_args(s, t, y)
    assert run(objective(terms=[{"loss": "dist"}]), st, yt, st.clone())["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert run(objective(terms=[{"loss": "dist"}]), st, yt, tt)["loss"].item() > 0.1


@pytest.mark.parametrize("name,params", [("kd", {"temperature": 2.0}), ("dkd", {"temperature": 2.0}), ("dist", {})])
def test_logit_standardization_is_the_loss_on_z_scored_logits(batch, name, params):
    """`standardize: true` (Sun et al. 2024) = the same loss on each row's z-scores, so it
    ignores a teacher's (or student's) logit scale and offset."""
    s, t, y = batch
    st, yt, tt = torch_args(s, t, y)
    std = run(objective(terms=[{"loss": name, "standardize": True, **params}]), st, yt, tt)["loss"].item()
    plain = run(objective(terms=[{"loss": name, **params}]), *torch_args(np_zscore(s), np_zscore(t), y))["loss"].item()
    assert std == pytest.approx(plain, rel=1e-6)
    rescaled = run(objective(terms=[{"loss": name, "standardize": True, **params}]),
                   *torch_args(3 * s + 1, 0.5 * t - 2, y))["loss"].item()
    assert rescaled == pytest.approx(std, rel=1e-6)


def two_teachers(terms: list[dict]) -> Objective:
    return Objective(TrainConfig(objective=terms).terms(), lambda name, features: None)


@pytest.mark.parametrize("weights,w", [("equal", (0.5, 0.5)), ([3.0, 1.0], (0.75, 0.25)), ([1.0, 0.0], (1.0, 0.0))])
def test_several_teachers_mix_their_softened_distributions(batch, weights, w):
    """`teacher: [a, b]`: the student matches w_a softmax(t_a/T) + w_b softmax(t_b/T), not the
    average of two KL terms (and not softmax of averaged logits)."""
    s, t, y = batch
    t2 = np.random.default_rng(1).normal(0, 3, t.shape)
    T = 3.0
    obj = two_teachers([{"loss": "kd", "teacher": ["a", "b"], "teacher_weights": weights, "temperature": T}])
    st, yt, tt = torch_args(s, t, y)
    out = obj(Outputs(st), {"a": Outputs(tt), "b": Outputs(torch.tensor(t2))}, yt, 0)
    pt = w[0] * np_softmax(t / T) + w[1] * np_softmax(t2 / T)
    ps = np_softmax(s / T)
    want = T**2 * np.sum(pt * (np.log(pt) - np.log(ps))) / B
    assert out["loss"].item() == pytest.approx(want, rel=1e-9)


def test_one_teacher_in_a_list_is_that_teacher(batch):
    s, t, y = batch
    st, yt, tt = torch_args(s, t, y)
    a = two_teachers([{"loss": "dkd", "teacher": ["a"]}])(Outputs(st), {"a": Outputs(tt)}, yt, 0)["loss"]
    b = two_teachers([{"loss": "dkd", "teacher": "a"}])(Outputs(st), {"a": Outputs(tt)}, yt, 0)["loss"]
    assert a.item() == b.item()


@pytest.mark.parametrize("name", ["dist"])
def test_new_logit_losses_send_gradients_to_the_student_only(batch, name):
    s, t, y = batch
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    obj = objective(terms=[{"loss": name, "standardize": True}])
    run(obj, st, torch.tensor(y), tt.detach())["loss"].backward()
    fd = finite_difference(obj, st, torch.tensor(y), tt, (1, 2), 1e-6)
    assert st.grad[1, 2].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
