"""Issue 7, fast part: bad input through the cv command, numerical faults, crash safety, checkpoint security.

Manifest-level validation (wrong columns, headers, labels, mixed labels, studies missing on either side, absolute and
`../` paths, patient in pool and holdout, corrupt images under the manifest CLI) is covered case by case in
tests/test_manifest.py; here each fault goes through `python -m kd_fracture.cv` (in-process `cv.main`) and the test
checks what that command leaves behind. The dashboard's loopback default and its 0.0.0.0 warning are covered in
tests/test_dashboard.py. Multi-process faults (SIGKILL, concurrent folds, torchrun, Optuna workers) are in
tests/test_scaleout.py (slow).

Training here uses the `hybrid_t` student (16k parameters) on the 32 px session phantom: the checks are about
files and control flow, not accuracy.
"""
from __future__ import annotations

import ast
import inspect
import json
import pickle
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import kd_fracture
from kd_fracture import cv, io
from kd_fracture.train import checkpoint, engine

PACKAGE = Path(kd_fracture.__file__).parent


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture
def over(tiny_cv_overrides):
    """2 folds × 1 epoch of the tiny hybrid student on the session phantom (32 px), one torch thread (the run sets
    it process-wide; it is restored afterwards)."""
    threads = torch.get_num_threads()
    yield dict(tiny_cv_overrides, **{"model.name": "hybrid_t", "train.threads": 1})
    torch.set_num_threads(threads)


@pytest.fixture
def phantom_copy(tiny_phantom, tmp_path) -> Path:
    """A private copy of the session phantom that a test may damage."""
    return Path(shutil.copytree(tiny_phantom, tmp_path / "data"))


def run_cv(capsys, over: dict, *extra: str) -> tuple[int, str]:
    rc = cv.main(cli_args(over) + [str(e) for e in extra])
    return rc, capsys.readouterr().err


