"""`python -m kd_fracture.tensorboard`: TensorBoard over a runs root, offline, on 127.0.0.1 (issue #26).

    python -m kd_fracture.tensorboard                          # runs/ at http://127.0.0.1:6006/
    python -m kd_fracture.tensorboard --logdir runs/mura --port 6007

Every fit writes its event stream into its own `tb/` (track.tensorboard), so each fold, trial and final student is
one run in TensorBoard, named by its path under the logdir. Bound to 127.0.0.1 unless --host says otherwise, like
the Optuna dashboard; a busy port is one line; Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from kd_fracture.cli.common import exposure_warning, new_parser
from kd_fracture.errors import UserError, cli_main

DEFAULT_PORT = 6006


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("tensorboard", __doc__)
    p.add_argument("--logdir", default="runs", metavar="DIR", help="runs root to show; default: %(default)s")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; default: %(default)s")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    return p


def check_port(host: str, port: int) -> None:
    """UserError naming host:port when it cannot be bound (busy, or not an address of this machine)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: choose a port between 1 and 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port} ({e.strerror or e}); choose another --port/--host") from None


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logdir = Path(args.logdir)
    if not logdir.is_dir():
        raise UserError(f"--logdir {logdir}: folder not found; train something first (python -m kd_fracture.cv)")
    try:
        from tensorboard import program
    except ImportError:
        raise UserError("TensorBoard is not installed: pip install tensorboard") from None
    check_port(args.host, args.port)
    warning = exposure_warning(args.host, "TensorBoard", "every run's curves and hyper-parameters become")
    if warning:
        print(warning, file=sys.stderr)
    runs = sorted({p.parent.relative_to(logdir).as_posix() for p in logdir.rglob("events.out.tfevents.*")})
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", args.host, "--port", str(args.port),
                          "--load_fast", "false"])
    print(f"TensorBoard for {logdir}/ ({len(runs)} event streams) at http://{args.host}:{args.port}/  "
          "(Ctrl-C stops it)", flush=True)
    board.main()
    return 0
