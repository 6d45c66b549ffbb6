"""`python -m kd_fracture.folds`: patient-grouped CV folds — the command lives in kd_fracture.cli.folds."""
from kd_fracture.cli.folds import main

if __name__ == "__main__":
    raise SystemExit(main())
