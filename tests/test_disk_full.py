"""Issue 15 item 4: a full disk is one line naming the path, the bytes needed and free, and what to do — never a
traceback, never a half-written file — and a rerun after freeing space resumes with identical tables.

The unit tests translate the errors writers raise on a full disk (OSError ENOSPC/EDQUOT, torch.save's "unexpected
pos", safetensors' "No space left on device") without a disk. The others mount a small tmpfs (root or
CAP_SYS_ADMIN; skipped with the reason otherwise) and fill it for real: through `io`, through the checkpoint
writers, and through a tiny `cv` whose run directory cannot hold a checkpoint.
"""
from __future__ import annotations

import errno
import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kd_fracture import cv, io
from kd_fracture.errors import UserError
from kd_fracture.train import checkpoint


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of io.atomic_path (`.<name>.<random>.tmp<suffix>`) anywhere under `folder`."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def assert_one_line(e: BaseException, path: Path) -> str:
    text = str(e)
    assert isinstance(e, io.DiskFullError) and isinstance(e, UserError)
    assert "\n" not in text and text.startswith(f"{path}: disk full"), text
    assert "bytes" in text and " free on " in text and "point --out at a bigger disk" in text, text
    return text


# ---------------------------------------------------------------------------------------------------- no disk needed


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456"),
    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # SafetensorError
], ids=["ENOSPC", "EDQUOT", "torch-unexpected-pos", "torch-write-failed", "safetensors"])
def test_disk_full_errors_become_one_line(tmp_path, raised):
    target = tmp_path / "state_last.pt"
    target.write_bytes(b"old")
    with pytest.raises(io.DiskFullError) as info:
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise raised
    assert_one_line(info.value, target)
    assert "more than 7 bytes" in str(info.value)  # size unknown to the writer: what got written before it failed
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_other_errors_pass_through(tmp_path):
    """Only a full disk is translated: a permission error or a bug keeps its own type."""
    for raised in (OSError(errno.EACCES, "Permission denied"), RuntimeError("unexpected key 'fc.weight'")):
        with pytest.raises(type(raised)):
            with io.atomic_path(tmp_path / "x.json") as tmp:
                tmp.write_bytes(b"{}")
                raise raised
    assert leftovers(tmp_path) == []


def test_known_size_is_checked_before_writing(tmp_path, monkeypatch):
    """write_bytes knows its size: with too little free space nothing is created, and the message states needed and
    free bytes."""
    monkeypatch.setattr(io, "free_bytes", lambda folder: 1000)
    target = tmp_path / "table.csv"
    with pytest.raises(io.DiskFullError) as info:
        io.write_text(target, "x" * 5000)
    text = assert_one_line(info.value, target)
    assert f"needs {5000 + io._WRITE_SLACK:,} bytes" in text and "1,000 bytes (0.0 MB) free" in text, text
    assert not target.exists() and leftovers(tmp_path) == []


def test_checkpoint_writers_announce_their_size(tmp_path, monkeypatch):
    """save_weights/save_state pass the state's tensor bytes, so the check happens before torch/safetensors write."""
    model = nn.Linear(100, 100)  # 40,400 bytes of fp32
    seen = []
    real = io.check_free
    monkeypatch.setattr(io, "check_free", lambda path, n: (seen.append((Path(path).name, n)), real(path, n))[1])
    checkpoint.save_weights(model, tmp_path / checkpoint.BEST)
    checkpoint.save_state(tmp_path / checkpoint.LAST, {"model": model.state_dict(), "epoch": 1,
                                                       "optimizer": {"state": {0: {"m": torch.zeros(10)}}}})
    assert (checkpoint.BEST, 40_400) in seen and (checkpoint.LAST, 40_440) in seen


# ---------------------------------------------------------------------------------------------------- a real tmpfs


