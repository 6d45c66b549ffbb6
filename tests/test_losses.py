"""Losses: two-class lifting, hard-label losses and the Hinton et al. 2015 KD loss, checked against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_fracture.models.losses import as_two_class, classification_loss, kd_loss, positive_prob


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_kd(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, T: float, alpha: float) -> tuple[float, float, float]:
    """Reference: zs, zt (B, 2) logits; y (B,) 0/1. Returns (total, T²·KL, CE)."""
    log_ps, log_pt = _np_log_softmax(zs / T), _np_log_softmax(zt / T)
    kl = float((np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean())  # batchmean
    log_p = _np_log_softmax(zs)
    ce = float(-(y * log_p[:, 1] + (1 - y) * log_p[:, 0]).mean())
    return alpha * T**2 * kl + (1 - alpha) * ce, T**2 * kl, ce


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"zs2": torch.randn(8, 2, generator=g) * 2, "zt2": torch.randn(8, 2, generator=g) * 2,
            "zs1": torch.randn(8, 1, generator=g) * 2, "zt1": torch.randn(8, 1, generator=g) * 2,
            "y": torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])}


def test_as_two_class_softmax_equals_sigmoid():
    z = torch.linspace(-6, 6, 13)
    for shaped in (z, z[:, None]):
        two = as_two_class(shaped)
        assert two.shape == (13, 2) and torch.all(two[:, 0] == 0)
        torch.testing.assert_close(torch.softmax(two, dim=1)[:, 1], torch.sigmoid(z))
        torch.testing.assert_close(positive_prob(shaped), torch.sigmoid(z))
    two = torch.randn(5, 2)
    assert as_two_class(two) is two
    torch.testing.assert_close(positive_prob(two), torch.softmax(two, dim=1)[:, 1])
    with pytest.raises(ValueError, match="shape"):
        as_two_class(torch.randn(4, 3))


@pytest.mark.parametrize("n_logits", [1, 2])
def test_kd_is_zero_when_student_equals_teacher(batch, n_logits):
    z = batch[f"zs{n_logits}"]
    out = kd_loss(z, z.clone(), batch["y"], temperature=4.0, alpha=1.0)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["ce"].item() > 0.1  # the hard term is computed but carries no weight at α = 1


def test_kd_zero_across_one_and_two_logit_forms(batch):
    z = batch["zs1"]
    out = kd_loss(z, as_two_class(z), batch["y"], temperature=2.0, alpha=1.0)  # teacher [0, z] == student z
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-7)
    out = kd_loss(z, as_two_class(z) + 3.0, batch["y"], temperature=2.0, alpha=1.0)  # softmax is shift-invariant
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (3.0, 0.7), (8.0, 0.9)])
def test_kd_matches_numpy_two_logits(batch, T, alpha):
    zs, zt, y = batch["zs2"], batch["zt2"], batch["y"]
    out = kd_loss(zs, zt, y, temperature=T, alpha=alpha)
    total, kd, ce = _np_kd(zs.numpy().astype(np.float64), zt.numpy().astype(np.float64), y.numpy(), T, alpha)
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_kd_matches_numpy_single_logits(batch):
    zs, zt, y = batch["zs1"], batch["zt1"], batch["y"]
    lift = lambda z: np.concatenate([np.zeros_like(z), z], axis=1)  # noqa: E731
    total, kd, ce = _np_kd(lift(zs.double().numpy()), lift(zt.double().numpy()), y.numpy(), 2.5, 0.6)
    out = kd_loss(zs, zt, y, temperature=2.5, alpha=0.6)
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)  # BCE on z == CE on [0, z]


@pytest.mark.parametrize("n_logits,kind", [(1, "bce"), (2, "ce")])
def test_alpha_zero_is_exactly_the_hard_loss(batch, n_logits, kind):
    zs, zt, y = batch[f"zs{n_logits}"], batch[f"zt{n_logits}"], batch["y"]
    hard = classification_loss(zs, y, kind=kind, pos_weight=2.0)
    assert torch.equal(kd_loss(zs, zt, y, temperature=4.0, alpha=0.0, pos_weight=2.0)["loss"], hard)
    assert torch.equal(kd_loss(zs, None, y, temperature=4.0, alpha=0.0, pos_weight=2.0)["loss"], hard)
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(zs, None, y, temperature=4.0, alpha=0.5)


def test_t_squared_keeps_soft_gradient_scale(batch):
    """Hinton et al.: soft-target gradients scale as 1/T²; the T² factor cancels it (for large T the gradient
    tends to (Δz − mean Δz)/(C·B), independent of T)."""
    zt = batch["zt2"]
    zs = (zt + 0.3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(1))).requires_grad_()

    def soft_grad(T: float) -> torch.Tensor:
        zs.grad = None
        kd_loss(zs, zt, batch["y"], temperature=T, alpha=1.0)["loss"].backward()
        return zs.grad.clone()

    g4, g16, g64 = soft_grad(4.0), soft_grad(16.0), soft_grad(64.0)
    ratio = g16.norm() / g4.norm()
    assert 0.85 < ratio < 1.15, ratio  # without T² this would be ≈ 1/16
    delta = (zs - zt).detach()
    limit = (delta - delta.mean(dim=1, keepdim=True)) / (2 * zs.shape[0])
    torch.testing.assert_close(g64, limit, rtol=2e-2, atol=1e-4)


def test_teacher_gets_no_gradient(batch):
    teacher = batch["zt2"].clone().requires_grad_()
    student = batch["zs2"].clone().requires_grad_()
    kd_loss(student, teacher, batch["y"], temperature=3.0, alpha=0.5)["loss"].backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_ce_on_lifted_logit_equals_bce_with_weights_smoothing_and_soft_targets(batch):
    z, y_soft = batch["zs1"], torch.rand(8, generator=torch.Generator().manual_seed(2))
    for y in (batch["y"], y_soft):
        for pw, ls in ((None, 0.0), (3.0, 0.1)):
            bce = classification_loss(z, y, kind="bce", pos_weight=pw, label_smoothing=ls)
            ce = classification_loss(z, y, kind="ce", pos_weight=pw, label_smoothing=ls)
            torch.testing.assert_close(ce, bce)
    # label smoothing: y → y(1 − ε) + ε/2, then the usual weighted BCE
    y = batch["y"].float()
    ys = y * 0.8 + 0.1
    ref = F.binary_cross_entropy_with_logits(z.reshape(-1), ys, pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(classification_loss(z, batch["y"], "bce", pos_weight=3.0, label_smoothing=0.2), ref)


def test_two_logit_ce_matches_torch_cross_entropy(batch):
    z, y = batch["zs2"], batch["y"]
    torch.testing.assert_close(classification_loss(z, y, kind="ce"), F.cross_entropy(z, y))
    torch.testing.assert_close(classification_loss(z, y, kind="ce", label_smoothing=0.1),
                               F.cross_entropy(z, y, label_smoothing=0.1))


def test_invalid_arguments_raise(batch):
    zs, zt, y = batch["zs2"], batch["zt2"], batch["y"]
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(zs, zt, y, temperature=0.0, alpha=0.5)
    for alpha in (-0.1, 1.1):
        with pytest.raises(ValueError, match="alpha"):
            kd_loss(zs, zt, y, temperature=2.0, alpha=alpha)
    with pytest.raises(ValueError, match="'bce' needs one logit"):
        classification_loss(zs, y, kind="bce")
    with pytest.raises(ValueError, match="not one of"):
        classification_loss(zs, y, kind="focal")
