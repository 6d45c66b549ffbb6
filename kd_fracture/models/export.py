"""Deployment numbers and ONNX export: parameters, FLOPs, CPU latency at batch 1, and an onnxruntime check.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward pass at batch 1 (it counts a multiply-add as
  2 FLOPs, for matmul/conv/attention ops; elementwise ops are not counted).
- Latency: median wall time of `runs` batch-1 forward passes after `warmup` passes, under `torch.inference_mode`,
  with `torch.set_num_threads(threads)` held fixed (and restored afterwards) so numbers are comparable between rows.
- ONNX: `torch.onnx.export` — the dynamo exporter when onnxscript is installed, else the TorchScript exporter
  (`dynamo=False`); then, if onnxruntime is installed, the largest |torch − onnxruntime| difference on a few inputs.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_fracture import extras, io
from kd_fracture.models.losses import positive_prob
from kd_fracture.models.serve import for_inference

__all__ = ["FoldEnsemble", "check_onnx", "count_flops", "cpu_latency_ms", "export_onnx", "profile_model"]

ONNX_TOLERANCE = 1e-4


def _cpu_copy(model: nn.Module) -> nn.Module:
    """The trained model in eval mode on the CPU (the reference an export is checked against)."""
    return copy.deepcopy(model).cpu().eval()


def _served_cpu_copy(model: nn.Module) -> nn.Module:
    """What is deployed and timed: the served form (`serve.for_inference`, BatchNorm folded) on the CPU."""
    return for_inference(_cpu_copy(model))


@contextlib.contextmanager
def num_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def count_flops(model: nn.Module, in_chans: int, img_size: int) -> int:
    """FLOPs of one (1, in_chans, img_size, img_size) forward pass (torch's flop counter; 1 MAC = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _cpu_copy(model)
    x = torch.zeros(1, in_chans, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def cpu_latency_ms(model: nn.Module, in_chans: int, img_size: int, threads: int = 1, warmup: int = 5,
                   runs: int = 20) -> float:
    """Median milliseconds per image at batch 1 on CPU with `threads` torch threads, of the served form."""
    model = _served_cpu_copy(model)
    x = torch.randn(1, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    times = []
    with num_threads(threads), torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def profile_model(model: nn.Module, in_chans: int, img_size: int, threads: int = 1, runs: int = 20) -> dict:
    """{"params", "flops", "latency_ms", "latency_threads"} of one model."""
    return {"params": sum(p.numel() for p in model.parameters()), "flops": count_flops(model, in_chans, img_size),
            "latency_ms": cpu_latency_ms(model, in_chans, img_size, threads, runs=runs), "latency_threads": threads}


class FoldEnsemble(nn.Module):
    """The K fold models as one network: (B, C, H, W) → (B,) mean positive-class probability (the holdout model)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([positive_prob(m(x)) for m in self.members], dim=0).mean(dim=0)


def export_onnx(model: nn.Module, path: str | Path, in_chans: int, img_size: int, opset: int = 18) -> dict:
    """Write `model` (eval, CPU) to ONNX with a dynamic batch axis: input "image" (B, in_chans, S, S), output
    "output". The dynamo exporter is tried first when onnxscript is installed; the TorchScript exporter is the
    fallback. The served form is exported (BatchNorm folded). Returns {"path", "exporter", "opset"}."""
    model = _served_cpu_copy(model)
    example = torch.randn(2, in_chans, img_size, img_size)
    names = {"input_names": ["image"], "output_names": ["output"], "opset_version": opset}
    exporter = "torchscript"
    with io.atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and tracer warnings are not the user's business
        if importlib.util.find_spec("onnxscript") is not None:
            try:
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, external_data=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
                exporter = "dynamo"
            except Exception:  # noqa: BLE001 — any dynamo failure: the TorchScript exporter below still works
                exporter = "torchscript"
        if exporter == "torchscript":
            torch.onnx.export(model, (example,), str(tmp), dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}}, **names)
    return {"path": str(path), "exporter": exporter, "opset": opset}


def check_onnx(model: nn.Module, path: str | Path, in_chans: int, img_size: int, batches: Sequence[int] = (1, 3),
               tolerance: float = ONNX_TOLERANCE) -> dict:
    """Compare onnxruntime's outputs with torch's on seeded random inputs of the given batch sizes.

    Returns {"checked": False, "reason"} without onnxruntime, else {"checked": True, "max_abs_diff", "ok", …}.
    """
    ort = extras.optional("onnxruntime", "onnx", f"checking {Path(path).name} against torch")
    if ort is None:
        return {"checked": False, "reason": "onnxruntime is not installed (pip install 'kd_fracture[onnx]')"}

    model = _cpu_copy(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    diff = 0.0
    for b in batches:
        x = torch.randn(b, in_chans, img_size, img_size, generator=gen)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        if got.shape != expected.shape:
            return {"checked": True, "ok": False, "max_abs_diff": float("inf"),
                    "reason": f"output shape {got.shape} != torch's {expected.shape} at batch {b}"}
        diff = max(diff, float(np.abs(got - expected).max()))
    return {"checked": True, "ok": diff < tolerance, "max_abs_diff": diff, "tolerance": tolerance,
            "batches": list(batches), "onnxruntime": ort.__version__}
