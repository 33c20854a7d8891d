"""Distillation losses against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.losses import LOSSES, ce_loss, dkd_loss, kd_loss, mse_logits_loss, uses_teacher

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


# ---------------------------------------------------------------------------- tests


def test_registry_has_all_losses():
    assert {"ce", "kd", "mse_logits", "dkd"} <= set(LOSSES.names())
    assert LOSSES.get("kd") is kd_loss and LOSSES.get("dkd") is dkd_loss
    assert uses_teacher("kd") and uses_teacher("dkd") and uses_teacher("mse_logits") and not uses_teacher("ce")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_matches_numpy(batch, smoothing):
    s, t, y = batch
    out = ce_loss(*torch_args(s, t, y)[:2], label_smoothing=smoothing)
    assert out["loss"].item() == pytest.approx(np_ce(s, y, smoothing), rel=1e-9)
    assert out["ce"] is out["loss"]


def test_ce_ignores_teacher(batch):
    s, t, y = batch
    st, yt, tt = torch_args(s, t, y)
    assert ce_loss(st, yt, tt)["loss"].item() == pytest.approx(ce_loss(st, yt, None)["loss"].item())


@pytest.mark.parametrize("T,alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 1.0), (3.0, 0.0)])
def test_kd_matches_numpy(batch, T, alpha):
    s, t, y = batch
    out = kd_loss(*torch_args(s, t, y), temperature=T, alpha=alpha)
    want_loss, want_kd = np_kd(s, t, y, T, alpha)
    assert out["kd"].item() == pytest.approx(want_kd, rel=1e-9)
    assert out["ce"].item() == pytest.approx(np_ce(s, y), rel=1e-9)
    assert out["loss"].item() == pytest.approx(want_loss, rel=1e-9)


def test_kd_zero_when_student_equals_teacher(batch):
    s, _, y = batch
    st, yt, _ = torch_args(s, s, y)
    out = kd_loss(st, yt, st.clone(), temperature=4.0, alpha=0.7)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["loss"].item() == pytest.approx(0.3 * np_ce(s, y), rel=1e-9)


def test_kd_is_invariant_to_logit_shift(batch):
    s, t, y = batch
    a = kd_loss(*torch_args(s, t, y))["kd"].item()
    b = kd_loss(*torch_args(s + 5.0, t - 3.0, y))["kd"].item()
    assert a == pytest.approx(b, rel=1e-9) and a > 0


@pytest.mark.parametrize("alpha", [0.9, 0.25])
def test_mse_logits_matches_numpy(batch, alpha):
    s, t, y = batch
    out = mse_logits_loss(*torch_args(s, t, y), alpha=alpha)
    mse = float(np.mean((s - t) ** 2))
    assert out["mse"].item() == pytest.approx(mse, rel=1e-9)
    assert out["loss"].item() == pytest.approx(alpha * mse + (1 - alpha) * np_ce(s, y), rel=1e-9)


@pytest.mark.parametrize("T,a,b,ce_w,warm", [(4.0, 1.0, 8.0, 1.0, 1.0), (1.0, 2.0, 0.5, 0.5, 0.3), (2.0, 0.0, 1.0, 1.0, 1.0)])
def test_dkd_matches_numpy(batch, T, a, b, ce_w, warm):
    s, t, y = batch
    out = dkd_loss(*torch_args(s, t, y), temperature=T, dkd_alpha=a, dkd_beta=b, ce_weight=ce_w, warmup=warm)
    want, tckd, nckd, ce = np_dkd(s, t, y, T, a, b, ce_w, warm)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-6)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-6)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_dkd_float32_matches_numpy(batch):
    s, t, y = batch
    out = dkd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(y), torch.tensor(t, dtype=torch.float32))
    want, tckd, nckd, _ = np_dkd(s, t, y, 4.0, 1.0, 8.0)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-4, abs=1e-6)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-4, abs=1e-6)


def test_dkd_zero_distillation_when_identical(batch):
    s, _, y = batch
    st, yt, _ = torch_args(s, s, y)
    out = dkd_loss(st, yt, st.clone())
    assert out["tckd"].item() == pytest.approx(0.0, abs=1e-9)
    assert out["nckd"].item() == pytest.approx(0.0, abs=1e-9)
    assert out["loss"].item() == pytest.approx(np_ce(s, y), rel=1e-9)


def test_dkd_nckd_ignores_target_logit(batch):
    """Changing only the target logits changes TCKD, never NCKD (non-target distribution is renormalised)."""
    s, t, y = batch
    s2 = s.copy()
    s2[np.arange(B), y] += 3.0
    a = dkd_loss(*torch_args(s, t, y))
    b = dkd_loss(*torch_args(s2, t, y))
    assert a["nckd"].item() == pytest.approx(b["nckd"].item(), rel=1e-6)
    assert a["tckd"].item() != pytest.approx(b["tckd"].item(), rel=1e-3)


@pytest.mark.parametrize("name", ["ce", "kd", "mse_logits", "dkd"])
def test_gradients_flow_to_student_only(batch, name):
    s, t, y = batch
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float32, requires_grad=True)
    out = LOSSES.get(name)(st, torch.tensor(y), tt)
    out["loss"].backward()
    assert st.grad is not None and torch.isfinite(st.grad).all() and st.grad.abs().sum() > 0
    # gradient check against finite differences on the first element
    eps = 1e-3
    with torch.no_grad():
        sp, sm = st.detach().clone(), st.detach().clone()
        sp[0, 0] += eps
        sm[0, 0] -= eps
        fd = (LOSSES.get(name)(sp, torch.tensor(y), tt.detach())["loss"]
              - LOSSES.get(name)(sm, torch.tensor(y), tt.detach())["loss"]) / (2 * eps)
    assert st.grad[0, 0].item() == pytest.approx(fd.item(), rel=2e-2, abs=1e-3)


def test_kd_gradient_matches_closed_form(batch):
    """d(T^2 KL)/ds = T * (softmax(s/T) - softmax(t/T)) / B."""
    s, t, y = batch
    st, yt, tt = torch_args(s, t, y, requires_grad=True)
    T = 3.0
    kd_loss(st, yt, tt, temperature=T, alpha=1.0)["loss"].backward()
    expected = T * (np_softmax(s / T) - np_softmax(t / T)) / B
    assert np.allclose(st.grad.numpy(), expected, atol=1e-10)


def test_losses_return_scalars(batch):
    s, t, y = batch
    for name in ("ce", "kd", "mse_logits", "dkd"):
        out = LOSSES.get(name)(*torch_args(s, t, y))
        assert "loss" in out
        for k, v in out.items():
            assert v.ndim == 0 and torch.isfinite(v), (name, k)


@pytest.mark.parametrize("name", ["ce", "kd", "mse_logits", "dkd"])
def test_losses_accept_the_keywords_fit_passes(batch, name):
    """train.fit calls every loss with the same keyword set; unused ones must be ignored."""
    s, t, y = batch
    out = LOSSES.get(name)(*torch_args(s, t, y), temperature=2.0, alpha=0.5, dkd_alpha=1.0, dkd_beta=2.0,
                           warmup=0.5, label_smoothing=0.1)
    assert torch.isfinite(out["loss"])
    assert out["ce"].item() == pytest.approx(np_ce(s, y, 0.1), rel=1e-9)
