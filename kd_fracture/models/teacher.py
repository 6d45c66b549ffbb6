"""The teacher: any timm model (default ResNet-50, He et al. 2016), optionally from a local weights file.

Weights are never downloaded. `pretrained` names a local .safetensors/.pth/.bin file that timm loads through
`pretrained_cfg_overlay=dict(file=...)`, adapting it the way it adapts hub weights:
- the input conv is adapted to `in_chans` (for 1 channel timm sums the RGB filters: `adapt_input_conv`);
- the classifier is dropped and re-initialised when `num_classes` differs from the architecture's pretrained
  config (1000 for ImageNet models), so an ImageNet file gives a fresh 1- or 2-logit head on a loaded backbone.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

from kd_fracture.errors import UserError

__all__ = ["FREEZE_MODES", "apply_freeze", "check_freeze_mode", "create_teacher", "create_timm_model",
           "freeze_backbone"]

FREEZE_MODES = ("none", "backbone", "bn")


def _unknown_model_error(name: str) -> UserError:
    close = timm.list_models(f"*{name}*")[:10] or difflib.get_close_matches(name, timm.list_models(), n=5)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    return UserError(f"unknown model '{name}'{hint}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict (timm's loader: safetensors or torch.load(weights_only=True), 'state_dict' unwrapped)."""
    if not path.is_file():
        raise UserError(f"--pretrained {path}: file not found; give a local .safetensors/.pth/.bin weights file")
    try:
        return timm.models.load_state_dict(str(path))
    except Exception as e:  # safetensors, pickle and zip errors have no common base class
        raise UserError(f"--pretrained {path}: cannot read weights ({type(e).__name__}: {e})") from None


def create_timm_model(name: str, num_classes: int = 1, in_chans: int = 3, pretrained: str | Path | None = None,
                      img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, ...)` with errors for people and local-only weights.

    img_size is passed only to models whose constructor takes it (ViT, MobileViT, ...); CNNs ignore it.
    kwargs go to timm (drop_rate, drop_path_rate, ...).
    """
    if ":" in name:  # 'hf-hub:...' / 'local-dir:' names make timm fetch configs
        raise UserError(f"model '{name}': give a timm architecture name (weights come from --pretrained FILE)")
    if not timm.is_model(name):
        raise _unknown_model_error(name)
    path = Path(pretrained).expanduser() if pretrained is not None else None
    file_state = _read_weights(path) if path is not None else None
    args = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if path is not None:
        args["pretrained_cfg_overlay"] = dict(file=str(path))
    try:
        try:
            model = timm.create_model(name, pretrained=path is not None, img_size=img_size, **args)
        except TypeError as e:
            if img_size is None or "img_size" not in str(e):
                raise
            model = timm.create_model(name, pretrained=path is not None, **args)
    except TypeError as e:  # an override the architecture does not take
        raise UserError(f"model '{name}': {e}") from None
    except RuntimeError as e:  # size mismatch between the file and the architecture
        if path is None:
            raise
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"--pretrained {path} does not fit model '{name}': {detail}") from None
    if file_state is not None:
        _check_backbone_loaded(model, file_state, path, name)
    return model


def _check_backbone_loaded(model: nn.Module, file_state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    # timm loads with strict=False once it drops the classifier, so a file with foreign key names
    # (another architecture, a wrapper prefix) would load nothing and say nothing.
    head = classifier_names(model)
    backbone = [k for k in model.state_dict() if k.rsplit(".", 1)[0] not in head]
    matched = [k for k in backbone if k in file_state]
    if not matched:
        raise UserError(f"--pretrained {path}: none of its tensor names match model '{name}' "
                        f"(e.g. file has '{next(iter(file_state), '')}', model has '{backbone[0]}')")


def classifier_names(model: nn.Module) -> set[str]:
    """Qualified names of the modules that make up the classifier (`model.get_classifier()`)."""
    if not hasattr(model, "get_classifier"):
        raise TypeError(f"{type(model).__name__} has no get_classifier(); not a timm-style model")
    classifier = model.get_classifier()
    inside = {id(m) for m in classifier.modules()}
    return {n for n, m in model.named_modules() if id(m) in inside}


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Train only `model.get_classifier()`: every other parameter stops requiring grad, and the backbone's
    BatchNorm layers become `FrozenBatchNorm2d` (timm) so `model.train()` no longer updates their running stats.

    Checkpoints of a frozen model have no `num_batches_tracked`; rebuild with the same freeze mode to load them.
    """
    classifier = model.get_classifier()
    trainable = {id(p) for p in classifier.parameters()}
    if not trainable:
        raise UserError("--freeze backbone: the model has no classifier parameters to train (num_classes=0?)")
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    for child_name, child in list(model.named_children()):
        if child is not classifier:
            frozen = freeze_batch_norm_2d(child)
            if frozen is not child:  # the child itself was a BatchNorm
                model.add_module(child_name, frozen)
    return model


def check_freeze_mode(mode: str) -> None:
    """UserError for a freeze mode that is not one of FREEZE_MODES (checked before a model is built)."""
    if mode not in FREEZE_MODES:
        raise UserError(f"--freeze '{mode}' is not one of {', '.join(FREEZE_MODES)}")


def apply_freeze(model: nn.Module, mode: str) -> nn.Module:
    """none | backbone (train only the classifier, `freeze_backbone`) | bn (train every weight, but every BatchNorm
    becomes timm's `FrozenBatchNorm2d`: running statistics and affine parameters stay those of the start weights,
    the usual way to fine-tune a pretrained CNN on a few hundred images with small batches)."""
    check_freeze_mode(mode)
    if mode == "backbone":
        return freeze_backbone(model)
    if mode == "bn":
        return freeze_batch_norm_2d(model)
    return model


def create_teacher(name: str = "resnet50", num_classes: int = 1, in_chans: int = 3, pretrained: str | None = None,
                   freeze: str = "none", drop_rate: float = 0.0, img_size: int | None = None,
                   **kwargs: Any) -> nn.Module:
    """Any timm model; `pretrained` is a local weights file (never downloaded); freeze in {"none", "backbone"}.

    freeze="backbone" reproduces the frozen-feature-extractor arm of the frozen-vs-fine-tuned comparison.
    """
    check_freeze_mode(freeze)
    model = create_timm_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
                              img_size=img_size, drop_rate=drop_rate, **kwargs)
    return apply_freeze(model, freeze)
