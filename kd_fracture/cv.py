"""`python -m kd_fracture.cv`: K-fold teacher cross-validation — the command lives in kd_fracture.cli.cv."""
from kd_fracture.cli.cv import main

if __name__ == "__main__":
    raise SystemExit(main())
