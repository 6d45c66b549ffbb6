"""Checkpoints: save, load, verify and remove — the one place that knows the file names and their sidecars.

A checkpoint `X` always travels with `X.json` = {file, size, sha256, …}: `verify_sidecar` detects a truncated or
modified file before it is loaded. Weights are safetensors (`BEST`); the resumable training state (`LAST`, model +
optimiser + scaler + history) is a `torch.save` file read back with `weights_only=True`, so a pickle carrying code is
refused (docs/design.md §5). Both writers are told the tensor bytes up front (`tensor_bytes`), so a disk without
room for the new copy is a one-line `io.DiskFullError` before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from kd_fracture import io
from kd_fracture.errors import UserError

BEST = "checkpoint_best.safetensors"
LAST = "state_last.pt"
HISTORY = "history.csv"


def sidecar(path: Path) -> Path:
    """`X` → `X.json`, the sidecar holding X's size and sha256."""
    return path.with_name(path.name + ".json")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (its state_dict keys have no `module.` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class CheckpointError(UserError):
    """A checkpoint is truncated, tampered with or not a safe checkpoint."""


def save_weights(model: nn.Module, path: Path, meta: dict | None = None) -> None:
    """safetensors weights + `<name>.json` sidecar with size and sha256 (detects truncation and tampering)."""
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    with io.atomic_path(path, expect_bytes=tensor_bytes(state)) as tmp:
        # one metadata key holding sorted JSON: safetensors writes a multi-key metadata map in a per-process random
        # order (a Rust HashMap), which gave identical weights a different sha256 in a resumed run
        save_file(state, str(tmp), metadata={"kd_fracture": json.dumps(meta or {}, sort_keys=True, default=str)})
    write_sidecar(path, meta)


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> nn.Module:
    verify_sidecar(path)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e}); delete it and retrain") from None
    unwrap(model).load_state_dict(state, strict=strict)
    return model


def save_state(path: Path, state: dict) -> None:
    with io.atomic_path(path, expect_bytes=tensor_bytes(state)) as tmp:
        torch.save(state, tmp)
    write_sidecar(path, {"epoch": state.get("epoch")})


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in `obj` (nested dicts/lists/tuples, as a state_dict or optimiser state holds them):
    what a checkpoint file of it needs, give or take its header."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_state(path: Path) -> dict:
    """`torch.load(weights_only=True)`: tensors and plain containers only — a pickle with code is refused."""
    verify_sidecar(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: refused to load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "it is not a safe kd_fracture checkpoint") from None


def write_sidecar(path: Path, meta: dict | None = None) -> None:
    io.write_json(sidecar(path),
                  {"file": path.name, "size": path.stat().st_size, "sha256": io.sha256_file(path), **(meta or {})})


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint together with its sidecar (never leave one without the other)."""
    for p in (path, sidecar(path)):
        p.unlink(missing_ok=True)


def verify_sidecar(path: Path) -> None:
    side = sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not side.is_file():
        raise CheckpointError(f"{path}: no {side.name} beside it, so its integrity cannot be checked")
    meta = io.read_json(side)
    if path.stat().st_size != meta["size"] or io.sha256_file(path) != meta["sha256"]:
        raise CheckpointError(f"{path}: size/sha256 differ from {side.name}; the file is truncated or was modified")
