"""Classification and knowledge-distillation losses for one- or two-logit binary classifiers.

A single logit z is the two-class logit pair [0, z]: softmax([0, z])[1] = 1 / (1 + e^-z) = sigmoid(z), so a
BCE model and a 2-way softmax model can teach each other, and BCE on z equals 2-class cross-entropy on [0, z].
Losses are computed in float32 (safe under autocast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["as_two_class", "classification_loss", "kd_loss", "positive_prob"]

LOSS_KINDS = ("bce", "ce")


def _n_logits(logits: Tensor) -> int:
    if logits.ndim == 1:
        return 1
    if logits.ndim == 2 and logits.shape[1] in (1, 2):
        return logits.shape[1]
    raise ValueError(f"expected logits of shape (B,), (B, 1) or (B, 2), got {tuple(logits.shape)}")


def as_two_class(logits: Tensor) -> Tensor:
    """(B,) or (B, 1) single logit z → (B, 2) [0, z]; (B, 2) is returned unchanged."""
    if _n_logits(logits) == 2:
        return logits
    z = logits.reshape(-1)
    return torch.stack([torch.zeros_like(z), z], dim=1)


def positive_prob(logits: Tensor) -> Tensor:
    """(B,) probability of class 1: sigmoid(z) for one logit, softmax(z)[:, 1] for two."""
    if _n_logits(logits) == 1:
        return torch.sigmoid(logits.float().reshape(-1))
    return torch.softmax(logits.float(), dim=1)[:, 1]


def _soft_targets(targets: Tensor, label_smoothing: float) -> Tensor:
    """(B,) labels (int/bool 0/1 or float probabilities of class 1) → (B,) float, smoothed: y(1-ε) + ε/2."""
    y = targets.reshape(-1).float()
    return y * (1.0 - label_smoothing) + 0.5 * label_smoothing


def classification_loss(logits: Tensor, targets: Tensor, kind: str = "bce", pos_weight: float | None = None,
                        label_smoothing: float = 0.0) -> Tensor:
    """Mean hard-label loss over the batch.

    "bce": BCE-with-logits on one logit, ℓ = -[w·y·log σ(z) + (1-y)·log(1-σ(z))], w = pos_weight.
    "ce":  cross-entropy on two logits (one logit is lifted to [0, z]), ℓ = -[w·y·log p_1 + (1-y)·log p_0].
    Both read targets (B,) as the probability of class 1 (int 0/1, or float soft labels from mixup), smoothed to
    y(1-ε) + ε/2, and average over the batch (not over the weights), so "ce" on [0, z] equals "bce" on z.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind '{kind}' is not one of {LOSS_KINDS}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    y = _soft_targets(targets, label_smoothing).to(logits.device)
    w = 1.0 if pos_weight is None else float(pos_weight)
    if kind == "bce":
        if _n_logits(logits) != 1:
            raise ValueError(f"loss 'bce' needs one logit per image, got {tuple(logits.shape)}; use loss 'ce'")
        weight = torch.tensor(w, device=logits.device) if pos_weight is not None else None
        return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), y, pos_weight=weight)
    log_p = torch.log_softmax(as_two_class(logits.float()), dim=1)  # (B, 2)
    return -(w * y * log_p[:, 1] + (1.0 - y) * log_p[:, 0]).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor, temperature: float,
            alpha: float, pos_weight: float | None = None) -> dict[str, Tensor]:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    L = α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(y, z_s)
    The T² keeps soft-target gradients on the same scale as the hard-label term when T changes
    (for large T, ∂(T²·KL)/∂z_s → (z_s − z_t)/C up to centring, independent of T).
    Single logits are lifted to [0, z]; the teacher is detached; KL uses batchmean reduction. The hard term is
    BCE for a single-logit student (= CE on [0, z]) and CE for a two-logit one, with optional pos_weight.
    α = 0 gives exactly the hard loss (the no-KD baseline; teacher_logits may then be None); α = 1 is pure KD.

    student_logits, teacher_logits: (B,), (B, 1) or (B, 2); targets: (B,) 0/1 or soft probability of class 1.
    Returns {"loss": total, "kd": T²·KL, "ce": hard term}.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kind = "bce" if _n_logits(student_logits) == 1 else "ce"
    hard = classification_loss(student_logits, targets, kind=kind, pos_weight=pos_weight)
    if teacher_logits is None:
        if alpha != 0:
            raise ValueError("kd_loss needs teacher_logits when alpha > 0")
        return {"loss": hard, "kd": torch.zeros_like(hard), "ce": hard}
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"teacher batch {teacher_logits.shape[0]} != student batch {student_logits.shape[0]}")
    log_p_s = torch.log_softmax(as_two_class(student_logits.float()) / temperature, dim=1)  # (B, 2)
    log_p_t = torch.log_softmax(as_two_class(teacher_logits.detach().float()) / temperature, dim=1)
    # F.kl_div(input=log q, target=log p) = Σ p·(log p − log q) = KL(p ‖ q), p = teacher, q = student
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    return {"loss": alpha * soft + (1.0 - alpha) * hard, "kd": soft, "ce": hard}
