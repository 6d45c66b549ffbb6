"""Tasks: what differs between teacher training and distillation, as one `losses(model, batch, epoch)` call.

`engine.fit` is the one loop; a Task turns a batch into named loss parts `{"loss": total, "ce": …, "kd": …}`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from kd_fracture.config import TrainConfig
from kd_fracture.errors import UserError
from kd_fracture.models.losses import classification_loss, kd_loss


class Task(Protocol):
    def losses(self, model: nn.Module, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        """Named loss parts for one batch; "loss" is the total that is back-propagated."""


@dataclass
class SupervisedTask:
    """Hard-label training: BCE on one logit (or CE on two), optional pos_weight and timm Mixup/CutMix."""

    loss: str = "bce"
    pos_weight: float | None = None
    label_smoothing: float = 0.0
    mixup: Callable | None = None

    def losses(self, model: nn.Module, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        x, y = batch["image"], batch["label"]  # (B, C, H, W), (B,) float 0/1
        if self.mixup is not None:
            x, y = mix(self.mixup, x, y)
        logits = model(x)  # (B, 1) or (B, 2)
        ce = classification_loss(logits, y, kind=self.loss, pos_weight=self.pos_weight,
                                 label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}


@dataclass
class DistillTask:
    """Hinton KD as an `engine.Task`: L = α·T²·KL(p_t^T ‖ p_s^T) + (1 − α)·CE(y, z_s) (see `losses.kd_loss`).

    `teacher(batch) → (B, C_t)` logits: a `CachedTeacher` (replayed views) or an `OnlineTeacher`; None for α = 0.
    Mixup is not supported: mixed images have no cached teacher logits.
    """

    teacher: Callable[[dict], torch.Tensor] | None
    temperature: float
    alpha: float
    pos_weight: float | None = None

    def losses(self, model: nn.Module, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        student_logits = model(batch["image"])  # (B, 1) or (B, 2)
        teacher_logits = self.teacher(batch) if self.teacher is not None and self.alpha > 0 else None
        return kd_loss(student_logits, teacher_logits, batch["label"], self.temperature,
                       self.alpha if teacher_logits is not None else 0.0, self.pos_weight)


def resolve_pos_weight(value: float | str | None, labels) -> float | None:
    """`auto` → n_neg / n_pos of the training labels (so both classes weigh the same in BCE)."""
    if value != "auto":
        return None if value is None else float(value)
    labels = np.asarray(labels)
    n_pos = int((labels == 1).sum())
    if n_pos == 0:
        raise UserError("pos_weight=auto: the training split has no positive images")
    return float((labels == 0).sum() / n_pos)


def make_mixup(cfg: TrainConfig) -> Callable | None:
    """timm Mixup/CutMix for binary targets; None when both alphas are 0."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    # timm's Mixup mixes one-hot targets; with num_classes=2 column 1 is the soft positive target.
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0, num_classes=2)


def mix(mixup: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] % 2:  # timm Mixup needs an even batch; the odd last sample trains unmixed
        x_mix, y_mix = mixup(x[:-1], y[:-1].long())
        return torch.cat([x_mix, x[-1:]]), torch.cat([y_mix[:, 1], y[-1:]])
    x_mix, y_mix = mixup(x, y.long())
    return x_mix, y_mix[:, 1]  # (B,) soft positive target
