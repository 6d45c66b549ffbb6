"""`python -m kd_fracture.app --run RUN`: a local, offline web app to try a run's models on a few radiographs.

    python -m kd_fracture.app --run runs/phantom/resnet50                 # http://127.0.0.1:7860/
    python -m kd_fracture.app --run runs/phantom/resnet50 --port 8000 --max-upload-mb 50
    python -m kd_fracture.app --run runs/phantom/resnet50 --host 0.0.0.0  # reachable from other machines (warns)

Predict tab: upload the images of one study; the teacher fold ensemble (with its spread over the folds) and, when
the run has a distilled student, the student give each image's probability, the study-level decision at the run's
threshold, a Grad-CAM overlay (with the gradcam extra) and their latency. Runs tab: the runs under the runs root
with their headline numbers and report.html pages. The page loads nothing from the network.
Research model, not a diagnostic device. Needs the app extra: pip install 'kd_fracture[app]'.

Bound to 127.0.0.1 unless --host says otherwise: the app has no authentication, so from another machine prefer an
SSH tunnel (`ssh -L 7860:127.0.0.1:7860 HOST`) over --host 0.0.0.0.
"""
from __future__ import annotations

import argparse
import sys

from kd_fracture import extras
from kd_fracture.cli.common import exposure_warning, new_parser
from kd_fracture.errors import UserError, cli_main

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_MEGAPIXELS = 64.0


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("app", __doc__)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory of `python -m kd_fracture.cv` "
                   "whose teachers (and distilled student, if any) the app serves")
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind; anything but loopback exposes the app; "
                   "default: %(default)s")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help="largest request body (all files of one upload); larger → 413; default: %(default)s")
    p.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS, metavar="MP",
                   help="an image whose header says more pixels is refused before decoding; default: %(default)s")
    p.add_argument("--runs-root", metavar="DIR", help="folder whose runs the Runs tab lists and whose report.html "
                   "pages it serves (default: the parent of the parent of --run, e.g. runs/)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the run's train.device)")
    p.add_argument("--no-student", action="store_true", help="serve the teachers only, even if the run has a "
                   "distilled student")
    return p


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise UserError("--max-upload-mb and --max-megapixels must be positive")
    for module in ("fastapi", "uvicorn", "multipart"):
        if extras.optional(module, "app", "the web app", log=False) is None:
            raise UserError(f"the web app needs {module.replace('multipart', 'python-multipart')}: "
                            "pip install 'kd_fracture[app]'")
    warning = exposure_warning(args.host, "the app", "the models, uploads and the runs' reports become")
    if warning:
        print(warning, file=sys.stderr)
    import uvicorn

    from kd_fracture.app.server import create_app

    app = create_app(args.run, int(args.max_upload_mb * 2**20), device=args.device, runs_root=args.runs_root,
                     max_pixels=int(args.max_megapixels * 1e6), student=not args.no_student)
    state = app.state.kd
    models = "; ".join(m.description for m in state.models.values())
    print(f"kd_fracture app: {models} on {state.device} (loaded in {state.load_s:.1f} s) at "
          f"{url_for(args.host, args.port)}  (Ctrl-C stops it)", flush=True)
    for note in state.notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except OSError as e:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({e.strerror or e}); choose another --port/--host"
                        ) from None
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        if e.code:
            raise UserError(f"cannot serve on {args.host}:{args.port}; choose another --port/--host") from None
    return 0