def error_line(rc: int, err: str) -> str:
    """The command failed with exit code 2 and exactly one `error:` line, its last, and no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def assert_nothing_written(over: dict) -> None:
    for key in ("run_dir", "data.manifests_dir"):
        assert not Path(over[key]).exists(), f"{over[key]} was created"


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Tamper with a file without changing its size (only the sha256 can tell)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def fold_metrics(run: Path, k: int) -> dict:
    return json.loads((run / f"fold_{k}" / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# 1. bad input: one line naming the file/flag, exit 2, nothing written


@pytest.mark.parametrize("how", ["yaml", "set"])
def test_unknown_config_key_is_named_and_nothing_written(over, tmp_path, capsys, how):
    if how == "yaml":
        bad = tmp_path / "study.yaml"
        bad.write_text("train:\n  epochs: 1\n  lrr: 0.01\n")
        msg = error_line(*run_cv(capsys, over, "--config", bad))
        assert f"{bad}: unknown key 'train.lrr'" in msg
    else:
        msg = error_line(*run_cv(capsys, over, "--set", "train.lrr=0.01"))
        assert "unknown key 'train.lrr'" in msg
    assert "train.lr" in msg  # the known keys are listed, so the typo is easy to fix
    assert_nothing_written(over)


def test_img_size_not_divisible_by_student_stride(over, capsys):
    msg = error_line(*run_cv(capsys, dict(over, **{"data.img_size": 40})))
    assert "--img-size 40 is not divisible by the student's stride 16" in msg
    assert_nothing_written(over)


def test_more_folds_than_patients_of_a_class(over, capsys):
    msg = error_line(*run_cv(capsys, dict(over, **{"data.folds": 40})))
    assert re.search(r"--folds 40: label \d \(\w+\) has only \d+ patients in the CV pool", msg), msg
    assert_nothing_written(over)


def test_fold_number_out_of_range(over, capsys):
    msg = error_line(*run_cv(capsys, over, "--fold", "2"))
    assert "--fold 2: folds are numbered 0..1" in msg
    assert_nothing_written(over)


def test_empty_folder_dataset(over, tmp_path, capsys):
    root = tmp_path / "folder_ds"
    for d in ("train/fractured", "train/not_fractured", "test/fractured", "test/not_fractured"):
        (root / d).mkdir(parents=True)
    msg = error_line(*run_cv(capsys, dict(over, **{"data.root": root})))
    assert f"{root}: no images found" in msg
    assert_nothing_written(over)


def test_manifest_error_through_cv_writes_nothing(over, phantom_copy, capsys):
    """One representative manifest fault end to end (the others: tests/test_manifest.py)."""
    csv = phantom_copy / "MURA-v1.1" / "train_image_paths.csv"
    lines = csv.read_text().splitlines()
    lines[2] = "MURA-v1.1/../../etc/passwd.png"
    csv.write_text("\n".join(lines) + "\n")
    msg = error_line(*run_cv(capsys, dict(over, **{"data.root": phantom_copy})))
    assert "MURA-v1.1/train_image_paths.csv line 3: path 'MURA-v1.1/../../etc/passwd.png' leaves the data root" in msg
    assert_nothing_written(over)


def damage_image(root: Path, how: str) -> tuple[int, str]:
    """Truncate or empty the 2nd image listed in train_image_paths.csv; returns (csv line, image path)."""
    image = (root / "MURA-v1.1" / "train_image_paths.csv").read_text().splitlines()[1]
    data = (root / image).read_bytes()
    (root / image).write_bytes(data[: len(data) // 2] if how == "truncated" else b"")
    return 2, image


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_corrupt_image_with_verify_images_writes_nothing(over, phantom_copy, capsys, how):
    line, image = damage_image(phantom_copy, how)
    msg = error_line(*run_cv(capsys, dict(over, **{"data.root": phantom_copy}), "--verify-images"))
    assert f"train_image_paths.csv line {line}" in msg and image in msg, msg
    assert_nothing_written(over)


def test_corrupt_image_found_while_training_names_it_and_finishes_nothing(over, phantom_copy, capsys):
    """Without --verify-images the image is decoded when a fold first needs it: the same one-line error naming the
    file, and no fold or table counts as finished."""
    _, image = damage_image(phantom_copy, "truncated")
    msg = error_line(*run_cv(capsys, dict(over, **{"data.root": phantom_copy})))
    assert image in msg and "corrupt or truncated" in msg, msg
    run = Path(over["run_dir"])
    # a fold trained before the bad image came up keeps its checkpoint (resume material), but none is marked done
    assert not list(run.glob("fold_*/DONE"))
    assert not (run / "holdout").exists() and not (run / "tables").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 2. numerical faults


def test_absurd_learning_rate_stops_naming_fold_and_epoch(over, capsys):
    msg = error_line(*run_cv(capsys, dict(over, **{"train.lr": 1e30})))
    assert re.search(r"fold 0: epoch 1: loss became (nan|inf|-inf) \(lr 1e\+30 too high", msg), msg
    fold = Path(over["run_dir"]) / "fold_0"
    assert not (fold / "DONE").exists() and not (fold / checkpoint.BEST).exists()


def test_nan_in_a_later_epoch_keeps_last_good_checkpoint(over, capsys, monkeypatch):
    """Epoch 2 runs at lr 1e30 (set on the optimizer as the epoch starts): training stops naming fold 0 / epoch 2,
    epoch 1's checkpoint and resumable state survive intact, and a rerun at the normal lr finishes from there."""
    over = dict(over, **{"train.epochs": 2, "train.patience": 5})
    real = engine.train_one_epoch

    def absurd_lr_in_epoch_2(*args, **kwargs):
        call = inspect.signature(real).bind(*args, **kwargs).arguments
        if call["epoch"] == 1:  # epoch index 1 = the 2nd epoch
            for group in call["optimizer"].param_groups:
                group["lr"] = 1e30
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", absurd_lr_in_epoch_2)
    msg = error_line(*run_cv(capsys, over, "--fold", "0"))
    assert re.search(r"fold 0: epoch 2: loss became (nan|inf|-inf)", msg), msg
    fold = Path(over["run_dir"]) / "fold_0"
    assert not (fold / "DONE").exists()
    checkpoint.verify_sidecar(fold / checkpoint.BEST)  # intact: size and sha256 match its sidecar
    assert io.read_json(fold / f"{checkpoint.BEST}.json")["epoch"] == 0
    assert checkpoint.load_state(fold / checkpoint.LAST)["epoch"] == 0
    assert all(torch.isfinite(w).all() for w in load_file(fold / checkpoint.BEST).values() if w.is_floating_point())
    assert len(pd.read_csv(fold / checkpoint.HISTORY)) == 1

    monkeypatch.setattr(engine, "train_one_epoch", real)
    rc, err = run_cv(capsys, over, "--fold", "0")
    assert rc == 0, err
    assert "fold 0: resumed after epoch 0" in err
    assert (fold / "DONE").exists() and len(pd.read_csv(fold / checkpoint.HISTORY)) == 2


