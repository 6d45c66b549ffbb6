"""TensorBoard event streams for every fit (issue #26): one stream per fold, trial and final student, in its `tb/`.

`engine.fit` writes one step per epoch into `<out_dir>/tb/` (torch.utils.tensorboard), so `tensorboard --logdir
runs/` (or `python -m kd_fracture.tensorboard`) shows every fold of every run, each trial under
`distill/<study>/trials/<variant>/<trial number>/fold_<k>` and each final student under
`distill/<study>/final/<variant>/fold_<k>`: the paths name the Optuna study and trial, as the dashboard does.

Scalars per epoch: the loss and each of its parts (`loss/train`, `loss/train_ce`, `loss/train_kd`), the inner-val
study κ and AUROC and image AUROC, the learning rate, training images/s, the share of the epoch spent waiting for
data, the epoch's seconds, and peak CUDA memory where there is a GPU. At the end: the fit's hyper-parameters and its
final inner-val numbers as TensorBoard HParams, so folds and trials can be compared side by side.

Tracking never breaks a run: without the tensorboard package, or when a write fails (a full disk), one warning line
is printed and training goes on untracked. A resumed fit opens its stream with `purge_step` = the first epoch it
trains, so events a killed process wrote for later epochs are dropped and no step appears twice. Event files are
append-only streams by design (TensorBoard reads a file that is still being written), the one kind of file the
package does not write through `io.atomic_path`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

TB_DIR = "tb"

SCALARS = {"train_loss": "loss/train", "val_study_kappa": "inner_val/study_kappa",
           "val_study_auroc": "inner_val/study_auroc", "val_image_auroc": "inner_val/image_auroc", "lr": "lr",
           "train_images_per_s": "throughput/train_images_per_s", "time_s": "time/epoch_s",
           "cuda_peak_mem_gb": "cuda/peak_mem_gb"}
"""history.csv column → TensorBoard tag; every other train_<part> column becomes loss/train_<part>."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


class TensorBoard:
    """One fit's event stream under `out_dir/tb`, or nothing (enabled=False, no tensorboard, a failed write)."""

    def __init__(self, out_dir: str | Path, start_epoch: int, enabled: bool = True, name: str = ""):
        self.writer, self.name = None, name
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warn(f"{name}TensorBoard tracking skipped: the tensorboard package is not installed (pip install "
                 "tensorboard, or set track.tensorboard=false)")
            return
        try:
            self.writer = SummaryWriter(str(Path(out_dir) / TB_DIR), purge_step=start_epoch)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        warn(f"{self.name}TensorBoard tracking stopped ({type(e).__name__}: {e}); training goes on")
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 — a writer that failed once may fail again on close
                pass

    def epoch(self, epoch: int, row: dict) -> None:
        """The epoch's history row as scalars at step `epoch`."""
        if self.writer is None:
            return
        try:
            for column, value in row.items():
                tag = SCALARS.get(column) or (f"loss/{column}" if column.startswith("train_") and column != "train_s"
                                              else None)
                if tag and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(tag, value, epoch)
            if row.get("data_wait_s") is not None and row.get("train_s"):
                self.writer.add_scalar("time/data_wait_fraction", row["data_wait_s"] / row["train_s"], epoch)
            self.writer.flush()
        except OSError as e:
            self._fail(e)

    def close(self, hparams: dict | None = None, final: dict | None = None) -> None:
        """Write `hparams` (flat, numbers/strings/bools) with the `final` metrics as HParams, then close."""
        if self.writer is None:
            return
        try:
            if hparams:
                from torch.utils.tensorboard.summary import hparams as hparams_summary

                metrics = {f"hparam/{k}": float(v) for k, v in (final or {}).items()
                           if isinstance(v, (int, float)) and math.isfinite(v)}
                clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
                for summary in hparams_summary(clean, metrics):  # into this stream, not a new sub-run
                    self.writer.file_writer.add_summary(summary)
                for k, v in metrics.items():
                    self.writer.add_scalar(k, v)
            self.writer.close()
        except OSError as e:
            self._fail(e)
        self.writer = None
