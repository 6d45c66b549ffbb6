"""TensorBoard tracking (issue #26): one event stream per fit, one step per epoch, none twice after a resume, and a
missing package or a failed write never stops training."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from kd_fracture import cv
from kd_fracture.train import engine

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EPOCH_TAGS = {"loss/train", "loss/train_ce", "inner_val/study_kappa", "inner_val/study_auroc",
              "inner_val/image_auroc", "lr", "throughput/train_images_per_s", "time/epoch_s",
              "time/data_wait_fraction"}


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def scalars(tb: Path) -> dict[str, list[int]]:
    """tag → the steps written for it, over every event file in `tb` (a resumed fit may have written several)."""
    steps: dict[str, list[int]] = {}
    for events in sorted(tb.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return steps


def test_every_fold_has_one_step_per_epoch_and_its_hparams(tiny_cv_overrides):
    over = dict(tiny_cv_overrides, **{"train.epochs": 2, "train.patience": 5})
    assert cv.main(cli_args(over)) == 0
    for k in (0, 1):
        steps = scalars(Path(over["run_dir"]) / f"fold_{k}" / "tb")
        assert EPOCH_TAGS <= set(steps), EPOCH_TAGS - set(steps)
        assert all(sorted(steps[tag]) == [0, 1] for tag in EPOCH_TAGS), steps
        assert "hparam/best_inner_val" in steps  # the HParams metrics of the fit, in the same stream


def test_a_resumed_fold_writes_no_step_twice(tiny_cv_overrides, monkeypatch):
    over = dict(tiny_cv_overrides, **{"train.epochs": 3, "train.patience": 5, "data.folds": 2})
    real, calls = engine.train_one_epoch, []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after epoch 1's state and events were written
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_epoch_2)
    assert cv.main(cli_args(over) + ["--fold", "0"]) == 130
    monkeypatch.setattr(engine, "train_one_epoch", real)
    assert cv.main(cli_args(over) + ["--fold", "0"]) == 0
    steps = scalars(Path(over["run_dir"]) / "fold_0" / "tb")
    assert sorted(steps["loss/train"]) == [0, 1, 2] and sorted(steps["inner_val/study_auroc"]) == [0, 1, 2]


def test_without_tensorboard_training_goes_on_with_one_warning(tiny_cv_overrides, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    assert cv.main(cli_args(tiny_cv_overrides) + ["--fold", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("TensorBoard tracking skipped: the tensorboard package is not installed") == 1
    assert not (Path(tiny_cv_overrides["run_dir"]) / "fold_0" / "tb").exists()


def test_a_failing_write_stops_tracking_not_training(tiny_cv_overrides, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    over = dict(tiny_cv_overrides, **{"train.epochs": 2, "train.patience": 5})
    assert cv.main(cli_args(over) + ["--fold", "0"]) == 0
    err = capsys.readouterr().err
    assert err.count("TensorBoard tracking stopped (OSError") == 1 and "training goes on" in err
    assert (Path(over["run_dir"]) / "fold_0" / "DONE").exists()


def test_tracking_off_writes_no_stream_and_is_no_conflicting_rerun(tiny_cv_overrides):
    over = dict(tiny_cv_overrides, **{"track.tensorboard": False})
    assert cv.main(cli_args(over) + ["--fold", "0"]) == 0
    assert not (Path(over["run_dir"]) / "fold_0" / "tb").exists()
    assert cv.main(cli_args(dict(over, **{"track.tensorboard": True})) + ["--fold", "1"]) == 0  # output-only key


def test_tensorboard_command_refuses_a_busy_port_and_a_missing_logdir(tmp_path, capsys):
    from kd_fracture.cli import tensorboard as tb_cli

    assert tb_cli.main(["--logdir", str(tmp_path / "nothing")]) == 2
    assert "folder not found" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert tb_cli.main(["--logdir", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot serve on 127.0.0.1:{port}")
    assert tb_cli.main(["--logdir", str(tmp_path), "--port", "99999"]) == 2
    assert "between 1 and 65535" in capsys.readouterr().err