# ---------------------------------------------------------------------------------------------------------------------
# 3. crash safety: atomic writes, damaged checkpoints


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = io.write_text(tmp_path / "metrics.json", '{"kappa": 0.5}\n')
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text('{"kap')  # half a file, then the writer dies
        raise RuntimeError("crash while writing")
    assert target.read_text() == '{"kappa": 0.5}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


WRITERS = {"write_text", "write_bytes", "savefig", "save", "savez", "save_file", "export", "imwrite", "to_parquet",
           "dump"}
"""Calls that write a file (Path.write_text, fig.savefig, torch.save, np.save[z], safetensors save_file,
torch.onnx.export, cv2.imwrite, df.to_parquet, json/yaml/pickle.dump); `df.to_csv(path)` and `open(path, "w")`
are checked separately."""
PRIVATE_TREES = {
    ("data/phantom/tree.py", "_patient_rows"): "PNGs go into a hidden temp tree that is renamed into place whole",
    ("app/server.py", "stage_upload"): "an upload is staged in the request's TemporaryDirectory, removed after it",
}
"""(file, function) → why its plain writes cannot leave a half-written result behind."""


def _direct_writes(source: str, rel: str) -> list[str]:
    """`file:line call` of every write in `source` (package file `rel`) that does not go through kd_fracture.io."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def inside(node: ast.AST, test) -> bool:
        while node in parents:
            node = parents[node]
            if test(node):
                return True
        return False

    def is_atomic_with(node: ast.AST) -> bool:
        return isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func).endswith("atomic_path")
            for item in node.items)

    def private(node: ast.AST) -> bool:
        return inside(node, lambda p: isinstance(p, ast.FunctionDef) and (rel, p.name) in PRIVATE_TREES)

    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        io_function = (isinstance(func, ast.Attribute) and ast.unparse(func.value) == "io") or (
            isinstance(func, ast.Name) and name in ("write_text", "write_bytes"))  # `from kd_fracture.io import ...`
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        writes = (
            (name in WRITERS and not io_function)
            or (name == "to_csv" and bool(node.args or any(k.arg == "path_or_buf" for k in node.keywords)))
            or (name == "open" and isinstance(mode, ast.Constant) and bool(set(str(mode.value)) & set("wax+")))
        )
        kernel = "'/proc/" in ast.unparse(node)  # e.g. /proc/self/clear_refs: a kernel switch, not a file
        if writes and not kernel and not inside(node, is_atomic_with) and not private(node):
            bad.append(f"{rel}:{node.lineno} {ast.unparse(node)[:80]}")
    return bad


def test_every_package_write_goes_through_io():
    """Static check of DESIGN's rule "every file the package writes goes through kd_fracture.io" (temp + os.replace):
    a write outside `with io.atomic_path(...)` would leave a half-written file when the process is killed."""
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "io.py"]
    assert len(files) > 10
    violations = [v for p in files for v in _direct_writes(p.read_text(), p.relative_to(PACKAGE).as_posix())]
    assert not violations, "\n".join(violations)


def test_write_scan_catches_a_direct_write():
    """The scan above can fail: direct writes are reported, the same writes through io/atomic_path are not."""
    source = (
        "def bad(p, df, fig):\n    torch.save({}, p)\n    df.to_csv(p)\n    fig.savefig(p)\n    open(p, 'w')\n"
        "    p.write_text('x')\n"
        "def good(p, df):\n    with io.atomic_path(p) as tmp:\n        torch.save({}, tmp)\n    io.write_text(p, 'x')\n"
        "    df.to_csv(index=False)\n    open(p).read()\n")
    found = _direct_writes(source, "probe.py")
    assert [f.split()[0] for f in found] == [f"probe.py:{n}" for n in (2, 3, 4, 5, 6)], found


def test_truncated_resume_state_restarts_the_fold_from_scratch(over, tmp_path, capsys, monkeypatch):
    over = dict(over, **{"train.epochs": 2, "train.patience": 5})
    clean = dict(over, run_dir=str(tmp_path / "clean"))
    assert run_cv(capsys, clean, "--fold", "0")[0] == 0

    real, calls = engine.train_one_epoch, []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", killed_in_epoch_2)
    assert run_cv(capsys, over, "--fold", "0")[0] == 130
    monkeypatch.setattr(engine, "train_one_epoch", real)
    state = Path(over["run_dir"]) / "fold_0" / checkpoint.LAST
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a torn write by a non-atomic writer

    rc, err = run_cv(capsys, over, "--fold", "0")
    assert rc == 0, err
    assert "size/sha256 differ" in err and "restarting fold 0 from scratch" in err
    assert fold_metrics(Path(over["run_dir"]), 0) == fold_metrics(tmp_path / "clean", 0)  # as if never interrupted
    assert not state.exists()  # the DONE fold dropped its resumable state


def test_tampered_checkpoint_of_finished_fold_is_detected_and_retrained(over, capsys):
    assert run_cv(capsys, over)[0] == 0
    run = Path(over["run_dir"])
    before = {k: fold_metrics(run, k) for k in (0, 1)}
    holdout_before = json.loads((run / "holdout" / "metrics.json").read_text())
    best = run / "fold_1" / checkpoint.BEST
    flip_byte(best)

    msg = error_line(*run_cv(capsys, {"run_dir": over["run_dir"]}, "--aggregate"))
    assert f"{best}: size/sha256 differ from {checkpoint.BEST}.json" in msg  # refused, never silently used

    rc, err = run_cv(capsys, over)
    assert rc == 0, err
    assert "fold 0: DONE, skipped" in err and "training fold 1 again" in err
    checkpoint.verify_sidecar(best)
    assert {k: fold_metrics(run, k) for k in (0, 1)} == before  # same seed → the same fold again
    assert json.loads((run / "holdout" / "metrics.json").read_text()) == holdout_before


def test_missing_sidecar_counts_as_damaged(over, capsys):
    assert run_cv(capsys, over, "--fold", "0")[0] == 0
    fold = Path(over["run_dir"]) / "fold_0"
    (fold / f"{checkpoint.BEST}.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint_best.safetensors.json beside it"):
        checkpoint.load_weights(torch.nn.Linear(1, 1), fold / checkpoint.BEST)
    rc, err = run_cv(capsys, over, "--fold", "0")
    assert rc == 0 and "training fold 0 again" in err
    checkpoint.verify_sidecar(fold / checkpoint.BEST)


# ---------------------------------------------------------------------------------------------------------------------
# 4. checkpoint security


class Payload:
    """Unpickling this calls Path(marker).touch(): a stand-in for arbitrary code in a downloaded checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A torch.save file that looks like a resumable state and whose sidecar matches (an attacker can write both)."""
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 0, "payload": Payload(marker)}, path)
    checkpoint.write_sidecar(path, {"epoch": 0})
    return path


def test_payload_is_live_when_loaded_unsafely(tmp_path):
    """Guard for the tests below: the crafted file really runs code under a plain pickle load."""
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_malicious_resume_state_is_refused_and_fold_restarts(over, tmp_path, capsys):
    marker = tmp_path / "pwned"
    fold = Path(over["run_dir"]) / "fold_0"
    fold.mkdir(parents=True)
    malicious_checkpoint(fold / checkpoint.LAST, marker)
    with pytest.raises(checkpoint.CheckpointError, match="refused to load .*not a safe kd_fracture checkpoint"):
        checkpoint.load_state(fold / checkpoint.LAST)
    rc, err = run_cv(capsys, over, "--fold", "0")
    assert rc == 0, err
    assert "refused to load" in err and "restarting fold 0 from scratch" in err
    assert not marker.exists()
    assert (fold / "DONE").exists()


def test_malicious_pickle_as_weights_is_refused(over, tmp_path, capsys):
    marker = tmp_path / "pwned"
    fake = malicious_checkpoint(tmp_path / checkpoint.BEST, marker)  # pickle bytes under a .safetensors name
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors checkpoint"):
        checkpoint.load_weights(torch.nn.Linear(1, 1), fake)
    evil = malicious_checkpoint(tmp_path / "resnet10t.pth", marker)
    msg = error_line(*run_cv(capsys, dict(over, **{"model.name": "resnet10t", "model.pretrained": evil})))
    assert f"--pretrained {evil}: cannot read weights" in msg and "weights_only" in msg
    assert not marker.exists()
    assert_nothing_written(over)


def test_every_torch_load_in_the_package_is_weights_only():
    """No pickle with code can enter through the package: torch.load always passes weights_only=True, and nothing
    calls pickle.load(s) or np.load(allow_pickle=True)."""
    offenders, loads = [], 0
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            call = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if call == "torch.load":
                loads += 1
                if kw.get("weights_only") != "True":
                    offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
            if call in ("pickle.load", "pickle.loads", "torch.serialization.load") or kw.get("allow_pickle") == "True":
                offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert loads >= 1 and not offenders, offenders
