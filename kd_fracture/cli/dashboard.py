"""`python -m kd_fracture.dashboard`: optuna-dashboard (live trials, history, importances) for the distill study.

    python -m kd_fracture.dashboard                                   # the default study, http://127.0.0.1:8080/
    python -m kd_fracture.dashboard --storage journal:kd.journal --port 8081
    python -m kd_fracture.dashboard --host 0.0.0.0                    # reachable from other machines (warns)

Bound to 127.0.0.1 unless --host says otherwise: the dashboard has no authentication and can edit notes and mark
trials, so from another machine prefer an SSH tunnel (`ssh -L 8080:127.0.0.1:8080 HOST`) over --host 0.0.0.0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_fracture.cli.common import exposure_warning, new_parser
from kd_fracture.config import DistillConfig
from kd_fracture.errors import UserError, cli_main
from kd_fracture.pipelines.distill import resolve_names
from kd_fracture.search import DASHBOARD_PORT, redact, storage_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = DASHBOARD_PORT


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("dashboard", __doc__)
    p.add_argument("--run", default=DistillConfig().teacher_run, metavar="DIR",
                   help="teacher run whose study database (distill's default storage) to show; default: %(default)s")
    p.add_argument("--storage", metavar="URL", help="sqlite:///F.db | postgresql://… | mysql://… | journal:PATH "
                   "(the distill --storage; default: the --run's study database)")
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind; anything but loopback exposes the study; "
                   "default: %(default)s")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    return p


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/dashboard/"


def open_storage(url: str):
    """A storage object optuna-dashboard can read; a missing default SQLite file is an error, not a new empty db."""
    import optuna

    url = storage_url(url, "")
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.is_file():
            raise UserError(f"--storage {url}: no journal file {path}; run python -m kd_fracture.distill first")
        journal = optuna.storages.journal
        backend = (journal.JournalFileBackend(str(path)) if hasattr(journal, "JournalFileBackend")
                   else optuna.storages.JournalFileStorage(str(path)))
        return optuna.storages.JournalStorage(backend)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):]).expanduser()
        if not path.is_file():
            raise UserError(f"--storage {url}: no study database at {path}; run python -m kd_fracture.distill first "
                            "(or pass the --storage it used)")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 — sqlalchemy/driver errors share no base class
        raise UserError(f"--storage {redact(url)}: cannot open ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]})") from None


def default_storage(run: str) -> str:
    """distill's default database for the teacher run: sqlite:///<run>/distill/<study>.db of the default student,
    else the run's only study database; several → the user picks one with --storage."""
    default = resolve_names(DistillConfig(teacher_run=run)).search.storage
    found = sorted((Path(run) / "distill").glob("*.db"))
    if Path(default[len("sqlite:///"):]).is_file() or not found:
        return default
    if len(found) > 1:
        raise UserError(f"{Path(run) / 'distill'}: several study databases ({', '.join(p.name for p in found)}); "
                        "choose one with --storage sqlite:///PATH")
    return f"sqlite:///{found[0]}"


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.storage is None:
        args.storage = default_storage(args.run)
    storage = open_storage(args.storage)
    warning = exposure_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    from optuna_dashboard import run_server

    print(f"optuna-dashboard for {redact(args.storage)} at {url_for(args.host, args.port)}  (Ctrl-C stops it)",
          flush=True)
    try:
        run_server(storage, host=args.host, port=args.port)
    except OSError as e:  # port in use, host not assignable
        raise UserError(f"cannot serve on {args.host}:{args.port} ({e.strerror or e}); choose another --port/--host"
                        ) from None
    return 0