@pytest.fixture
def small_tmpfs(tmp_path, request):
    """mount(size) → a fresh tmpfs of that size under tmp_path, unmounted at teardown; skips when mounting is not
    permitted (not root, no CAP_SYS_ADMIN, inside an unprivileged container)."""
    mounted = []

    def mount(size: str, name: str = "small") -> Path:
        where = tmp_path / name
        where.mkdir(exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no `mount` command here, so the disk-full tests cannot make a small filesystem")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs ({(r.stderr or r.stdout).strip() or 'mount failed'}): the disk-full "
                        "tests need root or CAP_SYS_ADMIN")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, size: str) -> None:
    """Grow a tmpfs in place: the 'freed space' of the rerun."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)


def test_io_write_on_a_full_tmpfs(small_tmpfs):
    disk = small_tmpfs("2m")
    target = disk / "sub" / "big.bin"
    io.write_bytes(target, b"o" * 100_000)
    with pytest.raises(io.DiskFullError) as info:  # refused up front: the size is known
        io.write_bytes(target, b"n" * 3_000_000)
    text = assert_one_line(info.value, target)
    assert f"on {disk}" in text, text
    with pytest.raises(io.DiskFullError) as info:  # size unknown: the real ENOSPC mid-write is translated
        with io.atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                for _ in range(30):
                    f.write(b"n" * 100_000)
    assert_one_line(info.value, target)
    assert target.read_bytes() == b"o" * 100_000 and leftovers(disk) == []
    assert shutil.disk_usage(disk).free > 1_500_000  # the temporary file's blocks were given back


def test_a_disk_with_no_byte_left(small_tmpfs):
    """Filled to the last block: the run lock is still taken (its holder note is optional) and the first write is
    the one-line error, not an OSError from the lock file."""
    disk = small_tmpfs("1m")
    with pytest.raises(OSError) as info, open(disk / "filler", "wb") as f:
        while True:
            f.write(b"x" * 65536)
            f.flush()
    assert info.value.errno == errno.ENOSPC
    with io.flock(disk / "run" / ".lock"):
        with pytest.raises(io.DiskFullError) as full:
            io.write_json(disk / "run" / "env.json", {"a": 1})
        assert_one_line(full.value, disk / "run" / "env.json")
    assert leftovers(disk) == []


def test_torch_save_on_a_full_tmpfs(small_tmpfs):
    """torch.save and safetensors hide ENOSPC in their own errors; both are translated, also without a size hint."""
    disk = small_tmpfs("1m")
    state = {"w": torch.zeros(600_000)}  # 2.4 MB
    with pytest.raises(io.DiskFullError):
        with io.atomic_path(disk / "state.pt") as tmp:
            torch.save(state, tmp)
    from safetensors.torch import save_file
    with pytest.raises(io.DiskFullError):
        with io.atomic_path(disk / "w.safetensors") as tmp:
            save_file(state, str(tmp))
    assert list(disk.iterdir()) == []


def test_checkpoints_too_big_for_the_disk(small_tmpfs):
    disk = small_tmpfs("2m")
    model = nn.Linear(1000, 1000)  # 4 MB of weights
    for save in (lambda p: checkpoint.save_weights(model, p / checkpoint.BEST),
                 lambda p: checkpoint.save_state(p / checkpoint.LAST, {"model": model.state_dict(), "epoch": 0})):
        with pytest.raises(io.DiskFullError) as info:
            save(disk / "fold_0")
        assert_one_line(info.value, info.value.path)
        assert info.value.path.parent == disk / "fold_0" and info.value.needed > 4_000_000
    assert [p for p in (disk / "fold_0").iterdir()] == []  # no checkpoint, no sidecar, no temp file


def test_cv_on_a_full_disk_then_resumes(small_tmpfs, tiny_cv_overrides, tmp_path, capsys):
    """A tiny cv whose run dir cannot hold a checkpoint: one `error:` line about the disk, exit code 2, nothing
    half-written. After the disk grows, the same command finishes, with tables equal to an uninterrupted run's."""
    threads = torch.get_num_threads()
    try:
        over = dict(tiny_cv_overrides, **{"train.threads": 1})
        ref = dict(over, run_dir=str(tmp_path / "ref"))
        args = [a for k, v in ref.items() for a in ("--set", f"{k}={v}")]
        assert cv.main(args) == 0
        capsys.readouterr()

        disk = small_tmpfs("4m")  # resnet10t weights are ≈ 20 MB
        over["run_dir"] = str(disk / "run")
        args = [a for k, v in over.items() for a in ("--set", f"{k}={v}")]
        rc = cv.main(args)
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        last = err.rstrip().splitlines()[-1]
        assert last.startswith(f"error: {disk / 'run'}") and "disk full" in last and f"on {disk};" in last, err
        assert leftovers(disk) == []

        remount(disk, "400m")
        assert cv.main(args) == 0, capsys.readouterr().err
        assert leftovers(disk) == []
    finally:
        torch.set_num_threads(threads)
    tables = sorted(p.name for p in (Path(ref["run_dir"]) / "tables").glob("*.csv"))
    assert tables
    match, mismatch, errors = filecmp.cmpfiles(Path(ref["run_dir"]) / "tables", disk / "run" / "tables", tables,
                                               shallow=False)
    assert mismatch == [] and errors == [], (mismatch, errors)
    assert os.path.ismount(disk)
