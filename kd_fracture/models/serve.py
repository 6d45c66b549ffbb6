"""The served form of a model (issue #24): what predict, evaluate, the app, ONNX export and latency figures run.

`for_inference(model)` returns an eval-mode copy with every BatchNorm folded into the convolution that feeds it:
for a conv y = W∗x + b followed by BN z = γ·(y − μ)/σ + β with σ = √(var + ε),

    W' = W · γ/σ (per output channel),   b' = (b − μ) · γ/σ + β,

so z = W'∗x + b' with one kernel instead of two, and the BN becomes an Identity (Ioffe & Szegedy 2015; the folding
every deployment toolchain does, e.g. torch.ao's `fuse_conv_bn_eval`, ONNX Runtime's graph optimiser). Dropout and
stochastic depth are already no-ops in eval mode. The folded copy is checked against the original on a random input
(float32, to 1e-4 relative); a model whose BN does not directly follow its conv (registration order and execution
order differ) fails the check and is served unfolded, with one note. The model passed in is never changed.

`graphed(model, example)` captures a batch-size-fixed forward pass into a CUDA graph (one replay instead of one
kernel launch per op, which is what a batch-1 forward of a small network waits on) and falls back to the eager
model with one line where capture fails or CUDA is absent.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


FOLD_RTOL = 1e-4
"""Relative tolerance (to the output's scale) of the check that the folded model computes what the original does."""


def _note(msg: str) -> None:
    import sys

    print(f"note: {msg}", file=sys.stderr)


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """W' = W·γ/σ, b' = (b − μ)·γ/σ + β on `conv`, in place (eval statistics of `bn`)."""
    with torch.no_grad():
        sigma = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.double() if bn.affine else torch.ones_like(sigma)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(sigma)
        scale = gamma / sigma  # (C_out,)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(sigma)
        conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        new_bias = ((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    """`module` if it is a Conv2d, or the last module of a Sequential if that is one (timm's deep stems)."""
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, nn.Sequential) and len(module):
        return _last_conv(module[-1])
    return None


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every BatchNorm2d that comes right after a Conv2d among its parent's children (in place); → how many."""
    folded = 0
    for parent in model.modules():
        names = list(parent._modules)
        for before, name in zip(names, names[1:]):
            bn, conv = parent._modules[name], _last_conv(parent._modules[before])
            if (type(bn) is nn.BatchNorm2d and bn.track_running_stats and conv is not None
                    and conv.out_channels == bn.num_features):
                fold_bn_into_conv(conv, bn)
                parent._modules[name] = nn.Identity()
                folded += 1
    return folded


def _example(model: nn.Module, size: int = 64) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first.in_channels if first is not None else 3
    return torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))


def for_inference(model: nn.Module, name: str = "model", example: Tensor | None = None) -> nn.Module:
    """The served form of `model`: an eval-mode copy with BatchNorm folded into its convolutions (see the module
    docstring). A model in training mode is switched to eval on the copy, with one note: the BN statistics it has
    now are the ones folded. Outputs equal the training form's in eval mode to float rounding (checked here)."""
    if model.training:
        _note(f"{name} was in training mode; serving it in eval mode with its current BatchNorm statistics")
    served = copy.deepcopy(model).eval()
    device = next((p.device for p in served.parameters()), torch.device("cpu"))
    if not any(type(m) is nn.BatchNorm2d for m in served.modules()):
        return served
    x = (_example(served) if example is None else example).to(device)
    with torch.no_grad():
        want = served(x).float()
        n = fold_batchnorms(served)  # in place on the copy
        got = served(x).float()
    scale = want.abs().max().clamp_min(1.0)
    if n and not torch.allclose(got, want, rtol=0, atol=FOLD_RTOL * float(scale)):
        _note(f"{name}: folding BatchNorm into its convolutions changed the output (max |Δ| "
              f"{float((got - want).abs().max()):.2g}); serving it unfolded")
        return copy.deepcopy(model).eval()  # the rare case pays for a second copy, not every model served
    return served


class GraphedForward(nn.Module):
    """A CUDA-graph replay of `model`'s forward at one input shape (static buffers); other shapes run eagerly."""

    def __init__(self, model: nn.Module, example: Tensor, dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype
        self.static_in = example.clone()
        stream = torch.cuda.Stream(example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream), torch.inference_mode(), self._autocast():
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs requires (cuDNN picks its kernels)
                model(self.static_in)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode(), self._autocast():
            self.static_out = model(self.static_in)

    def _autocast(self):
        import contextlib

        return torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype:
            with self._autocast():
                return self.model(x)
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


def graphed(model: nn.Module, example: Tensor, name: str = "model",
            dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """`GraphedForward(model, example)` on CUDA; the eager model, with one line, where that is not possible."""
    if example.device.type != "cuda":
        return model
    try:
        return GraphedForward(model, example, dtype)
    except Exception as e:  # noqa: BLE001 — any capture failure: serve eagerly rather than not at all
        _note(f"{name}: CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
              "running it eagerly")
        return model
