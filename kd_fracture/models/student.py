"""The student: a small CNN+Transformer hybrid, plus timm baselines under the `timm:NAME` prefix.

Layout (MobileViT/CoAtNet-style hybrid; convolutions for local texture, attention for global context):

    x (B, C_in, H, W)
      ─ stem: 3×3 conv, stride 2, BN, GELU                                  → (B, stem_width, H/2, W/2)
      ─ stage i (i = 1..len(widths)): inverted-residual (MBConv) blocks,
        the first with stride 2                                               → (B, widths[i], H/2^(i+1), W/2^(i+1))
      ─ 1×1 conv to embed_dim, flatten, + 2-D sin-cos position embedding    → (B, N, D), N = (H/s)·(W/s)
      ─ `depth` pre-norm Transformer blocks (timm ViT `Block`), final LayerNorm
      ─ mean over tokens, dropout, Linear                                     → (B, num_classes)

The total stride is s = 2 (stem) × 2**len(widths); the default three stages give s = 16. The position embedding
is computed for the actual token grid on every call, so any image size divisible by s works without interpolation.

Layout: the engine trains in channels_last (NHWC). There the wide 1×1 convolutions run as GEMMs over the NHWC view
(`PointwiseConv2d`) and GELU runs on the NHWC view (`GELU2d`), and the hand-off to tokens is a view, not a copy.
Parameters, state_dict and function are those of plain nn.Conv2d / nn.GELU (outputs agree to float32 rounding);
only the CPU kernels differ (measured in benchmarks/results.md, figure student_gflops).

References: Sandler et al. 2018 (MobileNetV2, inverted residuals); Vaswani et al. 2017 and Dosovitskiy et al. 2021
(Transformer encoder, ViT pre-norm blocks); Mehta & Rastegari 2022 (MobileViT, conv+transformer hybrids).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from kd_fracture.errors import ConfigError, UserError

__all__ = ["HybridConfig", "HybridStudent", "STUDENT_REGISTRY", "TIMM_PREFIX", "create_student", "is_student_name"]

TIMM_PREFIX = "timm:"
STEM_STRIDE = 2


@dataclass(frozen=True)
class HybridConfig:
    widths: tuple[int, ...] = (32, 64, 128)
    """Channels of the conv stages; each stage halves the resolution, so stride = 2 × 2**len(widths)."""
    blocks: tuple[int, ...] = (1, 2, 2)
    """Inverted-residual blocks per stage (the first of each has stride 2)."""
    stem_width: int = 16
    expand_ratio: float = 4.0
    """Hidden width of an inverted-residual block = expand_ratio × its input width."""
    embed_dim: int = 128
    """Token width D of the Transformer; divisible by 4 (2-D sin-cos embedding) and by `heads`."""
    depth: int = 2
    """Number of Transformer encoder blocks."""
    heads: int = 4
    mlp_ratio: float = 2.0
    drop_rate: float = 0.1
    """Dropout on the pooled features, before the classifier."""
    attn_drop: float = 0.0
    """Dropout on the attention weights."""
    drop_path: float = 0.0
    """Stochastic depth (Huang et al. 2016) of the Transformer blocks, increasing linearly to this value."""

    @property
    def stride(self) -> int:
        return STEM_STRIDE * 2 ** len(self.widths)

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        if not self.widths or len(self.widths) != len(self.blocks):
            raise ConfigError(f"student widths {self.widths} and blocks {self.blocks} need the same, non-zero length")
        if min(self.widths) < 1 or min(self.blocks) < 1 or self.stem_width < 1 or self.depth < 0:
            raise ConfigError("student widths, blocks, stem_width must be ≥ 1 and depth ≥ 0")
        if self.embed_dim % 4 or self.embed_dim % self.heads:
            raise ConfigError(f"student embed_dim {self.embed_dim} must be divisible by 4 and by heads={self.heads}")
        for name in ("drop_rate", "attn_drop", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"student {name}={getattr(self, name)} must be in [0, 1)")


STUDENT_REGISTRY: dict[str, HybridConfig] = {
    # ~16 k parameters: for tests and smoke runs
    "hybrid_t": HybridConfig(widths=(16, 24, 32), blocks=(1, 1, 1), stem_width=8, expand_ratio=2.0,
                             embed_dim=32, depth=1, heads=2, mlp_ratio=2.0),
    # default student, ~1.3 M parameters (≈ 5.5 % of ResNet-50's 23.5 M); ~7× lower CPU latency
    "hybrid_s": HybridConfig(widths=(32, 64, 128), blocks=(1, 2, 3), stem_width=16, expand_ratio=4.0,
                             embed_dim=192, depth=3, heads=4, mlp_ratio=2.0),
    # ~3.9 M parameters (≈ 17 % of ResNet-50)
    "hybrid_m": HybridConfig(widths=(48, 96, 192), blocks=(1, 3, 4), stem_width=24, expand_ratio=4.0,
                             embed_dim=256, depth=5, heads=8, mlp_ratio=2.0, drop_path=0.1),
}


_is_exporting = getattr(torch.compiler, "is_exporting", None) or (lambda: False)  # torch < 2.5 has none


def _nhwc(x: Tensor) -> bool:
    """True for a 4-D tensor stored channels_last (NHWC), not also NCHW-contiguous: the engine's default layout.

    False while exporting or tracing, so an exported graph keeps plain Conv and Gelu nodes whatever the layout.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or _is_exporting():
        return False
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class GELU2d(nn.GELU):
    """nn.GELU (exact, erf) that runs on the NHWC view of a channels_last feature map.

    Same function and no parameters; only the kernel differs. torch's CPU GELU and its backward take a slower path
    on a channels_last 4-D tensor than on the identical memory seen as a contiguous (B, H, W, C) tensor.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _nhwc(x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # views: no copy, stays NHWC
        return super().forward(x)


class PointwiseConv2d(nn.Conv2d):
    """A 1×1, stride-1, ungrouped nn.Conv2d (same parameters and state_dict) that runs as one GEMM over the NHWC view
    (F.linear) when its input is channels_last and has at least LINEAR_MIN_CHANNELS channels.

    The same product, summed in another order. On AVX2 CPUs the GEMM's forward + backward beat oneDNN's 1×1
    convolution at the student's small maps with ≥ 64 input channels and lost at the 16- and 32-channel
    expansions, hence the threshold. NCHW inputs (ONNX export, FLOP counting) take the conv.
    """

    LINEAR_MIN_CHANNELS = 64

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels >= self.LINEAR_MIN_CHANNELS and _nhwc(x):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


def conv2d(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """nn.Conv2d, or its PointwiseConv2d subclass for a 1×1, stride-1, ungrouped conv (same state_dict keys)."""
    cls = PointwiseConv2d if kernel == 1 and stride == 1 and groups == 1 else nn.Conv2d
    return cls(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=bias)


class ConvBNAct(nn.Sequential):
    """k×k conv (no bias) → BatchNorm → optional GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__(
            conv2d(c_in, c_out, kernel, stride, groups=groups),
            nn.BatchNorm2d(c_out),
            GELU2d() if act else nn.Identity(),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual (Sandler et al. 2018): 1×1 expand → 3×3 depthwise → 1×1 linear projection.

    y = x + block(x) when the shape is kept (stride 1, same width), else y = block(x).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: float):
        super().__init__()
        hidden = max(8, round(c_in * expand_ratio))
        self.block = nn.Sequential(
            ConvBNAct(c_in, hidden, 1),
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            ConvBNAct(hidden, c_out, 1, act=False),  # linear bottleneck: no activation on the projection
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class HybridStudent(nn.Module):
    """CNN stages → tokens → Transformer encoder → mean-pooled linear head. See the module docstring."""

    def __init__(self, cfg: HybridConfig = HybridConfig(), in_chans: int = 1, num_classes: int = 1):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stride: int = cfg.stride
        """Total downsampling of the conv part; the input size must be divisible by it."""
        self.num_features = self.embed_dim = cfg.embed_dim

        self.stem = ConvBNAct(in_chans, cfg.stem_width, 3, STEM_STRIDE)
        stages, c_in = [], cfg.stem_width
        for width, n_blocks in zip(cfg.widths, cfg.blocks):
            stages.append(nn.Sequential(*[
                InvertedResidual(c_in if i == 0 else width, width, stride=2 if i == 0 else 1,
                                 expand_ratio=cfg.expand_ratio)
                for i in range(n_blocks)
            ]))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.proj = conv2d(c_in, cfg.embed_dim, 1, bias=True)  # channels → token width D
        drop_path = torch.linspace(0, cfg.drop_path, cfg.depth).tolist() if cfg.depth else []
        self.blocks = nn.Sequential(*[
            Block(cfg.embed_dim, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, attn_drop=cfg.attn_drop,
                  drop_path=dp)
            for dp in drop_path
        ])
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # ViT init for the token part (truncated normal, std 0.02); convs keep PyTorch's Kaiming-uniform default
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def pos_embed(self, h: int, w: int, like: Tensor) -> Tensor:
        """(1, h·w, D) fixed 2-D sin-cos embedding (MAE, He et al. 2022) for an h×w token grid."""
        pe = build_sincos2d_pos_embed([h, w], dim=self.embed_dim, device=like.device)
        return pe.to(like.dtype).unsqueeze(0)

    def forward_conv(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) → (B, widths[-1], H/s, W/s): the last conv feature map (Grad-CAM's layer)."""
        return self.stages(self.stem(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) → (B, N, D) normalised tokens, N = (H/s)·(W/s)."""
        fmap = self.proj(self.forward_conv(x))  # (B, D, H/s, W/s)
        _, _, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, N, D), row-major over the grid
        tokens = tokens + self.pos_embed(h, w, tokens)
        return self.norm(self.blocks(tokens))

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N, D) tokens → (B, num_classes) logits (or the (B, D) pooled features when pre_logits)."""
        pooled = self.head_drop(tokens.mean(dim=1))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def grad_cam_layer(self) -> nn.Module:
        """The last conv stage: its (B, C, H/s, W/s) output is spatial, which Grad-CAM needs."""
        return self.stages[-1]

    # timm conventions, so timm utilities (freeze, optimizer groups, reset) treat the student like its models
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return set()


def is_student_name(name: str) -> bool:
    """True for a registered hybrid or a `timm:NAME` baseline (both are built by `create_student`)."""
    return name in STUDENT_REGISTRY or name.startswith(TIMM_PREFIX)


def check_img_size(img_size: int | None, stride: int) -> None:
    if img_size is not None and img_size % stride:
        raise UserError(f"--img-size {img_size} is not divisible by the student's stride {stride}; "
                        f"use a multiple of {stride}")


def hybrid_config(name: str, **overrides: Any) -> HybridConfig:
    """The registered config `name` with `overrides` applied (lists become tuples, as YAML gives lists)."""
    if name not in STUDENT_REGISTRY:
        raise UserError(f"unknown student '{name}'; choose one of {sorted(STUDENT_REGISTRY)} or timm:NAME")
    known = {f.name for f in fields(HybridConfig)}
    unknown = sorted(overrides.keys() - known)
    if unknown:
        raise ConfigError(f"unknown student override(s) {unknown}; valid: {sorted(known)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    cfg = replace(STUDENT_REGISTRY[name], **overrides)
    cfg.validate()
    return cfg


def create_student(name: str = "hybrid_s", in_chans: int = 1, num_classes: int = 1, img_size: int | None = None,
                   **overrides: Any) -> nn.Module:
    """A registered hybrid (with field overrides, e.g. depth=3) or, for `timm:NAME`, a timm model as a baseline.

    `img_size` is only checked (hybrids work at any multiple of their stride) or passed to timm models that take it.
    """
    if name.startswith(TIMM_PREFIX):
        from kd_fracture.models.teacher import create_timm_model

        return create_timm_model(name[len(TIMM_PREFIX):], num_classes=num_classes, in_chans=in_chans,
                                 img_size=img_size, **overrides)
    cfg = hybrid_config(name, **overrides)
    check_img_size(img_size, cfg.stride)
    return HybridStudent(cfg, in_chans=in_chans, num_classes=num_classes)


def _register_with_timm(name: str) -> None:
    """Make `timm.create_model(name, num_classes=..., in_chans=...)` build the hybrid too."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise UserError(f"student '{name}' has no pretrained weights; train it (or distill into it)")
        for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(timm_only, None)
        return create_student(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _name in STUDENT_REGISTRY:
    _register_with_timm(_name)
