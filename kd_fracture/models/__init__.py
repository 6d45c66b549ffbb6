"""Model factory: teachers (any timm model) and students (registered hybrids or `timm:NAME` baselines).

    create_model("resnet50", in_chans=3, pretrained="weights/resnet50_a1.safetensors", freeze="backbone")
    create_model("hybrid_s", in_chans=1, img_size=128, depth=3)        # a registered student with an override
    create_model("timm:mobilevit_xs", in_chans=1, img_size=128)        # a timm model as a student baseline
"""
from __future__ import annotations

from typing import Any

from torch import nn

from kd_fracture.errors import UserError
from kd_fracture.models.student import (STUDENT_REGISTRY, TIMM_PREFIX, HybridConfig, HybridStudent, create_student,
                                        is_student_name)
from kd_fracture.models.serve import for_inference, graphed
from kd_fracture.models.teacher import (FREEZE_MODES, apply_freeze, check_freeze_mode, classifier_names, create_teacher,
                                        freeze_backbone)

MIN_CAM_SIDE = 7
"""Smallest Grad-CAM map side worth showing: ResNet-50's layer4 at 224 px."""

__all__ = [
    "FREEZE_MODES", "STUDENT_REGISTRY", "HybridConfig", "HybridStudent", "apply_freeze", "classifier_param_names",
    "count_params", "create_model", "create_student", "create_teacher", "for_inference", "freeze_backbone",
    "grad_cam_target_layer", "graphed", "is_student_name",
]


def create_model(name: str, *, num_classes: int = 1, in_chans: int = 3, img_size: int | None = None,
                 pretrained: str | None = None, freeze: str = "none", drop_rate: float | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a teacher or student by name.

    name: a registered hybrid (`hybrid_t|hybrid_s|hybrid_m`, overrides = HybridConfig fields), `timm:NAME`
    (a timm model used as a student baseline) or any timm model name (a teacher); for timm models the overrides
    go to `timm.create_model` (e.g. drop_path_rate). drop_rate=None keeps the model's own default.
    """
    if name in STUDENT_REGISTRY:
        if pretrained is not None:
            raise UserError(f"--pretrained: student '{name}' starts from random init; "
                            f"only timm models load weights files")
        check_freeze_mode(freeze)
        if drop_rate is not None:
            overrides["drop_rate"] = drop_rate
        model = create_student(name, in_chans=in_chans, num_classes=num_classes, img_size=img_size, **overrides)
        return apply_freeze(model, freeze)
    # `timm:NAME` is the same timm model as a teacher would be; the prefix only marks its role
    timm_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    return create_teacher(timm_name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
                          freeze=freeze, drop_rate=drop_rate, img_size=img_size, **overrides)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with requires_grad when trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def classifier_param_names(model: nn.Module) -> set[str]:
    """Qualified names of the parameters of `model.get_classifier()` (e.g. {"fc.weight", "fc.bias"})."""
    modules = classifier_names(model)
    return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in modules}


def grad_cam_target_layer(model: nn.Module, img_size: int | None = None) -> nn.Module:
    """The layer whose (B, C, h, w) activations Grad-CAM weighs (Selvaraju et al. 2017).

    HybridStudent: its last conv stage (the tokens after it are not spatial maps).
    timm ResNet: `layer4[-1]`, the usual choice, when its map is at least MIN_CAM_SIDE pixels on a side (7×7 at
    224 px); at smaller inputs the deepest stage that still is (64 px: layer4 is 2×2, so layer2's 8×8) — a 2×2 map
    cannot point at a sign. Other timm models: the last `feature_info` module, else the last Conv2d. Token models
    (ViT) also need a reshape_transform in the Grad-CAM call.
    """
    if isinstance(model, HybridStudent):
        return model.grad_cam_layer()
    stages = [getattr(model, f"layer{i}", None) for i in (1, 2, 3, 4)]
    if all(isinstance(s, nn.Sequential) and len(s) for s in stages):
        strides = (4, 8, 16, 32)  # ResNet stage output strides
        usable = [s for s, stride in zip(stages, strides) if img_size is None or img_size // stride >= MIN_CAM_SIDE]
        return (usable or stages[:1])[-1][-1]
    feature_info = getattr(model, "feature_info", None)
    if isinstance(feature_info, list) and feature_info and "module" in feature_info[-1]:
        try:
            return model.get_submodule(feature_info[-1]["module"])
        except AttributeError:
            pass  # some timm feature_info names are not module paths; fall back to the last conv
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]
