"""Batches on the device they train on: the one place a DataLoader batch crosses to the model (timm's PrefetchLoader).

`DeviceBatches(loader, device)` yields the loader's batches with every tensor on `device`, augmented there when the
dataset hands over uint8 images and their parameters (`data.aug_backend: torch`, `data.batch_aug`), in
channels_last when asked. On CUDA the copy and augmentation of batch k+1 run on a side stream while batch k trains,
from memory the DataLoader pinned, so the host-to-device copy overlaps the step. On the CPU it is the same code
without the stream. `wait_s` is the time the loop spent waiting for the host loader (the data-wait share of an epoch
in history.csv).
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from kd_fracture.data.batch_aug import augment_batch


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """One batch on `device`: tensors copied (non-blocking from pinned memory), uint8 images + "aug" parameters
    turned into normalised float images there."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "aug" in batch:  # (B, C, S, S) uint8 + (B, 8) → (B, C, S, S) float32
        batch["image"] = augment_batch(batch["image"], batch.pop("aug"))
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


class DeviceBatches:
    """Iterate `loader` as device batches; on CUDA, batch k+1 is prepared on a side stream during step k."""

    def __init__(self, loader, device: torch.device, channels_last: bool = False):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.wait_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def _next(self, it: Iterator) -> dict | None:
        t0 = time.perf_counter()
        try:
            return next(it)
        except StopIteration:
            return None
        finally:
            self.wait_s += time.perf_counter() - t0

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.loader)
        if self.device.type != "cuda":
            while (batch := self._next(it)) is not None:
                yield to_device(batch, self.device, self.channels_last)
            return
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)

        def prepare(host: dict) -> dict:
            with torch.cuda.stream(stream):
                return to_device(host, self.device, self.channels_last)

        host = self._next(it)
        ready = prepare(host) if host is not None else None
        while ready is not None:
            current.wait_stream(stream)  # batch k's copy and augmentation are done before step k uses them
            for v in ready.values():
                if torch.is_tensor(v):
                    v.record_stream(current)  # allocated on the side stream, used on the current one
            host = self._next(it)
            upcoming = prepare(host) if host is not None else None  # enqueued before step k: runs beside it
            yield ready
            ready = upcoming
