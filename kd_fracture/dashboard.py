"""`python -m kd_fracture.dashboard`: optuna-dashboard for a distill study — the command lives in kd_fracture.cli.dashboard."""
from kd_fracture.cli.dashboard import main

if __name__ == "__main__":
    raise SystemExit(main())
