"""A plain training loop, written the way the seed projects write one: the reference arm of the `peer_epoch`
benchmark (bench_peer_epoch.py).

PIL decode on every access (`Image.open(...).convert("RGB")`), albumentations (Resize, HorizontalFlip, Normalize,
ToTensorV2), a timm model with one logit, Adam, BCEWithLogitsLoss, a validation pass (probabilities → AUROC) after
the epoch, no checkpoints, no cache, no channels_last, default OpenMP/torch settings. Nothing here imports
kd_fracture: it is what a project without it would run.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class PlainDataset(Dataset):
    """(image tensor (3, S, S), label) from a PNG path, decoded with PIL and transformed by albumentations each time."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[float], img_size: int, train: bool):
        import albumentations as A
        from albumentations.pytorch import ToTensorV2

        self.paths, self.labels = [str(p) for p in paths], np.asarray(labels, dtype=np.float32)
        ops = [A.Resize(img_size, img_size)]
        if train:
            ops.append(A.HorizontalFlip(p=0.5))
        self.transform = A.Compose([*ops, A.Normalize(), ToTensorV2()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        image = np.array(Image.open(self.paths[i]).convert("RGB"))
        return self.transform(image=image)["image"], torch.tensor(self.labels[i])


def make_loaders(train_paths, train_labels, val_paths, val_labels, img_size: int, batch_size: int,
                 num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(PlainDataset(train_paths, train_labels, img_size, train=True), batch_size=batch_size,
                       shuffle=True, num_workers=num_workers)
    val = DataLoader(PlainDataset(val_paths, val_labels, img_size, train=False), batch_size=batch_size,
                     shuffle=False, num_workers=num_workers)
    return train, val


def make_model(name: str = "resnet50") -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=1)


def make_optimizer(model: torch.nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    """One pass; returns the mean BCE loss."""
    criterion = torch.nn.BCEWithLogitsLoss()
    model.train()
    total, n = 0.0, 0
    for images, labels in loader:
        optimizer.zero_grad()
        loss = criterion(model(images).squeeze(1), labels)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        n += len(labels)
    return total / max(n, 1)


def validate(model: torch.nn.Module, loader: DataLoader) -> float:
    """Image-level AUROC of the validation split (NaN with one class)."""
    from sklearn.metrics import roc_auc_score

    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for images, y in loader:
            probs.append(torch.sigmoid(model(images).squeeze(1)))
            labels.append(y)
    p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
